"""One named rate-limiter actor per search engine, shared by every search worker of the cluster.

It holds a ``builder.ratelimit.EngineGovernor`` (token bucket that slows down on 429/errors and
recovers, circuit breaker, daily quota) plus per-job quotas. It is detached and found by name
(``ratelimit3:<engine>`` in the ``pixcrawler`` namespace), so concurrent jobs share one budget.
The ``3`` is its calls' version: a limiter an older PixCrawler left running on the cluster
(detached actors outlive their jobs) takes other arguments or answers otherwise (before 3 a
refusal was a message, not the ``CircuitOpen`` a worker raises), so it is not found by this
name.
The day's request count is kept in a file on the limiter's node (``builder.ratelimit.DayFile``),
so a limiter restarted there, and the jobs that run on that machine without Ray, count on
from it; so is each job's count against its ``max_requests_per_job``, and when the engine may
be asked again after its breaker opened or it asked for a pause (``DayFile.hold``).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Optional

import ray

from actors import NAMESPACE
from builder.ratelimit import (SHARED_LIMIT_KEYS, CircuitOpen, DayFile, EngineGovernor,
                               EngineLimits, QuotaExceeded, budget_key, limits_for, utc_day)
from builder.spec import SourceSpec


@ray.remote(num_cpus=0)
class RateLimiter:
    """One engine's (or endpoint's) limiter, shared by every job of the cluster: its rate,
    breaker and daily budget are the engine's. A job's own request quota
    (``max_requests_per_job``) comes with each of its calls, so no job's quota is another's,
    and a restarted limiter (Ray gives it back its first arguments) still applies it, counting
    on from the job's count in the node's file."""

    def __init__(self, engine: str, options: Optional[dict[str, Any]] = None, key: str = ""):
        self.engine = engine
        self.options = _shared(options)
        self.days = DayFile(key or engine)
        self.governor = EngineGovernor(engine, self._limits(self.options), day_file=self.days)
        # A restarted limiter (Ray runs this again) counts each job on from the file: a fresh
        # count let every running job spend its max_requests_per_job again.
        self.job_used: Counter = Counter(self.days.jobs(utc_day(time.time())))

    def configure(self, options: Optional[dict[str, Any]] = None) -> None:
        """Apply the limits the options set (``SHARED_LIMIT_KEYS``; those they leave unset take
        the engine's defaults). Options that set none leave the limits as they are: the limits
        a job set stay, for every later job of the engine, until another job sets some.

        New limits change only the limits: the requests already counted (today's, each
        job's), the breaker and the slow-down stay, or a job with other options would reset
        the engine's budget."""
        shared = _shared(options)
        if not shared or shared == self.options:
            return
        self.governor.reconfigure(self._limits(shared))
        self.options = shared

    def _limits(self, options: dict[str, Any]) -> EngineLimits:
        """The engine's limits for ``options``, without a per-job quota: the governor's own
        would count every job together (this actor counts each job apart)."""
        limits = limits_for(self.engine, options)
        limits.max_requests_per_job = None
        return limits

    def acquire(self, job_id: str = "", quota: Optional[int] = None) -> tuple[str, Any]:
        """("ok", seconds to wait), ("quota", message) or ("circuit_open", the
        ``CircuitOpen`` its worker raises: when to ask again, and whether to). ``job_id`` names
        what is counted (a job's source: ``source_key``), ``quota`` its
        ``max_requests_per_job``."""
        if quota is not None and self.job_used[job_id] >= quota:
            return "quota", (f"{self.engine}: job quota of {quota} requests spent; raise "
                             "options.max_requests_per_job or add another source")
        try:
            wait = self.governor.acquire()
        except QuotaExceeded as exc:
            return "quota", str(exc)
        except CircuitOpen as exc:
            return "circuit_open", exc
        self.job_used[job_id] = self.days.add_job(utc_day(time.time()), job_id)
        return "ok", wait

    def charge(self, job_id: str, n: int) -> None:
        """``n`` more requests of a search ``acquire`` let through (``EngineGovernor.charge``),
        counted against ``job_id``'s quota too."""
        if n > 0:
            self.job_used[job_id] = self.days.add_job(utc_day(time.time()), job_id, n)
            self.governor.charge(n)

    def record(self, success: bool, status: int = 0, retry_after: Optional[float] = None) -> None:
        self.governor.record(success, status, retry_after)

    def snapshot(self, job_id: str = "", quota: Optional[int] = None) -> dict[str, Any]:
        """The engine's state (its rate, breaker and requests, every job's together), with the
        quota's per-job figures and ``jobs`` those of ``job_id`` alone: another job's id is not
        the asking job's to see (its stats reach its API user)."""
        snap = self.governor.snapshot()
        used = self.job_used.get(job_id, 0)
        snap["quota"] = dict(snap["quota"], job_used=used, per_job=quota)
        snap["jobs"] = {job_id: used}
        return snap


def _shared(options: Optional[dict[str, Any]]) -> dict[str, Any]:
    return {k: v for k, v in (options or {}).items() if k in SHARED_LIMIT_KEYS}


def source_key(job_id: str, source: int) -> str:
    """What a limiter counts a job's requests by: each source of the job apart, so that two
    sources of one engine each get their own ``max_requests_per_job``, as they do in a job
    run without Ray (a governor each)."""
    return f"{job_id}#{source}"


def job_quota(source: SourceSpec) -> Optional[int]:
    """A source's own request quota in its job (``max_requests_per_job``), if it has one."""
    return limits_for(source.engine, source.options).max_requests_per_job


HEAD_RESOURCE = "node:__internal_head__"
"""The resource Ray gives the head node alone."""


LIMITER_PREFIX = "ratelimit3:"
"""Names a limiter of this version (``acquire(job, quota)`` answering a refusal with its
``CircuitOpen``, ``snapshot(job, quota)``)."""


def limiter_name(engine: str, source: Optional[SourceSpec] = None) -> str:
    """``LIMITER_PREFIX`` and the engine's budget (``builder.ratelimit.budget_key``)."""
    return f"{LIMITER_PREFIX}{budget_key(engine, source)}"


def get_rate_limiter(engine: str, source: Optional[SourceSpec] = None) -> Any:
    """The cluster's limiter for the source's engine/endpoint, created on first use, with the
    limits the source's options set applied (``RateLimiter.configure``)."""
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
    actor.configure.remote(options)
    return actor
