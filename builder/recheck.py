"""``pixcrawler recheck``: evaluate the opt-out signals of a built dataset's images again.

Consent changes after a dataset is built: a site adds ``Content-Signal: ai-train=no`` to its
robots.txt, reserves its rights in tdmrep.json, starts sending ``tdm-reservation: 1``. ``recheck``
reads the dataset's images (URL, final URL, label), asks their origins again with the download
settings the dataset was built with (its ``spec.yaml``), and lists each image a signal now
refuses, with the signal, its value and where it was read.

Two depths:

* ``origins`` (default): the per-origin files only (robots.txt rules, Content-Signal and
  Content-Usage lines, /.well-known/tdmrep.json, /ai.txt): each origin is asked once, so a
  dataset of any size costs a few requests per site.
* ``full``: every image is requested again through the fetcher, which also reads its response
  headers and the XMP in its bytes. An image that cannot be fetched now (404, timeout) is
  counted as unreachable and kept: only a signal removes an image.

``write_without`` writes a new dataset without the removed images: the same shards, manifests,
card and spec, with each removed image moved to the rejects (its reason and detail from the
signal) so that ``accepted + rejected == candidates`` still holds. It copies only a published
dataset (``check_source``), reads everything but the shards before it writes anything, and a
copy that fails removes its shards again, so a rerun needs no ``--overwrite``. A copy left
with no image is marked ``_PARTIAL`` (reason ``empty``), as a build that accepts nothing.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import urllib.parse
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from aiohttp.abc import AbstractResolver

from builder.errors import OutputExistsError, PixCrawlerError, StorageError
from builder.fetch import Fetcher
from builder.netguard import UrlRejected
from builder.profiles import first_public_url, has_contact
from builder.reasons import Reason
from builder.records import CANDIDATE_FIELDS, REJECT_SCHEMA, Candidate, Record
from builder.rights import UNREADABLE, RightsTally, Signal, first_refusal, rights_rows
from builder.spec import (DatasetSpec, DownloadSpec, loads_spec, require_trusted_networks,
                          require_trusted_opt_outs)
from builder.spreadsheet import as_text
from builder.storage import (delete_files, delete_tree, list_files, open_fs, same_location,
                             storage_errors, write_bytes)

log = logging.getLogger(__name__)

MODES = ("origins", "full")
BATCH = 256
"""Images re-fetched at a time in ``full`` mode (their bytes are dropped after each batch)."""
REMOVAL_COLUMNS = ("id", "label", "split", "url", "final_url", "signal", "value", "source",
                   "reason", "detail")
REMOVAL_WEB_COLUMNS = ("url", "final_url", "value", "source")
"""The removal list's values from the web, written for spreadsheets (``builder.spreadsheet``)."""
_READ_COLUMNS = ["id", "label_name", "split", "url", "final_url", "page_url"]


class RecheckSourceError(PixCrawlerError):
    """The dataset ``recheck --write`` would copy is not a published one (no marker, an
    unfinished job's journal) or lacks a file the copy needs."""


@dataclass
class Removal:
    """An image a signal now refuses."""

    id: str
    label: str
    split: str
    url: str
    final_url: str
    signal: Signal

    @property
    def reason(self) -> str:
        return (Reason.ROBOTS_DISALLOWED if self.signal.name == "robots_txt"
                else Reason.OPTED_OUT).value

    @property
    def detail(self) -> str:
        return f"recheck: {self.signal.describe()}"

    def row(self) -> dict[str, str]:
        return {"id": self.id, "label": self.label, "split": self.split, "url": self.url,
                "final_url": self.final_url, "signal": self.signal.name,
                "value": self.signal.value, "source": self.signal.source,
                "reason": self.reason, "detail": self.detail}


@dataclass
class RecheckResult:
    uri: str
    mode: str
    checked: int = 0
    origins: int = 0
    unreachable: int = 0
    removals: list[Removal] = field(default_factory=list)
    checked_at: str = ""

    def by_signal(self) -> dict[str, int]:
        return dict(Counter(r.signal.name for r in self.removals))

    def summary(self) -> dict[str, Any]:
        return {"uri": self.uri, "mode": self.mode, "checked_at": self.checked_at,
                "checked": self.checked, "origins": self.origins,
                "unreachable": self.unreachable, "removed": len(self.removals),
                "removed_by_signal": self.by_signal()}


def dataset_spec(uri: str, storage_options: Optional[dict] = None) -> DatasetSpec:
    """The spec a dataset was built with (its ``spec.yaml``)."""
    fs, root = open_fs(uri, storage_options)
    path = f"{root.rstrip('/')}/spec.yaml"
    with storage_errors(uri, "read spec.yaml from"):
        if not fs.exists(path):
            raise StorageError(f"{uri} has no spec.yaml: is it a PixCrawler dataset? "
                               "(recheck reads the download settings it was built with)")
        return loads_spec(fs.cat_file(path).decode("utf-8"), path, stored=True)


def _shards(uri: str, storage_options: Optional[dict]) -> list[str]:
    fs, root = open_fs(uri, storage_options)
    with storage_errors(uri, "list the shards of"):
        paths = sorted(p for p in list_files(fs, f"{root.rstrip('/')}/data")
                       if p.endswith(".parquet"))
    if not paths:
        raise StorageError(f"no Parquet shards under {uri}/data: recheck needs a dataset "
                           "written with the parquet format")
    return paths


def _read(uri: str, path: str, storage_options: Optional[dict],
          columns: Optional[list[str]] = None) -> pa.Table:
    fs, _ = open_fs(uri, storage_options)
    with storage_errors(uri, f"read {path} of"):
        with fs.open(path, "rb") as f:
            if columns is not None:  # those the file has (an older version's may lack some)
                names = set(pq.ParquetFile(f).schema_arrow.names)
                columns = [c for c in columns if c in names]
                f.seek(0)
            return pq.read_table(f, columns=columns)


def image_rows(uri: str, storage_options: Optional[dict] = None) -> Iterator[dict[str, str]]:
    """The dataset's images: id, label, split, url, final_url and page_url (no image bytes
    read)."""
    for path in _shards(uri, storage_options):
        table = _read(uri, path, storage_options, _READ_COLUMNS)
        yield from table.rename_columns(["label" if c == "label_name" else c
                                         for c in table.column_names]).to_pylist()


def recheck(uri: str, *, mode: str = "origins", download: Optional[DownloadSpec] = None,
            storage_options: Optional[dict] = None,
            resolver: Optional[AbstractResolver] = None,
            allow_private_networks: bool = False,
            allow_weaker_opt_outs: bool = False) -> RecheckResult:
    """Evaluate the signals of the dataset at ``uri`` again (see the module doc).

    ``download`` defaults to the dataset's own download settings, refused where they set
    ``allow_private_networks`` unless ``allow_private_networks`` is given
    (``require_trusted_networks``), and where they honour fewer opt-outs than the defaults
    unless ``allow_weaker_opt_outs`` is (``require_trusted_opt_outs``); ``resolver`` is passed
    to the fetcher (a hosts map)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    cfg = download
    if cfg is None:
        published = dataset_spec(uri, storage_options)
        require_trusted_networks(published, uri, "recheck", allow_private_networks)
        require_trusted_opt_outs(published, uri, "recheck", allow_weaker_opt_outs)
        cfg = published.download
    rows = list(image_rows(uri, storage_options))
    result = RecheckResult(uri, mode, checked=len(rows),
                           checked_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if mode == "origins":
        asyncio.run(_by_origin(rows, cfg, result, resolver))
    else:
        asyncio.run(_by_fetch(rows, cfg, result, resolver))
    return result


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2].lower()}"


def _removal(row: dict[str, Any], signal: Signal) -> Removal:
    return Removal(row["id"], row["label"], row.get("split") or "", row["url"],
                   row.get("final_url") or row["url"], signal)


async def _by_origin(rows: list[dict[str, Any]], cfg: DownloadSpec, result: RecheckResult,
                     resolver: Optional[AbstractResolver]) -> None:
    async with Fetcher(cfg, resolver=resolver) as fetcher:
        origins: dict[str, str] = {}
        for row in rows:
            where = row.get("final_url") or row["url"]
            origins.setdefault(_origin(where), where)

        async def warm(url: str) -> None:
            try:
                await fetcher.origin_ledger(url)
            except UrlRejected:
                pass

        await asyncio.gather(*(warm(u) for u in origins.values()))
        result.origins = len(origins)
        for row in rows:
            try:
                ledger = await fetcher.origin_ledger(row.get("final_url") or row["url"])
            except UrlRejected:
                result.unreachable += 1
                continue
            refusal = first_refusal(ledger)
            if refusal is not None and refusal.value in UNREADABLE:
                result.unreachable += 1  # robots.txt did not answer: no reason to remove it
            elif refusal is not None:
                result.removals.append(_removal(row, refusal))


async def _by_fetch(rows: list[dict[str, Any]], cfg: DownloadSpec, result: RecheckResult,
                    resolver: Optional[AbstractResolver]) -> None:
    origins: set[str] = set()
    async with Fetcher(cfg, resolver=resolver) as fetcher:
        for start in range(0, len(rows), BATCH):
            chunk = rows[start:start + BATCH]
            # the page too: with signals.page_meta the build read its robots meta tags
            records = [Record(Candidate(url=r["url"], label=r["label"],
                                        page_url=r.get("page_url") or "")) for r in chunk]
            # The bytes are not needed: each body goes as it arrives, so a batch holds none
            # (256 bodies of up to max_bytes each, 5 GB at the default 20 MB).
            await fetcher.fetch_many(records, on_result=_drop_body)
            for row, record in zip(chunk, records):
                origins.add(_origin(row["url"]))
                refusal = first_refusal(record.rights)
                if refusal is not None and refusal.value not in UNREADABLE:
                    result.removals.append(_removal(row, refusal))
                elif record.rejected:
                    result.unreachable += 1
    result.origins = len(origins)


def _drop_body(record: Record) -> None:
    record.data = None


def write_removals(result: RecheckResult, out: str,
                   storage_options: Optional[dict] = None) -> None:
    """The removal list as CSV (``REMOVAL_COLUMNS``) at ``out`` (a path or fsspec URI)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=REMOVAL_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for removal in result.removals:
        writer.writerow({k: as_text(v) if k in REMOVAL_WEB_COLUMNS else v
                         for k, v in removal.row().items()})
    write_bytes(out, text.getvalue().encode("utf-8"), storage_options)


def needs_contact(uri: str, cfg: DownloadSpec, storage_options: Optional[dict] = None
                  ) -> bool:
    """Whether rechecking asks public origins without a contact in the User-Agent."""
    if has_contact(cfg):
        return False
    return first_public_url(r["url"] for r in image_rows(uri, storage_options)) is not None


SOURCE_FILES = ("rejects.parquet", "stats.json")
"""The files of the dataset, besides its spec and shards, that its copy carries over."""


def check_source(uri: str, storage_options: Optional[dict] = None) -> None:
    """Refuse (``RecheckSourceError``) to copy what is not a published dataset: one without a
    ``_SUCCESS`` or ``_PARTIAL`` marker, or with an unfinished job's journal (a build or a
    ``retry-failed`` killed while it wrote there: its shards hold images its stats do not
    count), or one without the ``SOURCE_FILES``."""
    from builder.journal import resumable_jobs
    from builder.writers import read_marker

    jobs = resumable_jobs(uri, storage_options)
    if jobs:
        raise RecheckSourceError(
            f"{uri} holds an interrupted job ({', '.join(jobs)}), so its shards, rejects and "
            "stats do not agree: continue it with `pixcrawler build SPEC --resume` (SPEC: the "
            "spec it was started with), then recheck the dataset it publishes")
    if read_marker(uri, storage_options) is None:
        raise RecheckSourceError(
            f"{uri} has no _SUCCESS or _PARTIAL marker, so it holds no published dataset: if a "
            "job writing it was interrupted, continue it with `pixcrawler build SPEC --resume` "
            "(SPEC: the spec it was started with); otherwise check the URI")
    fs, root = open_fs(uri, storage_options)
    for name in SOURCE_FILES:
        path = f"{root.rstrip('/')}/{name}"
        with storage_errors(uri, f"check {name} of"):
            fs.invalidate_cache(path)
            found = fs.exists(path)
        if not found:
            raise RecheckSourceError(
                f"{uri} has no {name}, which its copy carries over: put it back, or build the "
                "dataset again with `pixcrawler build SPEC --overwrite`")


WRITE_ADVICE = ("Pass --overwrite to replace what is there (an interrupted `pixcrawler "
                "recheck --write` leaves its copy's files), or --write somewhere else.")


def check_destination(uri: str, out_uri: str, *, overwrite: bool = False,
                      storage_options: Optional[dict] = None,
                      out_storage_options: Optional[dict] = None) -> None:
    """Refuse a ``--write`` destination that cannot take the copy: the dataset being
    rechecked itself, one holding another dataset or a job's files (unless ``overwrite``),
    or one that cannot be written. ``OutputExistsError`` / ``StorageError`` say what to pass.
    The CLI calls it before the recheck sends any request; ``write_without`` again."""
    from builder.spec import OutputSpec
    from builder.writers import DatasetPublisher

    if same_location(uri, out_uri, storage_options, out_storage_options):
        raise OutputExistsError(f"--write {out_uri} is the dataset being rechecked: write the "
                                "copy somewhere else (replacing the dataset as it is read "
                                "would delete it)")
    publisher = DatasetPublisher(OutputSpec(uri=out_uri, overwrite=overwrite), out_uri,
                                 "recheck-check", out_storage_options)
    publisher.check(advice=WRITE_ADVICE)


@dataclass
class WrittenCopy:
    """What ``write_without`` published: where, and its stats (``partial_reason`` is
    ``empty`` when the recheck removed every image)."""

    uri: str
    stats: dict[str, Any]

    @property
    def partial_reason(self) -> Optional[str]:
        return self.stats.get("partial_reason") or None


@dataclass
class _Source:
    """Everything of the dataset being copied but its shards' rows, read before the copy
    writes anything."""

    spec: DatasetSpec
    shards: list[str]
    rejects: pa.Table
    stats: dict[str, Any]


def _read_source(uri: str, storage_options: Optional[dict]) -> _Source:
    check_source(uri, storage_options)
    spec = dataset_spec(uri, storage_options)
    shards = _shards(uri, storage_options)
    fs, root = open_fs(uri, storage_options)
    with storage_errors(uri, "read rejects.parquet and stats.json of"):
        rejects = pq.read_table(io.BytesIO(fs.cat_file(f"{root.rstrip('/')}/rejects.parquet")))
        stats_json = fs.cat_file(f"{root.rstrip('/')}/stats.json")
    try:
        stats = json.loads(stats_json)
    except ValueError as exc:
        raise RecheckSourceError(f"{uri}/stats.json is not JSON ({exc}): put back the stats "
                                 "the dataset was published with") from exc
    return _Source(spec, shards, rejects, stats)


def write_without(uri: str, result: RecheckResult, out_uri: str, *,
                  storage_options: Optional[dict] = None,
                  out_storage_options: Optional[dict] = None,
                  overwrite: bool = False) -> WrittenCopy:
    """A new dataset at ``out_uri``: the one at ``uri`` less the removed images, which join its
    rejects. ``storage_options`` open the source, ``out_storage_options`` the destination.

    The source is checked and read (but its shards' rows) before anything is written. Should
    the copy fail before its marker is written, the shards it wrote and its journal are
    removed: ``DatasetPublisher.check`` let it start only where no other shard was (or cleared
    them with ``overwrite``), so they are this run's, and a rerun is not refused. So are the
    dataset-level files a publish that failed before its marker wrote (the check refused a
    folder holding any of another's)."""
    from builder.journal import Journal
    from builder.writers import (DATASET_FILES, LAYOUT_DIRS, DatasetPublisher, ShardWriter,
                                 rows_of_output, top_files)

    check_destination(uri, out_uri, overwrite=overwrite, storage_options=storage_options,
                      out_storage_options=out_storage_options)
    source = _read_source(uri, storage_options)
    data = source.spec.model_dump(mode="json")
    data["output"]["uri"] = out_uri
    data["output"]["overwrite"] = overwrite
    spec = DatasetSpec.model_validate(data)
    removed = {r.id: r for r in result.removals}
    stats = _stats_without(source.stats, list(removed.values()), result)
    partial_reason: Optional[str] = None
    if stats.get("accepted", 0) == 0:  # no image: no dataset, as a build that accepts nothing
        partial_reason = "empty"
    elif stats.get("partial"):  # a partial dataset's copy is partial too (its stats say why)
        partial_reason = stats.get("partial_reason") or "partial"
    if partial_reason is not None:
        stats.update(partial=True, partial_reason=partial_reason)
    spec_yaml = yaml.safe_dump(spec.public_dump(), sort_keys=False, allow_unicode=True)
    job_id = f"{spec.name}-recheck-{uuid.uuid4().hex[:6]}"
    writer = ShardWriter(spec.output, out_uri, spec.labels, out_storage_options)
    publisher = DatasetPublisher(spec.output, out_uri, job_id, out_storage_options, spec.labels)
    journal = Journal(out_uri, job_id, out_storage_options)
    publisher.prepare()
    try:
        numbers: dict[str, int] = {}
        manifest: list[dict[str, Any]] = []
        gone: dict[str, dict[str, Any]] = {}
        for path in source.shards:
            table = rows_of_output(_read(uri, path, storage_options))
            keep = pc.invert(pc.is_in(table["id"], pa.array(list(removed), pa.string())))
            gone.update((row["id"], row) for row in table.filter(pc.invert(keep)).select(
                ["id", "rights", "query", "engine", *CANDIDATE_FIELDS]).to_pylist())
            table = table.filter(keep)
            for split in sorted(set(table["split"].to_pylist())):
                part = table.filter(pc.equal(table["split"], split))
                number = numbers.get(split, 0)
                numbers[split] = number + 1
                manifest += writer.write(part, split, number, journal).select(
                    ["id", "path", "label", "split", "license"]).to_pylist()
        moved = _moved_rows(list(removed.values()), gone, stats)
        out = publisher.publish(manifest_rows=iter(manifest),
                                reject_tables=[source.rejects, moved],
                                stats=stats, spec_name=spec.name,
                                description=spec.description, spec_yaml=spec_yaml,
                                partial_reason=partial_reason)
    except BaseException:
        fs, root = open_fs(out_uri, out_storage_options)
        try:
            with storage_errors(out_uri, "remove the unfinished copy from"):
                for d in LAYOUT_DIRS:
                    delete_tree(fs, f"{root.rstrip('/')}/{d}")
                delete_files(fs, top_files(fs, root.rstrip("/"), DATASET_FILES))
            journal.remove()
        except StorageError as cleanup:
            log.warning("%s; rerun with --overwrite to replace what the copy left there",
                        cleanup)
        raise
    journal.remove()
    return WrittenCopy(out, stats)


def _moved_rows(removed: list[Removal], gone: dict[str, dict[str, Any]],
                stats: dict[str, Any]) -> pa.Table:
    """The reject rows of the removed images (``gone``: their rows in the shards, by id): each
    keeps its candidate as the dataset had it (the caption its build gave it) and its build's
    ledger, with the refusal the recheck found added (its
    source says so). ``stats``' rights summary is moved on with them, so it stays the sum of
    the copy's ledgers."""
    rows, before, after = [], RightsTally(), RightsTally()
    for r in removed:
        row = gone.get(r.id, {})
        old = [Signal(e["signal"], e["value"], e["source"], e["verdict"])
               for e in row.get("rights") or []]
        new = old + [r.signal._replace(source=f"recheck: {r.signal.source}")]
        before.add(old)
        after.add(new)
        c = Candidate(url=r.url, label=r.label)
        rows.append({"key": c.key, "url": r.url, "label": r.label,
                     "query": row.get("query") or "", "engine": row.get("engine") or "",
                     "stage": "fetch", "reason": r.reason, "detail": r.detail,
                     "duplicate_of": "", "http_status": 0, "rights": rights_rows(new),
                     **{f: row.get(f) for f in CANDIDATE_FIELDS}})
    if isinstance(stats.get("rights"), dict):
        tally = RightsTally.from_summary(stats["rights"])
        tally.merge(before, -1)
        tally.merge(after)
        stats["rights"] = tally.summary()
    return pa.Table.from_pylist(rows, schema=REJECT_SCHEMA)


def _stats_without(stats: dict[str, Any], removed: list[Removal],
                   result: RecheckResult) -> dict[str, Any]:
    """``stats`` with the removed images moved from accepted to rejected (overall, per class,
    by reason and by stage), and a ``recheck`` section."""
    stats = json.loads(json.dumps(stats))
    by_reason = stats.setdefault("rejected_by_reason", {})
    by_stage = stats.setdefault("rejected_by_stage", {})
    for r in removed:
        stats["accepted"] = stats.get("accepted", 0) - 1
        stats["rejected"] = stats.get("rejected", 0) + 1
        by_reason[r.reason] = by_reason.get(r.reason, 0) + 1
        by_stage["fetch"] = by_stage.get("fetch", 0) + 1
        c = stats.get("classes", {}).get(r.label)
        if c is not None:
            c["accepted"] -= 1
            c["rejected"] += 1
            c.setdefault("rejected_by_reason", {})
            c["rejected_by_reason"][r.reason] = c["rejected_by_reason"].get(r.reason, 0) + 1
            c["shortfall"] = max(0, c.get("target", 0) - c["accepted"])
    stats["shortfall"] = {k: v["shortfall"] for k, v in stats.get("classes", {}).items()
                          if v.get("shortfall")}
    stats["recheck"] = result.summary()
    return stats


__all__ = ["MODES", "RecheckResult", "RecheckSourceError", "Removal", "WrittenCopy",
           "check_source", "dataset_spec", "image_rows", "needs_contact", "recheck",
           "write_removals", "write_without"]
