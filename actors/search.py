"""Search workers: run engine queries for the coordinator, paced by the engines' rate limiters."""

from __future__ import annotations

import time
from typing import Any

import ray

from builder.engines import SearchEngine
from builder.errors import EngineError, SourceError
from builder.job import SearchTask
from builder.pipeline import build_engines
from builder.spec import DatasetSpec

SearchResult = tuple[str, Any]


@ray.remote(max_concurrency=4)
class SearchWorker:
    """Holds one instance of each of the job's engines; answers ``search(task)``.

    Returns ``("ok", SearchPage)`` or ``("error", {message, retryable, retry_after, final})``:
    engine failures are data for the coordinator, not exceptions across the actor boundary.
    """

    def __init__(self, spec: DatasetSpec, limiters: dict[int, Any], job_id: str = ""):
        self.engines: list[SearchEngine] = build_engines(spec)
        self.limiters = limiters
        self.job_id = job_id

    def search(self, task: SearchTask) -> SearchResult:
        limiter = self.limiters.get(task.source)
        if limiter is not None:
            status, wait = ray.get(limiter.acquire.remote(self.job_id))
            if status == "circuit_open":
                return "error", {"message": wait, "retryable": True, "retry_after": 1.0,
                                 "final": False}
            if status != "ok":
                return "error", {"message": wait, "retryable": False, "retry_after": None,
                                 "final": True}
            if wait > 0:
                time.sleep(wait)
        engine = self.engines[task.source]
        try:
            page = engine.search(task.query, label=task.label, page=task.page,
                                 per_page=task.per_page)
        except EngineError as exc:
            if limiter is not None:
                limiter.record.remote(False, exc.status, exc.retry_after)
            return "error", {"message": str(exc), "retryable": exc.retryable,
                             "retry_after": exc.retry_after, "final": False}
        except SourceError as exc:  # EngineUnavailable, or a source that cannot be read
            return "error", {"message": str(exc), "retryable": False, "retry_after": None,
                             "final": True}
        if limiter is not None:
            limiter.record.remote(True, 200, None)
        return "ok", page
