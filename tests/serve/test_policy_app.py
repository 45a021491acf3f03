"""The attacks of issue 13 against the real app with the policy's defaults and two API keys,
alice and bob: writing outside one's prefix, replacing another key's dataset, reading server
files, naming internal endpoints, the caps, a chunked body past the limit, and keys taking turns
for the cluster. The app is mounted under /strict beside the session's app (whose policy lets
its tests use the sandbox web)."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any, Optional

import pytest
import requests
import yaml

from builder.writers import read_marker
from serve.store import JobStore

APP = "pixcrawler-strict"
PREFIX = "/strict"


class Strict:
    def __init__(self, base: str, data_dir: Path, store: str):
        self.base = base
        self.data_dir = data_dir
        js = JobStore(store)
        self.keys: dict[str, str] = {}
        self.owner: dict[str, str] = {}
        for name in ("alice", "bob"):
            plaintext, key = js.create_key(name)
            self.keys[name], self.owner[name] = plaintext, key.id
        js.close()

    def prefix(self, who: str) -> str:
        return f"{self.data_dir}/datasets/{self.owner[who]}"

    def post(self, who: str, spec: Any, yaml_body: bool = False) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.keys[who]}"}
        if yaml_body:
            headers["Content-Type"] = "application/yaml"
            return requests.post(f"{self.base}/v1/jobs", data=yaml.safe_dump(spec),
                                 headers=headers, timeout=60)
        return requests.post(f"{self.base}/v1/jobs", json=spec, headers=headers, timeout=60)

    def get(self, who: str, path: str) -> dict[str, Any]:
        r = requests.get(f"{self.base}{path}", timeout=30,
                         headers={"Authorization": f"Bearer {self.keys[who]}"})
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, who: str, job_id: str, until: tuple[str, ...] = ("succeeded", "failed",
                                                                    "cancelled"),
             timeout: float = 150) -> dict[str, Any]:
        deadline = time.time() + timeout
        while True:
            job = self.get(who, f"/v1/jobs/{job_id}")
            if job["state"] in until:
                return job
            assert time.time() < deadline, f"job stuck in {job['state']}: {job}"
            time.sleep(0.25)


@pytest.fixture(scope="module")
def strict(serve_app, tmp_path_factory):
    from ray import serve as ray_serve

    from serve.app import build_app

    tmp = tmp_path_factory.mktemp("strict")
    store = f"sqlite:///{tmp / 'jobs.db'}"
    # The policy's defaults, but one job at a time in the cluster (sized to all of it), so
    # the order jobs start in shows.
    ray_serve.run(build_app({"store": store, "data_dir": str(tmp), "rate_limit_per_s": 0,
                             "max_concurrent_jobs": 2, "reconcile_interval_s": 1.0,
                             "policy": {"max_running_jobs": 1, "job_cpus": 2.0}}),
                  name=APP, route_prefix=PREFIX)
    yield Strict(serve_app.base_url + PREFIX, tmp, store)
    ray_serve.delete(APP)


def quick_spec(sandbox, name: str = "pets", **overrides: Any) -> dict[str, Any]:
    """A job that ends within seconds: its URLs are on 127.0.0.1, which the policy's default
    (no private networks) has the fetcher refuse, so every candidate is rejected at once."""
    data = {"name": name, "target": 2,
            "classes": {"cat": {"urls": sandbox.search_urls("cat")[:3]}},
            "download": {"timeout_s": 1.0, "retries": 0},
            "resources": {"batch_size": 16}}
    data.update(overrides)
    return data


def refusal(r: requests.Response, status: int, field: str, setting: str) -> str:
    """Check a policy refusal's answer; returns its message for the field."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == ("forbidden_by_policy" if status == 403 else "over_policy_limit")
    found = {p["field"]: p for p in error["problems"]}
    assert field in found, error
    assert found[field]["policy"] == setting
    assert field in error["message"] and setting in error["message"]
    return found[field]["message"]


@pytest.mark.parametrize("uri", ["/etc/pixcrawler-pwn", "file:///root/pixcrawler-pwn",
                                 "../../../../pixcrawler-pwn", "{bob}/pets"])
def test_no_output_outside_ones_own_prefix(strict, sandbox, uri):
    uri = uri.replace("{bob}", strict.prefix("bob"))
    for yaml_body in (False, True):
        r = strict.post("alice", quick_spec(sandbox, output={"uri": uri, "overwrite": True}),
                        yaml_body)
        message = refusal(r, 403, "output.uri", "output_prefix")
        assert strict.prefix("alice") in message  # says where a relative path goes
    assert not Path("/etc/pixcrawler-pwn").exists()
    assert not (strict.data_dir.parents[2] / "pixcrawler-pwn").exists()
    assert strict.get("alice", "/v1/jobs")["total"] == 0


@pytest.mark.parametrize("field, overrides", [
    ("sources.0.path", {"sources": [{"engine": "urllist", "path": "/etc/passwd"}]}),
    ("sources.0.options.base_url",
     {"sources": [{"engine": "openverse",
                   "options": {"base_url": "http://169.254.169.254/latest/meta-data#"}}]}),
    ("sources.0.options.base_url",
     {"sources": [{"engine": "wikimedia",
                   "options": {"base_url": "http://127.0.0.1:1/internal-admin#"}}]}),
    ("sources.0.url", {"sources": [{"engine": "sandbox", "url": "http://127.0.0.1:1"}]}),
    ("sources.0.options.proxy",
     {"sources": [{"engine": "duckduckgo", "options": {"proxy": "http://127.0.0.1:1"}}]}),
    ("search.llm_base_url", {"search": {"expand": True,
                                        "llm_base_url": "http://127.0.0.1:1/v1"}}),
    ("download.allow_private_networks", {"download": {"allow_private_networks": True}}),
])
def test_server_files_internal_endpoints_and_private_networks_are_forbidden(
        strict, sandbox, field, overrides):
    setting = {"sources.0.path": "url_list_dirs", "sources.0.options.base_url": "source_urls",
               "sources.0.url": "source_urls", "sources.0.options.proxy": "allow_proxy",
               "search.llm_base_url": "llm_base_urls",
               "download.allow_private_networks": "allow_private_networks"}[field]
    spec = quick_spec(sandbox, **overrides)
    refusal(strict.post("bob", spec), 403, field, setting)
    refusal(strict.post("bob", spec, yaml_body=True), 403, field, setting)


@pytest.mark.parametrize("field, setting, overrides", [
    ("classes", "max_classes", {"classes": [f"c{i}" for i in range(10_000)], "target": 1,
                                "sources": [{"engine": "duckduckgo"}]}),
    ("target", "max_target", {"target": 20_000}),
    ("download.concurrency", "max_download_concurrency", {"download": {"concurrency": 100_000}}),
    ("download.per_host_concurrency", "max_per_host_concurrency",
     {"download": {"per_host_concurrency": 10_000}}),
    ("download.max_bytes", "max_bytes", {"download": {"max_bytes": 500_000_000}}),
    ("validation.max_pixels", "max_pixels", {"validation": {"max_pixels": 10**12}}),
    ("resources", "job_cpus", {"resources": {"workers": 64}}),
])
def test_values_over_the_operators_caps_are_422(strict, sandbox, field, setting, overrides):
    refusal(strict.post("bob", quick_spec(sandbox, **overrides)), 422, field, setting)


def test_a_chunked_body_is_refused_at_the_limit_without_waiting_for_its_end(strict):
    """A chunked upload that never ends: the 413 comes once max_spec_bytes + 1 bytes are in,
    where reading the body whole first would wait (and grow) for ever."""
    host, port = strict.base.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST {PREFIX}/v1/jobs HTTP/1.1\r\nHost: {host}\r\n"
                     f"Authorization: Bearer {strict.keys['alice']}\r\n"
                     "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                     .encode())
        chunk = b"x" * 65536
        for _ in range(1_000_000 // len(chunk) + 2):  # past the default max_spec_bytes
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            assert data, f"connection closed without an answer: {answer!r}"
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    if body:
        assert b"spec_too_large" in body


def read_outcome_job(uri: str) -> Optional[str]:
    marker = read_marker(uri)
    return marker.get("job_id") if marker else None


def test_keys_own_their_datasets_and_take_turns_for_the_cluster(strict, sandbox):
    """Alice's job runs; Alice queues a second, then Bob one. Bob cannot overwrite Alice's
    dataset; his 'pets' is his own. When Alice's first job ends, Bob's starts before Alice's
    second (the key that started longest ago goes first), and each dataset stays its
    writer's."""
    first = strict.post("alice", quick_spec(sandbox, output={"uri": "pets"}))
    assert first.status_code == 202, first.text
    a1 = first.json()
    assert a1["state"] == "starting"
    assert a1["output_uri"] == f"{strict.prefix('alice')}/pets" == a1["spec"]["output"]["uri"]
    second = strict.post("alice", quick_spec(sandbox, name="pets2"))
    assert second.status_code == 202 and second.json()["state"] == "queued", second.text
    a2 = second.json()
    assert a2["output_uri"] == f"{strict.prefix('alice')}/{a2['id']}"

    refusal(strict.post("bob", quick_spec(sandbox, output={"uri": a1["output_uri"],
                                                           "overwrite": True})),
            403, "output.uri", "output_prefix")
    third = strict.post("bob", quick_spec(sandbox, output={"uri": "pets", "overwrite": True}))
    assert third.status_code == 202 and third.json()["state"] == "queued", third.text
    b1 = third.json()
    assert b1["output_uri"] == f"{strict.prefix('bob')}/pets"
    over = strict.post("alice", quick_spec(sandbox))
    assert over.status_code == 429 and "running or queued" in over.json()["error"]["message"]

    ends = {job["id"]: strict.wait(who, job["id"])
            for who, job in (("alice", a1), ("bob", b1), ("alice", a2))}
    # Every URL is on 127.0.0.1, which this policy refuses: each job ends empty, a failure
    # that says why.
    assert {(job["state"], job["error"].split(":")[0]) for job in ends.values()} == \
        {("failed", "no image was accepted")}, ends
    assert "blocked_address 3" in ends[a1["id"]]["error"], ends
    assert ends[a1["id"]]["started_at"] < ends[b1["id"]]["started_at"] < \
        ends[a2["id"]]["started_at"]
    assert read_outcome_job(a1["output_uri"]) == a1["id"]
    assert read_outcome_job(b1["output_uri"]) == b1["id"]
    row = strict.get("alice", f"/v1/jobs/{a1['id']}")
    assert row["output_uri"] == a1["output_uri"] and row["state"] == "failed"
    assert row["stats"]["classes"]["cat"]["accepted"] == 0


def test_a_queued_job_cancels_at_once(strict, sandbox):
    running = strict.post("alice", quick_spec(sandbox, name="slowone",
                                              download={"timeout_s": 1.0, "retries": 0}))
    assert running.status_code == 202, running.text
    queued = strict.post("bob", quick_spec(sandbox, name="waiting"))
    assert queued.status_code == 202 and queued.json()["state"] == "queued", queued.text
    r = requests.delete(f"{strict.base}/v1/jobs/{queued.json()['id']}", timeout=30,
                        headers={"Authorization": f"Bearer {strict.keys['bob']}"})
    assert r.status_code == 202 and r.json()["state"] == "cancelled", r.text
    assert r.json()["started_at"] is None
    strict.wait("alice", running.json()["id"])
