"""Hierarchical labels in the output: the ImageFolder tree, per-image label files in all four
formats, level columns in the manifests and Parquet, the class-index map and the card."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from builder.card import hierarchy_markdown
from builder.pipeline import run_local
from builder.records import Candidate, Record, accepted_row
from builder.errors import SpecError
from builder.spec import parse_spec
from fsspec.implementations.local import LocalFileSystem

from builder.journal import Journal
from builder.writers import DatasetPublisher, LabelManifests, ShardWriter, read_dataset

FORMATS = ["txt", "json", "csv", "yaml"]
SPEC = {
    "name": "tree",
    "sources": [{"engine": "sandbox", "url": "http://127.0.0.1:1"}],
    "classes": {"cat": None},
    "categories": {
        "animals": {"mammals": {"dog": None, "red_fox": None}, "birds": {"eagle": None}},
        "plants": {"rose": None},
    },
    "output": {"formats": ["parquet", "imagefolder"], "image_label_files": FORMATS},
}
SPLITS = ("train", "train", "validation", "test")


def _jpeg(seed: int) -> bytes:
    img = Image.new("RGB", (20 + seed % 5, 18), ((seed * 41) % 256, (seed * 7) % 256, 99))
    img.putpixel((seed % 18, 3), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def make_rows(labels: list[str], per_label: int = 3) -> list[dict]:
    """Accepted rows over ``labels``; every third has no license, one has a tab in it."""
    rows = []
    for i in range(len(labels) * per_label):
        label = labels[i % len(labels)]
        data = _jpeg(i)
        license_ = "" if i % 3 == 0 else ("cc by\t4.0" if i == 1 else "cc-by-sa")
        cand = Candidate(url=f"http://127.0.0.1/img/{i}.jpg", label=label, engine="sandbox",
                         page_url=f"http://127.0.0.1/page/{i}", license=license_,
                         author=f"author {i}")
        rec = Record(candidate=cand, data=data, format="jpeg", width=20 + i % 5, height=18,
                     sha256=hashlib.sha256(data).hexdigest(), split=SPLITS[i % 4])
        rows.append(accepted_row(rec))
    return rows


def write_dataset(spec, out, rows, labels, job_id: str = "job1") -> list[dict]:
    """Shards of ``rows`` (7, then the rest, per split) and the publish; the manifest."""
    writer = ShardWriter(spec.output, str(out), labels)
    journal = Journal(str(out), job_id)
    manifest = []
    for number, part in enumerate((rows[:7], rows[7:])):
        for split in sorted({r["split"] for r in part}):
            manifest += writer.write([r for r in part if r["split"] == split], split, number,
                                     journal).to_pylist()
    stats = {"accepted": len(rows), "rejected": 0, "candidates": len(rows), "classes": {
        label: {"target": 5, "accepted": 3, "candidates": 4, "rejected": 1, "shortfall": 2}
        for label in spec.labels}}
    DatasetPublisher(spec.output, str(out), job_id, labels=labels).publish(
        manifest_rows=iter(manifest), reject_tables=[], stats=stats, spec_name=spec.name,
        description="", spec_yaml="name: tree\n")
    journal.remove()
    return manifest


@pytest.fixture(params=["flat", "nested"])
def published(tmp_path, request):
    spec = parse_spec({**SPEC, "output": {**SPEC["output"],
                                          "imagefolder_labels": request.param}})
    out = tmp_path / "ds"
    rows = make_rows(spec.labels)
    manifest = write_dataset(spec, out, rows, spec.labels)
    return spec, out, rows, manifest


def test_the_imagefolder_tree_names_each_class_by_its_full_path(published):
    """flat (the default): one folder per class, its levels joined by '__', so readers that
    take folder names as classes read the full label; nested: the tree mirrors the levels."""
    spec, out, rows, manifest = published
    nested = spec.output.imagefolder_labels == "nested"
    root = out / "imagefolder"
    images = sorted(p.relative_to(root) for p in root.rglob("*.jpg"))
    assert len(images) == len(rows)
    folders = set()
    for rel in images:
        split, *levels, _ = rel.parts
        assert split in SPLITS
        folders.add("/".join(levels))
    if nested:
        assert folders == set(spec.labels)
        assert (out / "imagefolder/train/animals/mammals/red_fox").is_dir()
    else:
        assert folders == {label.replace("/", "__") for label in spec.labels}
        assert (out / "imagefolder/train/animals__mammals__red_fox").is_dir()
    assert {m["path"] for m in manifest} == {f"imagefolder/{p}" for p in map(str, images)}


def test_flat_folder_names_that_collide_are_refused():
    with pytest.raises(SpecError, match="both make the ImageFolder folder 'a__b__c'"):
        parse_spec({**SPEC, "classes": {"a__b/c": None, "a/b__c": None}})
    parse_spec({**SPEC, "classes": {"a__b/c": None, "a/b__c": None},
                "output": {**SPEC["output"], "imagefolder_labels": "nested"}})


def test_every_image_has_a_label_file_in_each_format(published):
    spec, out, rows, manifest = published
    classes = json.loads((out / "classes.json").read_text())
    by_id = {r["id"]: r for r in rows}
    for m in manifest:
        image = out / m["path"]
        stem = image.with_suffix("")
        row = by_id[m["id"]]
        want_index = classes[row["label"]]

        as_json = json.loads(stem.with_suffix(".json").read_text())
        as_yaml = yaml.safe_load(stem.with_suffix(".yaml").read_text())
        for got in (as_json, as_yaml):
            assert got == {
                "id": row["id"], "label": row["label"], "levels": row["label"].split("/"),
                "class_index": want_index, "split": row["split"], "url": row["url"],
                "page_url": row["page_url"], "license": row["license"],
                "author": row["author"], "width": row["width"], "height": row["height"],
                "image": image.name}

        [header, values] = list(csv.reader(io.StringIO(stem.with_suffix(".csv").read_text())))
        assert header == ["id", "label", "level_0", "level_1", "level_2", "class_index",
                          "split", "url", "page_url", "license", "author", "width", "height",
                          "image"]
        got = dict(zip(header, values))
        levels = row["label"].split("/") + [""] * (3 - len(row["label"].split("/")))
        assert [got["level_0"], got["level_1"], got["level_2"]] == levels
        assert (got["label"], int(got["class_index"]), got["url"], got["license"]) == \
            (row["label"], want_index, row["url"], row["license"])

        txt = stem.with_suffix(".txt").read_text()
        assert txt.endswith("\n") and txt.count("\n") == 1
        assert txt[:-1].split("\t") == [row["label"], str(want_index), row["url"],
                                        row["license"].replace("\t", " ")]
    assert {by_id[m["id"]]["license"] for m in manifest} == {"", "cc-by-sa", "cc by\t4.0"}


def test_label_files_are_counted_in_success_and_only_beside_images(published):
    _, out, rows, _ = published
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["counts"]["imagefolder_files"] == len(rows) * 5
    under = [p for p in (out / "imagefolder").rglob("*") if p.is_file()]
    assert len(under) == len(rows) * 5
    stems = {p.with_suffix("") for p in under}
    assert len(stems) == len(rows)
    assert {p.suffix[1:] for p in under} == {"jpg", *FORMATS}


def test_manifests_carry_level_columns(published):
    spec, out, rows, _ = published
    classes = json.loads((out / "classes.json").read_text())
    as_json = json.loads((out / "labels.json").read_text())
    as_yaml = yaml.safe_load((out / "labels.yaml").read_text())
    text = (out / "labels.csv").read_text()
    assert text.splitlines()[0] == "id,path,label,label_index,split,level_0,level_1,level_2"
    as_csv = list(csv.DictReader(io.StringIO(text)))
    for entries in (as_json, as_yaml, as_csv):
        assert len(entries) == len(rows)
        for e in entries:
            levels = e["label"].split("/")
            assert [e[f"level_{i}"] for i in range(3)] == levels + [""] * (3 - len(levels))
            assert int(e["label_index"]) == classes[e["label"]]
    assert {e["level_0"] for e in as_json} == {"animals", "cat", "plants"}


def test_class_index_map_is_sorted_and_stable(published, tmp_path):
    spec, out, rows, _ = published
    assert json.loads((out / "classes.json").read_text()) == {
        label: i for i, label in enumerate(sorted(spec.labels))}
    assert (out / "classes.txt").read_text().splitlines() == sorted(spec.labels)
    # Another run, rows and labels in another order: the same map and the same files.
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    other = tmp_path / "other"
    write_dataset(spec, other, shuffled, list(reversed(spec.labels)), "job2")
    for rel in ("classes.json", "classes.txt"):
        assert (other / rel).read_bytes() == (out / rel).read_bytes(), rel
    for rel in ("labels.json", "labels.yaml"):
        assert sorted(json.dumps(e, sort_keys=True) for e in yaml.safe_load(
            (other / rel).read_text())) == sorted(
            json.dumps(e, sort_keys=True) for e in yaml.safe_load((out / rel).read_text()))
    for p in (out / "imagefolder").rglob("*"):
        if p.is_file():
            assert (other / p.relative_to(out)).read_bytes() == p.read_bytes()


def test_parquet_keeps_the_full_path_and_each_level(published):
    _, out, rows, _ = published
    table = read_dataset(str(out))
    assert table.num_rows == len(rows)
    for r in table.select(["label_name", "label_levels"]).to_pylist():
        assert r["label_levels"] == r["label_name"].split("/")
    shard = next((out / "data").glob("*.parquet"))
    column = pq.ParquetFile(shard).metadata.row_group(0).column(3)
    assert column.path_in_schema == "label_levels.list.element"
    assert column.compression == "ZSTD"


def test_the_card_shows_the_hierarchy_with_counts(published):
    _, out, _, _ = published
    card = (out / "README.md").read_text()
    tree = card.split("## Class hierarchy\n\n", 1)[1].split("\n\n", 1)[0]
    assert tree.splitlines() == [
        "- `animals` (3 classes): 9 accepted of 15",
        "  - `birds` (1 class): 3 accepted of 5",
        "    - `eagle`: 3 accepted of 5",
        "  - `mammals` (2 classes): 6 accepted of 10",
        "    - `dog`: 3 accepted of 5",
        "    - `red_fox`: 3 accepted of 5",
        "- `cat`: 3 accepted of 5",
        "- `plants` (1 class): 3 accepted of 5",
        "  - `rose`: 3 accepted of 5",
    ]
    assert "`{id}.txt`" in card and "`{id}.yaml`" in card and "level_0" in card


def test_hierarchy_without_stats_lists_names_only():
    assert hierarchy_markdown(["a/b", "a/c/d"], {}).splitlines() == [
        "- `a` (2 classes)", "  - `b`", "  - `c` (1 class)", "    - `d`"]


def test_no_label_files_unless_asked(tmp_path):
    spec = parse_spec({**SPEC, "output": {"formats": ["imagefolder"]}})
    rows = [r for r in make_rows(spec.labels, per_label=1) if r["split"] == "train"]
    ShardWriter(spec.output, str(tmp_path / "ds"), spec.labels).write(
        rows, "train", 0, Journal(str(tmp_path / "ds"), "job1"))
    files = [p for p in (tmp_path / "ds" / "imagefolder").rglob("*") if p.is_file()]
    assert files and all(p.suffix == ".jpg" for p in files)


def test_a_nested_spec_runs_end_to_end(sandbox, tmp_path):
    """The job loop takes each leaf path as a class: queries default to the leaf names, which
    the sandbox web knows (cat, dog, bird); a parent's target is split over its leaves."""
    out = tmp_path / "ds"
    spec = parse_spec({
        "name": "nested", "target": 2,
        "categories": {"pets": {"target": 5, "cat": None, "dog": None},
                       "wild": {"birds": {"bird": None}}},
        "sources": [{"engine": "sandbox", "url": sandbox.base_url, "per_page": 12}],
        "download": {"timeout_s": 1.0, "retries": 1, "backoff_s": 0.05,
                     "max_bytes": 1_000_000, "allow_private_networks": True},
        "output": {"uri": str(out), "shard_size": 4, "formats": ["parquet", "imagefolder"],
                   "image_label_files": ["json", "txt"]},
        "resources": {"batch_size": 8},
    })
    result = run_local(spec)
    assert not result.partial
    stats = json.loads((out / "stats.json").read_text())
    assert {label: c["accepted"] for label, c in stats["classes"].items()} == {
        "pets/cat": 3, "pets/dog": 2, "wild/birds/bird": 2}
    classes = json.loads((out / "classes.json").read_text())
    infos = [json.loads(p.read_text()) for p in (out / "imagefolder").rglob("*.json")]
    assert len(infos) == 7
    for info in infos:
        assert info["class_index"] == classes[info["label"]]
        folder = Path(out / "imagefolder" / info["split"] / info["label"].replace("/", "__"))
        assert (folder / info["image"]).is_file() and (folder / f"{info['id']}.txt").is_file()
    assert sorted(pq.read_table(out / "data").column("label_levels").to_pylist()) == sorted(
        [["pets", "cat"]] * 3 + [["pets", "dog"]] * 2 + [["wild", "birds", "bird"]] * 2)


@pytest.mark.parametrize("loader", [yaml.SafeLoader, getattr(yaml, "CSafeLoader", yaml.SafeLoader)])
def test_the_yaml_manifest_reads_back_exactly_whatever_the_strings_hold(loader, tmp_path):
    """labels.yaml is one flow mapping a line; strings YAML reads specially (line separators,
    C1 controls, a BOM, quotes, YAML keywords, comment and indicator characters, astral
    characters) must come back as written."""
    nasty = ["cat", "yes", "null", "0123", "- dash", "a: b", "#hash", "  lead", 'q"uote',
             "back\\slash", "line\u2028sep", "para\u2029sep", "nel\x85", "c1\x9b", "bom\ufeff",
             "tab\tnew\nline", "emoji \U0001F408", "\u00e9t\u00e9/\u732b", "del\x7f", ""]
    labels = sorted(set(nasty))
    entries = [{"id": f"{i:064x}", "path": f"images/train/{s}/{i}.jpg", "label": s,
                "split": "train"} for i, s in enumerate(nasty)]
    root = str(tmp_path)
    with LabelManifests(LocalFileSystem(), root, ["yaml"], labels) as manifests:
        for e in entries:
            manifests.add(e)
    text = (tmp_path / "labels.yaml").read_bytes()
    assert len(text.decode("utf-8").splitlines()) == len(entries)
    back = yaml.load(text, Loader=loader)
    assert [{k: e[k] for k in ("id", "path", "label", "split")} for e in back] == entries
    assert [e["label_index"] for e in back] == [labels.index(e["label"]) for e in entries]
    with LabelManifests(LocalFileSystem(), str(tmp_path / "none"), ["yaml"], labels):
        pass
    assert yaml.load((tmp_path / "none" / "labels.yaml").read_bytes(), Loader=loader) == []
