"""The job on a local Ray (2 CPUs) against the sandbox web: the issue's acceptance checks."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from builder.sandbox import FAULTS
from builder.writers import is_complete
from tests.conftest import HANGS_S, make_bucket
from tests.e2e.helpers import (KillWatch, accepted_urls, check_accounting, fault_list_spec,
                               reasons_by_url, sandbox_spec)


def run(spec, **kwargs):
    from cluster.coordinator import run_job_async

    return asyncio.run(run_job_async(spec, **kwargs))


@pytest.fixture(scope="module")
def ray_fault_run(ray_session, sandbox, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rayfaults")
    out = str(tmp / "out")
    result = run(fault_list_spec(sandbox, tmp, out))
    return sandbox, out, result


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_fault_lands_with_its_reason_on_ray(ray_fault_run, fault):
    sandbox, out, _ = ray_fault_run
    url = sandbox.fault_urls()[fault]
    if FAULTS[fault] == "accepted":
        assert url in accepted_urls(out)
    else:
        assert reasons_by_url(out).get(url) == FAULTS[fault]


def test_ray_fault_run_accounting(ray_fault_run):
    _, out, result = ray_fault_run
    stats = check_accounting(out)
    assert stats["runner"] == "ray" and stats["candidates"] == len(FAULTS) + 1


def test_multi_class_job_on_ray_reaches_targets(ray_session, sandbox, tmp_path):
    out = str(tmp_path / "ds")
    result = run(sandbox_spec(sandbox, out, target=10))
    stats = check_accounting(out)
    assert {k: c["accepted"] for k, c in stats["classes"].items()} == {
        "cat": 10, "dog": 10, "bird": 10}
    assert is_complete(out) and not result.partial
    root = Path(out)
    t = pq.read_table(root / "data")
    assert t.num_rows == 30 and len(set(t.column("id").to_pylist())) == 30
    assert len(list((root / "imagefolder").rglob("*.*"))) == 30
    assert sum(1 for _ in (root / "webdataset").glob("*.tar")) >= 1
    for name in ("labels.json", "labels.csv", "labels.yaml", "labels.txt", "classes.json",
                 "README.md", "rejects.csv"):
        assert (root / name).stat().st_size > 0, name
    assert stats["pools"]["workers"] >= 1


def test_shortfall_reported_on_ray(ray_session, sandbox, tmp_path):
    out = str(tmp_path / "dry")
    run(sandbox_spec(sandbox, out, target=100, classes=("dog",)))
    stats = check_accounting(out)
    assert 0 < stats["classes"]["dog"]["accepted"] < 100
    assert stats["shortfall"]["dog"] == 100 - stats["classes"]["dog"]["accepted"]


def test_an_unobserved_job_runs_without_a_progress_actor(ray_session, sandbox, tmp_path):
    """``observed=False`` (the CLI's own embedded Ray): no progress actor is started, and the
    job still shows its progress locally and finishes with exact accounting."""
    from actors.progress import get_progress

    out = str(tmp_path / "unobserved")
    job_id = "unobserved-test"
    looked = []  # what another driver would find, at each local progress update
    result = run(sandbox_spec(sandbox, out, target=6, classes=("dog",)), job_id=job_id,
                 observed=False, progress=lambda snapshot: looked.append(get_progress(job_id)))
    assert looked and looked == [None] * len(looked)
    assert not result.partial and check_accounting(out)["classes"]["dog"]["accepted"] == 6


def test_cancel_through_progress_actor_leaves_partial(ray_session, hanging_sandbox, tmp_path):
    """(A URL of the job hangs until the cancel: under load, the cancel's way through the
    progress actor can take longer than the job's other work.)"""
    from actors.progress import cancel_job, get_progress

    out = str(tmp_path / "cancel")
    job_id = "cancel-test"
    spec = sandbox_spec(hanging_sandbox, out, target=25,
                        download={"per_host_delay_s": 0.1, "timeout_s": HANGS_S / 2,
                                  "deadline_s": HANGS_S / 2})

    def stopper():
        deadline = time.time() + 60
        while time.time() < deadline:
            p = get_progress(job_id)
            if p and p.get("progress", {}).get("accepted", 0) >= 2:
                cancel_job(job_id, "test stop")
                return
            time.sleep(0.1)

    t = threading.Thread(target=stopper)
    t.start()
    result = run(spec, job_id=job_id)
    t.join()
    assert result.partial and not is_complete(out), (
        f"not cancelled: ran {result.stats['duration_s']}s, {result.stats['accepted']} accepted")
    assert json.loads((Path(out) / "_PARTIAL").read_text())
    stats = check_accounting(out)
    assert stats["partial"] and stats["accepted"] < 75


def test_s3_output_on_ray(ray_session, sandbox, moto_s3, tmp_path):
    import s3fs

    make_bucket(moto_s3, "ray-ds")
    out = "s3://ray-ds/run1"
    run(sandbox_spec(sandbox, out, target=3), storage_options={"endpoint_url": moto_s3})
    assert is_complete(out, {"endpoint_url": moto_s3})
    fs = s3fs.S3FileSystem(endpoint_url=moto_s3)
    shards = fs.glob(f"{out}/data/*.parquet")
    assert sum(pq.read_metadata(fs.open(p)).num_rows for p in shards) == 9
    assert json.loads(fs.cat(f"{out}/stats.json"))["accepted"] == 9


def test_a_killed_worker_actor_comes_back_and_the_job_is_the_same(ray_session, sandbox,
                                                                   tmp_path):
    """Ray restarts a worker actor that dies; the runner took it back only once every worker
    was lost, so one lost worker halved the job's workers for good. It rejoins now, and the
    dataset is the same as an uninterrupted run's over the same URL list."""
    import ray

    from builder.pipeline import run_local
    from cluster.coordinator import run_job_async

    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"{label}\t{u}\n" for label in ("cat", "dog", "bird")
                            for u in sandbox.class_image_urls(label)))

    def spec(out: str):
        return sandbox_spec(sandbox, out, target=1000,
                            sources=[{"engine": "urllist", "path": str(urls)}],
                            download={"per_host_delay_s": 0.08},
                            resources={"batch_size": 4, "workers": 2, "worker_cpus": 0.5,
                                       "max_in_flight_batches": 1})

    whole = str(tmp_path / "whole")
    run_local(spec(whole))
    out = str(tmp_path / "ds")
    watch = KillWatch()

    async def main():
        task = asyncio.ensure_future(run_job_async(spec(out), runner_hook=watch))
        await watch.until_accepted(task, 8)
        ray.kill(watch.runner.executor.handles[1], no_restart=False)
        watch.killed = True
        return await task

    result = asyncio.run(main())
    assert not result.partial and is_complete(out)
    assert (1, True) in watch.ran, "the killed worker was sent nothing once it was back"
    stats, reference = check_accounting(out), check_accounting(whole)
    assert stats["resent_units"] > 0
    for key in ("candidates", "accepted", "rejected", "rejected_by_reason"):
        assert stats[key] == reference[key], key
    ids = pq.read_table(Path(out) / "data", columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == stats["accepted"]
    assert accepted_urls(out) == accepted_urls(whole)
