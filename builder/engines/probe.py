"""Engines that tell the truth: probe each source of a spec once, before any job.

``probe_sources(spec)`` builds each source's engine and asks it for one small page of the first
class's first query. Each source gets a status:

* ``works``: it answered (with how many hits); Google's also carries its sunset date;
* ``blocked``: the service refused us (401/403/429, or a page that is not the API's answer,
  which is what a block page looks like), with the engine's own explanation;
* ``needs_key``: credentials are missing or refused, and which to set;
* ``down``: no answer (connection refused, timeout, 5xx);
* ``ended``: the service has shut down (Google's Custom Search API from 2027-01-01);
* ``unavailable``: it cannot run here (a missing package, a ddgs without the backend asked for,
  an unreadable URL list).

It runs offline against the sandbox web like any other source (``engine: sandbox``, or a web
engine whose ``options.base_url`` points at a local server).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Optional

from builder.engines import make_engine
from builder.engines.google import SUNSET as GOOGLE_SUNSET
from builder.errors import (EngineError, EngineNeedsKey, EngineSunset, EngineUnavailable,
                            SourceError)
from builder.spec import DatasetSpec, SourceSpec

SUNSETS: dict[str, date] = {"google": GOOGLE_SUNSET}
"""Engines whose service ends on a known date."""
PROBE_HITS = 5
"""Results asked for by a probe."""

WORKS, BLOCKED, NEEDS_KEY, DOWN, ENDED, UNAVAILABLE = (
    "works", "blocked", "needs_key", "down", "ended", "unavailable")


@dataclass
class ProbeResult:
    index: int
    engine: str
    status: str
    detail: str
    hits: int = 0
    sunset: Optional[date] = None

    @property
    def ok(self) -> bool:
        return self.status == WORKS


def _classify(exc: EngineError) -> str:
    """A failed probe's status from the engine's error: 401 (or a 400 about the key) needs a
    key, other 4xx are a refusal, no answer or a 5xx is down, except that an answer that is
    not the API's JSON is a block page."""
    message = str(exc)
    if exc.status == 401 or (exc.status == 400 and "key" in message.lower()):
        return NEEDS_KEY
    if 400 <= exc.status < 500 and exc.status != 408:
        return BLOCKED
    return BLOCKED if "is not JSON" in message else DOWN


def probe_source(index: int, src: SourceSpec, spec: DatasetSpec, *,
                 today: Optional[date] = None) -> ProbeResult:
    """Build source ``index``'s engine and ask it once (see the module doc)."""
    sunset = SUNSETS.get(src.engine)
    result = ProbeResult(index, src.engine, UNAVAILABLE, "", sunset=sunset)
    if sunset is not None and (today or date.today()) >= sunset:
        result.status, result.detail = ENDED, f"the service ended on {sunset.isoformat()}"
        return result
    if src.engine == "urllist":
        return _probe_list(result, src)
    try:
        engine = make_engine(src, spec)
    except EngineSunset as exc:
        result.status, result.detail = ENDED, str(exc)
        return result
    except EngineNeedsKey as exc:
        result.status, result.detail = NEEDS_KEY, str(exc)
        return result
    except (EngineUnavailable, SourceError) as exc:
        result.detail = str(exc)
        return result
    label = spec.labels[0]
    query = spec.queries_of(label)[0]
    try:
        page = engine.search(query, label=label, page=0, per_page=min(src.per_page, PROBE_HITS))
    except EngineError as exc:
        result.status, result.detail = _classify(exc), str(exc)
        return result
    except SourceError as exc:
        result.detail = str(exc)
        return result
    finally:
        engine.close()
    result.status, result.hits = WORKS, len(page.hits)
    result.detail = f"{len(page.hits)} hit{'s' if len(page.hits) != 1 else ''} for {query!r}"
    if sunset is not None:
        days = (sunset - (today or date.today())).days
        result.detail += f"; the service ends on {sunset.isoformat()} (in {days} days)"
    return result


def _probe_list(result: ProbeResult, src: SourceSpec) -> ProbeResult:
    """A URL list works when its first slice reads (it is never read whole here)."""
    from builder.listsource import head_rows

    try:
        rows = head_rows(src.path or "", PROBE_HITS, url_column=src.url_column,
                         label_column=src.label_column)
    except SourceError as exc:
        result.detail = str(exc)
        return result
    result.status, result.hits = WORKS, len(rows)
    result.detail = f"{len(rows)} row{'s' if len(rows) != 1 else ''} read from its first slice"
    return result


def probe_sources(spec: DatasetSpec, *, today: Optional[date] = None) -> list[ProbeResult]:
    """One ``ProbeResult`` per source of ``spec``, in order."""
    return [probe_source(i, src, spec, today=today) for i, src in enumerate(spec.sources)]


def probe_table(results: list[ProbeResult]) -> str:
    """The probe results as a plain-text table for the terminal."""
    rows = [("#", "engine", "status", "detail")]
    rows += [(str(r.index), r.engine, r.status.replace("_", " "), r.detail) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}"
                     for a, b, c, d in rows)


__all__ = ["BLOCKED", "DOWN", "ENDED", "NEEDS_KEY", "ProbeResult", "SUNSETS", "UNAVAILABLE",
           "WORKS", "probe_source", "probe_sources", "probe_table"]
