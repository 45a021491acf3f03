"""Which of a published dataset's rejects a continuing run decides again.

A run that continues a dataset (``--resume`` of a published partial one, or ``retry-failed``)
decides again the rejects whose reason ``reasons.decided_again`` names, of a class of the spec
and with a URL. ``retry-failed`` reads them from ``rejects.parquet`` in slices (one unit each,
``retry_candidates``). Everything else, and the rows of a slice whose unit never committed (a
retry cancelled before it got there), stays in the dataset as it was (``kept_rows``), and
counts as it did (``redecided_counts`` says what to take out of the published counts).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Callable, Iterable, Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from builder.listsource import SlicePlan
from builder.reasons import Reason, decided_again, stage_of
from builder.records import CANDIDATE_FIELDS, REJECT_SCHEMA, Candidate, with_columns
from builder.rights import RightsTally
from builder.spec import DatasetSpec
from builder.storage import open_fs
from builder.units import ClassTally, UnitReport

Done = Callable[[int], bool]
"""Whether the unit of retry slice ``i`` committed (its rows were decided again)."""


def redecided(table: pa.Table, spec: DatasetSpec, retry: bool) -> pa.ChunkedArray:
    """Per row of ``table`` (columns ``url``, ``label``, ``reason``, ``page_url``), whether a
    continuing run of ``spec`` decides it again. With ``page_meta``, not a row of a dataset
    written before rejects kept the candidate's page (a null ``page_url``): decided again
    without its page, its page's opt-out would go unread."""
    again = pa.array(sorted(decided_again(retry)), pa.string())
    labels = pa.array(sorted(spec.labels), pa.string())
    mask = pc.and_(pc.and_(pc.is_in(table["reason"], value_set=again),
                           pc.is_in(table["label"], value_set=labels)),
                   pc.greater(pc.utf8_length(table["url"]), 0))
    if spec.download.signals.page_meta:
        mask = pc.and_(mask, pc.is_valid(table["page_url"]))
    return pc.fill_null(mask, False)


def retry_candidates(plan: SlicePlan, storage_options: Optional[dict[str, Any]],
                     spec: DatasetSpec, index: int) -> list[Candidate]:
    """The candidates of retry slice ``index`` (a row range of ``rejects.parquet``)."""
    group, start, stop = plan.bounds(index)
    fs, path = open_fs(plan.path, storage_options)
    columns = ["url", "label", "reason", "query", "engine", *CANDIDATE_FIELDS]
    with fs.open(path, "rb") as f:
        table = with_columns(pq.ParquetFile(f).read_row_group(group, columns=columns),
                             REJECT_SCHEMA, columns).slice(start, stop - start)
    table = table.filter(redecided(table, spec, retry=True))
    return [Candidate(url=row["url"], label=row["label"], query=row["query"] or "",
                      engine=row["engine"] or "",
                      **{f: row[f] for f in CANDIDATE_FIELDS if row[f] is not None})
            for row in table.to_pylist()]


def _slices_by_group(plan: Optional[SlicePlan]) -> dict[int, list[tuple[int, int, int]]]:
    out: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for index in range(plan.count if plan is not None else 0):
        group, start, stop = plan.bounds(index)  # type: ignore[union-attr]
        out[group].append((index, start, stop))
    return out


def _groups(path: str, storage_options: Optional[dict[str, Any]], spec: DatasetSpec,
            retry: bool, plan: Optional[SlicePlan], done: Optional[Done],
            columns: Optional[list[str]] = None, undecided: Optional[dict[str, int]] = None,
            only: bool = False) -> Iterator[tuple[pa.Table, pa.ChunkedArray]]:
    """Each row group of the rejects file at ``path`` and which of its rows are decided again:
    with ``done``, only those of slices of ``plan`` whose units committed. ``undecided``
    (``undecided_keys``): per key, how many of its rows were not decided again after all
    (the first that many, in file order); ``only``: just those, else all but those."""
    fs, fs_path = open_fs(path, storage_options)
    fs.invalidate_cache(fs_path)
    if not fs.exists(fs_path):
        return
    slices = _slices_by_group(plan) if done is not None else {}
    left = dict(undecided) if undecided is not None else None
    wanted = pa.array(sorted(left), pa.string()) if left else None
    with fs.open(fs_path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = list(dict.fromkeys([*(columns or pf.schema_arrow.names), "page_url",
                                    *(("key",) if left is not None else ())]))
        for group in range(pf.metadata.num_row_groups):
            table = with_columns(pf.read_row_group(group, columns=names), REJECT_SCHEMA, names)
            mask = redecided(table, spec, retry)
            if done is not None:
                ran = [False] * table.num_rows
                for index, start, stop in slices.get(group, ()):
                    if done(index):
                        ran[start:stop] = [True] * (stop - start)
                mask = pc.and_(mask, pa.array(ran, pa.bool_()))
            if left is not None:
                stays = [False] * table.num_rows
                if wanted is not None:
                    hits = pc.and_(mask, pc.is_in(table["key"], value_set=wanted))
                    keys = table["key"].to_pylist()
                    for i in pc.indices_nonzero(hits).to_pylist():
                        if left.get(keys[i], 0) > 0:
                            left[keys[i]] -= 1
                            stays[i] = True
                chosen = pa.array(stays, pa.bool_())
                mask = pc.and_(mask, chosen if only else pc.invert(chosen))
            yield table, mask


def kept_rows(path: str, storage_options: Optional[dict[str, Any]], spec: DatasetSpec,
              retry: bool, plan: Optional[SlicePlan] = None, done: Optional[Done] = None,
              columns: Optional[list[str]] = None, undecided: Optional[dict[str, int]] = None
              ) -> Iterator[pa.Table]:
    """The rejects a continuing run leaves as they were, a row group at a time: all but those
    it decides again (with ``done``: decided again in a slice whose unit committed; with
    ``undecided``: not those rows, which it never reached). Their ``columns`` (and those
    ``redecided`` reads), or all of them."""
    for table, mask in _groups(path, storage_options, spec, retry, plan, done, columns,
                               undecided=undecided):
        yield table.filter(pc.invert(mask))


def undecided_keys(path: str, storage_options: Optional[dict[str, Any]], spec: DatasetSpec,
                   decided: Iterable[pa.Table]) -> dict[str, int]:
    """For a run continuing a partial dataset (not a retry): of the rejects it was to decide
    again (``cancelled``), per key, how many rows it did not decide: those past the rows of
    that key its units wrote (``decided``: tables of their rows' ``key``). It decides them
    only where the crawl finds them again, which it need not (a class filled first, an
    engine that answers otherwise): they stay as they were. A cancel leaves few such rows
    (the candidates of the units in flight)."""
    cancelled: Counter = Counter()
    for table, mask in _groups(path, storage_options, spec, False, None, None,
                               columns=["key", "url", "label", "reason"]):
        cancelled.update(table["key"].filter(mask).to_pylist())
    if not cancelled:
        return {}
    wanted = pa.array(sorted(cancelled), pa.string())
    found: Counter = Counter()
    for t in decided:
        found.update(t["key"].filter(pc.is_in(t["key"], value_set=wanted)).to_pylist())
    return {key: n - found[key] for key, n in cancelled.items() if n > found[key]}


def redecided_counts(path: str, storage_options: Optional[dict[str, Any]],
                     spec: DatasetSpec, retry: bool, plan: Optional[SlicePlan] = None,
                     done: Optional[Done] = None, undecided: Optional[dict[str, int]] = None
                     ) -> UnitReport:
    """The published rejects a continuing run decides again, as counts (candidates and
    rejections per class, reason and stage, and their rights ledgers), from the rows
    themselves; with ``undecided``, just the rows it left undecided after all (to count
    back)."""
    report = UnitReport("redecided")
    report.rights = RightsTally()
    for table, mask in _groups(path, storage_options, spec, retry, plan, done,
                               columns=["url", "label", "reason", "rights"],
                               undecided=undecided, only=undecided is not None):
        rows = table.filter(mask)
        report.rights.add_column(rows["rights"])
        for row in rows.group_by(["label", "reason"], use_threads=False).aggregate(
                [([], "count_all")]).to_pylist():
            tally = report.classes.setdefault(row["label"], ClassTally())
            tally.candidates += row["count_all"]
            tally.rejected[row["reason"]] += row["count_all"]
            report.by_stage[stage_of(Reason(row["reason"])).value] += row["count_all"]
    return report
