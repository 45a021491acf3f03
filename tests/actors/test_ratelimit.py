"""The per-engine rate-limiter actor, driven as its plain Python class (no Ray): every job and
source of an engine configures the one shared limiter, so new options must change the limits
only, never the budget the engine has already spent or an open breaker."""

from __future__ import annotations

import pytest

from actors.ratelimit import RateLimiter
from builder.ratelimit import CircuitOpen

Limiter = RateLimiter.__ray_metadata__.modified_class


@pytest.fixture(autouse=True)
def own_state(tmp_path, monkeypatch):
    """Each test's limiters count in files of their own (the files outlive a limiter, as its
    node's do)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))


def test_a_restarted_limiter_holds_each_running_job_to_its_quota():
    """Ray runs a restarted limiter's __init__ again with its first arguments: each job's
    count began at 0, so every running job could spend its max_requests_per_job again (and
    the API's max_budget_share with it). The counts are kept beside the day's, in the file."""
    rl = Limiter("sandbox", {}, "sandbox@test-restart")
    assert [rl.acquire("job-a#0", 3)[0] for _ in range(2)] == ["ok", "ok"]
    again = Limiter("sandbox", {}, "sandbox@test-restart")  # as Ray restarts it
    assert [again.acquire("job-a#0", 3)[0] for _ in range(2)] == ["ok", "quota"]
    assert again.acquire("job-b#0", 3)[0] == "ok"
    assert again.snapshot("job-a#0", 3)["quota"]["job_used"] == 3
    daily = Limiter("google", {}, "google@test-restart")  # 100 a day: the day's count too
    assert [daily.acquire("job-a#0", 5)[0] for _ in range(2)] == ["ok", "ok"]
    daily.charge("job-a#0", 2)
    snap = Limiter("google", {}, "google@test-restart").snapshot("job-a#0", 5)
    assert (snap["quota"]["job_used"], snap["quota"]["day_used"]) == (4, 4)


def test_a_restarted_limiter_keeps_its_engine_held():
    """A limiter Ray restarted while its breaker was open, or an engine had asked for a
    pause, sent the next job's request at once: both are kept in the node's file."""
    rl = Limiter("bing", {}, "bing@test-restart-held")
    for _ in range(5):
        assert rl.acquire("job-a")[0] == "ok"
        rl.record(False, 503)
    again = Limiter("bing", {}, "bing@test-restart-held")  # as Ray restarts it
    verdict, refusal = again.acquire("job-a")
    assert verdict == "circuit_open" and isinstance(refusal, CircuitOpen)
    assert 0 < refusal.retry_after <= 60 and refusal.probes_failed == 0  # the worker raises it
    paused = Limiter("duckduckgo", {}, "duckduckgo@test-restart-held")
    assert paused.acquire("job-a") == ("ok", 0.0)
    paused.record(False, 429, retry_after=120)
    verdict, wait = Limiter("duckduckgo", {}, "duckduckgo@test-restart-held").acquire("job-a")
    assert verdict == "ok" and 110 < wait <= 121


def test_new_options_keep_the_daily_quota_and_an_open_breaker():
    rl = Limiter("google", {}, "google@test-new-options")  # a budget of its own
    for _ in range(100):
        assert rl.acquire("job-a")[0] == "ok"
    assert rl.acquire("job-a")[0] == "quota"  # google: 100 requests a day
    rl.configure({"rate": 0.5})  # another job asks for another rate
    assert rl.acquire("job-b")[0] == "quota"
    snap = rl.snapshot("job-a")
    assert snap["quota"]["day_used"] == 100 and snap["base_rate"] == 0.5
    assert snap["jobs"] == {"job-a": 100}

    rl = Limiter("bing", {})
    for _ in range(5):
        assert rl.acquire("job-a")[0] == "ok"
        rl.record(False, 429)
    rl.configure({"rate": 0.25})
    assert rl.acquire("job-b")[0] == "circuit_open"
    assert rl.snapshot()["state"] == "open"


def test_each_jobs_quota_comes_with_its_calls():
    """The per-job quota was the last job's to configure the limiter: one job's
    max_requests_per_job of 0 stopped every other job of the engine, and a restarted limiter
    forgot them all. Each job's stats listed every job's id that had used the engine (other
    API users' among them)."""
    rl = Limiter("sandbox", {"max_requests_per_job": 2})
    assert [rl.acquire("job-a", 2)[0] for _ in range(3)] == ["ok", "ok", "quota"]
    assert [rl.acquire("job-a", 3)[0] for _ in range(2)] == ["ok", "quota"]
    assert rl.acquire("job-b", 0)[0] == "quota"
    assert [rl.acquire("job-c")[0] for _ in range(4)] == ["ok"] * 4
    snap = rl.snapshot("job-a", 3)
    assert snap["jobs"] == {"job-a": 3} and snap["quota"]["job_used"] == 3
    assert snap["quota"]["per_job"] == 3 and snap["requests"] == 7
    assert rl.snapshot("job-b")["jobs"] == {"job-b": 0}


def test_a_job_that_sets_no_limit_leaves_the_limits_as_they_are():
    rl = Limiter("bing", {"rate": 0.1})
    rl.configure({"proxy": "http://p:3128", "max_requests_per_job": 5})
    assert rl.snapshot()["base_rate"] == 0.1
    rl.configure({"rate": 0.25})
    assert rl.snapshot()["base_rate"] == 0.25


def test_each_source_of_a_job_counts_its_own_quota():
    """Two sources of one engine share its limiter: counted by job alone, one source's
    requests spent the other's quota (a job without Ray gives each its own governor)."""
    from actors.ratelimit import source_key

    rl = Limiter("sandbox", {})
    first, second = source_key("job-a", 0), source_key("job-a", 1)
    assert [rl.acquire(first, 2)[0] for _ in range(3)] == ["ok", "ok", "quota"]
    assert [rl.acquire(second, 2)[0] for _ in range(2)] == ["ok", "ok"]
    assert rl.snapshot(second, 2)["jobs"] == {second: 2}


def test_a_searchs_further_requests_count_against_its_jobs_quota_and_the_day():
    """One search may take several requests (``SearchPage.requests``): the shard worker
    charges those past the first, to its job's quota and the engine's day."""
    rl = Limiter("google", {}, "google@test-charge")
    assert rl.acquire("job-a#0", 10)[0] == "ok"
    rl.charge("job-a#0", 4)
    rl.charge("job-a#0", 0)
    snap = rl.snapshot("job-a#0", 10)
    assert snap["quota"]["job_used"] == 5 and snap["quota"]["day_used"] == 5
    assert snap["requests"] == 5
    rl.charge("job-a#0", 5)
    assert rl.acquire("job-a#0", 10)[0] == "quota"
    assert rl.snapshot("job-b#0")["quota"]["job_used"] == 0
