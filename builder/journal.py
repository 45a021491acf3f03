"""The job's journal, in its output location: what is decided and written, unit by unit.

``<uri>/_journal/<job_id>/`` holds:

* ``job.json``: the spec and its fingerprint (a resume must use the same spec);
* ``units/<uid>.parquet``: one file per *committed* unit, written when every image it accepted
  is in a committed shard: one row per candidate of the unit (``UNIT_SCHEMA``: the rejects
  manifest's columns, whether it was accepted, its URL and claim keys), and the unit's
  description and counts in the file's metadata. Writing it is the unit's commit;
* ``shards/<name>.intent.json``: the files a shard is about to write (so a crash mid-write
  leaves nothing unaccounted for), then ``shards/<name>.parquet``: the shard's commit, one row
  per image with its manifest entry and what the dedup index needs to rebuild (``SHARD_SCHEMA``).

Everything lives on the output's filesystem, so ``--resume`` works from any machine of the
cluster, and a restarted dedup partition rebuilds from here. Files appear atomically (a rename on
local disks; object stores publish an object only when its upload completes). Reading the
journal streams it in batches of files: memory stays flat however many units a job has.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from builder.errors import PixCrawlerError
from builder.records import REJECT_SCHEMA, with_columns
from builder.rights import RIGHTS_TYPE
from builder.spec import DatasetSpec, upgrade_saved_spec
from builder.storage import (atomic_write, cut_writes, delete_tree, flush_to_disk, join,
                             list_files, open_fs, storage_errors)
from builder.units import ClassTally, SearchOutcome, UnitReport, WorkUnit

JOURNAL = "_journal"
BASE = "base"
"""The journal's copy of the published figures a merge continues from (``Journal.keep_base``)."""

READ_FILES = 64
"""Journal files fetched per request when the journal is streamed: an object store fetches
them concurrently, and memory holds one such batch."""

TABLE_ROWS = 4_096
"""Rows per table when the journal is streamed (whole files, concatenated): what is done per
table (a filter, a Parquet write) is paid per batch of files, not per file. Publishing 8,000
units of 125 took the least CPU with batches of 2-4k rows (0.41 ms a unit, against 0.52 ms
with 64k), and its RSS rose by 28 MiB (64k: 113 MiB)."""

COMPRESSION = "snappy"
"""Of the journal's tables. zstd makes files 20% smaller, but its decoder costs about 25 µs
per column chunk to start, so a unit file's 11 reject columns took 0.43 ms to read, against
0.16 ms in snappy: and the publish step reads every unit file."""

UNIT_SCHEMA = pa.schema(list(REJECT_SCHEMA) + [
    pa.field("accepted", pa.bool_()),
    pa.field("image_id", pa.string()),
    pa.field("url_hash", pa.uint64()),
    pa.field("claim", pa.uint64()),
])
"""One row per candidate of a committed unit (``accepted`` rows have no stage or reason)."""

SHARD_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("uid", pa.string()),
    pa.field("claim", pa.uint64()),
    pa.field("label", pa.string()),
    pa.field("split", pa.string()),
    pa.field("path", pa.string()),
    pa.field("format", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("bytes", pa.int64()),
    pa.field("sha256", pa.string()),
    pa.field("url", pa.string()),
    pa.field("license", pa.string()),
    pa.field("author", pa.string()),
    pa.field("sig_a", pa.list_(pa.uint64())),
    pa.field("sig_b", pa.list_(pa.uint64())),
    pa.field("rights", RIGHTS_TYPE),
])
"""One row per image of a committed shard: its manifest entry, its stored signatures and its
rights ledger (journals written before the ledger was added lack it: nulls)."""

WRITTEN_COLUMNS = ["claim", "id", "sha256", "label", "url", "format", "width", "height", "bytes",
                   "rights"]
"""What a resent unit takes back of an image an earlier attempt of it wrote
(``Journal.unit_rows``)."""


class ResumeError(PixCrawlerError):
    """There is nothing (or nothing compatible) to resume."""


def spec_fingerprint(spec: DatasetSpec, *, legacy: bool = False, with_uri: bool = False) -> str:
    """What must not change between a run and its resume: everything but ``resources``,
    ``output.overwrite``, ``output.uri`` and the credentials in the servers' URLs (the spec as
    published, ``DatasetSpec.public_dump``: a password changed between runs changes no
    result). The journal and the dataset are found through the URI, so two spellings of one
    place (``ds`` and ``/home/me/ds``) are one job.

    ``legacy``: the fingerprint as journals written before credentials were masked hold it:
    with them, and without the fields added since (``ADDED_FIELDS``) where the spec leaves them
    at the value that does what those versions did. ``with_uri`` (legacy): as journals written
    before the URI was left out hold it."""
    if not legacy:
        return _fingerprint_of(spec.public_dump())
    data = spec.model_dump(mode="json")
    for section, name, default_in in ADDED_FIELDS:
        part = data.get(section)
        if isinstance(part, dict) and part.get(name) == default_in(part):
            data[section] = {k: v for k, v in part.items() if k != name}
    return _fingerprint_of(data, with_uri=with_uri)


def accepted_fingerprints(spec: DatasetSpec) -> set[str]:
    """The fingerprints a journal of ``spec``'s job may hold, this version's and earlier
    ones' (``_with_class_urls``: before the classes' image URLs were masked too)."""
    return {spec_fingerprint(spec), _fingerprint_of(_with_class_urls(spec)),
            spec_fingerprint(spec, legacy=True),
            spec_fingerprint(spec, legacy=True, with_uri=True)}


def _with_class_urls(spec: DatasetSpec) -> dict[str, Any]:
    """``spec.public_dump()`` as the versions that masked its servers' credentials, but not
    its classes' image URLs', wrote it."""
    data, full = spec.public_dump(), spec.model_dump(mode="json")
    for key in ("classes", "categories"):
        if key in full:
            data[key] = full[key]
    return data


ADDED_FIELDS: tuple[tuple[str, str, Callable[[dict[str, Any]], Any]], ...] = (
    ("download", "deadline_s", lambda download: max(120.0, download.get("timeout_s", 0.0))),)
"""Spec fields added since the first journals were written, each with its default (from its
section's other values): a journal written before a field existed never held it in its
fingerprint, and resumes where the spec leaves the field at its default."""


def _fingerprint_of(data: dict[str, Any], *, with_uri: bool = False) -> str:
    """``spec_fingerprint`` of a spec's JSON form (left as it is)."""
    left_out = {"overwrite"} if with_uri else {"overwrite", "uri"}
    kept = {key: value for key, value in data.items() if key != "resources"}
    if "output" in kept:
        kept["output"] = {k: v for k, v in kept["output"].items() if k not in left_out}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def _same_once_upgraded(stored: Any, spec: DatasetSpec) -> bool:
    """Whether a journal's spec is ``spec`` once read as this version reads a saved spec
    (``upgrade_saved_spec``): a field an earlier version accepted and this one refuses or
    spells otherwise was written into the fingerprint as it was, so a job started with one
    resumes with the spec as this version takes it."""
    upgraded, changes = upgrade_saved_spec(stored)
    return bool(changes) and _fingerprint_of(upgraded) in {
        spec_fingerprint(spec), _fingerprint_of(_with_class_urls(spec)),
        spec_fingerprint(spec, legacy=True)}


def splits_reordered(saved: Any, spec: DatasetSpec) -> Optional[str]:
    """Why a saved spec (its JSON form) and ``spec`` would put images in different splits
    although their fingerprints agree, or None: the split names in another order. An image's
    split is found on the fractions in the order they are listed (``assign_split``), which
    the fingerprint, JSON with its keys sorted, does not see."""
    try:
        old = [name for name, frac in saved["output"]["splits"].items() if frac > 0]
    except (KeyError, TypeError, AttributeError):
        return None
    new = [name for name, frac in spec.output.splits.items() if frac > 0]
    if old == new:
        return None
    return (f"output.splits lists {', '.join(new)} where the first run listed "
            f"{', '.join(old)}: the order decides which split each image lands in, so list "
            "them as the first run did")


def report_to_json(unit: WorkUnit, report: UnitReport) -> dict[str, Any]:
    return {
        "unit": unit.__dict__,
        "classes": {label: {"candidates": t.candidates, "accepted": t.accepted,
                            "rejected": dict(t.rejected), "unused": t.unused}
                    for label, t in report.classes.items()},
        "by_stage": dict(report.by_stage), "bytes": report.bytes,
        "search": _search_state(report.search) if report.search is not None else None,
        "skipped": dict(report.skipped),
        "relabelled": {f"{a}\t{b}": n for (a, b), n in report.relabelled.items()},
        "exhausted": report.exhausted, "decided_before": report.decided_before,
        "rights": report.rights.state() if report.rights is not None else None,
    }


def _search_state(outcome: SearchOutcome) -> dict[str, Any]:
    """``outcome``'s fields that differ from their defaults: a field added later (``refused``)
    then stays out of a journal that a version before it may resume."""
    return {f.name: getattr(outcome, f.name) for f in dataclasses.fields(outcome)
            if getattr(outcome, f.name) != f.default}


def report_from_json(data: dict[str, Any]) -> tuple[WorkUnit, UnitReport]:
    unit = WorkUnit(**data["unit"])
    report = UnitReport(unit.uid)
    for label, t in data.get("classes", {}).items():
        report.classes[label] = ClassTally(t["candidates"], t["accepted"],
                                           Counter(t["rejected"]), t.get("unused", 0))
    report.by_stage = Counter(data.get("by_stage") or {})
    report.bytes = int(data.get("bytes") or 0)
    if data.get("search") is not None:
        report.search = SearchOutcome(**data["search"])
    report.skipped = Counter(data.get("skipped") or {})
    report.relabelled = Counter({tuple(k.split("\t", 1)): n
                                 for k, n in (data.get("relabelled") or {}).items()})
    report.exhausted = bool(data.get("exhausted"))
    report.decided_before = int(data.get("decided_before") or 0)
    if data.get("rights") is not None:
        from builder.rights import RightsTally

        report.rights = RightsTally.from_state(data["rights"])
    return unit, report


def _read_table(data: bytes, schema: pa.Schema, columns: list[str]) -> pa.Table:
    """``columns`` of a journal file's bytes (``schema``: ``UNIT_SCHEMA`` or
    ``SHARD_SCHEMA``), without its metadata; one the file lacks (written before the column
    was added) comes as nulls."""
    table = pq.ParquetFile(pa.BufferReader(data)).read(columns=columns, use_threads=False)
    return with_columns(table.replace_schema_metadata(None), schema, columns)


@dataclass
class ResumeState:
    """What a resumed run starts from: the committed units (counts, and which work is done)
    and the next shard number of each split. Built by streaming the journal."""

    job_id: str
    done: set[str] = field(default_factory=set)
    reports: list[tuple[WorkUnit, UnitReport]] = field(default_factory=list)
    next_shard: dict[str, int] = field(default_factory=dict)

    @property
    def committed_units(self) -> int:
        return len(self.done)


class Journal:
    """The journal of one job under ``<uri>/_journal/<job_id>/``."""

    def __init__(self, uri: str, job_id: str, storage_options: Optional[dict] = None):
        self.uri = uri
        self.job_id = job_id
        self.storage_options = storage_options
        self.fs, root = open_fs(uri, storage_options)
        self.dataset_root = root.rstrip("/")
        self.root = f"{self.dataset_root}/{JOURNAL}/{job_id}"

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # -- writing ------------------------------------------------------------------------------

    def start(self, spec: DatasetSpec, **extra: Any) -> None:
        """Write ``job.json`` (the spec, its fingerprint and ``extra``) unless it exists: a
        resumed job keeps what its first run recorded."""
        path = self._path("job.json")
        with storage_errors(self.uri, "start the journal in"):
            self.fs.invalidate_cache(path)
            if not self.fs.exists(path):
                self.write_meta({"job_id": self.job_id, "fingerprint": spec_fingerprint(spec),
                                 "started": time.time(), "spec": spec.public_dump(), **extra})

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Replace ``job.json`` with ``meta`` (what ``meta()`` read, changed)."""
        atomic_write(self.fs, self._path("job.json"), json.dumps(meta, indent=2).encode())

    def begin_new(self, replaced: bool) -> None:
        """Make way for a new job (not a resume) under this id, before it touches the output.

        A journal with ``job.json`` is an interrupted job of the same id (``--job-id`` used
        again): a new job would take its units and shards for its own, so it is refused,
        unless ``replaced`` (an ``--overwrite`` build, whose ``DatasetPublisher.prepare``
        removes every interrupted job's journal). Files without ``job.json`` are what a
        removal that stopped half way left: no job can resume them, so they go now."""
        meta = self._path("job.json")
        with storage_errors(self.uri, "look for an earlier journal in"):
            self.fs.invalidate_cache(self.root)
            if not self.fs.exists(self.root):
                return
            self.fs.invalidate_cache(meta)
            interrupted = self.fs.exists(meta)
            if not interrupted:
                delete_tree(self.fs, self.root)
                return
        if not replaced:
            raise ResumeError(
                f"{self.uri} holds the journal of an interrupted job {self.job_id!r}: a new "
                f"job under that id would count its work again. Continue it with --resume "
                f"--job-id {self.job_id}, or give this job another --job-id")

    def keep_base(self, resuming: bool) -> None:
        """Copy the published dataset's ``rejects.parquet`` and ``stats.json`` into the
        journal (``BASE``): a merge's publish replaces both in place, and a merge resumed
        after a publish that failed half way must read the dataset it continued, not its own
        figures added in once already. ``stats.json`` goes last: the copy counts once it is
        there (``base_uri``).

        A new job (``resuming`` False) always copies: a copy left by an earlier job of the
        same id (``--job-id``) is not its base. A resumed one keeps the copy its first run
        made, and refuses, lacking one, a ``stats.json`` its own job id wrote: a publish of
        its own that stopped half way (an older version kept no copy)."""
        with storage_errors(self.uri, "keep the published figures in the journal of"):
            kept = self._path(BASE, "stats.json")
            self.fs.invalidate_cache(kept)
            if resuming and self.fs.exists(kept):
                return
            stats = f"{self.dataset_root}/stats.json"
            self.fs.invalidate_cache(stats)
            figures = self.fs.cat_file(stats) if self.fs.exists(stats) else None
            if resuming and figures is not None and _job_of(figures) == self.job_id:
                raise ResumeError(
                    f"{self.uri}/stats.json already holds the figures of job {self.job_id}, "
                    "whose journal kept no copy of the dataset it continued (a publish that "
                    "stopped half way, by an older version): its work would be counted twice. "
                    "Build the dataset again with --overwrite")
            if self.fs.exists(kept):
                self.fs.rm_file(kept)  # an earlier job's: not whole until copied again
            rejects = f"{self.dataset_root}/rejects.parquet"
            self.fs.invalidate_cache(rejects)
            if self.fs.exists(rejects):
                self.fs.makedirs(self._path(BASE), exist_ok=True)
                self.fs.cp_file(rejects, self._path(BASE, "rejects.parquet"))  # no glob
            if figures is not None:
                atomic_write(self.fs, kept, figures)

    def base_uri(self) -> Optional[str]:
        """Where a merge reads the dataset it continues (``stats.json``, ``rejects.parquet``)
        from: the journal's copy (``keep_base``), or None where there is none."""
        kept = self._path(BASE, "stats.json")
        with storage_errors(self.uri, "read the journal from"):
            self.fs.invalidate_cache(kept)
            found = self.fs.exists(kept)
        return f"{self.uri.rstrip('/')}/{JOURNAL}/{self.job_id}/{BASE}" if found else None

    def write_unit(self, unit: WorkUnit, report: UnitReport, rows: pa.Table) -> None:
        """Commit a unit: its candidates' decisions, with its description and counts."""
        meta = {b"pixcrawler.unit": json.dumps(report_to_json(unit, report)).encode()}
        table = rows.cast(UNIT_SCHEMA).replace_schema_metadata(meta)
        self._write_table(self._path("units", f"{unit.uid}.parquet"), table)

    def write_shard_intent(self, name: str, files: list[str]) -> None:
        atomic_write(self.fs, self._path("shards", f"{name}.intent.json"),
                     json.dumps({"files": files}).encode())

    def write_shard(self, name: str, rows: pa.Table) -> None:
        self._write_table(self._path("shards", f"{name}.parquet"), rows.cast(SHARD_SCHEMA))

    def _write_table(self, path: str, table: pa.Table) -> None:
        import io

        buf = io.BytesIO()
        pq.write_table(table, buf, compression=COMPRESSION)
        with storage_errors(self.uri, "write the journal to"):
            atomic_write(self.fs, path, buf.getvalue())

    # -- reading ------------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        path = self._path("job.json")
        with storage_errors(self.uri, "read the journal from"):
            self.fs.invalidate_cache(path)
            if not self.fs.exists(path):
                raise ResumeError(f"no journal for job {self.job_id} at {self.uri}")
            data = self.fs.cat_file(path)
        return json.loads(data)

    def _listing(self, sub: str) -> list[str]:
        """Every file under the journal's ``sub`` folder, sorted."""
        with storage_errors(self.uri, "list the journal in"):
            return list_files(self.fs, self._path(sub))

    def _files(self, sub: str, suffix: str) -> list[str]:
        return [p for p in self._listing(sub) if p.endswith(suffix)
                and not p.endswith(".intent.json")]

    def shard_exists(self, name: str) -> bool:
        path = self._path("shards", f"{name}.parquet")
        with storage_errors(self.uri, "check the journal in"):
            self.fs.invalidate_cache(path)
            return bool(self.fs.exists(path))

    def unit_files(self) -> list[str]:
        return self._files("units", ".parquet")

    def shard_files(self) -> list[str]:
        return self._files("shards", ".parquet")

    def unit_uids(self) -> set[str]:
        """The committed units' uids (their files' names)."""
        return {parquet_stem(p) for p in self.unit_files()}

    def shard_names(self) -> set[str]:
        """The committed shards' names (``train-00004``: the dataset's ``data/`` file names)."""
        return {parquet_stem(p) for p in self.shard_files()}

    def _contents(self, paths: list[str]) -> Iterator[bytes]:
        """The bytes of each file, in order, fetched ``READ_FILES`` at a time."""
        for start in range(0, len(paths), READ_FILES):
            batch = paths[start:start + READ_FILES]
            with storage_errors(self.uri, "read the journal from"):
                data = self.fs.cat_ranges(batch, None, None, on_error="raise")
            yield from data

    def partial_units(self, committed: set[str]) -> dict[str, dict[str, int]]:
        """Units with images in committed shards but not in ``committed`` (no unit file: a
        killed driver, or on Ray a lost ledger, came first): per class, their images written."""
        out: dict[str, Counter] = {}
        for table in self.iter_tables("shards", ["uid", "label"]):
            counts = table.group_by(["uid", "label"], use_threads=False).aggregate(
                [([], "count_all")])
            for row in counts.to_pylist():
                if row["uid"] and row["uid"] not in committed:
                    out.setdefault(row["uid"], Counter())[row["label"]] += row["count_all"]
        return {uid: dict(c) for uid, c in out.items()}

    def unit_rows(self, uid: str, seen: dict[str, frozenset[str]]) -> list[dict[str, Any]]:
        """The rows (``WRITTEN_COLUMNS``) of the images unit ``uid`` has in committed shards:
        what an earlier attempt of it wrote before it was resent. ``seen``: the caller's
        record of the units in each shard file read so far, filled in here; a committed
        shard file never changes, so each is fetched once for it, and then only the files
        that hold ``uid`` are fetched again (whole: they hold no images; about 120 KB per
        1,000 images)."""
        paths = self.shard_files()
        new = [p for p in paths if p not in seen]
        for path, data in zip(new, self._contents(new)):
            seen[path] = frozenset(_read_table(data, SHARD_SCHEMA, ["uid"])["uid"].to_pylist())
        rows: list[dict[str, Any]] = []
        for data in self._contents([p for p in paths if uid in seen[p]]):
            table = _read_table(data, SHARD_SCHEMA, ["uid"] + WRITTEN_COLUMNS)
            rows += [row for row in table.to_pylist() if row.pop("uid") == uid]
        return rows

    def read_unit(self, uid: str) -> Optional[UnitReport]:
        """The report a committed unit journaled, or None where it has not committed."""
        path = self._path("units", f"{uid}.parquet")
        with storage_errors(self.uri, "read the journal from"):
            self.fs.invalidate_cache(path)
            if not self.fs.exists(path):
                return None
            data = self.fs.cat_file(path)
        meta = pq.read_schema(pa.BufferReader(data)).metadata or {}
        return report_from_json(json.loads(meta[b"pixcrawler.unit"]))[1]

    def iter_unit_reports(self) -> Iterator[tuple[WorkUnit, UnitReport]]:
        """Each committed unit's description and counts (from the files' footers)."""
        for data in self._contents(self.unit_files()):
            meta = pq.read_schema(pa.BufferReader(data)).metadata or {}
            yield report_from_json(json.loads(meta[b"pixcrawler.unit"]))

    def iter_tables(self, kind: str, columns: Optional[list[str]] = None,
                    rows: Optional[int] = None) -> Iterator[pa.Table]:
        """The committed ``units`` or ``shards`` files, in name order, as tables of whole
        files concatenated until they hold ``rows`` rows (``TABLE_ROWS``) or more, and the
        rest. Without the files' metadata (a unit's counts: ``iter_unit_reports``)."""
        rows = rows or TABLE_ROWS
        paths = self.unit_files() if kind == "units" else self.shard_files()
        pending: list[pa.Table] = []
        held = 0
        schema = UNIT_SCHEMA if kind == "units" else SHARD_SCHEMA
        wanted = list(columns or schema.names)
        for data in self._contents(paths):
            table = _read_table(data, schema, wanted)
            pending.append(table)
            held += table.num_rows
            if held >= rows:
                yield pa.concat_tables(pending)
                pending, held = [], 0
        if pending:
            yield pa.concat_tables(pending)

    def orphan_files(self) -> list[str]:
        """Files named by shard intents whose shard never committed (a crash mid-write), as
        paths relative to the dataset, but those a committed shard also wrote: an image's
        ImageFolder file is named by its id alone, so a shard lost mid-write and the shard
        that wrote the image again (its unit resent) name the same file. With them, the
        temporary files of the orphans' writes a killed process left (``storage.cut_writes``)."""
        orphans: list[str] = []
        kept: set[str] = set()
        listed = self._listing("shards")
        committed = {p for p in listed if p.endswith(".parquet")}
        intents = [p for p in listed if p.endswith(".intent.json")]
        for path, data in zip(intents, self._contents(intents)):
            files = json.loads(data).get("files", [])
            if f"{path[:-len('.intent.json')]}.parquet" in committed:
                kept.update(files)
            else:
                orphans += files
        with storage_errors(self.uri, "look for unfinished writes in"):
            cut = [cut[len(self.dataset_root) + 1:] for rel in orphans
                   for cut in cut_writes(self.fs, f"{self.dataset_root}/{rel}")]
        return [f for f in orphans if f not in kept] + cut

    def load(self, spec: DatasetSpec) -> ResumeState:
        """The state to resume from; refuses if the spec changed in a way that matters."""
        meta = self.meta()
        if meta.get("fingerprint") not in accepted_fingerprints(spec) \
                and not _same_once_upgraded(meta.get("spec"), spec):
            raise ResumeError(
                f"the spec differs from the one job {self.job_id} started with (only "
                "'resources', 'output.overwrite' and how 'output.uri' spells the same place "
                "may change on resume); run it without "
                "--resume into a new output, or restore the spec (saved in "
                f"{self.uri}/{JOURNAL}/{self.job_id}/job.json)")
        reordered = splits_reordered(meta.get("spec"), spec)
        if reordered:
            raise ResumeError(f"job {self.job_id}'s {reordered} (saved in "
                              f"{self.uri}/{JOURNAL}/{self.job_id}/job.json)")
        state = ResumeState(self.job_id)
        for unit, report in self.iter_unit_reports():
            state.done.add(unit.uid)
            state.reports.append((unit, report))
        state.next_shard = self.next_shard_numbers()
        return state

    def next_shard_numbers(self) -> dict[str, int]:
        """Per split, the number after every shard this job committed or started writing."""
        out: dict[str, int] = {}
        for path in self._listing("shards"):
            name = path.rsplit("/", 1)[-1]
            for suffix in (".intent.json", ".parquet"):
                if name.endswith(suffix):
                    split, _, number = name[:-len(suffix)].rpartition("-")
                    if number.isdigit():
                        out[split] = max(out.get(split, 0), int(number) + 1)
        return out

    def remove(self) -> None:
        """Delete the journal, ``job.json`` first: a remove that stops half way leaves no
        journal a ``--resume`` would take up again (its copy of the base may be gone)."""
        with storage_errors(self.uri, "remove the journal from"):
            meta = self._path("job.json")
            self.fs.invalidate_cache(meta)
            if self.fs.exists(meta):
                self.fs.rm_file(meta)
                flush_to_disk(self.fs, self.root)  # (a crash must not bring it back)
            self.fs.invalidate_cache(self.root)
            delete_tree(self.fs, self.root)
            parent = self.root.rsplit("/", 1)[0]
            self.fs.invalidate_cache(parent)
            try:
                if self.fs.exists(parent) and not self.fs.ls(parent):
                    self.fs.rmdir(parent)
            except OSError:
                pass


def _job_of(stats_json: bytes) -> Optional[str]:
    """The job a dataset's stats.json says published it (None where it cannot say)."""
    try:
        stats = json.loads(stats_json)
    except ValueError:
        return None
    return stats.get("job_id") if isinstance(stats, dict) else None


def parquet_stem(path: str) -> str:
    """A Parquet file's name without its folder and ``.parquet``: a journal file's unit or
    shard name, a dataset shard's name."""
    return path.rsplit("/", 1)[-1][:-len(".parquet")]


def resumable_jobs(uri: str, storage_options: Optional[dict] = None) -> list[str]:
    """Job ids with a journal at ``uri`` (interrupted jobs that can be resumed)."""
    fs, root = open_fs(uri, storage_options)
    base = f"{root.rstrip('/')}/{JOURNAL}"
    out = []
    with storage_errors(uri, "look for interrupted jobs in"):
        fs.invalidate_cache(base)
        if not fs.exists(base):
            return []
        for p in fs.ls(base, detail=False):
            job = p.rstrip("/")
            fs.invalidate_cache(f"{job}/job.json")
            if fs.exists(f"{job}/job.json"):
                out.append(job.rsplit("/", 1)[-1])
    return sorted(out)


def journal_uri(uri: str, job_id: str) -> str:
    return join(uri, JOURNAL, job_id)


def new_job_id(spec: DatasetSpec) -> str:
    return f"{spec.name}-{uuid.uuid4().hex[:8]}"


def published_spec(uri: str, storage_options: Optional[dict] = None) -> DatasetSpec:
    """The spec a published dataset was built from (its ``spec.yaml``); ``ResumeError`` if it
    has none (saying what to do instead) or one that is not UTF-8 text."""
    from builder.spec import loads_spec

    fs, root = open_fs(uri, storage_options)
    path = f"{root.rstrip('/')}/spec.yaml"
    with storage_errors(uri, "read spec.yaml from"):
        fs.invalidate_cache(path)
        if not fs.exists(path):
            jobs = resumable_jobs(uri, storage_options)
            if jobs:
                raise ResumeError(f"{uri} holds an interrupted job ({', '.join(jobs)}), not a "
                                  "published dataset: continue it with `pixcrawler build SPEC "
                                  "--resume` (SPEC: the spec it was started with)")
            raise ResumeError(f"{uri} has no spec.yaml, so it holds no dataset that PixCrawler "
                              "0.1+ published: check the URI, or build the dataset again with "
                              "`pixcrawler build SPEC --overwrite`")
        data = fs.cat_file(path)
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise ResumeError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): put "
                          "back the spec the dataset was built from, saved as UTF-8") from exc
    return loads_spec(text, path, stored=True)
