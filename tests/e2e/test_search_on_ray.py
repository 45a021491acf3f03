"""Search on Ray: cluster-wide pacing, breaker + fallback, paging to target, keyword expansion."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq

from builder.spec import parse_spec
from tests.builder.engines.fakes import FakeServer, Request, Response, closed_port
from tests.e2e.helpers import check_accounting


def run(spec, **kwargs):
    from cluster.coordinator import run_job_async

    return asyncio.run(run_job_async(spec, **kwargs))


def base_spec(out: str, sources: list, **extra) -> dict:
    return {"name": "search", "target": 6, "classes": {"cat": ["cat a", "cat b"],
                                                       "dog": ["dog a", "dog b"]},
            "sources": sources,
            "download": {"timeout_s": 1.0, "retries": 0, "allow_private_networks": True},
            "output": {"uri": out}, **extra}


def recording_proxy(sandbox, queries: list[str] | None = None):
    """A search endpoint in front of the sandbox's that records when each request arrived
    (and, given a list, which query it asked)."""
    times: list[float] = []

    def handle(req: Request) -> Response:
        times.append(time.monotonic())
        if queries is not None:
            queries.append(req.query.get("q", ""))
        qs = "&".join(f"{k}={urllib.parse.quote(v)}" for k, v in req.query.items())
        body = urllib.request.urlopen(f"{sandbox.base_url}/search?{qs}", timeout=5).read()
        return Response(200, json.loads(body))

    return FakeServer(handle), times


def test_rate_limit_holds_across_workers(ray_session, sandbox, tmp_path):
    server, times = recording_proxy(sandbox)
    with server:
        spec = parse_spec(base_spec(str(tmp_path / "o"), [
            {"engine": "sandbox", "url": server.url, "per_page": 3,
             "options": {"rate": 4.0, "burst": 1}}],
            target=8, resources={"workers": 4, "worker_cpus": 0.2}))
        result = run(spec)
    assert len(times) >= 8, "too few searches to measure pacing"
    gaps = [b - a for a, b in zip(times, times[1:])]
    span = times[-1] - times[0]
    assert (len(times) - 1) / span <= 4.0 * 1.15, f"{len(times)} requests in {span:.2f}s"
    assert min(gaps) >= 0.25 * 0.6, f"two requests {min(gaps):.3f}s apart at 4/s"
    snap = next(v for k, v in result.stats["engines"].items() if k.startswith("sandbox@"))
    assert snap["requests"] == len(times) and snap["rate"] <= 4.0


def test_breaker_opens_and_falls_back_to_next_source(ray_session, sandbox, tmp_path):
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"{label}\t{u}\n" for label in ("cat", "dog")
                            for u in sandbox.class_image_urls(label)))
    dead = f"http://127.0.0.1:{closed_port()}"
    spec = parse_spec(base_spec(str(tmp_path / "o"), [
        {"engine": "sandbox", "url": dead, "options": {"failure_threshold": 2,
                                                        "cooldown_s": 30}},
        {"engine": "urllist", "path": str(urls)}]))
    result = run(spec)
    stats = check_accounting(str(tmp_path / "o"))
    assert all(c["accepted"] == 6 for c in stats["classes"].values())
    assert {(f["from"], f["to"]) for f in result.stats["fallbacks"]} == {("sandbox", "urllist")}
    snap = next(v for k, v in result.stats["engines"].items() if k.startswith("sandbox@"))
    assert snap["failures"] >= 2 and (snap["circuit_opens"] >= 1 or snap["state"] != "closed")
    assert result.stats["search_errors"]
    engines = set(pq.read_table(Path(tmp_path / "o") / "data").column("engine").to_pylist())
    assert engines == {"urllist"}


def test_pages_until_target(ray_session, sandbox, tmp_path):
    spec = parse_spec(base_spec(str(tmp_path / "o"), [
        {"engine": "sandbox", "url": sandbox.base_url, "per_page": 4}], target=10))
    result = run(spec)
    assert all(c["accepted"] == 10 for c in result.stats["classes"].values())
    assert result.stats["engine_requests"]["sandbox"] >= 2 * 10 // 4


def chat_server(seen: list):
    def handle(req: Request) -> Response:
        body = req.json()
        seen.append(body)
        label = "cat" if "cat" in json.dumps(body["messages"]) else "dog"
        content = json.dumps({"queries": [f"fluffy {label}", f"{label} sleeping",
                                          f"{label} outdoors"]})
        return Response(200, {"id": "x", "object": "chat.completion", "created": 1,
                              "model": body["model"],
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant",
                                                       "content": content}}]})
    return FakeServer(handle)


def test_keyword_expansion_used_and_cached(ray_session, sandbox, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PIXCRAWLER_LLM_API_KEY", "test-key")
    seen: list = []
    asked: list[str] = []
    proxy, _ = recording_proxy(sandbox, asked)
    with chat_server(seen) as llm, proxy:
        # The server's key goes only to the server's endpoint, which the spec names again.
        monkeypatch.setenv("PIXCRAWLER_LLM_BASE_URL", f"{llm.url}/v1")
        data = base_spec(str(tmp_path / "o1"), [
            {"engine": "sandbox", "url": proxy.url, "per_page": 2}],
            search={"expand": True, "expand_n": 3, "llm_base_url": f"{llm.url}/v1",
                    "llm_model": "tiny-test"})
        result = run(parse_spec(data))
        assert len(seen) == 2 and seen[0]["model"] == "tiny-test"
        exp = result.stats["keyword_expansion"]
        assert exp["source"] == {"cat": "llm", "dog": "llm"}
        assert "fluffy cat" in exp["queries"]["cat"]
        # The sandbox answers every query of a class from one list, so which query's
        # candidate survives dedup is a race; what must hold is that the engine was asked
        # the expanded queries and that every accepted row names a query from the plan.
        assert set(asked) & {"fluffy cat", "cat sleeping", "cat outdoors", "fluffy dog",
                             "dog sleeping", "dog outdoors"}
        planned = {"cat a", "cat b", "dog a", "dog b", *exp["queries"]["cat"],
                   *exp["queries"]["dog"]}
        queries = set(pq.read_table(Path(tmp_path / "o1") / "data").column("query").to_pylist())
        assert queries and queries <= planned
        data["output"]["uri"] = str(tmp_path / "o2")
        run(parse_spec(data))
        assert len(seen) == 2, "the second job should read the cache"


def test_expansion_falls_back_offline_when_llm_down(ray_session, sandbox, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    data = base_spec(str(tmp_path / "o"), [
        {"engine": "sandbox", "url": sandbox.base_url}],
        search={"expand": True, "llm_base_url": f"http://127.0.0.1:{closed_port()}/v1"})
    result = run(parse_spec(data))
    assert result.stats["keyword_expansion"]["source"] == {"cat": "offline", "dog": "offline"}
    assert all(c["accepted"] == 6 for c in result.stats["classes"].values())


def test_list_sources_are_read_in_slices_by_the_workers(ray_session, sandbox, tmp_path):
    """A URL list queries no engine: the driver issues slices, workers read them."""
    runners: list = []
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"{label}\t{u}\n" for label in ("cat", "dog")
                            for u in sandbox.class_image_urls(label)))
    data = base_spec(str(tmp_path / "o"), [{"engine": "urllist", "path": str(urls)}])
    data["resources"] = {"batch_size": 4}
    result = run(parse_spec(data), runner_hook=runners.append)
    assert all(c["accepted"] == 6 for c in result.stats["classes"].values())
    assert result.stats["engine_requests"] == {}
    check_accounting(str(tmp_path / "o"))
    plan = runners[0].planner.lists[0].plan
    assert plan.count >= 4 and runners[0].planner.lists[0].next >= 2


def test_a_private_servers_answer_stays_out_of_the_search_errors(ray_session, sandbox,
                                                                  tmp_path):
    """With private addresses allowed, a search source may be an internal service: its
    answers were quoted in stats.json's search_errors, which reach an API user."""
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"{label}\t{u}\n" for label in ("cat", "dog")
                            for u in sandbox.class_image_urls(label)))
    with FakeServer(lambda req: Response(500, b"<h1>internal admin</h1> token=s3cret")) as srv:
        spec = parse_spec(base_spec(str(tmp_path / "o"), [
            {"engine": "sandbox", "url": srv.url, "options": {"failure_threshold": 2}},
            {"engine": "urllist", "path": str(urls)}]))
        result = run(spec)
    errors = [e["error"] for e in result.stats["search_errors"]]
    assert not any("s3cret" in e or "admin" in e for e in errors), errors
    assert any(e.startswith("sandbox: the search failed (HTTP 500); what it said is not "
                            "shown") for e in errors), errors
    check_accounting(str(tmp_path / "o"))
