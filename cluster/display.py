"""Progress on the terminal: a live per-class table on a TTY, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from builder.errors import printable
from builder.job import MAX_SEARCH_ERRORS


def _table(snapshot: dict[str, Any], title: str) -> Table:
    t = Table(title=title, expand=False)
    for col in ("class", "accepted / target", "candidates", "rejected", "fetched, deciding"):
        t.add_column(col, justify="right" if col != "class" else "left")
    for label, c in snapshot.get("classes", {}).items():
        t.add_row(label, f"{c['accepted']} / {c['target']}", str(c["candidates"]),
                  str(c["rejected"]), str(c.get("in_flight", 0)))
    t.caption = (f"{snapshot.get('accepted', 0)} accepted, {snapshot.get('rejected', 0)} "
                 f"rejected of {snapshot.get('candidates', 0)} candidates · "
                 f"{snapshot.get('images_per_s', 0):.1f} images/s · "
                 f"{snapshot.get('elapsed_s', 0):.0f}s")
    return t


class ProgressDisplay:
    """Call with snapshots (``JobLedger.snapshot()``); ``close()`` when the job ends."""

    def __init__(self, job_id: str, stream: Optional[TextIO] = None, every_s: float = 5.0):
        self.job_id = job_id
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s
        self._last = 0.0
        self._live: Optional[Live] = None
        if self.tty:
            self._live = Live(console=_plain_console(self.stream), refresh_per_second=4,
                              transient=False)
            self._live.start()

    def __call__(self, snapshot: dict[str, Any]) -> None:
        if self._live is not None:
            self._live.update(_table(snapshot, f"PixCrawler job {self.job_id}"))
            return
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        per_class = " ".join(f"{k}={c['accepted']}/{c['target']}"
                             for k, c in snapshot.get("classes", {}).items())
        print(f"[{self.job_id}] {snapshot.get('accepted', 0)} accepted, "
              f"{snapshot.get('rejected', 0)} rejected, {snapshot.get('candidates', 0)} "
              f"candidates, {snapshot.get('in_flight', 0)} fetched and being decided, "
              f"{snapshot.get('images_per_s', 0):.1f} img/s | {per_class}",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def partial_state(stats: dict[str, Any]) -> str:
    """The dataset's state in the summary: complete, or PARTIAL and why (``partial_reason``
    in stats.json: cancelled, empty, or what a retry kept from the dataset it retried)."""
    if not stats.get("partial"):
        return "complete"
    reason = printable(str(stats.get("partial_reason") or "partial"))  # (a dataset's text)
    if stats.get("partial_kept"):
        return f"PARTIAL (its crawl was {reason} before this retry)"
    if reason == "empty":
        return "PARTIAL (empty: nothing accepted)"
    return f"PARTIAL ({reason})"


def shortfall_cause(stats: dict[str, Any]) -> str:
    """Why classes fell short: cancelled, searches that failed (a dead engine, no network), or
    sources that had nothing more to give."""
    if stats.get("partial") and stats.get("partial_reason") == "cancelled":
        return ("crawl cancelled before this retry" if stats.get("partial_kept")
                else "job cancelled")
    errors = stats.get("search_errors") or []
    if errors:
        last = errors[-1]
        more = "+" if len(errors) >= MAX_SEARCH_ERRORS else ""
        return (f"sources failed or ran dry; {len(errors)}{more} searches failed, the last: "
                f"{last.get('engine', '?')}: {str(last.get('error', ''))[:160]} "
                "(all in stats.json search_errors)")
    return "sources ran dry"


def _plain_console(stream: TextIO, **options: Any) -> Console:
    """A console that shows text as it is: class names and a server's error text hold no
    Rich markup or emoji codes of ours."""
    return Console(file=stream, markup=False, emoji=False, **options)


def summary(stats: dict[str, Any], uri: str, stream: Optional[TextIO] = None) -> None:
    """The end-of-job summary table and the output location."""
    console = _plain_console(stream or sys.stdout, width=120)
    # (a retry's figures merge the published dataset's stats.json, whose text may be anyone's:
    # Rich passes an escape sequence through)
    t = Table(title=printable(f"PixCrawler: {stats.get('name', '')} ({stats.get('job_id', '')})"))
    for col in ("class", "target", "accepted", "shortfall", "candidates", "rejected",
                "top reject reasons"):
        t.add_column(col, justify="left" if col in ("class", "top reject reasons") else "right")
    for label, c in stats.get("classes", {}).items():
        top = sorted(c.get("rejected_by_reason", {}).items(), key=lambda kv: -kv[1])[:3]
        t.add_row(*(printable(str(v)) for v in (
            label, c["target"], c["accepted"], c["shortfall"], c["candidates"], c["rejected"],
            ", ".join(f"{k} {v}" for k, v in top))))
    console.print(t)
    console.print(f"{stats.get('accepted', 0)} accepted + {stats.get('rejected', 0)} rejected = "
                  f"{stats.get('candidates', 0)} candidates in {stats.get('duration_s', 0):.1f}s; "
                  f"dataset {partial_state(stats)}")
    if stats.get("shortfall"):
        console.print(f"shortfall ({shortfall_cause(stats)}): {stats['shortfall']}")
    console.print(f"output: {uri}")
