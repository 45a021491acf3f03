"""Token bucket, adaptive limiter, circuit breaker, quota, governor and fallback chain."""

from __future__ import annotations

import pickle

import pytest

from builder.ratelimit import (
    AdaptiveLimiter,
    CircuitBreaker,
    CircuitOpen,
    DayFile,
    EngineGovernor,
    EngineLimits,
    MAX_HOLD_S,
    FallbackChain,
    PROBE_POLL_S,
    Quota,
    QuotaExceeded,
    TokenBucket,
    budget_key,
    limits_for,
)
from builder.spec import SourceSpec


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def test_bucket_spends_burst_then_paces_at_rate():
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert [bucket.reserve() for _ in range(3)] == pytest.approx([0.5, 1.0, 1.5])
    assert bucket.tokens == pytest.approx(-3.0)
    clock.advance(1.5)  # the queued three have gone; bucket empty
    assert bucket.reserve() == pytest.approx(0.5)
    clock.advance(10)  # refills to burst, never above
    assert bucket.tokens == pytest.approx(3.0)


def test_bucket_rate_change_repays_debt_at_new_rate_and_pause():
    clock = FakeClock()
    bucket = TokenBucket(rate=1.0, burst=1, clock=clock)
    bucket.reserve()
    assert bucket.reserve() == pytest.approx(1.0)
    bucket.set_rate(0.5)  # 2 tokens owed -> now 4 s to repay
    assert bucket.reserve() == pytest.approx(4.0)
    clock.advance(6)
    bucket.pause_until(clock() + 10)
    assert bucket.reserve() == pytest.approx(10.0)
    assert bucket.reserve() == pytest.approx(12.0)
    with pytest.raises(ValueError):
        TokenBucket(rate=0)


def test_adaptive_limiter_halves_on_error_and_recovers_gradually():
    clock = FakeClock()
    lim = AdaptiveLimiter(rate=4.0, burst=1, min_rate=0.5, clock=clock)
    lim.on_error()
    assert lim.rate == 2.0
    for _ in range(5):
        lim.on_error()
    assert lim.rate == 0.5  # floor
    lim.on_success()
    assert lim.rate == pytest.approx(0.55)
    for _ in range(100):
        lim.on_success()
    assert lim.rate == 4.0  # capped at the base rate


def test_adaptive_limiter_blocks_until_retry_after():
    clock = FakeClock()
    lim = AdaptiveLimiter(rate=10.0, burst=5, clock=clock)
    lim.on_error(retry_after=30)
    assert lim.reserve() == pytest.approx(30.0)
    assert lim.reserve() == pytest.approx(30.2)  # then paced at the halved rate (5/s)
    clock.advance(31)
    assert lim.reserve() == pytest.approx(0.0, abs=1e-9)


def test_a_huge_retry_after_holds_requests_only_up_to_the_cap():
    clock = FakeClock()
    lim = AdaptiveLimiter(rate=10.0, burst=5, clock=clock)
    lim.on_error(retry_after=10.0 ** 9)
    assert lim.reserve() == pytest.approx(AdaptiveLimiter.MAX_RETRY_AFTER_S)
    assert lim.blocked_until == pytest.approx(clock() + AdaptiveLimiter.MAX_RETRY_AFTER_S)


def test_breaker_opens_after_threshold_then_half_open_probe():
    clock = FakeClock()
    br = CircuitBreaker(failure_threshold=3, cooldown_s=10, clock=clock)
    for _ in range(2):
        assert br.allow()
        br.on_failure()
    br.on_success()  # a success resets the count
    for _ in range(3):
        br.on_failure()
    assert br.state == "open" and not br.allow()
    assert br.retry_in() == pytest.approx(10)
    clock.advance(10)
    assert br.state == "half_open"
    assert br.allow()  # the one probe
    assert not br.allow() and not br.would_allow()
    br.on_failure()  # probe failed: open again for a full cooldown
    assert br.state == "open" and br.opens == 2
    clock.advance(9.9)
    assert not br.allow()
    clock.advance(0.1)
    assert br.allow()
    br.on_success()
    assert br.state == "closed" and br.allow() and br.allow()


def test_a_governors_refusal_says_when_to_ask_again_and_how_many_probes_failed():
    """A refused search learns when to ask again (the rest of the cooldown while the breaker
    is open, soon while another search's probe is out, whose answer may close it) and how
    many probes failed in a row, by which a waiting job decides the engine is down. A
    request let through before the breaker opened that fails while it is half-open is no
    probe."""
    clock = FakeClock()
    gov = EngineGovernor("x", EngineLimits(rate=1000.0, burst=1000, failure_threshold=2,
                                           cooldown_s=30), clock=clock)
    for _ in range(3):
        gov.acquire()
    gov.record(False, status=429)
    gov.record(False, status=429)
    clock.advance(10)
    with pytest.raises(CircuitOpen) as info:
        gov.acquire()
    assert info.value.retryable and info.value.retry_after == pytest.approx(20)
    assert info.value.probes_failed == 0 and info.value.status == 429  # busy, but there
    clock.advance(20)
    gov.record(False, status=503)  # the third request, not a probe: opens it again
    assert gov.breaker.probes_failed == 0
    for failed in range(1, 3):
        clock.advance(30)
        gov.acquire()  # the probe
        with pytest.raises(CircuitOpen) as info:
            gov.acquire()
        assert info.value.retry_after == pytest.approx(PROBE_POLL_S)
        gov.record(False, status=503)
        with pytest.raises(CircuitOpen, match=f"{failed} probes failed") as info:
            gov.acquire()
        assert info.value.probes_failed == failed and info.value.status == 503
        assert info.value.retry_after == pytest.approx(30)
    clock.advance(30)
    gov.acquire()  # a later probe, which the engine answers
    gov.record(True)
    assert gov.breaker.probes_failed == 0
    rate = gov.limiter.rate
    for status in (401, 404, 400, 401, 404):  # the job's own (on Ray, one job's of several)
        gov.acquire()
        gov.record(False, status=status)
    assert gov.breaker.state == "closed" and gov.limiter.rate == rate
    gov.record(False, status=503)
    gov.record(False, status=0)  # no answer: the breaker opens; the engine's last status 0
    with pytest.raises(CircuitOpen) as info:
        gov.acquire()
    assert info.value.status == 0
    clock.advance(30)
    gov.acquire()  # the probe, which another job's wrong key takes
    gov.record(False, status=401)
    assert gov.breaker.probes_failed == 0
    gov.acquire()  # no verdict: the next search probes at once


@pytest.mark.parametrize("status", [403, 418, 429, 503, 0])
def test_a_block_opens_the_breaker_where_a_refused_key_does_not(status):
    """DuckDuckGo answers a block with 403, Google a rate limit: the engine's state, which
    slows the pace and opens the breaker; a 401, 404 or 400 is the job's own request."""
    gov = EngineGovernor("x", EngineLimits(rate=1000.0, burst=1000, failure_threshold=2,
                                           cooldown_s=30), clock=FakeClock())
    for _ in range(2):
        gov.acquire()
        gov.record(False, status=status)
    with pytest.raises(CircuitOpen):
        gov.acquire()


def test_breaker_probe_that_never_reports_frees_the_slot():
    clock = FakeClock()
    br = CircuitBreaker(failure_threshold=1, cooldown_s=5, clock=clock)
    br.on_failure()
    clock.advance(5)
    assert br.allow() and not br.allow()
    clock.advance(5)
    assert br.allow()


def test_quota_per_job_and_per_utc_day():
    wall = FakeClock(t=1_700_000_000.0)  # 2023-11-14 22:13 UTC
    q = Quota(per_job=5, per_day=3, wall_clock=wall)
    for _ in range(3):
        assert q.check()
        q.use()
    assert not q.check() and "daily quota of 3" in q.why_not()
    wall.advance(2 * 3600)  # past midnight UTC: a new day
    assert q.check() and q.day_used == 0
    q.use(2)
    assert not q.check() and "job quota of 5" in q.why_not()
    assert Quota().check()


def test_the_day_s_count_outlives_the_process_and_adds_up_across_processes(tmp_path):
    """Each job (and a rate limiter restarted after its process died) began the day at 0, so
    every new run could spend an engine's daily quota again. The count is the day file's,
    and concurrent processes add to it under a lock."""
    import multiprocessing

    wall = FakeClock(t=1_700_000_000.0)
    limits = EngineLimits(rate=1e6, burst=1e6, max_requests_per_day=10)
    first = EngineGovernor("google", limits, wall_clock=wall,
                           day_file=DayFile("google", tmp_path))
    for _ in range(4):
        first.acquire()
    again = EngineGovernor("google", limits, wall_clock=wall, day_file=DayFile("google", tmp_path))
    assert again.snapshot()["quota"]["day_used"] == 4
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_to_day, args=(tmp_path, 50)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert DayFile("google", tmp_path).used(first.quota._day) == 154
    with pytest.raises(QuotaExceeded, match="daily quota of 10"):
        again.acquire()
    other = EngineGovernor("google", limits, wall_clock=wall,
                           day_file=DayFile("google@127.0.0.1:1", tmp_path))
    other.acquire()  # another endpoint, another budget
    wall.advance(2 * 3600)  # past midnight UTC: a new day
    again.acquire()
    assert again.snapshot()["quota"]["day_used"] == 1


def test_a_governor_started_while_its_engine_is_held_waits_it_out(tmp_path):
    """A limiter Ray restarted (or another job's governor on the machine) began with its
    breaker closed and no retry-after pause, and asked an engine that was refusing requests
    again at once. The breaker's cooldown and the pause are kept in the budget's file (across
    the day's end too), and a governor started meanwhile waits out what is left of them."""
    wall = FakeClock(t=1_700_000_000.0)
    limits = EngineLimits(rate=1.0, burst=1, failure_threshold=2, cooldown_s=60)

    def governor(engine: str) -> EngineGovernor:
        return EngineGovernor(engine, limits, clock=FakeClock(5.0), wall_clock=wall,
                              day_file=DayFile(engine, tmp_path))

    first = governor("bing")
    for _ in range(2):
        first.acquire()
        first.record(False, 503)
    paused = governor("ddg")
    paused.acquire()
    paused.record(False, 429, retry_after=30)
    wall.advance(20)
    again = governor("bing")
    with pytest.raises(CircuitOpen) as refused:
        again.acquire()
    assert refused.value.retry_after == pytest.approx(40)
    assert refused.value.status == 503  # the engine answered: a job waits for it (UnitPlanner)
    assert again.snapshot()["state"] == "open"
    assert governor("ddg").acquire() == pytest.approx(10)
    wall.advance(40)  # both over: nothing is held
    assert governor("bing").acquire() == 0.0 and governor("ddg").acquire() == 0.0
    wall.t = 1_700_006_300.0  # 100 s before midnight UTC, with a daily budget in the file
    limits.max_requests_per_day = 1000
    before = governor("brave")
    before.acquire()
    before.record(False, 429, retry_after=3600)  # capped at 600 s
    wall.advance(300)  # a new day: its count begins again, the pause goes on
    after = governor("brave")
    assert after.acquire() == pytest.approx(300)
    assert after.snapshot()["quota"]["day_used"] == 1
    assert governor("brave").acquire() == pytest.approx(300)


def test_only_the_servers_own_refusals_hold_other_governors(tmp_path):
    """A hold in the budget's file reaches every job on the machine: it is written for what
    every job meets (a block, 429, 5xx, no answer), not for a refused key or request (401,
    404, 400),
    is no longer than ``MAX_HOLD_S`` whatever a job's ``cooldown_s``, ends when the engine
    answers a probe, and one past ``MAX_HOLD_S`` (a clock that jumped, an edited file) is
    none. Reading the holds makes no file."""
    wall, mono = FakeClock(t=1_700_000_000.0), FakeClock(5.0)

    def governor(cooldown_s: float = 60.0) -> EngineGovernor:
        return EngineGovernor("bing", EngineLimits(rate=1.0, burst=1, failure_threshold=1,
                                                   cooldown_s=cooldown_s),
                              clock=mono, wall_clock=wall,
                              day_file=DayFile("bing", tmp_path))

    first = governor()
    assert list(tmp_path.iterdir()) == []
    first.acquire()
    first.record(False, 401, retry_after=30)
    assert governor().snapshot()["state"] == "closed" and governor().acquire() == 0.0
    long, short = governor(cooldown_s=1e9), governor(cooldown_s=10)
    long.acquire()
    short.acquire()
    long.record(False, 503)
    assert DayFile("bing", tmp_path).holds()["breaker"] == wall.t + MAX_HOLD_S
    short.record(False, 503)
    wall.advance(10)
    mono.advance(10)
    assert governor().snapshot()["state"] == "open"  # the long one's hold
    short.acquire()  # its probe: the engine answers
    short.record(True)
    assert governor().snapshot()["state"] == "closed"
    assert DayFile("bing", tmp_path).holds() == {}  # the hold and its status forgotten
    day = DayFile("bing", tmp_path)
    day.hold("breaker", wall.t + 10 * MAX_HOLD_S, 0.0)  # as an edited file may hold
    assert governor().snapshot()["state"] == "closed"
    day.hold("breaker", wall.t + 30, wall.t)  # a hold past MAX_HOLD_S is replaced
    assert day.holds()["breaker"] == wall.t + 30


def _add_to_day(directory, n):
    from builder.ratelimit import DayFile

    day = DayFile("google", directory)
    for _ in range(n):
        day.add("2023-11-14")


def test_a_day_file_that_cannot_be_written_counts_in_memory(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    day = DayFile("google", blocker)  # its folder would be inside a file
    assert day.add("2023-11-14") == 1 and day.add("2023-11-14", 2) == 3
    assert day.used("2023-11-14") == 3 and day.used("2023-11-15") == 0
    assert sum("cannot keep the daily request count" in r.message for r in caplog.records) == 1


def test_a_torn_day_file_keeps_the_count_this_process_saw(tmp_path):
    day = DayFile("google", tmp_path)
    day.add("2023-11-14", 7)
    day.path.write_text('{"key": "google", "day": "2023-11-14", "us')  # a crash mid-write
    assert day.add("2023-11-14") == 8


def test_governor_paces_counts_and_raises_on_quota_and_open_circuit():
    clock = FakeClock()
    gov = EngineGovernor("x", EngineLimits(rate=1.0, burst=2, failure_threshold=2,
                                           cooldown_s=60, max_requests_per_job=6),
                         clock=clock, wall_clock=lambda: 1_700_000_000.0)
    assert [gov.acquire() for _ in range(3)] == pytest.approx([0.0, 0.0, 1.0])
    gov.record(True)
    gov.record(False, status=429, retry_after=20)
    assert gov.acquire() == pytest.approx(20.0)
    gov.record(False, status=500)
    with pytest.raises(CircuitOpen) as info:
        gov.acquire()
    assert info.value.retryable and info.value.retry_after == pytest.approx(60)
    assert not gov.available() and gov.unavailable_reason() == "circuit_open"
    clock.advance(60)
    gov.acquire()  # the probe
    gov.record(True)
    gov.acquire()
    with pytest.raises(QuotaExceeded, match="job quota of 6"):
        gov.acquire()
    snap = gov.snapshot()
    assert snap["requests"] == 6 and snap["successes"] == 2 and snap["failures"] == 2
    assert snap["rate_limited"] == 1 and snap["circuit_opens"] == 1
    assert snap["refused"] == {"quota": 1, "circuit_open": 1}
    assert snap["quota"]["job_used"] == 6 and snap["state"] == "closed"
    assert snap["rate"] < snap["base_rate"] == 1.0


def test_charge_counts_a_searchs_further_requests_and_paces_the_next():
    """One search may take several requests (Google's 10 results a request): acquire counts
    its first, charge the rest, against both quotas, and the next acquire waits for them."""
    clock = FakeClock()
    gov = EngineGovernor("x", EngineLimits(rate=1.0, burst=1, max_requests_per_job=6),
                         clock=clock, wall_clock=lambda: 1_700_000_000.0)
    assert gov.acquire() == 0.0
    gov.charge(4)
    gov.charge(0)
    gov.charge(-1)  # a search answered from a cache took none
    assert gov.acquire() == pytest.approx(5.0)
    snap = gov.snapshot()
    assert snap["requests"] == 6 and snap["quota"]["job_used"] == 6
    with pytest.raises(QuotaExceeded, match="job quota of 6"):
        gov.acquire()


@pytest.mark.parametrize("engine,a,b", [
    ("sandbox", "http://127.0.0.1:8800", "http://127.0.0.1:08800/other/path"),
    ("sandbox", "http://LocalHost.:80/", "http://localhost"),
    ("openverse", "https://mirror.example/v1/images/", "https://u:p@MIRROR.example:0443/x"),
    ("sandbox", "http://[::1]:8800/", "http://[0:0::1]:8800/"),
    ("sandbox", "http://127.0.0.1:8800/", "http://0x7f.1:8800/"),
    ("sandbox", "http://127.0.0.1/", "http://2130706433:80/"),
    ("openverse", "https://xn--bcher-kva.example/", "https://BÜCHER.example/"),
])
def test_every_spelling_of_a_server_is_one_budget(engine, a, b):
    """Each budget is a limiter actor on Ray's head node that outlives the job: a spec that
    spelled one allowed server a thousand ways (a zero-padded port, upper case, a final dot)
    made a thousand actors, each with its own rate and daily quota."""
    field = "url" if engine == "sandbox" else "base_url"

    def source(url: str) -> SourceSpec:
        if field == "url":
            return SourceSpec(engine=engine, url=url)
        return SourceSpec(engine=engine, options={"base_url": url})

    key = budget_key(engine, source(a))
    assert key == budget_key(engine, source(b)) and key.startswith(f"{engine}@")
    assert "u:p" not in key and "/" not in key


def test_a_server_name_that_is_no_address_stays_a_name():
    from builder.ratelimit import endpoint_server

    assert endpoint_server("http://x\x00.com/") == "x\x00.com:80"
    assert endpoint_server("http://cafe.example:8/") == "cafe.example:8"
    assert endpoint_server("http://add/") == "add:80"  # hex digits, but no address
    assert endpoint_server("http://0x7f.1/") == "127.0.0.1:80"
    assert endpoint_server("file:///etc/passwd") is None


def test_the_public_api_however_spelled_is_the_engines_own_budget():
    for url in ("https://api.openverse.org/v1/images/", "https://API.openverse.org.:443/v2",
                "https://\uff41pi.openverse.org/v1/images/"):  # a full-width a
        assert budget_key("openverse", SourceSpec(engine="openverse",
                                                  options={"base_url": url})) == "openverse"
    assert budget_key("google", SourceSpec(engine="google")) == "google"
    assert budget_key("openverse", SourceSpec(
        engine="openverse", options={"base_url": "http://api.openverse.org/"})) == \
        "openverse@api.openverse.org:80"


def test_a_saved_sources_url_without_a_host_is_no_public_services_budget():
    """A base_url with no host filed under the public service's budget: its failures, every
    request's, opened that engine's breaker for every job on the machine (on Ray, the
    cluster). A new spec refuses such a URL; one an earlier version saved still loads, and its
    source gets a budget of its own."""
    from builder.errors import SpecError
    from builder.spec import parse_spec

    spec = {"name": "t", "classes": {"cat": None},
            "sources": [{"engine": "wikimedia", "options": {"base_url": "commons-api"}}]}
    with pytest.raises(SpecError, match="sources.0.options.base_url: must be an http"):
        parse_spec(spec)
    saved = parse_spec(spec, stored=True)
    assert budget_key("wikimedia", saved.sources[0]) == "wikimedia@no-server"
    # read again as saved where it is validated again: a job the API queued (build
    # --spec-env, with the command line's overrides), recheck --write's copy
    from argparse import Namespace

    from builder.spec import DatasetSpec
    from cluster.cli import _apply_overrides

    again = _apply_overrides(saved, Namespace(spec_env="PIXCRAWLER_SPEC", output="/tmp/x",
                                              overwrite=True))
    assert again.sources[0].endpoint() == "commons-api" and again.output.overwrite
    assert DatasetSpec.model_validate(saved.model_dump(mode="json")).sources[0].endpoint()


def test_limits_from_source_options():
    lim = limits_for("google", {"rate": 3, "max_requests_per_day": 50, "base_url": "x"})
    assert (lim.rate, lim.max_requests_per_day, lim.burst) == (3, 50, 2)
    assert limits_for("unknown-engine") == EngineLimits()


def test_fallback_chain_follows_spec_order_and_records_switches():
    clock = FakeClock()
    govs = {name: EngineGovernor(name, EngineLimits(failure_threshold=1, cooldown_s=30,
                                                    max_requests_per_job=2 if name == "b"
                                                    else None),
                                 clock=clock)
            for name in ("a", "b", "c")}
    chain = FallbackChain(["a", "b", "c"], govs)
    assert chain.pick() == "a" and chain.fallbacks == []
    govs["a"].acquire()
    govs["a"].record(False, status=429)  # a's breaker opens
    assert chain.pick() == "b"
    govs["b"].acquire()
    govs["b"].acquire()  # b's quota spent
    assert chain.pick() == "c"
    assert chain.pick() == "c"  # no new record while nothing changes
    clock.advance(30)  # a half-open again
    assert chain.pick() == "a"
    chain.mark_unavailable("a", "missing GOOGLE_API_KEY")
    chain.mark_unavailable("c", "gone")
    assert chain.pick() is None
    assert chain.snapshot()["fallbacks"] == [
        {"from": "a", "to": "b", "reason": "circuit_open"},
        {"from": "b", "to": "c", "reason": "quota_exhausted"},
        {"from": "c", "to": "a", "reason": "recovered"},
        {"from": "a", "to": None, "reason": "unavailable: missing GOOGLE_API_KEY"},
    ]
    with pytest.raises(ValueError):
        FallbackChain(["a", "zzz"], govs)


def test_reconfigured_governor_keeps_quota_breaker_slow_down_and_hold():
    """New options (another job, another source of the engine) change the limits only: what the
    engine already counted and refused must not be forgotten."""
    clock = FakeClock()
    gov = EngineGovernor("x", EngineLimits(rate=4.0, burst=1, failure_threshold=2,
                                           cooldown_s=60, max_requests_per_day=4),
                         clock=clock, wall_clock=lambda: 1_700_000_000.0)
    for _ in range(3):
        gov.acquire()
    gov.record(False, status=429)
    gov.record(False, status=429)  # rate 4 -> 1 a second; breaker open
    gov.reconfigure(EngineLimits(rate=8.0, burst=4, failure_threshold=2, cooldown_s=60,
                                 max_requests_per_day=4))
    snap = gov.snapshot()
    assert snap["state"] == "open" and snap["failures"] == 2 and snap["rate_limited"] == 2
    assert snap["quota"]["day_used"] == 3 and snap["base_rate"] == 8.0
    assert snap["rate"] == pytest.approx(2.0)  # still a quarter of the base rate
    with pytest.raises(CircuitOpen):
        gov.acquire()
    clock.advance(60)
    gov.acquire()  # the probe
    gov.record(True)
    with pytest.raises(QuotaExceeded, match="daily quota of 4"):
        gov.acquire()
    gov.reconfigure(EngineLimits(rate=8.0, burst=4, max_requests_per_day=5))
    gov.acquire()  # the new daily quota applies
    assert gov.snapshot()["quota"]["day_used"] == 5


def test_reconfigure_keeps_a_retry_after_hold():
    clock = FakeClock()
    gov = EngineGovernor("x", EngineLimits(rate=1.0, burst=1), clock=clock)
    gov.acquire()
    gov.record(False, status=429, retry_after=30)
    gov.reconfigure(EngineLimits(rate=100.0, burst=50))
    assert gov.acquire() == pytest.approx(30.0)
    with pytest.raises(ValueError):
        gov.reconfigure(EngineLimits(rate=1.0, failure_threshold=0))


@pytest.mark.parametrize("make", [
    lambda: CircuitOpen("ddg: circuit open after 6 failures; next try in 59.5s", 59.5),
    lambda: CircuitOpen("ddg: circuit open after 6 failures, 2 probes failed", 59.5, 2, 429),
    lambda: QuotaExceeded("ddg: daily quota of 100 requests spent"),
], ids=["circuit_open", "probes_failed", "quota"])
def test_a_governors_refusal_reaches_a_worker_process_as_itself(make):
    """The in-process runner's governors answer the worker processes' searches over a pickled
    channel. CircuitOpen could not be rebuilt from its args (its retry_after was missing), so
    the worker got a RuntimeError that no unit handles, and the whole job stopped the first
    time an engine's breaker opened."""
    from builder.worker_procs import _portable

    exc = make()
    exc.requests = 2
    sent = _portable(exc)
    back = pickle.loads(pickle.dumps(sent))
    assert type(back) is type(exc) and str(back) == str(exc)
    assert (back.retryable, back.retry_after, back.requests) == \
        (exc.retryable, exc.retry_after, 2)
    assert getattr(back, "probes_failed", None) == getattr(exc, "probes_failed", None)
    assert back.status == exc.status
