"""The rights ledger: which opt-out signals were checked for an image, what each said, and where
it came from.

Every signal the fetcher checks for a candidate becomes one ``Signal`` on ``Record.rights``, in
the order checked: origin-level files first (robots.txt, /.well-known/tdmrep.json, /ai.txt), then
the image response's headers, then metadata embedded in the image bytes, then the page (with
``download.signals.page_meta``). A signal that was looked for and not found is recorded too, with
verdict ``none``, so a ledger says what was checked, not only what refused.

Accepted images carry their ledger into the Parquet ``rights`` column (``RIGHTS_TYPE``); a refusal
rejects the record (``opted_out`` or ``robots_disallowed``) with a detail naming the signal, and
a signal that could not be read refuses too (value ``unreachable`` or ``no answer``:
``robots_unreachable`` for robots.txt, ``optout_unreachable`` for the others and the page).
``RightsTally`` sums ledgers into the ``rights`` section of ``stats.json`` and the dataset card:
the signals honoured, then per signal how many candidates had it checked, found a value, were
allowed and were refused.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Iterable, NamedTuple, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from builder.text import well_formed

if TYPE_CHECKING:
    from builder.spec import DownloadSpec

ALLOW = "allow"
REFUSE = "refuse"
NONE = "none"
VERDICTS = (ALLOW, REFUSE, NONE)

SIGNAL_DOCS: dict[str, str] = {
    "robots_txt": "robots.txt (RFC 9309) rules for our user agent",
    "content_signal": "Cloudflare Content Signals in robots.txt (Content-Signal: ai-train=...)",
    "content_usage": "IETF AI Preferences (Content-Usage: train-ai=...), robots.txt rule or "
                     "HTTP header",
    "tdmrep": "TDMRep tdm-reservation / tdm-policy: /.well-known/tdmrep.json, HTTP header or "
              "page meta tag",
    "ai_txt": "/ai.txt rules for our user agent (robots.txt syntax)",
    "x_robots_tag": "X-Robots-Tag header: noai, noimageai, noml, noindex, noimageindex, none",
    "xmp_datamining": "IPTC plus:DataMining in the image's embedded XMP",
    "robots_meta": "<meta name=robots> on the image's page (page_meta)",
}
"""Signal names, as they appear in ledgers, stats and the card."""


class Signal(NamedTuple):
    """One ledger entry. ``value`` is what the signal said ('' when absent); ``source`` where it
    was read (``robots.txt group '*'``, ``header tdm-reservation``, ...); ``verdict`` one of
    ``allow`` / ``refuse`` / ``none`` (checked, nothing said).

    A tuple in the order of ``RIGHTS_TYPE``'s fields: Arrow converts a list of them into the
    ``rights`` column as it is, about ten times faster than dicts (``bench/bench_rights.py``).
    """

    name: str
    value: str
    source: str
    verdict: str = NONE

    @property
    def refuses(self) -> bool:
        return self.verdict == REFUSE

    def describe(self) -> str:
        """The rejection detail of a refusing signal: names the signal, its value and source."""
        value = f" {self.value}" if self.value else ""
        return f"{self.name}:{value} ({self.source})"



RIGHTS_TYPE = pa.list_(pa.struct([
    pa.field("signal", pa.string()),
    pa.field("value", pa.string()),
    pa.field("source", pa.string()),
    pa.field("verdict", pa.string()),
]))
"""Arrow type of the ``rights`` column: one struct per signal checked, in order."""


def rights_rows(signals: Iterable[Signal]) -> list[Signal]:
    """The ``rights`` value of an output row: the ledger's entries, which Arrow reads as
    structs by position (their text made well-formed: a header may carry undecodable bytes)."""
    return [s if s.value.isascii() and s.source.isascii() else
            s._replace(value=well_formed(s.value), source=well_formed(s.source))
            for s in signals]


UNREACHABLE, NO_ANSWER = "unreachable", "no answer"
"""The values of a refusal made because a signal could not be read: its file (robots.txt,
tdmrep.json, ai.txt) or page answered a server error or 429, or gave no usable answer (none,
too many redirects, a redirect to a blocked address, an encoding the fetcher cannot undo); a
page that answered 401, 403 or 451, or whose robots.txt could not be read, is ``unreachable``
too."""
UNREADABLE = frozenset({UNREACHABLE, NO_ANSWER})


def first_refusal(signals: Iterable[Signal]) -> Optional[Signal]:
    """The refusal a record is rejected for: the first that says no, before one made only
    because robots.txt could not be read (an opt-out found meanwhile is the lasting reason)."""
    refusals = [s for s in signals if s.refuses]
    return next((s for s in refusals if s.value not in UNREADABLE),
                refusals[0] if refusals else None)


def honoured_signals(cfg: "DownloadSpec") -> list[str]:
    """The signals a download config checks and honours, in ``SIGNAL_DOCS`` order."""
    on = {"robots_txt": cfg.respect_robots, "x_robots_tag": cfg.respect_optouts,
          "content_signal": cfg.signals.content_signal,
          "content_usage": cfg.signals.content_usage, "tdmrep": cfg.signals.tdmrep,
          "ai_txt": cfg.signals.ai_txt, "xmp_datamining": cfg.signals.xmp_datamining,
          "robots_meta": cfg.signals.page_meta and cfg.respect_optouts}
    return [name for name in SIGNAL_DOCS if on[name]]


class RightsTally:
    """Per-signal counts over decided records, for ``stats.json`` (``summary()``).

    ``checked``: records whose ledger has the signal; ``present``: of those, how many found a
    value; ``refused``: how many it refused; ``allowed``: how many carried an explicit allow.
    Mergeable (``merge``), so shards or actors can count apart and add up.
    """

    def __init__(self, honoured: Iterable[str] = ()) -> None:
        self.honoured = list(honoured)
        self.counts: dict[str, Counter] = {}
        self.records = 0
        self.with_ledger = 0
        self.refused_records = 0
        self.unrecorded = 0
        """Records counted whose ledger is not known (a reject of a dataset written before
        rejects kept their ledgers). Taken out of a published tally, each leaves its earlier
        ledger in the signal counts: ``summary()`` says how many (``earlier_ledgers``)."""

    def add(self, signals: Iterable[Signal]) -> None:
        self.records += 1
        seen = False
        refused = False
        for s in signals:
            seen = True
            c = self.counts.get(s.name)
            if c is None:
                c = self.counts[s.name] = Counter()
            c["checked"] += 1
            if s.value:
                c["present"] += 1
            if s.verdict == REFUSE:
                c["refused"] += 1
                refused = True
            elif s.verdict == ALLOW and s.value:
                c["allowed"] += 1
        self.with_ledger += seen
        self.refused_records += refused

    def merge(self, other: "RightsTally", sign: int = 1) -> None:
        """Add ``other``'s counts (``sign`` -1 takes them back: a unit resent from scratch)."""
        for name, c in other.counts.items():
            mine = self.counts.setdefault(name, Counter())
            for key, n in c.items():
                mine[key] += sign * n
        self.records += sign * other.records
        self.with_ledger += sign * other.with_ledger
        self.refused_records += sign * other.refused_records
        self.unrecorded += sign * other.unrecorded

    def add_column(self, rights: pa.ChunkedArray | pa.Array) -> None:
        """Add the ledgers of a ``rights`` column (``RIGHTS_TYPE``; a null is a ledger not
        recorded: counted in ``records`` and ``unrecorded``), as ``add`` would one by one."""
        if isinstance(rights, pa.ChunkedArray):
            rights = rights.combine_chunks() if rights.num_chunks else \
                pa.array([], RIGHTS_TYPE)
        nulls = rights.null_count
        self.records += len(rights)
        self.unrecorded += nulls
        self.with_ledger += pc.sum(pc.greater(pc.list_value_length(rights), 0)).as_py() or 0
        entries = pc.list_flatten(rights)
        if not len(entries):
            return
        rows = pc.list_parent_indices(rights)
        names, values, verdicts = (entries.field(n) for n in ("signal", "value", "verdict"))
        present = pc.greater(pc.utf8_length(values), 0)
        refused = pc.equal(verdicts, REFUSE)
        table = pa.table({"name": names, "checked": pa.array(np.ones(len(entries), np.int64)),
                          "present": present, "refused": refused,
                          "allowed": pc.and_(pc.equal(verdicts, ALLOW), present)})
        for col in ("present", "refused", "allowed"):
            table = table.set_column(table.schema.get_field_index(col), col,
                                     pc.cast(table[col], pa.int64()))
        sums = table.group_by("name", use_threads=False).aggregate(
            [(c, "sum") for c in ("checked", "present", "refused", "allowed")])
        for row in sums.to_pylist():
            c = self.counts.setdefault(row["name"], Counter())
            for key in ("checked", "present", "refused", "allowed"):
                if row[f"{key}_sum"]:
                    c[key] += row[f"{key}_sum"]
        self.refused_records += len(pc.unique(pc.filter(rows, refused)))

    def state(self) -> dict[str, Any]:
        """Plain data (JSON-able), for a unit's journaled report."""
        return {"counts": {k: dict(c) for k, c in self.counts.items()}, "records": self.records,
                "with_ledger": self.with_ledger, "refused": self.refused_records,
                "unrecorded": self.unrecorded}

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> "RightsTally":
        tally = cls()
        tally.counts = {k: Counter(v) for k, v in (data.get("counts") or {}).items()}
        tally.records = int(data.get("records") or 0)
        tally.with_ledger = int(data.get("with_ledger") or 0)
        tally.refused_records = int(data.get("refused") or 0)
        tally.unrecorded = int(data.get("unrecorded") or 0)
        return tally

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> "RightsTally":
        """The tally a published ``stats.json`` 'rights' section (``summary()``) stands for."""
        tally = cls(summary.get("honoured") or ())
        tally.counts = {name: +Counter({k: int(v) for k, v in (c or {}).items()})
                        for name, c in (summary.get("signals") or {}).items()}
        tally.records = int(summary.get("records") or 0)
        tally.with_ledger = int(summary.get("checked") or 0)
        tally.refused_records = int(summary.get("refused") or 0)
        tally.unrecorded = -int(summary.get("earlier_ledgers") or 0)
        return tally

    def summary(self) -> dict[str, Any]:
        signals = {name: {k: int(c.get(k, 0)) for k in ("checked", "present", "allowed",
                                                        "refused")}
                   for name, c in sorted(self.counts.items())}
        out = {"honoured": self.honoured, "records": self.records,
               "checked": self.with_ledger, "refused": self.refused_records,
               "signals": signals}
        if self.unrecorded < 0:
            out["earlier_ledgers"] = -self.unrecorded
        return out


__all__ = ["ALLOW", "NONE", "NO_ANSWER", "REFUSE", "RIGHTS_TYPE", "SIGNAL_DOCS", "UNREACHABLE",
           "UNREADABLE", "RightsTally", "Signal", "first_refusal", "honoured_signals",
           "rights_rows"]
