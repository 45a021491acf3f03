"""The job's journal in its output location, so an interrupted job can be resumed anywhere.

``<uri>/_journal/<job_id>/`` holds ``job.json`` (the spec and its fingerprint) and, for each
checkpoint, ``{seq:06d}-manifest.parquet`` (the manifest rows of the shards written since the
last checkpoint; the shards themselves are in ``<uri>/_staging/<job_id>/``) and
``{seq:06d}-rejects.parquet`` (the candidates rejected since). A candidate is *decided* once it is
in either. Everything lives on the output's filesystem (local or object storage), not on the
driver's disk, so ``--resume`` works from another machine of the cluster.

On resume, decided candidates are not fetched again; their counts, URLs and hashes seed the new
run's ledger, URL dedup and dedup index; shard numbers continue after the last one written.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from builder.errors import PixCrawlerError
from builder.records import Candidate, REJECT_SCHEMA
from builder.spec import DatasetSpec
from builder.storage import join, open_fs

JOURNAL = "_journal"
STAGING = "_staging"


class ResumeError(PixCrawlerError):
    """There is nothing (or nothing compatible) to resume."""


def spec_fingerprint(spec: DatasetSpec) -> str:
    """What must not change between a run and its resume: everything but resources/overwrite."""
    data = spec.model_dump(mode="json")
    data.pop("resources", None)
    data.get("output", {}).pop("overwrite", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ResumeState:
    """What a resumed run starts from."""

    job_id: str
    manifest: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    hashes: list[tuple[str, str, str, str]] = field(default_factory=list)
    next_shard: int = 0
    checkpoints: int = 0

    @property
    def decided_keys(self) -> set[str]:
        keys = {r["key"] for r in self.rejects}
        keys.update(Candidate(url=m["url"], label=m["label"]).key for m in self.manifest)
        return keys

    def decided_urls(self) -> list[tuple[str, str]]:
        """(url, key) of every decided candidate, for the URL dedup."""
        out = [(r["url"], r["key"]) for r in self.rejects]
        out += [(m["url"], Candidate(url=m["url"], label=m["label"]).key) for m in self.manifest]
        return out

    def counts(self) -> dict[str, dict[str, Any]]:
        """Per label: candidates, accepted, rejected by reason; and rejects by stage."""
        per: dict[str, dict[str, Any]] = {}
        for m in self.manifest:
            c = per.setdefault(m["label"], {"accepted": 0, "rejected": Counter()})
            c["accepted"] += 1
        for r in self.rejects:
            c = per.setdefault(r["label"], {"accepted": 0, "rejected": Counter()})
            c["rejected"][r["reason"]] += 1
        return per


class Journal:
    """Checkpoints of one job under ``<uri>/_journal/<job_id>/``."""

    def __init__(self, uri: str, job_id: str, storage_options: Optional[dict] = None):
        self.uri = uri
        self.job_id = job_id
        self.storage_options = storage_options
        self.fs, root = open_fs(uri, storage_options)
        self.root = f"{root.rstrip('/')}/{JOURNAL}/{job_id}"
        self.staging = f"{root.rstrip('/')}/{STAGING}/{job_id}"
        self.seq = 0

    def start(self, spec: DatasetSpec) -> None:
        path = f"{self.root}/job.json"
        self.fs.makedirs(self.root, exist_ok=True)
        if not self.fs.exists(path):
            meta = {"job_id": self.job_id, "fingerprint": spec_fingerprint(spec),
                    "started": time.time(), "spec": spec.model_dump(mode="json")}
            self.fs.pipe_file(path, json.dumps(meta, indent=2).encode())

    def checkpoint(self, manifest_rows: list[dict[str, Any]],
                   reject_rows: list[dict[str, Any]]) -> None:
        """Record newly written shards' manifest rows and newly decided rejects."""
        if not manifest_rows and not reject_rows:
            return
        self.seq += 1
        base = f"{self.root}/{self.seq:06d}"
        if reject_rows:
            self._write(f"{base}-rejects.parquet",
                        pa.Table.from_pylist(reject_rows, schema=REJECT_SCHEMA))
        if manifest_rows:
            self._write(f"{base}-manifest.parquet", pa.Table.from_pylist(manifest_rows))

    def _write(self, path: str, table: pa.Table) -> None:
        tmp = f"{path}.tmp"
        with self.fs.open(tmp, "wb") as f:
            pq.write_table(table, f)
        self.fs.mv(tmp, path)

    def _parts(self, suffix: str) -> list[str]:
        self.fs.invalidate_cache(self.root)
        if not self.fs.exists(self.root):
            return []
        return sorted(p for p in self.fs.ls(self.root, detail=False) if p.endswith(suffix))

    def _read_rows(self, suffix: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for path in self._parts(suffix):
            with self.fs.open(path, "rb") as f:
                rows.extend(pq.read_table(f).to_pylist())
        return rows

    def meta(self) -> dict[str, Any]:
        path = f"{self.root}/job.json"
        if not self.fs.exists(path):
            raise ResumeError(f"no journal for job {self.job_id} at {self.uri}")
        return json.loads(self.fs.cat_file(path))

    def load(self, spec: DatasetSpec) -> ResumeState:
        """The state to resume from; refuses if the spec changed in a way that matters."""
        meta = self.meta()
        if meta.get("fingerprint") != spec_fingerprint(spec):
            raise ResumeError(
                f"the spec differs from the one job {self.job_id} started with (only "
                "'resources' and 'output.overwrite' may change on resume); run it without "
                "--resume into a new output, or restore the spec (saved in "
                f"{self.uri}/{JOURNAL}/{self.job_id}/job.json)")
        state = ResumeState(self.job_id, self._read_rows("-manifest.parquet"),
                            self._read_rows("-rejects.parquet"))
        state.checkpoints = len(self._parts("-manifest.parquet")) + len(
            self._parts("-rejects.parquet"))
        self.seq = max([int(p.rsplit("/", 1)[-1][:6]) for p in self._parts(".parquet")] or [0])
        shards = {int(m["shard"]) for m in state.manifest}
        state.next_shard = max(shards) + 1 if shards else 0
        state.hashes = self._staged_hashes({m["id"] for m in state.manifest})
        return state

    def _staged_hashes(self, ids: set[str]) -> list[tuple[str, str, str, str]]:
        """(id, sha256, phash, dhash) of the accepted images already in staged shards."""
        out = []
        data = f"{self.staging}/data"
        self.fs.invalidate_cache(data)
        if not ids or not self.fs.exists(data):
            return out
        for path in sorted(self.fs.glob(f"{data}/*.parquet")):
            with self.fs.open(path, "rb") as f:
                t = pq.read_table(f, columns=["id", "sha256", "phash", "dhash"])
            out.extend((r["id"], r["sha256"], r["phash"] or "", r["dhash"] or "")
                       for r in t.to_pylist() if r["id"] in ids)
        return out

    def remove(self) -> None:
        self.fs.invalidate_cache(self.root)
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)
        parent = self.root.rsplit("/", 1)[0]
        try:
            if self.fs.exists(parent) and not self.fs.ls(parent):
                self.fs.rmdir(parent)
        except OSError:
            pass


def resumable_jobs(uri: str, storage_options: Optional[dict] = None) -> list[str]:
    """Job ids with a journal at ``uri`` (interrupted jobs that can be resumed)."""
    fs, root = open_fs(uri, storage_options)
    base = f"{root.rstrip('/')}/{JOURNAL}"
    fs.invalidate_cache(base)
    if not fs.exists(base):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)
                  if fs.exists(f"{p.rstrip('/')}/job.json"))


def journal_uri(uri: str, job_id: str) -> str:
    return join(uri, JOURNAL, job_id)


def remove_orphans(journal: Journal, state: ResumeState) -> int:
    """Remove staged files the journal does not know (a shard written, then killed before its
    checkpoint): they would duplicate images the resumed run accepts again. Returns how many."""
    fs, staging = journal.fs, journal.staging
    ids = {m["id"] for m in state.manifest}
    doomed = []
    for sub in ("data", "webdataset"):
        base = f"{staging}/{sub}"
        fs.invalidate_cache(base)
        if fs.exists(base):
            for path in fs.find(base):
                stem = path.rsplit("/", 1)[-1].split(".")[0]
                digits = stem.rsplit("-", 1)[-1]
                if digits.isdigit() and int(digits) >= state.next_shard:
                    doomed.append(path)
    base = f"{staging}/imagefolder"
    fs.invalidate_cache(base)
    if fs.exists(base):
        doomed += [p for p in fs.find(base) if p.rsplit("/", 1)[-1].split(".")[0] not in ids]
    if doomed:
        fs.rm(doomed)
    return len(doomed)


def load_published(uri: str, storage_options: Optional[dict] = None) -> ResumeState:
    """The state of a published dataset (complete or partial), read from its own files: the
    Parquet shards (ids, labels, URLs, hashes, shard numbers) and rejects.parquet. Needs the
    ``parquet`` output format."""
    from builder.writers import manifest_row, read_marker

    fs, root = open_fs(uri, storage_options)
    root = root.rstrip("/")
    marker = read_marker(uri, storage_options)
    if marker is None:
        raise ResumeError(f"{uri} holds no published dataset (_SUCCESS or _PARTIAL)")
    spec = published_spec(uri, storage_options)
    formats = set(spec.output.formats)
    state = ResumeState(str(marker.get("job_id", "")))
    shards: set[int] = set()
    cols = ["id", "label", "split", "format", "width", "height", "bytes", "sha256", "phash",
            "dhash", "url", "license", "author", "label_levels"]
    paths = sorted(fs.glob(f"{root}/data/*.parquet"))
    if not paths:
        if "parquet" not in formats:
            raise ResumeError(f"{uri} was written without the parquet format, which resuming "
                              "and retry-failed read their state from")
    for path in paths:
        shard = int(path.rsplit("-", 1)[-1].split(".")[0])
        shards.add(shard)
        with fs.open(path, "rb") as f:
            schema_names = pq.read_schema(f).names
            f.seek(0)
            t = pq.read_table(f, columns=[c for c in cols if c in schema_names])
        for row in t.to_pylist():
            state.manifest.append(manifest_row(row, shard, formats))
            state.hashes.append((row["id"], row["sha256"], row.get("phash") or "",
                                 row.get("dhash") or ""))
    rejects = f"{root}/rejects.parquet"
    if fs.exists(rejects):
        with fs.open(rejects, "rb") as f:
            state.rejects = pq.read_table(f).to_pylist()
    state.next_shard = max(shards) + 1 if shards else 0
    return state


def published_spec(uri: str, storage_options: Optional[dict] = None) -> DatasetSpec:
    """The spec a published dataset was built from (its ``spec.yaml``)."""
    from builder.spec import loads_spec

    fs, root = open_fs(uri, storage_options)
    path = f"{root.rstrip('/')}/spec.yaml"
    if not fs.exists(path):
        raise ResumeError(f"{uri} has no spec.yaml (written by PixCrawler 0.1+); pass the spec")
    return loads_spec(fs.cat_file(path).decode(), path)
