"""A nested spec against the sandbox web on Ray: label paths, the tree, per-image label files."""

from __future__ import annotations

import asyncio
import csv
import json

import pyarrow.parquet as pq
import yaml

from builder.spec import parse_spec
from tests.e2e.helpers import check_accounting


def test_nested_spec_labels_tree_and_label_files(ray_session, sandbox, tmp_path):
    from cluster.coordinator import run_job_async

    out = tmp_path / "nested"
    spec = parse_spec({
        "name": "nested",
        "categories": {"animals": {"target": 6, "mammals": {"cat": None, "dog": None}},
                       "birds": {"bird": {"target": 2}}},
        "sources": [{"engine": "sandbox", "url": sandbox.base_url, "per_page": 10}],
        "download": {"timeout_s": 1.0, "retries": 1, "allow_private_networks": True},
        "output": {"uri": str(out), "image_label_files": ["txt", "json", "csv", "yaml"],
                   "splits": {"train": 1.0}},
    })
    assert spec.labels == ["animals/mammals/cat", "animals/mammals/dog", "birds/bird"]
    assert [spec.target_of(x) for x in spec.labels] == [3, 3, 2]
    asyncio.run(run_job_async(spec))
    stats = check_accounting(str(out))
    assert {k: c["accepted"] for k, c in stats["classes"].items()} == {
        "animals/mammals/cat": 3, "animals/mammals/dog": 3, "birds/bird": 2}

    rows = pq.read_table(out / "data").to_pylist()
    assert {tuple(r["label_levels"]) for r in rows} == {
        ("animals", "mammals", "cat"), ("animals", "mammals", "dog"), ("birds", "bird")}
    classes = json.loads((out / "classes.json").read_text())
    assert classes == {"animals/mammals/cat": 0, "animals/mammals/dog": 1, "birds/bird": 2}
    for r in rows:
        r["label"] = r["label_name"]
        folder = out / "imagefolder" / "train" / r["label"].replace("/", "__")
        images = [p for p in folder.glob(f"{r['id']}.*")
                  if p.suffix[1:] not in ("txt", "json", "yaml", "csv")]
        assert len(images) == 1
        as_json = json.loads((folder / f"{r['id']}.json").read_text())
        as_yaml = yaml.safe_load((folder / f"{r['id']}.yaml").read_text())
        assert as_json["label"] == as_yaml["label"] == r["label"]
        assert as_json["class_index"] == classes[r["label"]] and as_json["url"] == r["url"]
        row = next(csv.DictReader((folder / f"{r['id']}.csv").open()))
        assert row["label"] == r["label"] and row["level_0"] == r["label_levels"][0]
        txt = (folder / f"{r['id']}.txt").read_text().rstrip("\n").split("\t")
        assert txt[0] == r["label"] and int(txt[1]) == classes[r["label"]] and txt[2] == r["url"]
    labels = list(csv.DictReader((out / "labels.csv").open()))
    assert {x["level_0"] for x in labels} == {"animals", "birds"}
    assert "Class hierarchy" in (out / "README.md").read_text()
