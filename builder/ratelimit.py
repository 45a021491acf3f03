"""Pacing, back-off, circuit breaking, quotas and fallbacks for search engines: pure logic.

One ``EngineGovernor`` per engine combines a token bucket that slows down on errors
(``AdaptiveLimiter``), a ``CircuitBreaker`` and a ``Quota``. It never sleeps: ``acquire()`` reserves
a request slot and returns how long the caller must wait before sending it, so one governor (held
by one Ray actor) can pace every search worker of the cluster. ``FallbackChain`` picks, in the
spec's source order, the first engine that is neither broken nor out of quota.

Every class takes a ``clock`` (seconds, monotonic) so tests drive time by hand.

A daily quota outlives the process that counts it: ``DayFile`` keeps each budget's requests of
the UTC day in a file under the user's state directory, shared by every job on the machine (and
by an engine's limiter actor restarted there), so a new job, or a limiter restarted after its
process died, cannot spend the day's quota again.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from yarl import URL

from builder.errors import EngineError
from builder.spec import PUBLIC_ENDPOINTS, host_key

Clock = Callable[[], float]

log = logging.getLogger("pixcrawler.ratelimit")


class QuotaExceeded(EngineError):
    """The engine's request quota for this job or this UTC day is spent."""

    def __init__(self, message: str):
        super().__init__(message, retryable=False)


class CircuitOpen(EngineError):
    """The engine failed repeatedly; it is not asked again until ``retry_after`` seconds pass.
    No request went out. ``probes_failed``: the breaker's probes that failed in a row since
    the engine last answered (a job waiting for the engine gives up after a few,
    ``builder.job.GIVE_UP_PROBES``); ``status``: the HTTP status of the last failure it
    counted (0: no answer, or not known), by which a job tells a busy engine from one that is
    not there."""

    def __init__(self, message: str, retry_after: float, probes_failed: int = 0,
                 status: int = 0):
        super().__init__(message, retryable=True, retry_after=retry_after, status=status)
        self.probes_failed = probes_failed

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from ``args`` alone, it would lack ``retry_after``: it crosses from the
        # runner to its worker processes (``builder.worker_procs``), which would receive a
        # RuntimeError that no unit handles, and the job would stop.
        return type(self), (str(self), self.retry_after, self.probes_failed, self.status), \
            self.__dict__


PROBE_POLL_S = 2.0
"""How soon a refused search asks again while another's probe is out (its answer decides
whether the breaker closes, usually well within ``cooldown_s``)."""


class TokenBucket:
    """``rate`` tokens a second, up to ``burst`` saved; reservations may run into debt.

    Kept as a "theoretical arrival time" (GCRA): ``_tat`` is when the bucket would be full again.
    ``reserve(n)`` takes ``n`` tokens now and returns how long the caller must wait until they
    exist; later callers queue behind earlier ones.
    """

    def __init__(self, rate: float, burst: float = 1.0, *, clock: Clock = time.monotonic):
        if rate <= 0:
            raise ValueError(f"rate must be > 0 tokens/s, got {rate}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1 token, got {burst}")
        self._rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._tat = clock()

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def tokens(self) -> float:
        """Tokens available now; negative when reservations are queued."""
        now = self._clock()
        return self.burst - max(0.0, self._tat - now) * self._rate

    def reserve(self, n: float = 1.0) -> float:
        """Take ``n`` tokens; return the seconds to wait before using them (0 if available)."""
        now = self._clock()
        self._tat = max(self._tat, now) + n / self._rate
        return max(0.0, self._tat - now - self.burst / self._rate)

    def set_rate(self, rate: float) -> None:
        """Change the rate; tokens already owed are repaid at the new rate."""
        if rate <= 0:
            raise ValueError(f"rate must be > 0 tokens/s, got {rate}")
        now = self._clock()
        owed = max(0.0, self._tat - now) * self._rate
        self._rate = float(rate)
        self._tat = now + owed / self._rate

    def pause_until(self, when: float) -> None:
        """No token before ``when``; from then on, one token per ``1/rate`` (no saved burst)."""
        self._tat = max(self._tat, when + (self.burst - 1.0) / self._rate)


class AdaptiveLimiter:
    """A token bucket whose rate halves on each error and creeps back up on successes.

    ``on_error`` multiplies the rate by ``decrease`` (never below ``min_rate``) and, given a
    ``retry_after``, holds every request until then, for at most ``MAX_RETRY_AFTER_S``: a server
    asking for more (or a bogus header) must not stall the job for good; the circuit breaker
    handles a source that keeps failing. ``on_success`` multiplies it by ``increase`` up to the
    configured ``base_rate``.
    """

    MAX_RETRY_AFTER_S = 600.0

    def __init__(self, rate: float, burst: float = 1.0, *, min_rate: float | None = None,
                 decrease: float = 0.5, increase: float = 1.1, clock: Clock = time.monotonic):
        if not 0 < decrease < 1:
            raise ValueError(f"decrease must be in (0, 1), got {decrease}")
        if increase <= 1:
            raise ValueError(f"increase must be > 1, got {increase}")
        self.base_rate = float(rate)
        self.min_rate = float(min_rate if min_rate is not None else rate / 32)
        if not 0 < self.min_rate <= self.base_rate:
            raise ValueError(f"min_rate must be in (0, rate={rate}], got {self.min_rate}")
        self.decrease = decrease
        self.increase = increase
        self._clock = clock
        self.bucket = TokenBucket(rate, burst, clock=clock)
        self.blocked_until = 0.0

    @property
    def rate(self) -> float:
        return self.bucket.rate

    def reserve(self, n: float = 1.0) -> float:
        return self.bucket.reserve(n)

    def on_error(self, retry_after: float | None = None) -> None:
        self.bucket.set_rate(max(self.min_rate, self.rate * self.decrease))
        if retry_after:
            self.hold_for(float(retry_after))

    def hold_for(self, seconds: float) -> None:
        """No request for ``seconds`` (at most ``MAX_RETRY_AFTER_S``) from now."""
        until = self._clock() + min(seconds, self.MAX_RETRY_AFTER_S)
        self.blocked_until = max(self.blocked_until, until)
        self.bucket.pause_until(until)

    def on_success(self) -> None:
        if self.rate < self.base_rate:
            self.bucket.set_rate(min(self.base_rate, self.rate * self.increase))

    def set_limits(self, rate: float, burst: float = 1.0, min_rate: float | None = None) -> None:
        """Configure a new base rate, burst and floor, keeping what errors did: the current rate
        stays the same fraction of the base rate, and a retry-after hold still holds."""
        floor = float(min_rate if min_rate is not None else rate / 32)
        if not 0 < floor <= rate:
            raise ValueError(f"min_rate must be in (0, rate={rate}], got {floor}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1 token, got {burst}")
        current = max(floor, self.rate * rate / self.base_rate)
        self.base_rate, self.min_rate = float(rate), floor
        self.bucket.burst = float(burst)
        self.bucket.set_rate(current)
        if self.blocked_until > self._clock():
            self.bucket.pause_until(self.blocked_until)


ENGINE_STATE_4XX = frozenset({403, 408, 418, 425, 429})
"""Client errors that are the engine's state, not the request's: a block (DuckDuckGo's 403
and Google's rate limits among them, a 418 some services block with), a timeout, too early,
too many requests."""


def jobs_own(status: int) -> bool:
    """Whether a failed request's ``status`` is the job's own doing (400, 401, 404, ...)
    rather than the engine's state (no answer, ``ENGINE_STATE_4XX``, a 5xx)."""
    return 400 <= status < 500 and status not in ENGINE_STATE_4XX


class CircuitBreaker:
    """closed -> open after ``failure_threshold`` failures in a row; open for ``cooldown_s``;
    then half-open: one probe request goes through; its success closes the breaker, its failure
    opens it again. A probe that never reports back frees the slot after another ``cooldown_s``.
    """

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(self, failure_threshold: int = 5, cooldown_s: float = 60.0, *,
                 clock: Clock = time.monotonic):
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        self.failure_threshold = failure_threshold
        self.cooldown_s = float(cooldown_s)
        self._clock = clock
        self._state = self.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.opens = 0
        self.probes_failed = 0
        """Probes in a row that failed (since the engine last answered)."""
        self._probe_since: float | None = None

    @property
    def state(self) -> str:
        if self._state == self.OPEN and self._clock() - self.opened_at >= self.cooldown_s:
            self._state = self.HALF_OPEN
            self._probe_since = None
        return self._state

    def retry_in(self) -> float:
        """Seconds until a request may be let through (0 when one may go now)."""
        state = self.state
        if state == self.OPEN:
            return max(0.0, self.opened_at + self.cooldown_s - self._clock())
        if state == self.HALF_OPEN and self._probe_since is not None:
            return max(0.0, self._probe_since + self.cooldown_s - self._clock())
        return 0.0

    def would_allow(self) -> bool:
        """``allow()`` without taking the half-open probe slot."""
        return self.retry_in() == 0.0

    def allow(self) -> bool:
        state = self.state
        if state == self.CLOSED:
            return True
        if state == self.OPEN:
            return False
        now = self._clock()
        if self._probe_since is None or now - self._probe_since >= self.cooldown_s:
            self._probe_since = now
            return True
        return False

    def on_success(self) -> None:
        self._state = self.CLOSED
        self.failures = 0
        self.probes_failed = 0
        self._probe_since = None

    def no_verdict(self) -> None:
        """A request let through ended saying nothing of the engine's state: were it the
        probe, the next request may probe."""
        if self.state == self.HALF_OPEN:
            self._probe_since = None

    def on_failure(self) -> None:
        if self.state == self.HALF_OPEN:
            if self._probe_since is not None:  # (not a request let through before it opened)
                self.probes_failed += 1
            self._open()
            return
        self.failures += 1
        if self._state == self.CLOSED and self.failures >= self.failure_threshold:
            self._open()

    def _open(self) -> None:
        self._state = self.OPEN
        self.opened_at = self._clock()
        self._probe_since = None
        self.opens += 1

    def open_for(self, seconds: float) -> None:
        """Open, to let a probe through in ``seconds`` (at most ``cooldown_s``): a breaker
        before this one opened, and its cooldown has that long to run."""
        self._state = self.OPEN
        self.failures = max(self.failures, self.failure_threshold)
        self.opened_at = self._clock() + min(seconds, self.cooldown_s) - self.cooldown_s
        self._probe_since = None


def state_dir() -> Path:
    """Where PixCrawler keeps what outlives a job on this machine: ``$XDG_STATE_HOME/pixcrawler``
    (``~/.local/state/pixcrawler`` when it is not set)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "pixcrawler"


_NUMERIC_HOST = re.compile(r"[0-9a-fA-FxX.]+")
"""A host the resolver may read as an IPv4 address in another form (``127.1``, ``0x7f.1``)."""


def endpoint_server(url: str) -> Optional[str]:
    """The server a URL's requests reach, as ``host:port``: the host as the HTTP client reads
    it (yarl: lower case, IDNA, full-width forms folded) without a final dot, an IP address
    in its usual form (``127.1`` and ``0x7f.1`` are 127.0.0.1 to the resolver), the port
    filled in, no user info. None for a URL without a host or port."""
    try:
        parts = URL(url)
        host, port = host_key(parts.raw_host or ""), parts.port
    except (ValueError, TypeError):
        return None
    if not host or not port:
        return None
    try:
        host = ipaddress.ip_address(host).compressed
    except ValueError:
        if _NUMERIC_HOST.fullmatch(host):
            try:
                host = socket.inet_ntoa(socket.inet_aton(host))
            except OSError:
                pass  # not an address after all: a name
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


NO_SERVER = "no-server"
"""What ``budget_key`` names a server as where a source's URL has none (a spec an earlier
version saved; ``parse_spec`` refuses it in a new one): its failures, every request's, then
open no public service's breaker."""


def budget_key(engine: str, source: Any = None) -> str:
    """The name of an engine's shared budget: ``<engine>``, or ``<engine>@<host>:<port>`` for a
    source pointed at another server than the engine's public API (the sandbox, a test fake,
    a self-hosted mirror): another service, another budget. The server is named as requests
    reach it (``endpoint_server``), so that no other spelling of a server, the public API's
    included, gets a budget (and, on Ray, a limiter actor) of its own. ``source`` is a
    ``SourceSpec`` (or None)."""
    endpoint = source.endpoint() if source is not None else None
    if not endpoint:
        return engine
    server = endpoint_server(endpoint)
    if server is None:  # (a saved spec's: every request fails, and is no public service's)
        return f"{engine}@{NO_SERVER}"
    public = PUBLIC_ENDPOINTS.get(engine)
    if public is not None and server == endpoint_server(public):
        return engine
    return f"{engine}@{server}"


STATUS_SUFFIX = "_status"
"""A hold's status in a budget's file: ``breaker_status`` beside ``breaker``."""

MAX_HOLD_S = 600.0
"""The longest a hold in a budget's file keeps a governor that starts meanwhile from asking:
a job's own ``cooldown_s`` may be far longer, and is its own (``AdaptiveLimiter`` caps a
``Retry-After`` the same)."""


class DayFile:
    """A budget's requests per UTC day, in ``<state_dir>/engine-days/<key>.json``, read and
    changed under an exclusive ``flock`` so concurrent jobs on the machine add up. A file that
    cannot be used (read-only home, disk full) never fails a search: the count goes on in
    memory, with one warning."""

    def __init__(self, key: str, directory: Optional[Path] = None):
        safe = re.sub(r"[^A-Za-z0-9_.@-]", "_", key)[:80]
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        self.path = (directory or state_dir() / "engine-days") / f"{safe}-{digest}.json"
        self.key = key
        self._memory: dict[str, int] = {}
        self._jobs_day, self._jobs = "", {}
        """What ``add_job`` counted, for when the file cannot be used."""
        self._failed = False

    def _update(self, day: Optional[str],
                change: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The file's data for ``day`` (a new day's starts empty; None: whichever day the
        file holds), passed to ``change`` under the file's lock and written back where
        ``change`` says it changed it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            try:
                data = json.loads(f.read() or "{}")
            except ValueError:
                data = {}  # cut short by a crash mid-write: count from the memory's figures
            if not isinstance(data, dict) or day is not None and data.get("day") != day:
                holds = data.get("holds") if isinstance(data, dict) else None
                data = {"key": self.key, "day": day or "", "used": 0}
                if isinstance(holds, dict):
                    data["holds"] = holds  # (a hold outlives the day it began in)
            if change(data):
                f.seek(0)
                f.truncate()
                f.write(json.dumps(data))
                f.flush()
            return data

    def _change(self, day: str, n: int) -> int:
        def count(data: dict[str, Any]) -> bool:
            data["used"] = max(int(data.get("used", 0)), self._memory.get(day, 0)) + n
            return n != 0

        return int(self._update(day, count)["used"])

    def add_job(self, day: str, job: str, n: int = 1) -> int:
        """Count ``n`` more requests of ``job`` (a job's source) on ``day``; its total that
        day. Kept in the file, so a limiter restarted on this node (Ray runs its ``__init__``
        again) holds each running job to its quota still."""
        if self._jobs_day != day:
            self._jobs_day, self._jobs = day, {}
        if not self._failed:
            def count(data: dict[str, Any]) -> bool:
                jobs = data.setdefault("jobs", {})
                jobs[job] = max(int(jobs.get(job, 0)), self._jobs.get(job, 0)) + n
                return n != 0

            try:
                self._jobs[job] = int(self._update(day, count)["jobs"][job])
                return self._jobs[job]
            except OSError as exc:
                self._fail(exc)
        self._jobs[job] = self._jobs.get(job, 0) + n
        return self._jobs[job]

    def jobs(self, day: str) -> dict[str, int]:
        """Each job's requests on ``day`` (``add_job``)."""
        if not self._failed:
            try:
                return {k: int(v) for k, v in
                        self._update(day, lambda data: False).get("jobs", {}).items()}
            except OSError as exc:
                self._fail(exc)
        return dict(self._jobs) if self._jobs_day == day else {}

    def add(self, day: str, n: int = 1) -> int:
        """Count ``n`` more requests on ``day``; the day's total."""
        if not self._failed:
            try:
                total = self._change(day, n)
                self._memory = {day: total}
                return total
            except OSError as exc:
                self._fail(exc)
        self._memory = {day: self._memory.get(day, 0) + n}
        return self._memory[day]

    def used(self, day: str) -> int:
        """The requests counted on ``day`` by every process that shares the file."""
        if not self._failed:
            try:
                return self._change(day, 0)
            except OSError as exc:
                self._fail(exc)
        return self._memory.get(day, 0)

    def hold(self, kind: str, until: float, now: float, status: int = 0) -> None:
        """Record that the budget's engine takes no request before ``until`` (Unix time;
        ``now`` is the time it is) for ``kind``'s sake (``breaker``: its breaker opened;
        ``retry_after``: it asked for a pause), unless the file holds a later time already
        (one past ``MAX_HOLD_S`` from now is no hold: a clock that jumped, an edited file). A
        governor that starts on this machine while it holds (a restarted limiter, another
        job's) waits it out. ``status`` is the HTTP status of the failure that caused it
        (``EngineGovernor.last_status``), kept beside it as ``<kind>_status``: a job that
        finds the breaker held then knows the engine answered, and waits for it."""
        def later(holds: dict[str, Any]) -> bool:
            if until <= _number(holds.get(kind)) <= now + MAX_HOLD_S:
                return False
            holds[kind] = until
            holds[kind + STATUS_SUFFIX] = status
            return True

        self._change_holds(later)

    def release(self, kind: str) -> None:
        """Forget ``kind``'s hold: the engine answered again."""
        def forget(holds: dict[str, Any]) -> bool:
            status = holds.pop(kind + STATUS_SUFFIX, None)
            return holds.pop(kind, None) is not None or status is not None

        if self.path.exists():
            self._change_holds(forget)

    def _change_holds(self, change: Callable[[dict[str, Any]], bool]) -> None:
        """``change`` the file's holds under its lock (written back where it says it changed
        them), unless the file cannot be used."""
        if self._failed:
            return

        def on_holds(data: dict[str, Any]) -> bool:
            holds = data.get("holds")
            if not isinstance(holds, dict):
                holds = data["holds"] = {}
            return change(holds)

        try:
            self._update(None, on_holds)
        except OSError as exc:
            self._fail(exc)

    def holds(self) -> dict[str, float]:
        """What ``hold`` recorded: each kind's time (Unix), past ones included, and the status
        of each (``<kind>_status``). Reads without making the file (a budget with no daily
        quota may never have one)."""
        if self._failed:
            return {}
        try:
            with open(self.path, encoding="utf-8") as f:
                fcntl.flock(f, fcntl.LOCK_SH)
                data = json.loads(f.read() or "{}")
        except FileNotFoundError:
            return {}
        except ValueError:
            return {}  # (cut short by a crash mid-write: nothing held)
        except OSError as exc:
            self._fail(exc)
            return {}
        holds = data.get("holds") if isinstance(data, dict) else None
        return {str(k): _number(v) for k, v in holds.items()} if isinstance(holds, dict) else {}

    def _fail(self, exc: OSError) -> None:
        self._failed = True
        log.warning("cannot keep the daily request count of %s in %s (%s): it is counted for "
                    "this process only, so other jobs today may spend its daily quota again",
                    self.key, self.path, exc)


def _number(value: Any) -> float:
    """``value`` as a float, 0.0 where the file holds something else (an edited file)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def utc_day(t: float) -> str:
    """The UTC day of Unix time ``t`` (``2026-12-06``), as budgets count their days."""
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).date().isoformat()


class Quota:
    """At most ``per_job`` requests in this job and ``per_day`` in each UTC day (None: no limit).

    ``wall_clock`` is Unix time (it decides the UTC day). With ``day_file`` the day's count is
    the file's, shared with every other process that uses it; else it is this object's own.
    """

    def __init__(self, per_job: int | None = None, per_day: int | None = None, *,
                 wall_clock: Clock = time.time, day_file: Optional[DayFile] = None):
        self.per_job = per_job
        self.per_day = per_day
        self._wall_clock = wall_clock
        self.day_file = day_file
        self.job_used = 0
        self._day = self._today()
        self._day_used = 0

    def _today(self) -> str:
        return utc_day(self._wall_clock())

    def _roll(self) -> None:
        today = self._today()
        if today != self._day:
            self._day, self._day_used = today, 0

    @property
    def day_used(self) -> int:
        self._roll()
        if self.day_file is not None and self.per_day is not None:
            return self.day_file.used(self._day)
        return self._day_used

    def check(self) -> bool:
        if self.per_job is not None and self.job_used >= self.per_job:
            return False
        return self.per_day is None or self.day_used < self.per_day

    def use(self, n: int = 1) -> None:
        """Count ``n`` requests. Only a budget with a daily limit is written to its file; the
        check and the count are two steps, so processes that check at once may each take the
        day's last request."""
        self._roll()
        self.job_used += n
        if self.day_file is not None and self.per_day is not None:
            self.day_file.add(self._day, n)
        else:
            self._day_used += n

    def why_not(self) -> str:
        if self.per_job is not None and self.job_used >= self.per_job:
            return f"job quota of {self.per_job} requests spent"
        if self.per_day is not None and self.day_used >= self.per_day:
            return f"daily quota of {self.per_day} requests spent (UTC day {self._day})"
        return ""


@dataclass
class EngineLimits:
    """How hard an engine may be used; overridable per source through ``SourceSpec.options``."""

    rate: float = 1.0
    burst: float = 1.0
    min_rate: float | None = None
    failure_threshold: int = 5
    cooldown_s: float = 60.0
    max_requests_per_job: int | None = None
    max_requests_per_day: int | None = None

    OPTION_KEYS = ("rate", "burst", "min_rate", "failure_threshold", "cooldown_s",
                   "max_requests_per_job", "max_requests_per_day")


SHARED_LIMIT_KEYS = tuple(k for k in EngineLimits.OPTION_KEYS if k != "max_requests_per_job")
"""The option keys that set the limits every job of an engine shares (its one limiter actor);
``max_requests_per_job`` is each job's own."""


# Conservative defaults from each service's published limits or observed tolerance.
DEFAULT_LIMITS: dict[str, EngineLimits] = {
    "duckduckgo": EngineLimits(rate=0.5, burst=2),
    "bing": EngineLimits(rate=0.5, burst=2),
    "wikimedia": EngineLimits(rate=2.0, burst=4),
    "openverse": EngineLimits(rate=0.2, burst=5, max_requests_per_day=200),
    "google": EngineLimits(rate=1.0, burst=2, max_requests_per_day=100),
    "baidu": EngineLimits(rate=0.5, burst=2),
    "sandbox": EngineLimits(rate=1000.0, burst=1000),
    "urllist": EngineLimits(rate=1e6, burst=1e6),
}


def limits_for(engine: str, options: Mapping[str, Any] | None = None) -> EngineLimits:
    """The engine's default limits with any of ``EngineLimits.OPTION_KEYS`` from ``options``."""
    base = DEFAULT_LIMITS.get(engine, EngineLimits())
    overrides = {k: v for k, v in (options or {}).items() if k in EngineLimits.OPTION_KEYS}
    return EngineLimits(**{**{k: getattr(base, k) for k in EngineLimits.OPTION_KEYS},
                           **overrides})


@dataclass
class _Counters:
    requests: int = 0
    successes: int = 0
    failures: int = 0
    rate_limited: int = 0
    waited_s: float = 0.0
    refused: dict[str, int] = field(default_factory=lambda: {"quota": 0, "circuit_open": 0})


class EngineGovernor:
    """Pacing, breaker and quota for one engine. ``acquire`` before each request, ``record`` after.

    Every request ``acquire`` lets through counts against the quota, whatever its outcome.
    """

    def __init__(self, engine: str, limits: EngineLimits | None = None, *,
                 clock: Clock = time.monotonic, wall_clock: Clock = time.time,
                 day_file: Optional[DayFile] = None):
        self.engine = engine
        self.limits = limits or limits_for(engine)
        lim = self.limits
        self.limiter = AdaptiveLimiter(lim.rate, lim.burst, min_rate=lim.min_rate, clock=clock)
        self.breaker = CircuitBreaker(lim.failure_threshold, lim.cooldown_s, clock=clock)
        self.last_status = 0
        """The HTTP status of the last failure the breaker counted (the engine's state: a
        block, a 429, a 5xx; 0: no answer, or none yet)."""
        self.quota = Quota(lim.max_requests_per_job, lim.max_requests_per_day,
                           wall_clock=wall_clock, day_file=day_file)
        self.counters = _Counters()
        self._wall_clock = wall_clock
        self.day_file = day_file
        self._resume_holds()

    def _resume_holds(self) -> None:
        """Wait out the holds the budget's file records (``DayFile.hold``): an open breaker's
        cooldown and a retry-after pause a governor before this one was given. A limiter Ray
        restarted began with neither, and asked an engine that was refusing it at once."""
        if self.day_file is None:
            return
        now = self._wall_clock()
        holds = self.day_file.holds()
        for kind in ("breaker", "retry_after"):
            left = holds.get(kind, 0.0) - now
            if not 0 < left <= MAX_HOLD_S:  # (over, or no hold: see DayFile.hold)
                continue
            if kind == "breaker":
                self.breaker.open_for(left)
                status = holds.get(kind + STATUS_SUFFIX, 0.0)
                self.last_status = int(status) if 100 <= status < 600 else 0
            else:
                self.limiter.hold_for(left)

    def reconfigure(self, limits: EngineLimits) -> None:
        """Apply new limits but keep what already happened: the requests counted against the
        quotas, the breaker's state and failures, the slow-down and any retry-after hold. A
        fresh governor would let the engine's daily quota be spent again, and ask an engine that
        is refusing requests again at once."""
        if limits.failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {limits.failure_threshold}")
        self.limiter.set_limits(limits.rate, limits.burst, limits.min_rate)
        self.breaker.failure_threshold = limits.failure_threshold
        self.breaker.cooldown_s = float(limits.cooldown_s)
        self.quota.per_job = limits.max_requests_per_job
        self.quota.per_day = limits.max_requests_per_day
        self.limits = limits

    def available(self) -> bool:
        """Whether ``acquire`` would let a request through now (takes nothing)."""
        return self.quota.check() and self.breaker.would_allow()

    def unavailable_reason(self) -> str:
        if not self.quota.check():
            return "quota_exhausted"
        if not self.breaker.would_allow():
            return "circuit_open"
        return ""

    def acquire(self) -> float:
        """Reserve one request (a search's first; ``charge`` counts the rest); return seconds to
        wait before sending it.

        Raises ``QuotaExceeded`` or ``CircuitOpen`` (with ``retry_after``) instead.
        """
        if not self.quota.check():
            self.counters.refused["quota"] += 1
            raise QuotaExceeded(f"{self.engine}: {self.quota.why_not()}; raise "
                                "options.max_requests_per_job/max_requests_per_day or add "
                                "another source")
        if not self.breaker.allow():
            self.counters.refused["circuit_open"] += 1
            raise self._refusal()
        self.quota.use()
        wait = self.limiter.reserve()
        self.counters.requests += 1
        self.counters.waited_s += wait
        return wait

    def _refusal(self) -> CircuitOpen:
        breaker = self.breaker
        wait = breaker.retry_in()
        if breaker.state == breaker.HALF_OPEN:  # another search's probe is out
            return CircuitOpen(f"{self.engine}: circuit half-open, a probe is out",
                               retry_after=min(wait, PROBE_POLL_S),
                               probes_failed=breaker.probes_failed, status=self.last_status)
        failed = f", {breaker.probes_failed} probes failed" if breaker.probes_failed else ""
        return CircuitOpen(f"{self.engine}: circuit open after {breaker.failures} failures"
                           f"{failed}; next try in {wait:.1f}s", retry_after=wait,
                           probes_failed=breaker.probes_failed, status=self.last_status)

    def charge(self, n: int) -> None:
        """Count ``n`` more requests of a search ``acquire`` let through (one search may take
        several: ``SearchPage.requests``): against the quotas, and paced, so that the next
        ``acquire`` waits for them too."""
        if n <= 0:
            return
        self.quota.use(n)
        self.limiter.reserve(n)
        self.counters.requests += n

    def record(self, success: bool, status: int = 0, retry_after: float | None = None) -> None:
        """Report the outcome of a request ``acquire`` let through. A failure that is the
        job's own (``jobs_own``: a refused key, a wrong path, a bad request, which on Ray
        another job of the engine need not share) is counted but tells the breaker and the
        pace nothing; were it the breaker's probe, another search may probe at once."""
        if success:
            self.counters.successes += 1
            self.limiter.on_success()
            if self.breaker.state != CircuitBreaker.CLOSED and self.day_file is not None:
                self.day_file.release("breaker")
            self.breaker.on_success()
            return
        self.counters.failures += 1
        if status == 429:
            self.counters.rate_limited += 1
        if jobs_own(status):
            self.breaker.no_verdict()
            return
        opens = self.breaker.opens
        self.last_status = status  # (an answer of the engine's state: see jobs_own)
        self.limiter.on_error(retry_after)
        self.breaker.on_failure()
        if self.day_file is not None:
            # (the server's own state, which every job of the budget meets: a refused key or
            # request returned above)
            now = self._wall_clock()
            if self.breaker.opens != opens:
                self.day_file.hold("breaker", now + min(self.breaker.cooldown_s, MAX_HOLD_S),
                                   now, status)
            if retry_after:
                self.day_file.hold("retry_after", now + min(float(retry_after), MAX_HOLD_S),
                                   now)

    def snapshot(self) -> dict[str, Any]:
        c = self.counters
        return {
            "engine": self.engine, "state": self.breaker.state,
            "rate": round(self.limiter.rate, 6), "base_rate": self.limiter.base_rate,
            "requests": c.requests, "successes": c.successes, "failures": c.failures,
            "rate_limited": c.rate_limited, "waited_s": round(c.waited_s, 3),
            "refused": dict(c.refused), "circuit_opens": self.breaker.opens,
            "quota": {"job_used": self.quota.job_used, "per_job": self.quota.per_job,
                      "day_used": self.quota.day_used, "per_day": self.quota.per_day},
        }


@dataclass(frozen=True)
class Fallback:
    from_engine: str
    to_engine: str | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"from": self.from_engine, "to": self.to_engine, "reason": self.reason}


class FallbackChain:
    """Engines in spec order; ``pick()`` gives the first usable one and records each switch.

    An engine is skipped while its breaker is open, when its quota is spent, or for good once
    ``mark_unavailable`` named it (missing credentials, say). Each change of the engine picked is
    recorded once (``from``, ``to``, ``reason``), not every call: the reason the previous engine
    was skipped, or ``recovered`` when an earlier engine is usable again.
    """

    def __init__(self, engines: list[str], governors: Mapping[str, EngineGovernor]):
        missing = [e for e in engines if e not in governors]
        if missing:
            raise ValueError(f"no governor for engine(s) {missing}")
        self.engines = list(engines)
        self.governors = governors
        self.unavailable: dict[str, str] = {}
        self.fallbacks: list[Fallback] = []
        self.current: str | None = self.engines[0] if self.engines else None

    def _skip_reason(self, engine: str) -> str:
        if engine in self.unavailable:
            return f"unavailable: {self.unavailable[engine]}"
        return self.governors[engine].unavailable_reason()

    def pick(self) -> str | None:
        """The first usable engine in order, or None if none is usable now."""
        skipped: list[tuple[str, str]] = []
        chosen = None
        for engine in self.engines:
            reason = self._skip_reason(engine)
            if not reason:
                chosen = engine
                break
            skipped.append((engine, reason))
        if chosen != self.current:
            if self.current is not None:
                reason = dict(skipped).get(self.current, "recovered")
                self.fallbacks.append(Fallback(self.current, chosen, reason))
            self.current = chosen
        return chosen

    def mark_unavailable(self, engine: str, reason: str) -> None:
        """Never pick ``engine`` again in this chain."""
        self.unavailable[engine] = reason

    def snapshot(self) -> dict[str, Any]:
        return {"engines": list(self.engines), "current": self.current,
                "unavailable": dict(self.unavailable),
                "fallbacks": [f.as_dict() for f in self.fallbacks]}
