"""The fair share of the cluster between API keys (serve/schedule.py) on SQLite and
PostgreSQL, with a fake launcher (no Ray): the caps on running jobs, keys taking turns, claims by
two replicas at once, a cancel while queued, and a store created before jobs could queue."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa

from serve.jobs import ClusterUnavailable, Reconciler
from serve.schedule import REFUSED_ERROR, Scheduler, next_job
from serve.store import JobRow, JobStore


class FakeLauncher:
    """Ray's job API: records what was submitted; ``refuse`` makes submit fail."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.stopped: list[str] = []
        self.refuse = False

    def submit(self, job_id: str, spec: dict[str, Any], owner_name: str) -> None:
        if self.refuse:
            raise ClusterUnavailable("cannot reach Ray's job API at http://10.0.0.5:8265: "
                                     "connection refused")
        self.submitted.append(job_id)

    def stop(self, job_id: str) -> bool:
        self.stopped.append(job_id)
        return True

    def status(self, job_id: str) -> None:
        return None


@pytest.fixture
def store(store_url):
    s = JobStore(store_url)
    yield s
    s.close()


def queue(store: JobStore, job_id: str, owner: str) -> None:
    store.create_job(job_id, owner, "ds", {"name": "ds"}, f"/out/{job_id}", queued=True)
    time.sleep(0.002)  # distinct created_at, so "oldest" is well defined


def end(store: JobStore, job_id: str) -> None:
    store.update_job(job_id, state="succeeded")


def row(job_id: str, owner: str, created_at: float) -> JobRow:
    return JobRow(id=job_id, owner=owner, name="ds", state="queued", created_at=created_at,
                  updated_at=created_at, output_uri="/out", spec={})


def test_next_job_prefers_keys_with_fewer_running_then_the_longest_unserved():
    queued = [row("a2", "alice", 1.0), row("a3", "alice", 2.0), row("b1", "bob", 3.0),
              row("c1", "carol", 4.0)]
    # Nobody runs anything and nobody started yet: the oldest job first.
    assert next_job(queued, {}, {}, per_key=1).id == "a2"
    # Alice started a job a moment ago: bob and carol (never started) go first, oldest first.
    assert next_job(queued, {}, {"alice": 10.0}, per_key=1).id == "b1"
    assert next_job(queued, {}, {"alice": 10.0, "bob": 11.0}, per_key=1).id == "c1"
    # Fewest running wins over the longest wait; a key at its cap is skipped.
    assert next_job(queued, {"bob": 1}, {"alice": 10.0, "carol": 5.0}, per_key=2).id == "c1"
    assert next_job(queued, {"alice": 1, "bob": 1, "carol": 1}, {}, per_key=1) is None


def test_keys_take_turns_however_many_jobs_one_key_queued(store):
    """Alice queues four jobs, then Bob one: with one place, Bob's job starts right after
    Alice's first, not after all four."""
    launcher = FakeLauncher()
    scheduler = Scheduler(store, launcher, max_running=1, per_key=1)
    for n in range(1, 5):
        queue(store, f"a{n}", "alice")
    assert scheduler.start_ready() == {} and launcher.submitted == ["a1"]
    queue(store, "b1", "bob")
    scheduler.start_ready()
    assert launcher.submitted == ["a1"]  # the one place is taken
    assert store.get_job("b1").state == "queued"
    end(store, "a1")
    scheduler.start_ready()
    assert launcher.submitted == ["a1", "b1"]
    end(store, "b1")
    scheduler.start_ready()
    end(store, "a2")
    scheduler.start_ready()
    assert launcher.submitted == ["a1", "b1", "a2", "a3"]
    assert store.get_job("a3").state == "starting" and store.get_job("a3").started_at


def test_a_key_that_prunes_its_started_jobs_keeps_its_place_in_the_turns(store):
    """Turns go by each key's last start, worked out from its jobs' rows; a key that
    submitted and cancelled enough queued jobs had its started ones pruned, counted as never
    started, and went ahead of every waiting key after each job it ran."""
    launcher = FakeLauncher()
    scheduler = Scheduler(store, launcher, max_running=1, per_key=1)
    for job_id, owner in (("b0", "bob"), ("a0", "alice")):
        queue(store, job_id, owner)
        scheduler.start_ready()
        end(store, job_id)
    assert launcher.submitted == ["b0", "a0"]
    queue(store, "a1", "alice")
    queue(store, "b1", "bob")
    for n in range(3):  # what POST then DELETE /v1/jobs do, the pruning included
        queue(store, f"pad{n}", "alice")
        store.cancel_queued(f"pad{n}")
    assert store.prune_ended("alice", keep_jobs=1, keep_chars=10**6) == 2  # a0 stays
    assert store.get_job("a0") is not None and "alice" in store.last_starts()
    scheduler.start_ready()
    assert launcher.submitted == ["b0", "a0", "b1"]  # bob's turn: alice started last


def test_past_the_rows_read_at_once_the_oldest_queued_jobs_start_first(store, monkeypatch):
    """The scheduler read the newest 10,000 queued jobs: past that many, the oldest never
    started while new ones kept coming."""
    import serve.schedule

    monkeypatch.setattr(serve.schedule, "_MAX_ROWS", 3)
    launcher = FakeLauncher()
    for n in range(1, 6):
        queue(store, f"a{n}", "alice")
    Scheduler(store, launcher, max_running=1, per_key=1).start_ready()
    assert launcher.submitted == ["a1"]


def test_the_caps_on_running_jobs_hold(store):
    launcher = FakeLauncher()
    scheduler = Scheduler(store, launcher, max_running=3, per_key=2)
    for n in range(3):
        queue(store, f"a{n}", "alice")
    queue(store, "b0", "bob")
    scheduler.start_ready()
    assert sorted(launcher.submitted) == ["a0", "a1", "b0"]  # alice at 2, the cluster at 3
    assert store.get_job("a2").state == "queued"


def test_two_replicas_claiming_at_once_start_each_job_once_within_the_cap(store_url):
    stores = [JobStore(store_url), JobStore(store_url)]
    launchers = [FakeLauncher(), FakeLauncher()]
    schedulers = [Scheduler(s, la, max_running=3, per_key=3) for s, la in zip(stores, launchers)]
    for trial in range(5):
        for n in range(6):
            queue(stores[0], f"t{trial}-{n}", f"owner{n % 2}")
        barrier = threading.Barrier(2)

        def run(scheduler: Scheduler) -> None:
            barrier.wait()
            scheduler.start_ready()

        threads = [threading.Thread(target=run, args=(s,)) for s in schedulers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        started = launchers[0].submitted + launchers[1].submitted
        assert len(started) == len(set(started)) == 3, (trial, started)
        for job_id in started:
            end(stores[0], job_id)
        for la in launchers:
            la.submitted.clear()
        for n in range(6):
            stores[0].update_job(f"t{trial}-{n}", state="cancelled")
    for s in stores:
        s.close()


def test_a_queued_job_cancels_without_ray_and_is_never_started(store):
    launcher = FakeLauncher()
    scheduler = Scheduler(store, launcher, max_running=1, per_key=1)
    queue(store, "a1", "alice")
    queue(store, "b1", "bob")
    scheduler.start_ready()
    assert store.cancel_queued("b1") is True
    assert store.cancel_queued("a1") is False  # started: cancelled as a running job
    job = store.get_job("b1")
    assert job.state == "cancelled" and job.cancel_requested and job.ended_at
    end(store, "a1")
    scheduler.start_ready()
    assert launcher.submitted == ["a1"]


def test_a_job_ray_refuses_fails_and_the_next_one_still_starts(store):
    launcher = FakeLauncher()
    scheduler = Scheduler(store, launcher, max_running=1, per_key=1)
    queue(store, "a1", "alice")
    launcher.refuse = True
    refused = scheduler.start_ready()
    assert list(refused) == ["a1"] and store.get_job("a1").state == "failed"
    # Its owner sees that Ray refused it, not where the cluster is.
    assert store.get_job("a1").error == REFUSED_ERROR and "10.0.0.5" not in REFUSED_ERROR
    launcher.refuse = False
    queue(store, "b1", "bob")
    assert scheduler.start_ready() == {} and launcher.submitted == ["b1"]


def test_queued_jobs_are_left_alone_by_the_reconciler_and_started_ones_get_their_grace(store):
    """A queued job is not Ray's yet; one started after a long wait in the queue gets the
    whole submit grace period from when it started, not from when it was queued."""
    launcher = FakeLauncher()
    reconciler = Reconciler(store, launcher, submit_grace_s=0.3)
    queue(store, "a1", "alice")
    time.sleep(0.4)
    assert reconciler.reconcile(store.get_job("a1"), check_live=False).state == "queued"
    Scheduler(store, launcher, max_running=1, per_key=1).start_ready()
    assert reconciler.reconcile(store.get_job("a1"), check_live=False).state == "starting"


def test_a_store_made_before_jobs_could_queue_gets_the_new_column(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(
            "CREATE TABLE jobs (id VARCHAR(160) PRIMARY KEY, owner VARCHAR(64) NOT NULL, "
            "name VARCHAR(128) NOT NULL, state VARCHAR(16) NOT NULL, created_at FLOAT NOT NULL, "
            "updated_at FLOAT NOT NULL, ended_at FLOAT, output_uri TEXT NOT NULL, "
            "spec_json TEXT NOT NULL, ray_status VARCHAR(32), cancel_requested BOOLEAN NOT NULL, "
            "error TEXT, progress_json TEXT, stats_json TEXT)"))
        conn.execute(sa.text(
            "INSERT INTO jobs VALUES ('old-1', 'alice', 'ds', 'running', 1.0, 1.0, NULL, "
            "'/out', '{}', 'RUNNING', 0, NULL, NULL, NULL)"))
    engine.dispose()
    store = JobStore(url)
    old = store.get_job("old-1")
    assert old.state == "running" and old.started_at is None
    queue(store, "new-1", "bob")
    assert Scheduler(store, FakeLauncher(), max_running=2, per_key=1).start_ready() == {}
    assert store.get_job("new-1").state == "starting"
    JobStore(url).close()  # opening it again finds the column there
    store.close()


def test_the_api_answers_a_refused_start_with_503_and_keeps_ray_s_words_for_the_log(
        store, caplog):
    """The 503 quoted Ray's error to the API user: the cluster's job API address, and advice
    (`ray start --head ...`) only whoever runs the cluster can follow."""
    import inspect

    from serve.app import CLUSTER_RETRY_S, JobAPI
    from serve.errors import ApiError

    route = JobAPI.func_or_class

    class Replica:  # the replica's methods on a bare object (the Serve class is ASGI-wrapped)
        def __getattr__(self, name: str) -> Any:
            return inspect.getattr_static(route, name).__get__(self, route)

    launcher = FakeLauncher()
    api = Replica()
    api.scheduler = Scheduler(store, launcher, max_running=1, per_key=1)
    queue(store, "a1", "alice")
    launcher.refuse = True
    with caplog.at_level("WARNING", logger="pixcrawler.serve"):
        with pytest.raises(ApiError) as err:
            api._start("a1")
    assert err.value.status == 503 and err.value.code == "cluster_unavailable"
    assert err.value.headers == {"Retry-After": str(CLUSTER_RETRY_S)}
    assert "a1" in err.value.message and "10.0.0.5" not in err.value.message
    assert any("10.0.0.5" in r.getMessage() for r in caplog.records)
    assert sum("10.0.0.5" in r.getMessage() for r in caplog.records) == 1  # logged once
    launcher.refuse = False
    queue(store, "b1", "bob")
    api._start("b1")  # started, or still queued: no error


def test_a_revoked_keys_queued_jobs_end_cancelled_and_never_start(store):
    """A revoked key's queued jobs still started, one after another, each for up to
    max_job_hours. Revoking ends them; one queued by a replica that had not seen the revoke
    yet (its key cache) is ended by the scheduler, and the other keys' jobs start."""
    _, alice = store.create_key("alice")
    _, bob = store.create_key("bob")
    launcher = FakeLauncher()
    scheduler = Scheduler(store, launcher, max_running=1, per_key=1)
    queue(store, "a1", alice.id)
    queue(store, "a2", alice.id)
    queue(store, "b1", bob.id)
    assert [k.id for k in store.revoke_key("alice")] == [alice.id]
    for job_id in ("a1", "a2"):
        job = store.get_job(job_id)
        assert job.state == "cancelled" and job.ended_at and "revoked" in job.error
    queue(store, "a3", alice.id)  # through a replica whose key cache still held alice's key
    scheduler.start_ready()
    assert launcher.submitted == ["b1"]
    late = store.get_job("a3")
    assert late.state == "cancelled" and "revoked" in late.error
    assert store.get_job("b1").state == "starting" and store.get_job("b1").error is None
    assert store.revoked_owners([alice.id, bob.id, "local"]) == {alice.id}


def test_a_submit_whose_answer_was_lost_leaves_the_job_for_the_reconciler(tmp_path, store,
                                                                           monkeypatch):
    """Ray's job API took the job, and the connection was reset before its answer came back:
    the job was recorded failed ("submit it again") while its driver ran on, outside every
    cap, and could not be cancelled. A lost answer leaves the job starting, for the
    reconciler to find at Ray (or to fail after the grace period); a refusal still fails it."""
    from types import SimpleNamespace

    from builder.spec import parse_spec
    from serve import jobs
    from serve.app import EXAMPLE_SPEC

    class Client:  # Ray's JobSubmissionClient, as far as the launcher uses it
        def __init__(self, error: Exception):
            self.error = error

        def submit_job(self, **_):
            raise self.error

    monkeypatch.setattr(jobs.ray, "get_runtime_context",
                        lambda: SimpleNamespace(gcs_address="127.0.0.1:1"))
    spec = parse_spec(EXAMPLE_SPEC).model_dump(mode="json")
    launcher = jobs.JobLauncher(tmp_path)
    for error in (ConnectionError("('Connection aborted.', ConnectionResetError(104))"),
                  RuntimeError("Request failed with status code 502: Bad Gateway")):
        launcher._client = Client(error)
        with pytest.raises(jobs.SubmitUnconfirmed, match="may run"):
            launcher.submit("j-1", spec, "o")
    for error in (ConnectionError("HTTPConnectionPool: Max retries exceeded (Connection "
                                  "refused)"),
                  RuntimeError("Request failed with status code 400: bad entrypoint")):
        launcher._client = Client(error)
        with pytest.raises(jobs.ClusterUnavailable) as refused:
            launcher.submit("j-1", spec, "o")
        assert not isinstance(refused.value, jobs.SubmitUnconfirmed)

    class LostAnswer(FakeLauncher):
        def submit(self, job_id, spec, owner_name):
            raise jobs.SubmitUnconfirmed("Ray's answer to the job's submission was lost")

    queue(store, "a1", "alice")
    assert Scheduler(store, LostAnswer(), max_running=1, per_key=1).start_ready() == {}
    assert store.get_job("a1").state == "starting" and store.get_job("a1").error is None
