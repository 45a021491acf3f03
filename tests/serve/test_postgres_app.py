"""The app on a PostgreSQL store, as a cluster would run it, mounted under a route prefix
beside the session's app: submit, the per-key cap on concurrent jobs, status and list (the fast
path under the prefix), cancel, and the job's end in the store."""

from __future__ import annotations

import time

import requests

from serve.store import JobStore
from tests.serve.conftest import job_spec

APP = "pixcrawler-pg"
PREFIX = "/pg"


def test_a_job_through_the_app_on_postgresql_under_a_route_prefix(serve_app, sandbox, postgres,
                                                                   tmp_path):
    from ray import serve as ray_serve

    from serve.app import build_app

    url = postgres.create_database("app")
    ray_serve.run(build_app({"store": url, "data_dir": str(tmp_path), "rate_limit_per_s": 0,
                             "max_concurrent_jobs": 1, "reconcile_interval_s": 2.0,
                             "policy": serve_app.settings["policy"]}),
                  name=APP, route_prefix=PREFIX)
    try:
        store = JobStore(url)
        key, _ = store.create_key("pg")
        auth = {"Authorization": f"Bearer {key}"}
        base = serve_app.base_url + PREFIX
        spec = job_spec(sandbox, name="pgjob", target=25,
                        download={"per_host_concurrency": 1, "per_host_delay_s": 0.3})
        r = requests.post(f"{base}/v1/jobs", json=spec, headers=auth, timeout=60)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        over = requests.post(f"{base}/v1/jobs", json=job_spec(sandbox), headers=auth,
                             timeout=60)
        assert over.status_code == 429 and over.json()["error"]["code"] == "too_many_jobs"

        api = ray_serve.get_app_handle(APP)
        before = api.hot_read_count.remote().result()
        status = requests.get(f"{base}/v1/jobs/{job_id}", headers=auth, timeout=30)
        listed = requests.get(f"{base}/v1/jobs", headers=auth, timeout=30)
        assert status.status_code == listed.status_code == 200
        assert status.json()["id"] == job_id and status.json()["name"] == "pgjob"
        assert [j["id"] for j in listed.json()["jobs"]] == [job_id]
        nul = requests.get(f"{base}/v1/jobs/%00", headers=auth, timeout=30)
        assert nul.status_code == 404 and "SELECT" not in nul.text  # PostgreSQL refuses a NUL
        assert api.hot_read_count.remote().result() == before + 2  # the prefix is stripped

        def wait(states: tuple[str, ...]) -> dict:
            deadline = time.time() + 150
            while True:
                job = requests.get(f"{base}/v1/jobs/{job_id}", headers=auth, timeout=30).json()
                if job["state"] in states + ("succeeded", "failed", "cancelled"):
                    return job
                assert time.time() < deadline, f"job stuck in {job['state']}: {job}"
                time.sleep(0.5)

        assert wait(("running",))["state"] == "running"
        assert requests.delete(f"{base}/v1/jobs/{job_id}", headers=auth,
                               timeout=60).status_code == 202
        job = wait(())
        assert job["state"] == "cancelled" and job["stats"]["partial"] is True, job
        row = store.get_job(job_id)
        assert row.state == "cancelled" and row.stats["partial"] is True
        store.close()
    finally:
        ray_serve.delete(APP)
