"""One dataset built by the local runner against the sandbox web, read back with the tools people
load datasets with, exactly as the README's "Loading a dataset" section shows: pandas, pyarrow,
Hugging Face datasets (the Parquet shards, the card's configs, the ImageFolder tree), WebDataset,
a torch DataLoader and Ray Data. Two classes share the leaf name ``dog``; every reader must keep
them apart. datasets, webdataset (the test extra) and torch (the ml extra) are imported, not
skipped for: tests/run.sh installs both extras, so these tests run wherever the suite does."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds

from builder.pipeline import run_local
from tests.e2e.helpers import check_accounting, sandbox_spec

LABELS = ["mammals/cat", "mammals/dog", "toys/dog"]
FOLDERS = ["mammals__cat", "mammals__dog", "toys__dog"]
SHARD_SIZE = 8
TARGET = 12
SPLITS = {"train": 0.6, "validation": 0.2, "test": 0.2}
RAY_IMAGE_EXTENSIONS = ["jpg", "jpeg", "png", "gif", "webp"]
"""What the README tells Ray Data's read_images to take (its default leaves out webp)."""


@pytest.fixture(scope="module")
def built(sandbox, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("readback")
    out = str(tmp / "ds")
    spec = sandbox_spec(
        sandbox, out, target=TARGET, classes=(),
        categories={"mammals": {"cat": None, "dog": None}, "toys": {"dog": {"queries": "bird"}}},
        output={"shard_size": SHARD_SIZE, "splits": SPLITS},
        resources={"batch_size": 16, "workers": 1})  # shard sizes are exact per worker
    result = run_local(spec)
    assert not result.partial
    stats = check_accounting(out)
    assert {k: c["accepted"] for k, c in stats["classes"].items()} == dict.fromkeys(LABELS,
                                                                                      TARGET)
    return Path(out), tmp / "hf-cache"


def _shards(root: Path, split: str) -> list[Path]:
    return sorted((root / "data").glob(f"{split}-*.parquet"))


def test_the_class_map_is_the_sorted_label_paths(built):
    root, _ = built
    assert json.loads((root / "classes.json").read_text()) == {l: i for i, l in enumerate(LABELS)}


def test_pandas_and_pyarrow(built):
    root, _ = built
    frame = pd.read_parquet(root / "data")
    assert len(frame) == 3 * TARGET and frame["id"].is_unique
    assert sorted(Counter(frame["label_name"]).items()) == [(l, TARGET) for l in LABELS]
    assert all(LABELS[i] == name for i, name in zip(frame["label"], frame["label_name"]))
    assert set(frame["split"]) == set(SPLITS)
    first = frame.iloc[0]["image"]
    assert first["bytes"][:2] in (b"\xff\xd8", b"\x89P", b"GI", b"RI")
    assert first["path"].startswith(frame.iloc[0]["id"] + ".")
    table = pq.read_table(root / "data")
    assert table.num_rows == 3 * TARGET and b"huggingface" in table.schema.metadata


def test_shards_hold_exactly_shard_size_rows_classes_mixed(built):
    """One worker: every shard of a split but its last holds shard_size rows, and a
    shard mixes the classes of several units of work."""
    root, _ = built
    for split in SPLITS:
        sizes = [pq.read_metadata(p).num_rows for p in _shards(root, split)]
        assert sizes and all(n == SHARD_SIZE for n in sizes[:-1]), (split, sizes)
        assert 0 < sizes[-1] <= SHARD_SIZE
    train = [pq.read_table(p, columns=["label"])["label"].to_pylist()
             for p in _shards(root, "train")]
    assert len(train) >= 2
    assert all(len(set(labels)) >= 2 for labels in train[:-1]), train


def test_hugging_face_datasets_parquet_and_the_card(built):
    """load_dataset on the shards and on the dataset folder (its card's configs): the same
    splits, typed columns, no cast_column."""
    root, cache = built
    by_dir = datasets.load_dataset("parquet", data_dir=str(root / "data"), cache_dir=str(cache))
    by_card = datasets.load_dataset(str(root), cache_dir=str(cache))
    sizes = {split: sum(pq.read_metadata(p).num_rows for p in _shards(root, split))
             for split in SPLITS}
    for loaded in (by_dir, by_card):
        assert {split: len(loaded[split]) for split in loaded} == sizes
        train = loaded["train"]
        assert train.features["image"] == datasets.Image()
        assert train.features["label"] == datasets.ClassLabel(names=LABELS)
        row = train[0]
        assert row["image"].size == (row["width"], row["height"])
        assert train.features["label"].int2str(row["label"]) == row["label_name"]


def test_hugging_face_imagefolder_reads_the_full_label(built):
    root, cache = built
    loaded = datasets.load_dataset("imagefolder", data_dir=str(root / "imagefolder"),
                                   cache_dir=str(cache))
    assert set(loaded) == set(SPLITS)
    assert loaded["train"].features["label"] == datasets.ClassLabel(names=FOLDERS)
    counts: Counter = Counter()
    for split in loaded:
        names = loaded[split].features["label"].names
        counts.update(names[i] for i in loaded[split]["label"])
    assert counts == dict.fromkeys(FOLDERS, TARGET)


def test_the_imagefolder_top_level_is_one_folder_per_class(built):
    """torchvision's ImageFolder takes the folders right under the root it is given as the
    classes (sorted), and every image file below one as that class's."""
    root, _ = built
    for split in SPLITS:
        base = root / "imagefolder" / split
        assert sorted(p.name for p in base.iterdir() if p.is_dir()) == FOLDERS
        assert all(p.parent.parent == base for p in base.rglob("*") if p.is_file())


def test_webdataset_to_tuple_jpg_cls(built):
    root, _ = built
    tars = [str(p) for p in sorted((root / "webdataset").glob("*.tar"))]
    seen: Counter = Counter()
    dataset = wds.WebDataset(tars, shardshuffle=False).decode("pil").to_tuple("jpg", "cls",
                                                                              "json")
    for image, cls, meta in dataset:
        assert image.mode == "RGB" and image.size == (meta["width"], meta["height"])
        assert LABELS[cls] == meta["label"]
        seen[LABELS[cls]] += 1
    assert seen == dict.fromkeys(LABELS, TARGET)


def test_a_torch_dataloader_over_the_hugging_face_split(built):
    root, cache = built
    train = datasets.load_dataset("parquet", data_dir=str(root / "data"), cache_dir=str(cache),
                                  split="train")

    def collate(rows):
        pixels = [torch.tensor(list(r["image"].convert("RGB").resize((32, 32)).getdata()),
                               dtype=torch.uint8).view(32, 32, 3) for r in rows]
        return torch.stack(pixels), torch.tensor([r["label"] for r in rows])

    loader = torch.utils.data.DataLoader(train, batch_size=4, collate_fn=collate)
    n = 0
    for images, labels in loader:
        assert images.shape[1:] == (32, 32, 3) and labels.max() < len(LABELS)
        n += len(labels)
    assert n == len(train)


def test_ray_data_reads_every_format(ray_session, built):
    import ray.data

    root, _ = built
    parquet = ray.data.read_parquet(str(root / "data"))
    assert parquet.count() == 3 * TARGET
    assert sorted(parquet.unique("label_name")) == LABELS
    images = ray.data.read_images(str(root / "imagefolder"), mode="RGB",
                                  file_extensions=RAY_IMAGE_EXTENSIONS, include_paths=True)
    rows = images.take_all()
    assert len(rows) == 3 * TARGET
    assert Counter(r["path"].split("/")[-2] for r in rows) == dict.fromkeys(FOLDERS, TARGET)
    assert all(r["image"].ndim == 3 and r["image"].shape[2] == 3 for r in rows)
    samples = ray.data.read_webdataset(str(root / "webdataset")).take_all()
    assert len(samples) == 3 * TARGET
    assert all(s["jpg"].ndim == 3 and s["jpg"].shape[2] == 3 for s in samples)
    assert Counter(LABELS[s["cls"]] for s in samples) == dict.fromkeys(LABELS, TARGET)
