"""The reconciler against a fake Ray job API (no Ray): a job being submitted is not failed for
Ray not knowing it yet, one job's bad output does not stop the pass for the others, an
earlier run's outcome at the same output is not taken for this run's, and a failed job's error
keeps the driver's last words but not where the cluster is."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import pytest

from builder.writers import PARTIAL, SUCCESS
from serve import jobs
from serve.jobs import AGENT_WAIT_S, SUBMIT_GRACE_S, RayJob, Reconciler, read_outcome
from serve import store as store_module
from serve.store import JobStore, jobs_table


class FakeRay:
    """Ray's job API: a status per job id; an id it has no record of is None."""

    def __init__(self, **statuses: RayJob):
        self.jobs: dict[str, RayJob] = dict(statuses)
        self.broken: set[str] = set()

    def status(self, job_id: str) -> Optional[RayJob]:
        if job_id in self.broken:
            raise KeyError(f"unexpected answer for {job_id}")
        return self.jobs.get(job_id)


@pytest.fixture
def store(store_url, monkeypatch):
    monkeypatch.setattr(jobs, "read_live", lambda job_id: None)  # no progress actors
    monkeypatch.setattr(jobs, "read_live_all", dict.fromkeys)
    s = JobStore(store_url)
    yield s
    s.close()


def write_outcome(out: Path, marker: str, stats: Any) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / marker).write_text(json.dumps({"job_id": (stats or {}).get("job_id")}
                                         if isinstance(stats, dict) else {}))
    (out / "stats.json").write_text(json.dumps(stats))
    return str(out)


def test_a_job_still_being_submitted_is_not_failed_for_ray_not_knowing_it(store):
    assert SUBMIT_GRACE_S > AGENT_WAIT_S
    ray = FakeRay()
    store.create_job("new-1", "o", "new", {"name": "new"}, "/nonexistent/new")
    row = Reconciler(store, ray).reconcile(store.get_job("new-1"))
    assert (row.state, row.ray_status, row.error) == ("starting", None, None)

    ray.jobs["new-1"] = RayJob("PENDING")  # the submit returned
    assert Reconciler(store, ray).reconcile(row).ray_status == "PENDING"
    del ray.jobs["new-1"]  # Ray knew it and lost it (restarted): no grace then
    row = Reconciler(store, ray).reconcile(store.get_job("new-1"))
    assert row.state == "failed" and "no record" in row.error


def test_a_starting_job_ray_never_got_fails_after_the_grace_period(store):
    store.create_job("lost-1", "o", "lost", {"name": "lost"}, "/nonexistent/lost")
    reconciler = Reconciler(store, FakeRay(), submit_grace_s=0.2)
    assert reconciler.reconcile(store.get_job("lost-1")).state == "starting"
    time.sleep(0.3)
    row = reconciler.reconcile(store.get_job("lost-1"))
    assert row.state == "failed" and row.ray_status == "UNKNOWN"
    # A row past "starting" was handed to Ray: no record means it is gone, however young.
    store.create_job("ran-1", "o", "ran", {"name": "ran"}, "/nonexistent/ran")
    store.update_job("ran-1", state="running")
    assert Reconciler(store, FakeRay()).reconcile(store.get_job("ran-1")).state == "failed"


def test_the_submit_grace_period_runs_on_the_replicas_own_clock(store):
    """The replica handing a job to Ray wrote started_at by its clock; another replica whose
    clock was a minute ahead saw the job past its grace period while the submit still ran,
    failed it, and the first replica then stopped the job it had just started."""
    store.create_job("new-1", "o", "x", {"name": "x"}, "/nonexistent/x")
    with store.engine.begin() as conn:  # as a replica a minute behind this one wrote it
        conn.execute(jobs_table.update().where(jobs_table.c.id == "new-1")
                     .values(started_at=time.time() - 2 * SUBMIT_GRACE_S))
    row = Reconciler(store, FakeRay()).reconcile(store.get_job("new-1"))
    assert (row.state, row.ray_status, row.error) == ("starting", None, None)


def test_a_stats_json_that_is_not_an_object_is_read_as_missing(tmp_path):
    uri = write_outcome(tmp_path / "out", SUCCESS, [1])
    assert read_outcome(uri) == (SUCCESS, None)


def test_one_bad_job_does_not_stop_the_pass_for_the_others(store, tmp_path):
    failed = RayJob("FAILED", "driver exited with code 1")
    ray = FakeRay(**{"victim-1": failed, "bad-1": failed, "odd-1": failed})
    for job_id in ("victim-1", "bad-1", "odd-1"):  # reconciled newest first: odd, bad, victim
        out = tmp_path / job_id
        if job_id == "bad-1":  # an output location another tenant controls
            write_outcome(out, SUCCESS, [1])
        store.create_job(job_id, job_id, job_id.split("-")[0], {"name": "x"}, str(out))
        store.update_job(job_id, state="running")
        time.sleep(0.01)
    ray.broken.add("odd-1")

    assert Reconciler(store, ray).reconcile_all() == 3
    assert store.get_job("odd-1").state == "running"  # tried again next pass
    bad, victim = store.get_job("bad-1"), store.get_job("victim-1")
    assert bad.state == "failed" and bad.stats is None
    assert victim.state == "failed" and victim.error == "driver exited with code 1"


def test_progress_actors_that_cannot_be_read_leave_the_pass_to_rays_records(store, tmp_path,
                                                                          monkeypatch):
    """The pass reads every job's progress actor at once; when that read fails (a GCS that
    does not answer), each job is still checked against Ray's record of it."""
    def unreadable(job_ids):
        raise RuntimeError("the GCS did not answer")

    monkeypatch.setattr(jobs, "read_live_all", unreadable)
    store.create_job("done-1", "o", "done", {"name": "done"}, "/nonexistent/done")
    store.update_job("done-1", state="running")
    reconciler = Reconciler(store, FakeRay(**{"done-1": RayJob("FAILED", "boom")}))
    assert reconciler.reconcile_all() == 1
    assert store.get_job("done-1").state == "failed"


def test_an_earlier_runs_partial_result_is_not_this_jobs_outcome(store, tmp_path):
    out = write_outcome(tmp_path / "pets", PARTIAL,
                        {"accepted": 17, "partial": True, "job_id": "pets-run1"})
    ray = FakeRay(**{"pets-run2": RayJob("FAILED", "SourceError: bing needs BING_API_KEY")})
    store.create_job("pets-run2", "o", "pets", {"name": "pets"}, out)
    row = Reconciler(store, ray).reconcile(store.get_job("pets-run2"))
    assert row.state == "failed" and row.error == "SourceError: bing needs BING_API_KEY"
    assert row.stats is None
    assert read_outcome(out, "pets-run2") == (None, None)
    assert read_outcome(out, "pets-run1")[1]["accepted"] == 17


def test_a_jobs_own_partial_result_is_its_outcome(store, tmp_path):
    out = write_outcome(tmp_path / "pets", PARTIAL,
                        {"accepted": 5, "partial": True, "job_id": "pets-run3"})
    store.create_job("pets-run3", "o", "pets", {"name": "pets"}, out)
    row = Reconciler(store, FakeRay(**{"pets-run3": RayJob("STOPPED")})).reconcile(
        store.get_job("pets-run3"))
    assert row.state == "cancelled" and row.stats["accepted"] == 5
    assert row.progress["accepted"] == 5


@pytest.mark.parametrize("status", ["STOPPED", "FAILED"])
def test_a_job_that_published_whole_and_was_stopped_on_its_way_out_succeeded(store, tmp_path,
                                                                          status):
    """A cancel (or a crash) that came after the driver had published its _SUCCESS, while it
    exited: Ray said STOPPED (or FAILED), and the job was recorded cancelled (or failed)
    over its own complete dataset."""
    out = write_outcome(tmp_path / "pets", SUCCESS, {"accepted": 9, "job_id": "pets-run4"})
    store.create_job("pets-run4", "o", "pets", {"name": "pets"}, out)
    store.update_job("pets-run4", state="running", ray_status="RUNNING", cancel_requested=True)
    row = Reconciler(store, FakeRay(**{"pets-run4": RayJob(status, "exit 1")})).reconcile(
        store.get_job("pets-run4"))
    assert (row.state, row.error, row.stats["accepted"]) == ("succeeded", None, 9)


def test_a_cancelled_job_that_published_nothing_ended_cancelled_not_failed(store, tmp_path):
    """A cancel that met half-written units (after a lost worker) publishes nothing, and its
    driver exits non-zero: the job was recorded failed, with advice to --resume."""
    store.create_job("pets-run5", "o", "pets", {"name": "pets"}, str(tmp_path / "none"))
    store.update_job("pets-run5", state="running", ray_status="RUNNING", cancel_requested=True)
    store.update_job("pets-run5", error="stopped: the job ran past max_job_hours; what it "
                     "accepted is published as a partial dataset")
    row = Reconciler(store, FakeRay(**{"pets-run5": RayJob(
        "FAILED", "Job entrypoint command failed with exit code 130")})
                     ).reconcile(store.get_job("pets-run5"))
    assert row.state == "cancelled" and "no dataset of this job's was found" in row.error
    assert "--resume" not in row.error and "partial dataset" not in row.error
    store.create_job("pets-run6", "o", "pets", {"name": "pets"}, str(tmp_path / "none"))
    store.update_job("pets-run6", state="running", ray_status="RUNNING")
    row = Reconciler(store, FakeRay(**{"pets-run6": RayJob("FAILED", "boom")})).reconcile(
        store.get_job("pets-run6"))
    assert row.state == "failed"  # not asked to stop: a failure
    store.create_job("pets-run7", "o", "pets", {"name": "pets"}, str(tmp_path / "none"))
    store.update_job("pets-run7", state="running", ray_status="RUNNING", cancel_requested=True,
                     error="stopped: the job ran past max_job_hours")
    row = Reconciler(store, FakeRay(**{"pets-run7": RayJob(
        "FAILED", "Job entrypoint command failed with exit code 1: StorageError")})).reconcile(
        store.get_job("pets-run7"))
    assert row.state == "failed" and "StorageError" in row.error  # a failure, though asked
    store.create_job("pets-run8", "o", "pets", {"name": "pets"}, str(tmp_path / "none"))
    store.update_job("pets-run8", state="running", ray_status="RUNNING", cancel_requested=True)
    row = Reconciler(store, FakeRay(**{"pets-run8": RayJob(
        "FAILED", "Job entrypoint command failed with exit code 1, last available logs:\n"
        "... the child exited with exit code 130 ...")})).reconcile(store.get_job("pets-run8"))
    assert row.state == "failed"  # its logs' words are not its exit


def test_a_finished_live_job_keeps_its_own_stats_over_an_earlier_runs(store, tmp_path):
    out = write_outcome(tmp_path / "pets", SUCCESS, {"accepted": 17, "job_id": "pets-old"})
    store.create_job("pets-new", "o", "pets", {"name": "pets"}, out)
    live = {"state": "failed", "error": "boom", "stats": {"accepted": 2, "job_id": "pets-new"}}
    row = Reconciler(store, FakeRay()).apply_live(store.get_job("pets-new"), live)
    assert row.state == "failed" and row.error == "boom" and row.stats["accepted"] == 2


class StoppingRay(FakeRay):
    """FakeRay that also stops jobs, as the launcher does."""

    def __init__(self, **statuses: RayJob):
        super().__init__(**statuses)
        self.stopped: list[str] = []

    def stop(self, job_id: str) -> None:
        self.stopped.append(job_id)
        self.jobs[job_id] = RayJob("STOPPED")


@pytest.mark.parametrize("actor", [True, False])
def test_a_job_running_past_the_policys_limit_is_stopped_saying_why(store, monkeypatch,
                                                                     actor):
    """API jobs had no time limit: one of many slow fetches (each within the caps) could hold
    its place in the cluster for days. Its partial dataset is published, as for a cancel."""
    asked = []
    monkeypatch.setattr(jobs, "request_cancel",
                        lambda job_id, reason: asked.append((job_id, reason)) or actor)
    ray = StoppingRay(**{"long-1": RayJob("RUNNING"), "short-1": RayJob("RUNNING")})
    for job_id in ("long-1", "short-1"):
        store.create_job(job_id, "o", "x", {"name": "x"}, "/nonexistent/x")
        store.update_job(job_id, state="running")
    with store.engine.begin() as conn:  # started two hours ago
        conn.execute(jobs_table.update().where(jobs_table.c.id == "long-1")
                     .values(started_at=time.time() - 7200))
    reconciler = Reconciler(store, ray, max_job_s=3600)
    reconciler.reconcile_all()
    long_row, short_row = store.get_job("long-1"), store.get_job("short-1")
    assert long_row.cancel_requested and "1 h" in long_row.error
    assert "max_job_hours" in long_row.error and not short_row.cancel_requested
    assert [job_id for job_id, _ in asked] == ["long-1"]
    assert ray.stopped == ([] if actor else ["long-1"])
    ray.jobs["long-1"] = RayJob("STOPPED")  # the job has ended, cancelled
    reconciler.reconcile_all()
    ended = store.get_job("long-1")
    assert ended.state == "cancelled" and "max_job_hours" in ended.error
    assert len(asked) == 1  # asked once


@pytest.mark.parametrize("actor", [True, False])
def test_a_running_job_of_a_revoked_key_is_stopped_saying_why(store, monkeypatch, actor):
    """Revoking a key left its running jobs running to their end (up to max_job_hours). The
    next reconcile pass stops them as a cancel does; the other keys' jobs, and those of a
    server without keys (owner "local"), are left alone."""
    asked = []
    monkeypatch.setattr(jobs, "request_cancel",
                        lambda job_id, reason: asked.append((job_id, reason)) or actor)
    _, alice = store.create_key("alice")
    _, bob = store.create_key("bob")
    owners = {"alice-1": alice.id, "bob-1": bob.id, "anon-1": "local"}
    ray = StoppingRay(**{job_id: RayJob("RUNNING") for job_id in owners})
    for job_id, owner in owners.items():
        store.create_job(job_id, owner, "x", {"name": "x"}, "/nonexistent/x")
        store.update_job(job_id, state="running")
    store.revoke_key("alice")
    reconciler = Reconciler(store, ray)
    reconciler.reconcile_all()
    stopped = store.get_job("alice-1")
    assert stopped.cancel_requested and "revoked" in stopped.error
    assert stopped.error == store_module.REVOKED_ERROR
    assert not store.get_job("bob-1").cancel_requested
    assert not store.get_job("anon-1").cancel_requested
    assert [job_id for job_id, _ in asked] == ["alice-1"]
    assert ray.stopped == ([] if actor else ["alice-1"])
    reconciler.reconcile_all()
    assert len(asked) == 1  # asked once
    ray.jobs["alice-1"] = RayJob("STOPPED")
    reconciler.reconcile_all()
    ended = store.get_job("alice-1")
    assert ended.state == "cancelled" and ended.error == store_module.REVOKED_ERROR


def test_a_job_cancelled_before_ray_ever_had_it_ends_cancelled(store):
    """The replica that started a job died before handing it to Ray, and its owner cancelled
    it: Ray never had it, and the job ended "failed", telling its owner to submit it again."""
    store.create_job("orphan-1", "o", "x", {"name": "x"}, "/nonexistent/x")
    store.update_job("orphan-1", cancel_requested=True)
    with store.engine.begin() as conn:  # handed out long ago, never submitted
        conn.execute(jobs_table.update().where(jobs_table.c.id == "orphan-1")
                     .values(started_at=time.time() - 10 * SUBMIT_GRACE_S))
    reconciler = Reconciler(store, FakeRay(), submit_grace_s=0.2)
    reconciler.reconcile_all()  # this replica gives it the grace period from now
    assert store.get_job("orphan-1").state == "starting"
    time.sleep(0.3)
    reconciler.reconcile_all()
    row = store.get_job("orphan-1")
    assert row.state == "cancelled" and "submit it again" not in (row.error or "")
    # one Ray had, and lost (the cluster restarted), is not said to have never run
    store.create_job("lost-1", "o", "x", {"name": "x"}, "/nonexistent/x")
    store.update_job("lost-1", state="running", ray_status="RUNNING", cancel_requested=True)
    Reconciler(store, FakeRay()).reconcile_all()
    assert store.get_job("lost-1").state == "failed"


def test_a_job_that_never_acts_on_its_stop_has_its_driver_stopped_by_ray(store, monkeypatch):
    """A job past max_job_hours was asked to stop once; a driver that never acted on it (its
    loop wedged) stayed running for ever, holding its place and its key's queue."""
    monkeypatch.setattr(jobs, "request_cancel", lambda job_id, reason: True)  # the actor heard
    store.create_job("wedged-1", "o", "x", {"name": "x"}, "/nonexistent/x")
    store.update_job("wedged-1", state="running")
    with store.engine.begin() as conn:  # long past the limit (the server was down, say)
        conn.execute(jobs_table.update().where(jobs_table.c.id == "wedged-1")
                     .values(started_at=time.time() - 3600 - 3 * jobs.STOP_GRACE_S))
    ray = StoppingRay(**{"wedged-1": RayJob("RUNNING")})
    ray.stop = lambda job_id: ray.stopped.append(job_id)  # Ray stops it, in its own time
    clock = [time.time()]
    monkeypatch.setattr(jobs.time, "time", lambda: clock[0])
    reconciler = Reconciler(store, ray, max_job_s=3600)
    reconciler.reconcile_all()
    reconciler.reconcile_all()  # the grace counts from the stop, not from the limit
    assert store.get_job("wedged-1").cancel_requested and ray.stopped == []
    clock[0] += jobs.STOP_GRACE_S + 60  # an hour later, still running
    reconciler.reconcile_all()
    reconciler.reconcile_all()
    assert ray.stopped == ["wedged-1"]  # once
    assert "Ray stopped its driver" in store.get_job("wedged-1").error


def test_a_job_stopped_too_late_that_published_whole_succeeds_without_the_stop_error(
        store, monkeypatch, tmp_path):
    """A stop (max_job_hours, a revoked key) asked of a job that was already publishing came
    too late: the job published whole and succeeded, but kept the stop's error, which said a
    partial dataset was published."""
    monkeypatch.setattr(jobs, "request_cancel", lambda job_id, reason: True)
    out = write_outcome(tmp_path / "late", SUCCESS, {"job_id": "late-1", "accepted": 3,
                                                     "rejected": 0, "candidates": 3})
    store.create_job("late-1", "o", "x", {"name": "x"}, out)
    store.update_job("late-1", state="writing")
    with store.engine.begin() as conn:  # started 10 minutes past the limit
        conn.execute(jobs_table.update().where(jobs_table.c.id == "late-1")
                     .values(started_at=time.time() - 3600 - 600))
    ray = StoppingRay(**{"late-1": RayJob("RUNNING")})
    reconciler = Reconciler(store, ray, max_job_s=3600)
    reconciler.reconcile_all()
    assert "max_job_hours" in store.get_job("late-1").error
    ray.jobs["late-1"] = RayJob("SUCCEEDED")  # it had published before it saw the stop
    reconciler.reconcile_all()
    done = store.get_job("late-1")
    assert (done.state, done.error) == ("succeeded", None)


def test_a_cancel_the_progress_actor_forgot_is_asked_again(store, monkeypatch):
    """A job's progress actor restarted (its node was lost) forgets the cancel it held, and
    the driver then ran the job to its end. The reconciler sees the job still running with no
    cancel at its actor and asks again, with the reason it was stopped for."""
    asked = []
    monkeypatch.setattr(jobs, "request_cancel",
                        lambda job_id, reason: asked.append((job_id, reason)) or True)
    live = {"forgot-1": {"state": "running", "cancel_requested": None, "progress": {}},
            "holds-1": {"state": "running", "cancel_requested": "x", "progress": {}},
            "ending-1": {"state": "writing", "cancel_requested": None, "progress": {}},
            "running-1": {"state": "running", "cancel_requested": None, "progress": {}}}
    monkeypatch.setattr(jobs, "read_live_all", lambda ids: {i: live.get(i) for i in ids})
    for job_id in live:
        store.create_job(job_id, "o", "x", {"name": "x"}, "/nonexistent/x")
        store.update_job(job_id, state="running", cancel_requested=job_id != "running-1")
    store.update_job("holds-1", error="why")
    Reconciler(store, StoppingRay()).reconcile_all()
    assert asked == [("forgot-1", jobs.API_CANCEL)]


# What Ray's job API says of a driver that exited 1 (its log's tail, as Ray words it).
DRIVER_LOG = """Job entrypoint command failed with exit code 1, last available logs \
(truncated to 20,000 chars):
2026-12-04 06:46:32,441\tINFO job_manager.py:581 -- Runtime env is setting up.
Running entrypoint for job pets-1a2b3c4d: /srv/venv/bin/python -m cluster.cli build \
--spec-env PIXCRAWLER_SPEC_YAML --job-id pets-1a2b3c4d --address 10.1.2.3:6379
2026-12-04 06:46:34,247 INFO pixcrawler: running on Ray: joining the cluster at 10.1.2.3:6379
2026-12-04 06:46:35,356 INFO pixcrawler: [pets-1a2b3c4d] Ray cluster (10.1.2.3:6379), 2 CPUs, \
dashboard http://10.1.2.3:8265
2026-12-04 06:46:36,001 WARNING pixcrawler.sources: [pets-1a2b3c4d] bing: HTTP 429, retrying
(SearchActor pid=4242, ip=10.1.2.4) bing: giving up after 5 tries
error: bing needs BING_API_KEY (set it in the environment of the cluster's nodes)
"""


def test_a_failed_jobs_error_keeps_the_drivers_last_words_not_the_clusters_addresses():
    from serve.jobs import failure_text

    text = failure_text(DRIVER_LOG)
    assert "10.1.2" not in text and "/srv/venv" not in text and "INFO" not in text
    assert text.startswith("Job entrypoint command failed with exit code 1")
    assert "WARNING pixcrawler.sources: [pets-1a2b3c4d] bing: HTTP 429" in text
    assert "(SearchActor pid=4242) bing: giving up after 5 tries" in text
    assert text.endswith("error: bing needs BING_API_KEY (set it in the environment of the "
                         "cluster's nodes)")
    assert failure_text("x" * 5000 + "\nerror: last") == ("x" * 5000 + "\nerror: last")[-4000:]
    assert failure_text("") == "the job failed"


def test_the_reconciler_stores_the_failure_text(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 's.db'}")
    store.create_job("pets-1a2b3c4d", "o", "pets", {"name": "pets"}, str(tmp_path / "out"))
    store.update_job("pets-1a2b3c4d", state="running")
    ray = FakeRay(**{"pets-1a2b3c4d": RayJob("FAILED", DRIVER_LOG)})
    row = Reconciler(store, ray).reconcile(store.get_job("pets-1a2b3c4d"), check_live=False)
    assert row.state == "failed" and "10.1.2.3" not in row.error
    assert row.error.endswith("error: bing needs BING_API_KEY (set it in the environment of "
                              "the cluster's nodes)")
    store.close()
