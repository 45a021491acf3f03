"""The job API over HTTP: a job from submit to succeeded (watched on its event stream),
its status, list, samples, and what other keys, bad keys, bad specs and bursts get."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import pytest
import ray
import requests
import yaml
from PIL import Image
from ray.util.state import list_actors

from builder.writers import is_complete
from tests.serve.conftest import job_spec


@pytest.fixture(scope="module")
def finished(serve_app, sandbox):
    """One job submitted and watched to its end through the event stream."""
    key = serve_app.new_key("lifecycle")
    job_id = serve_app.submit(key, job_spec(sandbox, target=3))
    events = list(serve_app.events(key, job_id))
    return key, job_id, events


def test_healthz_and_openapi(serve_app):
    r = serve_app.call("GET", "/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    spec = serve_app.call("GET", "/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events",
            "/v1/jobs/{job_id}/samples", "/healthz"} <= set(spec["paths"])
    docs = serve_app.call("GET", "/docs")
    assert docs.status_code == 200
    # Offline: every script and style sheet of the page comes from this server.
    assets = re.findall(r"(?:src|href)=['\"]?(/docs/assets/[\w.-]+)", docs.text)
    assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets)
    for asset in assets:
        assert serve_app.call("GET", asset).status_code == 200, asset


def test_the_page_refuses_to_be_framed(serve_app):
    """Inside another site's frame, a page there could overlay it and have a visitor click
    Submit or Cancel (clickjacking)."""
    r = serve_app.call("GET", "/")
    assert r.status_code == 200 and r.headers["x-frame-options"] == "DENY"
    assert r.headers["content-security-policy"] == "frame-ancestors 'none'"


def test_the_serving_path_runs_at_normal_priority(serve_app):
    """Ray starts workers at nice 15; the API's replica and Serve's own actors (which inherit
    the serving driver's environment) run at 0."""
    def nice(class_prefix: str) -> set[int]:
        pids = [a.pid for a in list_actors(address=ray.get_runtime_context().gcs_address,
                                           filters=[("state", "=", "ALIVE")], limit=1000)
                if a.class_name.startswith(class_prefix) and a.pid]
        assert pids, f"no live {class_prefix} actor"
        return {os.getpriority(os.PRIO_PROCESS, pid) for pid in pids}

    assert nice("ServeReplica:pixcrawler:JobAPI") == {0}
    assert nice("ServeController") == {0}
    assert nice("ProxyActor") == {0}


def test_job_runs_to_succeeded_with_live_events(serve_app, finished):
    _, job_id, events = finished
    kinds = [e for e, _ in events]
    assert kinds[-1] == "end" and kinds.count("progress") >= 2
    states = [d["state"] for _, d in events]
    assert states[-1] == "succeeded"
    assert "starting" in states or "running" in states
    accepted = [d["progress"].get("accepted", 0) for _, d in events]
    assert accepted == sorted(accepted) and accepted[-1] == 9
    # The state only moves forward; each event is a change, and none carries the spec.
    from serve.store import RANK

    assert [RANK[s] for s in states] == sorted(RANK[s] for s in states)
    assert all("spec" not in d for _, d in events)
    changes = [{k: v for k, v in d.items() if k != "updated_at"} for _, d in events]
    assert all(a != b for a, b in zip(changes, changes[1:-1]))


def test_finished_job_status_has_classes_rejects_and_output(serve_app, finished):
    key, job_id, _ = finished
    r = serve_app.call("GET", f"/v1/jobs/{job_id}", key)
    assert r.status_code == 200
    job = r.json()
    assert job["state"] == "succeeded" and job["error"] is None and not job["partial"]
    assert {k: c["accepted"] for k, c in job["classes"].items()} == {
        "cat": 3, "dog": 3, "bird": 3}
    for c in job["classes"].values():
        assert c["target"] == 3 and c["shortfall"] == 0
        assert c["accepted"] + c["rejected"] == c["candidates"]
        assert sum(c["rejected_by_reason"].values()) == c["rejected"]
    stats = job["stats"]
    assert stats["accepted"] == 9
    assert job["rejected_by_reason"] == stats["rejected_by_reason"]
    assert job["progress"]["accepted"] == 9 and job["progress"]["images_per_s"] > 0
    assert job["ray"]["status"] in ("SUCCEEDED", None)
    assert is_complete(job["output_uri"])


def test_samples_are_small_jpeg_thumbnails_per_class(serve_app, finished):
    key, job_id, _ = finished
    r = serve_app.call("GET", f"/v1/jobs/{job_id}/samples", key, params={"label": "dog"})
    assert r.status_code == 200
    body = r.json()
    assert body["ready"] and len(body["samples"]) == 3
    for s in body["samples"]:
        assert s["label"] == "dog"
        head, data = s["thumbnail"].split(",", 1)
        assert head == "data:image/jpeg;base64"
        with Image.open(io.BytesIO(base64.b64decode(data))) as img:
            assert img.format == "JPEG" and max(img.size) <= 160
    r = serve_app.call("GET", f"/v1/jobs/{job_id}/samples", key, params={"label": "horse"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "label_not_found"


def test_list_pages_and_filters_by_state(serve_app, finished, sandbox):
    key, job_id, _ = finished
    r = serve_app.call("GET", "/v1/jobs", key)
    assert r.status_code == 200
    body = r.json()
    assert [j["id"] for j in body["jobs"]] == [job_id] and body["total"] == 1
    assert body["next_offset"] is None
    assert serve_app.call("GET", "/v1/jobs", key,
                          params={"state": "failed,cancelled"}).json()["jobs"] == []
    assert serve_app.call("GET", "/v1/jobs", key, params={"state": "succeeded"}
                          ).json()["total"] == 1
    page = serve_app.call("GET", "/v1/jobs", key, params={"limit": 1, "offset": 1}).json()
    assert page["jobs"] == [] and page["offset"] == 1
    bad = serve_app.call("GET", "/v1/jobs", key, params={"state": "done"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"
    bad = serve_app.call("GET", "/v1/jobs", key, params={"limit": 0})
    assert bad.status_code == 422 and bad.json()["error"]["problems"][0]["field"] == \
        "query.limit"


def test_fast_answers_are_the_routes_answers(serve_app, finished):
    """Status and list are answered by serve/fastpath.py; a query it does not expect sends
    the same request through FastAPI's route, which must give the same JSON."""
    key, job_id, _ = finished
    # The module's other tests spend this key's tokens: let its bucket fill up again.
    time.sleep(serve_app.settings["rate_limit_burst"] / serve_app.settings["rate_limit_per_s"])
    from ray import serve as ray_serve

    from serve.app import APP_NAME

    api = ray_serve.get_app_handle(APP_NAME)
    for path in (f"/v1/jobs/{job_id}", "/v1/jobs", "/v1/jobs?state=succeeded&limit=5",
                 "/v1/jobs?offset=1"):
        before = api.hot_read_count.remote().result()
        fast = serve_app.call("GET", path, key)
        assert api.hot_read_count.remote().result() == before + 1, path
        routed = serve_app.call("GET", path + ("&" if "?" in path else "?") + "via=route", key)
        assert api.hot_read_count.remote().result() == before + 1, path
        assert fast.status_code == routed.status_code == 200, (path, fast.text, routed.text)
        assert fast.headers["content-type"] == routed.headers["content-type"]
        assert fast.content == routed.content, path


def test_each_request_takes_one_rate_limit_token_whichever_path_answers(serve_app, finished):
    """Answers from the fast path (200s) and from FastAPI's routes (404s, after the fast path
    passed them on) take one token each: a burst of 15 gets through, no more."""
    _, job_id, _ = finished
    key = serve_app.new_key("mixed")
    burst = serve_app.settings["rate_limit_burst"]
    start = time.monotonic()
    codes = [serve_app.call("GET", "/v1/jobs" if i % 2 else "/v1/jobs/no-such-job", key
                            ).status_code for i in range(burst)]
    assert codes == [404 if i % 2 == 0 else 200 for i in range(burst)]
    more = [serve_app.call("GET", "/v1/jobs", key).status_code for _ in range(40)]
    refill = (time.monotonic() - start) * serve_app.settings["rate_limit_per_s"]
    assert 429 in more and more.count(200) <= refill + 1


def test_finished_job_cannot_be_cancelled(serve_app, finished):
    key, job_id, _ = finished
    r = serve_app.call("DELETE", f"/v1/jobs/{job_id}", key)
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"


def test_requests_without_a_valid_key_get_401(serve_app, finished):
    _, job_id, _ = finished
    for method, path in (("GET", "/v1/jobs"), ("GET", f"/v1/jobs/{job_id}"),
                         ("POST", "/v1/jobs"), ("GET", f"/v1/jobs/{job_id}/events")):
        r = serve_app.call(method, path)
        assert r.status_code == 401, (method, path)
        assert r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
    r = serve_app.call("GET", "/v1/jobs", "pxc_not-a-real-key")
    assert r.status_code == 401 and "invalid" in r.json()["error"]["message"]
    r = serve_app.call("GET", "/v1/jobs", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401


def test_the_event_stream_takes_the_key_in_a_header_or_a_token_never_in_the_url(
        serve_app, finished):
    """``?key=`` put the API key into every proxy's and server's log; a browser now sends a
    token that opens one job's stream for a while and nothing else."""
    key, job_id, _ = finished

    def stream(path: str, key: Optional[str] = None) -> requests.Response:
        return serve_app.call("GET", path, key, stream=True)

    with stream(f"/v1/jobs/{job_id}/events", key) as r:
        assert r.status_code == 200 and "event: end" in r.text
    r = stream(f"/v1/jobs/{job_id}/events?key={key}")
    assert r.status_code == 401 and "not taken in a URL" in r.json()["error"]["message"]
    for name in ("key", "KEY"):  # refused even beside a valid header: it is in a log now
        r = stream(f"/v1/jobs/{job_id}/events?{name}={key}", key)
        assert r.status_code == 401

    answer = serve_app.call("POST", f"/v1/jobs/{job_id}/events/token", key)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    token = body["token"]
    assert key not in answer.text and token.startswith("pxs_")
    assert 290 <= body["expires_at"] - time.time() <= 301  # stream_token_s, 300 by default
    assert body["events_url"] == f"/v1/jobs/{job_id}/events?token={token}"
    with stream(body["events_url"]) as r:
        assert r.status_code == 200 and "event: end" in r.text
    # The token opens that stream only: not another route, not another job's stream.
    for method, path in (("GET", f"/v1/jobs/{job_id}?token={token}"),
                         ("GET", f"/v1/jobs?token={token}"),
                         ("GET", f"/v1/jobs/{job_id}/samples?token={token}"),
                         ("DELETE", f"/v1/jobs/{job_id}?token={token}"),
                         ("POST", f"/v1/jobs/{job_id}/events/token?token={token}")):
        r = serve_app.call(method, path)
        assert r.status_code == 401, (method, path, r.text)
    r = stream(f"/v1/jobs/{job_id}0/events?token={token}")
    assert r.status_code == 401 and "another job" in r.json()["error"]["message"]
    r = stream(f"/v1/jobs/{job_id}/events?token={token[:-2]}")
    assert r.status_code == 401 and "not a stream token" in r.json()["error"]["message"]


def test_another_keys_job_is_not_found(serve_app, finished):
    _, job_id, _ = finished
    other = serve_app.new_key("intruder")
    for method, path in (("GET", f"/v1/jobs/{job_id}"), ("DELETE", f"/v1/jobs/{job_id}"),
                         ("GET", f"/v1/jobs/{job_id}/samples"),
                         ("GET", f"/v1/jobs/{job_id}/events"),
                         ("POST", f"/v1/jobs/{job_id}/events/token")):
        r = serve_app.call(method, path, other)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "job_not_found"
    assert serve_app.call("GET", "/v1/jobs", other).json()["jobs"] == []


def test_a_job_written_elsewhere_shows_within_the_read_cache_time(serve_app):
    """Reads are reused for read_cache_s (1 s by default) by a replica; a write by another
    process (another replica, the CLI) shows within that time."""
    from serve.store import JobStore

    key = serve_app.new_key("elsewhere")
    assert serve_app.call("GET", "/v1/jobs", key).json()["total"] == 0
    store = JobStore(serve_app.settings["store"])
    owner = store.verify_key(key).id
    store.create_job("elsewhere-00000000", owner, "elsewhere", {"name": "elsewhere"},
                     "/nonexistent/elsewhere")
    store.update_job("elsewhere-00000000", state="failed", error="written elsewhere")
    store.close()
    # A job id not seen before is read from the store at once (a miss is never cached).
    job = serve_app.call("GET", "/v1/jobs/elsewhere-00000000", key)
    assert job.status_code == 200 and job.json()["error"] == "written elsewhere"
    deadline = time.monotonic() + 1.5
    while serve_app.call("GET", "/v1/jobs", key).json()["total"] == 0:
        assert time.monotonic() < deadline, "the list stayed stale past read_cache_s"
        time.sleep(0.1)


def test_revoked_key_stops_working(serve_app):
    from serve.store import JobStore

    key = serve_app.new_key("short-lived")
    assert serve_app.call("GET", "/v1/jobs", key).status_code == 200
    store = JobStore(serve_app.settings["store"])
    store.revoke_key("short-lived")
    store.close()
    time.sleep(0.6)  # the app's key cache (key_cache_s) is 0.5 s here
    assert serve_app.call("GET", "/v1/jobs", key).status_code == 401


def test_bad_specs_get_422_with_the_field_path(serve_app, sandbox):
    key = serve_app.new_key("badspecs")
    spec = job_spec(sandbox)
    spec["download"]["timeout_s"] = -1
    spec["sources"][0]["engine"] = "altavista"
    r = serve_app.call("POST", "/v1/jobs", key, json=spec)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "invalid_spec"
    fields = {p["field"] for p in err["problems"]}
    assert {"download.timeout_s", "sources.0.engine"} <= fields
    assert any("allowed" in p["message"] for p in err["problems"])

    r = serve_app.call("POST", "/v1/jobs", key, data="name: x\nclasses: [",
                       headers={"Content-Type": "application/yaml"})
    assert r.status_code == 422 and r.json()["error"]["problems"][0]["field"] == "(body)"
    r = serve_app.call("POST", "/v1/jobs", key, data="{}",
                       headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = serve_app.call("POST", "/v1/jobs", key, data="x" * 1_100_000,
                       headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "spec_too_large"
    huge = '{"name": "x", "target": ' + "1" * 5000 + "}"
    r = serve_app.call("POST", "/v1/jobs", key, data=huge,
                       headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["problems"][0]["field"] == "(body)"
    r = serve_app.call("POST", "/v1/jobs", key, data="name: &n x\nclasses: {a: [b]}\n",
                       headers={"Content-Type": "application/yaml"})
    assert r.status_code == 422 and "anchors and aliases" in r.json()["error"]["message"]
    assert serve_app.call("GET", "/v1/jobs", key).json()["total"] == 0


def test_yaml_spec_is_accepted(serve_app, sandbox, finished):
    """A YAML body (application/yaml) runs like JSON; it is stopped right away here."""
    key = serve_app.new_key("yaml")
    text = yaml.safe_dump(job_spec(sandbox, name="yamljob", target=2))
    r = serve_app.call("POST", "/v1/jobs", key, data=text,
                       headers={"Content-Type": "application/yaml"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["name"] == "yamljob" and job["state"] == "starting"
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert serve_app.call("DELETE", f"/v1/jobs/{job['id']}", key).status_code == 202
    assert serve_app.wait(key, job["id"])["state"] == "cancelled"


def test_a_failing_job_ends_failed_with_its_error(serve_app, sandbox, tmp_path, finished):
    key = serve_app.new_key("failing")
    unreadable = tmp_path / "urls.txt.gz"  # (a missing list is refused at submission)
    unreadable.write_bytes(b"\x1f\x8b not read in slices")
    spec = job_spec(sandbox, name="failjob",
                    sources=[{"engine": "urllist", "path": str(unreadable)}])
    job_id = serve_app.submit(key, spec)
    job = serve_app.wait(key, job_id)
    assert job["state"] == "failed", job
    assert str(unreadable) in job["error"] and "compressed" in job["error"]
    assert job["ray"]["status"] == "FAILED" and job["stats"] is None


def test_burst_over_the_rate_limit_gets_429_with_retry_after(serve_app):
    key = serve_app.new_key("bursty")
    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(lambda _: serve_app.call("GET", "/v1/jobs", key), range(40)))
    codes = [r.status_code for r in answers]
    assert codes.count(200) >= 10 and 429 in codes
    limited = next(r for r in answers if r.status_code == 429)
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.json()["error"]["code"] == "rate_limited"


def test_unknown_route_answers_json_error(serve_app):
    r = serve_app.call("GET", "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_ids_and_pages_that_cannot_exist_are_a_404_or_a_422_never_a_500(serve_app):
    """A NUL in a job id failed PostgreSQL's query (a 500 quoting the SQL); an offset past
    nine digits overflowed the store's integers."""
    key = serve_app.new_key("odd-ids")
    for method, path in (("GET", "/v1/jobs/%00"), ("GET", "/v1/jobs/a%00b/events"),
                         ("POST", "/v1/jobs/a%00b/events/token"),
                         ("DELETE", "/v1/jobs/%00"), ("GET", "/v1/jobs/" + "a" * 200),
                         ("GET", "/v1/jobs/a%0A/samples")):
        r = serve_app.call(method, path, key)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "job_not_found"
    r = serve_app.call("GET", "/v1/jobs?offset=9223372036854775808", key)
    assert r.status_code == 422, r.text


def test_an_internal_error_answers_without_its_details():
    """The log has them; the client gets no exception text (a store's error quotes its SQL)."""
    import asyncio

    from serve.app import _internal

    response = asyncio.run(_internal(None, RuntimeError('SELECT * FROM jobs WHERE id = "x"')))
    assert response.status_code == 500
    body = json.loads(response.body)
    assert body["error"]["code"] == "internal_error" and "SELECT" not in response.body.decode()


def test_healthz_answers_a_store_error_without_its_details(caplog):
    """/healthz needs no key; a PostgreSQL error names the database's host and user."""
    import asyncio
    from types import SimpleNamespace

    from sqlalchemy.exc import OperationalError

    from serve.app import JobAPI
    from serve.cache import ReadCache
    from serve.errors import ApiError

    secret = 'connection to server at "db.internal" (10.0.0.9), port 5432 failed: ' \
             'FATAL: password authentication failed for user "pixcrawler"'

    def count_active(_owner: str) -> int:
        raise OperationalError("SELECT 1", {}, Exception(secret))

    replica = SimpleNamespace(health=ReadCache(1.0), settings=SimpleNamespace(auth=True),
                              store=SimpleNamespace(count_active=count_active))
    with pytest.raises(ApiError) as info:
        asyncio.run(JobAPI.func_or_class.healthz(replica))
    assert (info.value.status, info.value.code) == (503, "store_unavailable")
    assert "db.internal" not in json.dumps(info.value.body())
    assert "server's log" in info.value.message
    assert "db.internal" in caplog.text  # the operator's log has it


def test_a_revoked_keys_event_stream_ends_with_an_error(serve_app, sandbox):
    """A stream already open once kept serving a revoked key until its job ended; the key is
    checked again between events (through the key cache)."""
    from serve.store import JobStore

    from serve.store import TERMINAL

    key = serve_app.new_key("streamer")
    job_id = serve_app.submit(key, job_spec(sandbox, target=6, name="streamed", download={
        "per_host_concurrency": 1, "per_host_delay_s": 0.3}))
    store = JobStore(serve_app.settings["store"])
    try:
        token = serve_app.call("POST", f"/v1/jobs/{job_id}/events/token", key).json()["token"]
        with requests.get(serve_app.url(f"/v1/jobs/{job_id}/events"), params={"token": token},
                          stream=True, timeout=120) as r:
            lines = r.iter_lines(decode_unicode=True)
            first = next(line for line in lines if line.startswith("event: "))
            store.revoke_key("streamer")
            rest = [line[len("event: "):] for line in lines if line.startswith("event: ")]
        assert first == "event: progress" and rest and rest[-1] == "error", (first, rest)
        deadline = time.time() + 120  # its job ends before the next test's jobs start
        while (row := store.get_job(job_id)) is not None and row.state not in TERMINAL:
            assert time.time() < deadline, row.state
            time.sleep(0.5)
    finally:
        store.close()
