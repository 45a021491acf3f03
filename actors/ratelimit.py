"""One named rate-limiter actor per search engine, shared by every search worker of the cluster.

It holds a ``builder.ratelimit.EngineGovernor`` (token bucket that slows down on 429/errors and
recovers, circuit breaker, daily quota) plus per-job quotas. It is detached and found by name
(``ratelimit:<engine>`` in the ``pixcrawler`` namespace), so concurrent jobs share one budget.
The day's request count is kept in a file on the limiter's node (``builder.ratelimit.DayFile``),
so a limiter restarted there, and the jobs that run on that machine without Ray, count on
from it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

import ray

from actors import NAMESPACE
from builder.ratelimit import (CircuitOpen, DayFile, EngineGovernor, EngineLimits,
                               QuotaExceeded, budget_key, limits_for)
from builder.spec import SourceSpec


@ray.remote(num_cpus=0)
class RateLimiter:
    def __init__(self, engine: str, options: Optional[dict[str, Any]] = None, key: str = ""):
        self.engine = engine
        self.options = dict(options or {})
        limits, _ = self._limits(self.options)
        self.governor = EngineGovernor(engine, limits, day_file=DayFile(key or engine))
        self.job_used: Counter = Counter()
        self.job_quota: dict[str, int] = {}
        """Each job's own ``max_requests_per_job``: a job's quota is its own, not the last
        configured one (which let one job's 0 stop every other job of the engine)."""

    def configure(self, options: Optional[dict[str, Any]] = None, job_id: str = "") -> None:
        """Apply the options' limits, and their per-job quota to ``job_id``; the limits are
        left alone when they are those already in force.

        Every job and source of this engine configures the one shared limiter, so new options
        change only the limits: the requests already counted (today's, each job's), the breaker
        and the slow-down stay, or a job with other options would reset the engine's budget.
        """
        options = dict(options or {})
        limits, per_job = self._limits(options)
        if per_job is None:
            self.job_quota.pop(job_id, None)
        else:
            self.job_quota[job_id] = per_job
        shared = {k: v for k, v in options.items() if k != "max_requests_per_job"}
        if shared == {k: v for k, v in self.options.items() if k != "max_requests_per_job"}:
            return
        self.governor.reconfigure(limits)
        self.options = options

    def _limits(self, options: dict[str, Any]) -> tuple[EngineLimits, Optional[int]]:
        """The engine's limits for ``options`` and, apart, the per-job quota, which this actor
        counts per job id: the governor's own would count every job together."""
        limits = limits_for(self.engine, options)
        per_job, limits.max_requests_per_job = limits.max_requests_per_job, None
        return limits, per_job

    def acquire(self, job_id: str = "") -> tuple[str, Any]:
        """("ok", seconds to wait) or ("quota"|"circuit_open", message)."""
        quota = self.job_quota.get(job_id)
        if quota is not None and self.job_used[job_id] >= quota:
            return "quota", (f"{self.engine}: job quota of {quota} requests spent; raise "
                             "options.max_requests_per_job or add another source")
        try:
            wait = self.governor.acquire()
        except QuotaExceeded as exc:
            return "quota", str(exc)
        except CircuitOpen as exc:
            return "circuit_open", str(exc)
        self.job_used[job_id] += 1
        return "ok", wait

    def record(self, success: bool, status: int = 0, retry_after: Optional[float] = None) -> None:
        self.governor.record(success, status, retry_after)

    def snapshot(self, job_id: str = "") -> dict[str, Any]:
        """The engine's state, and the requests of ``job_id`` alone (another job's id is not
        the asking job's to see: its stats reach its API user)."""
        return dict(self.governor.snapshot(), jobs={job_id: self.job_used.get(job_id, 0)})


HEAD_RESOURCE = "node:__internal_head__"
"""The resource Ray gives the head node alone."""


def limiter_name(engine: str, source: Optional[SourceSpec] = None) -> str:
    """``ratelimit:`` and the engine's budget (``builder.ratelimit.budget_key``)."""
    return f"ratelimit:{budget_key(engine, source)}"


def get_rate_limiter(engine: str, source: Optional[SourceSpec] = None, job_id: str = "") -> Any:
    """The cluster's limiter for the source's engine/endpoint, created on first use, with the
    source's options applied (their per-job quota to ``job_id``)."""
    options = dict(source.options) if source else {}
    options.pop("base_url", None)
    # Restarted when its process is lost (its calls retried there): every search unit of the
    # engine needs it, and a lost one failed them all until the job gave up. It lives on the
    # head node (HEAD_RESOURCE), whoever creates it, so every restart counts on from the same
    # day's file (builder.ratelimit.DayFile); losing the head ends the cluster anyway.
    actor = RateLimiter.options(name=limiter_name(engine, source), namespace=NAMESPACE,
                                lifetime="detached", get_if_exists=True, max_restarts=-1,
                                max_task_retries=-1, resources={HEAD_RESOURCE: 0.001}
                                ).remote(engine, options, budget_key(engine, source))
    actor.configure.remote(options, job_id)
    return actor
