"""The job store on SQLite and on PostgreSQL: jobs and keys persist across opens, keys are
kept hashed only, and the cap on active jobs holds when replicas submit at the same moment."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import sqlalchemy as sa

from serve.store import TERMINAL, JobStore, StoreError, TooManyJobs


@pytest.fixture
def url(store_url):
    return store_url


def test_jobs_persist_page_and_filter(url):
    store = JobStore(url)
    for i in range(5):
        store.create_job(f"job-{i}", "alice", "ds", {"name": "ds", "n": i}, f"/out/{i}")
    store.create_job("bob-1", "bob", "ds", {"name": "ds"}, "/out/b")
    store.update_job("job-1", state="succeeded", stats={"accepted": 3})
    store.close()

    store = JobStore(url)
    rows, total = store.list_jobs("alice", limit=2, offset=0)
    assert total == 5 and [r.id for r in rows] == ["job-4", "job-3"]
    rows, _ = store.list_jobs("alice", limit=2, offset=4)
    assert [r.id for r in rows] == ["job-0"]
    done, total = store.list_jobs("alice", states=["succeeded"])
    assert total == 1 and done[0].ended_at is not None
    assert done[0].stats is None and store.get_job("job-1").stats == {"accepted": 3}
    assert store.get_job("job-2", "alice").spec == {"name": "ds", "n": 2}
    assert store.get_job("job-2", "bob") is None
    assert store.count_active("alice") == 4
    assert {r.id for r in store.active_jobs()} == {"job-0", "job-2", "job-3", "job-4", "bob-1"}


def test_an_ended_job_keeps_its_end_state(url):
    store = JobStore(url)
    store.create_job("j", "o", "ds", {}, "/out")
    store.update_job("j", state="cancelled")
    store.update_job("j", state="failed", error="late")
    row = store.get_job("j")
    assert row.state == "cancelled" and row.error is None and row.state in TERMINAL
    with pytest.raises(StoreError, match="valid: queued, starting"):
        store.update_job("j", state="done")


def test_a_jobs_state_never_moves_back(url):
    """A reader that saw the job a moment earlier (running) writes after one that saw it
    writing: its state and progress are dropped, other fields still change."""
    store = JobStore(url)
    store.create_job("j", "o", "ds", {}, "/out")
    store.update_job("j", state="running", progress={"accepted": 71})
    store.update_job("j", state="writing", progress={"accepted": 150})
    store.update_job("j", state="running", progress={"accepted": 80})
    store.update_job("j", state="starting")
    store.update_job("j", ray_status="RUNNING")
    row = store.get_job("j")
    assert (row.state, row.progress, row.ray_status) == ("writing", {"accepted": 150},
                                                         "RUNNING")
    store.update_job("j", state="succeeded")
    assert store.get_job("j").state == "succeeded"


def test_keys_are_stored_hashed_and_can_be_revoked(url, tmp_path):
    store = JobStore(url)
    plaintext, key = store.create_key("ci")
    assert plaintext.startswith("pxc_") and len(plaintext) > 40
    assert store.verify_key(plaintext).id == key.id
    assert store.verify_key(plaintext + "x") is None and store.verify_key("nope") is None
    with pytest.raises(StoreError, match="exists"):
        store.create_key("ci")
    with store.engine.connect() as conn:
        rows = conn.execute(sa.text("select * from api_keys")).all()
    assert len(rows) == 1 and plaintext[4:] not in repr(rows)
    assert len(rows[0].key_hash) == 64 and rows[0].key_hash not in plaintext
    if url.startswith("sqlite"):
        raw = (tmp_path / "store.db").read_bytes()
        assert plaintext.encode() not in raw and plaintext[4:].encode() not in raw

    assert [k.name for k in store.revoke_key("ci")] == ["ci"]
    assert store.verify_key(plaintext) is None
    assert not store.list_keys()[0].active
    with pytest.raises(StoreError, match="keys list"):
        store.revoke_key("ci")
    again, _ = store.create_key("ci")
    store.close()
    assert JobStore(url).verify_key(again) is not None


def test_unusable_store_url_says_what_to_check(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="sqlite:////abs/path.db"):
        JobStore(f"sqlite:///{blocker}/sub/store.db")


def test_the_cap_on_active_jobs_is_checked_with_the_insert(url):
    store = JobStore(url)
    store.create_job("a-1", "alice", "ds", {}, "/out/1", max_active=2)
    store.create_job("a-2", "alice", "ds", {}, "/out/2", max_active=2)
    with pytest.raises(TooManyJobs) as info:
        store.create_job("a-3", "alice", "ds", {}, "/out/3", max_active=2)
    assert (info.value.active, info.value.cap) == (2, 2)
    assert store.get_job("a-3") is None
    store.create_job("b-1", "bob", "ds", {}, "/out/b", max_active=2)  # per owner
    store.update_job("a-1", state="succeeded")
    assert store.create_job("a-3", "alice", "ds", {}, "/out/3", max_active=2).state == \
        "starting"


def test_replicas_submitting_at_once_stay_under_the_cap(url):
    """Two stores on one database, as two replicas: of two submits at the same moment with
    a cap of one, exactly one is created, every time."""
    stores = [JobStore(url), JobStore(url)]
    for trial in range(20):
        barrier = threading.Barrier(2)
        outcomes: list[str] = []

        def submit(store: JobStore, n: int) -> None:
            barrier.wait()
            try:
                store.create_job(f"t{trial}-{n}", "alice", "ds", {}, "/out", max_active=1)
                outcomes.append("created")
            except TooManyJobs:
                outcomes.append("refused")

        threads = [threading.Thread(target=submit, args=(s, n)) for n, s in enumerate(stores)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["created", "refused"], f"trial {trial}: {outcomes}"
        assert stores[0].count_active("alice") == 1
        for n in (0, 1):
            stores[0].update_job(f"t{trial}-{n}", state="failed")


def test_a_missing_database_driver_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed
    with pytest.raises(StoreError, match=r"pip install 'pixcrawler\[serve\]'"):
        JobStore("postgresql+psycopg://user@127.0.0.1:1/db")


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_taken_job_id_is_job_id_taken_and_the_api_draws_another(dialect, tmp_path,
                                                                   monkeypatch, request):
    """Ids are the name and 32 random bits: a repeat was an IntegrityError, a 500."""
    import serve.app
    from builder.spec import parse_spec
    from serve.app import with_fresh_id
    from serve.store import JobIdTaken

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}" if dialect == "sqlite" else
                     request.getfixturevalue("postgres").create_database("taken"))
    store.create_job("ds-00000001", "alice", "ds", {"name": "ds"}, "/out/1")
    for cap in (None, 5):
        with pytest.raises(JobIdTaken, match="ds-00000001"):
            store.create_job("ds-00000001", "bob", "ds", {"name": "ds"}, "/out/2",
                             max_active=cap)
    spec = parse_spec({"name": "ds", "target": 1, "classes": {"cat": None},
                       "sources": [{"engine": "duckduckgo"}]})
    drawn = iter(["ds-00000001", "ds-00000001", "ds-00000002"])
    monkeypatch.setattr(serve.app, "new_job_id", lambda _spec: next(drawn))
    row = with_fresh_id(spec, lambda job_id: store.create_job(job_id, "bob", "ds", {},
                                                              f"/out/{job_id}"))
    assert row.id == "ds-00000002" and store.get_job("ds-00000002").owner == "bob"
    assert store.get_job("ds-00000001").owner == "alice"
    monkeypatch.setattr(serve.app, "new_job_id", lambda _spec: "ds-00000001")
    with pytest.raises(JobIdTaken):
        with_fresh_id(spec, lambda job_id: store.create_job(job_id, "bob", "ds", {}, "/o"))
    store.close()


def test_ended_jobs_past_a_keys_count_or_size_are_pruned_newest_kept(url):
    """A key that submitted large specs and cancelled them while queued grew the store
    without end: only its newest ended jobs stay, by count and by size; active jobs and other
    keys' jobs are never touched."""
    store = JobStore(url)
    for i in range(6):
        store.create_job(f"a-{i}", "alice", "ds", {"name": "ds", "pad": "x" * 1000}, "/o")
        if i != 5:
            store.update_job(f"a-{i}", state="cancelled")
    store.create_job("b-0", "bob", "ds", {"name": "ds"}, "/o")
    store.update_job("b-0", state="failed")
    assert store.prune_ended("alice", keep_jobs=10, keep_chars=100_000) == 0
    assert store.prune_ended("alice", keep_jobs=3, keep_chars=100_000) == 2
    assert {r.id for r in store.list_jobs("alice", limit=100)[0]} == {"a-2", "a-3", "a-4", "a-5"}
    assert store.prune_ended("alice", keep_jobs=3, keep_chars=2_500) == 1  # a-4, a-3 fit
    assert {r.id for r in store.list_jobs("alice", limit=100)[0]} == {"a-3", "a-4", "a-5"}
    assert store.get_job("b-0") is not None and store.get_job("a-5").state != "cancelled"
    store.create_job("a-6", "alice", "ds", {"name": "ds"}, "/o")
    store.update_job("a-6", state="cancelled")
    time.sleep(0.01)
    store.update_job("a-5", state="succeeded")  # older than a-6, but it ended last
    # a-5 ended last; a-6 started last, and the scheduler's turns need the key's last start
    assert store.prune_ended("alice", keep_jobs=1, keep_chars=100_000) == 2
    assert [r.id for r in store.list_jobs("alice", limit=100)[0]] == ["a-6", "a-5"]


def test_a_sqlite_store_is_readable_by_its_user_only(tmp_path):
    """The store holds the salt that signs stream tokens and every job's spec; SQLite made
    the file 0644 in a 0755 folder, so another user of the machine could read them."""
    import os
    import stat

    def mode(path) -> int:
        return stat.S_IMODE(os.stat(path).st_mode)

    folder = tmp_path / "new" / "pixcrawler"
    store = JobStore(f"sqlite:///{folder}/serve.db")
    store.create_job("job-1", "alice", "ds", {"name": "ds"}, "/out/1")
    assert mode(folder) == 0o700
    assert {p.name: mode(p) for p in folder.iterdir()} == {
        name: 0o600 for name in ("serve.db", "serve.db-wal", "serve.db-shm")}
    store.close()
    for name in ("serve.db", "serve.db-wal", "serve.db-shm"):  # as an earlier version left them
        if (folder / name).exists():
            os.chmod(folder / name, 0o644)
    (folder / "serve.db-wal").touch()  # a crash's
    os.chmod(folder / "serve.db-wal", 0o644)
    again = JobStore(f"sqlite:///{folder}/serve.db")
    again.get_job("job-1")
    assert mode(folder / "serve.db") == mode(folder / "serve.db-wal") == 0o600
    again.close()
