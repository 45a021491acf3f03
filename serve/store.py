"""The job store: jobs and API keys in a SQL database (SQLAlchemy Core).

A SQLite file by default, so the jobs outlive a restart of a Serve replica or of the whole app;
any SQLAlchemy URL (``postgresql+psycopg://...``) where several replicas on several nodes share
it. The tables are created on first use.

API keys are stored as ``sha256(salt + key)`` only: the plaintext is shown once, when it is
created. Keys are 256-bit random strings, so one fast salted hash is enough (a slow KDF guards
low-entropy passwords, and would cost every request). The salt is made once per store and kept
in its ``meta`` table; ``PIXCRAWLER_KEY_SALT`` overrides it so the database alone cannot be used
to check guesses. The salt also keys the event streams' tokens (``serve.auth.token_secret``):
whoever reads it can make them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from serve.locations import default_store_url

log = logging.getLogger("pixcrawler.serve.store")

STATES = ("queued", "starting", "running", "writing", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE = frozenset(STATES) - TERMINAL
STARTED = ACTIVE - {"queued"}
REVOKED_ERROR = ("stopped: the API key that submitted this job was revoked; what it had "
                 "accepted by then is published as a partial dataset")
"""The error of a job whose key was revoked (a queued one ends with nothing published)."""
REVOKED_QUEUED_ERROR = "cancelled before it started: the API key that submitted it was revoked"
RANK = {state: rank for rank, state in enumerate(STATES[:4])} | {s: 4 for s in TERMINAL}
"""How far along a state is: a job's state only ever moves forward."""


def later_state(a: str, b: str) -> str:
    """The one of two states that is further along (``a`` on a tie)."""
    return b if RANK.get(b, -1) > RANK.get(a, -1) else a


def states_before(state: str) -> list[str]:
    """The active states a job may be in to move to ``state`` (itself included)."""
    return [s for s in STATES if s in ACTIVE and RANK[s] <= RANK[state]]
"""Handed to Ray: the jobs that hold a share of the cluster (serve.schedule)."""
KEY_PREFIX = "pxc_"
KEY_FORM = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_-]{43}")
"""What every key ``create_key`` makes looks like (the prefix and 32 random bytes, URL-safe
base64): anything else is no key, refused before a lookup."""

_meta = sa.MetaData()

jobs_table = sa.Table(
    "jobs", _meta,
    sa.Column("id", sa.String(160), primary_key=True),
    sa.Column("owner", sa.String(64), nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("ended_at", sa.Float),
    sa.Column("output_uri", sa.Text, nullable=False),
    sa.Column("spec_json", sa.Text, nullable=False),
    sa.Column("ray_status", sa.String(32)),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("error", sa.Text),
    sa.Column("progress_json", sa.Text),
    sa.Column("stats_json", sa.Text),
    sa.Column("started_at", sa.Float),
    sa.Index("ix_jobs_owner_created", "owner", "created_at"),
    sa.Index("ix_jobs_state", "state"),
)

keys_table = sa.Table(
    "api_keys", _meta,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("prefix", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float),
)

meta_table = sa.Table(
    "meta", _meta,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


class StoreError(Exception):
    """The store cannot be opened or a request to it is invalid; the message says why."""


class TooManyJobs(StoreError):
    """``create_job`` with ``max_active``: the owner already has that many active jobs."""

    def __init__(self, owner: str, active: int, cap: int):
        super().__init__(f"{owner} has {active} active jobs (the limit is {cap})")
        self.owner = owner
        self.active = active
        self.cap = cap


class JobIdTaken(StoreError):
    """``create_job``: a job with this id exists already (a new id's random part repeated)."""

    def __init__(self, job_id: str):
        super().__init__(f"a job with the id {job_id!r} exists already")
        self.job_id = job_id


@dataclass
class ApiKey:
    id: str
    name: str
    prefix: str
    created_at: float
    revoked_at: Optional[float] = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass
class JobRow:
    id: str
    owner: str
    name: str
    state: str
    created_at: float
    updated_at: float
    output_uri: str
    spec: dict[str, Any]
    ended_at: Optional[float] = None
    ray_status: Optional[str] = None
    cancel_requested: bool = False
    error: Optional[str] = None
    progress: Optional[dict[str, Any]] = None
    stats: Optional[dict[str, Any]] = None
    started_at: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


def private_file(path: Path) -> None:
    """Create ``path`` (empty) readable and writable by this user only, in a folder only this
    user may enter where the folder is new; an existing one of this user's that others may
    read is made so, with its WAL and shared-memory files (SQLite gives new ones the database
    file's permissions, and keeps those a crash left). The store holds every key's salted
    hash and the salt that signs stream tokens, and every job's spec: with the umask's 0644
    in a 0755 folder, another user of the machine could read them and forge a stream token.
    Files another user owns are left as they are (with a warning where others may read
    them): that store is shared on purpose."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        private_mode(name)


def private_mode(path: Path) -> None:
    """``path`` (a file or folder of this user's) made inaccessible to others where it is
    not; one another user owns only warned of."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return
    if not info.st_mode & 0o077:
        return
    if info.st_uid == os.geteuid():
        path.chmod(info.st_mode & 0o700)
    else:
        log.warning("%s can be read by other users of this machine, and is not yours to "
                    "change: it holds what the job API keeps secret", path)


def sqlite_path(url: str) -> Optional[Path]:
    """The file of a ``sqlite:///`` URL (absolute), or None for other databases/in-memory."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or \
            parsed.database == ":memory:":
        return None
    return Path(parsed.database).expanduser().resolve()


def _hash_key(salt: str, key: str) -> str:
    return hashlib.sha256((salt + key).encode("utf-8")).hexdigest()


def _loads(text: Optional[str]) -> Optional[dict[str, Any]]:
    return json.loads(text) if text else None


def _dumps(obj: Optional[dict[str, Any]]) -> Optional[str]:
    return None if obj is None else json.dumps(obj, separators=(",", ":"), default=str)


class JobStore:
    """Jobs and API keys. Thread-safe (one SQLAlchemy engine, a connection per call).

    ``generation`` moves on after every write through this object (once it is committed), so
    a cache of reads (serve.cache) can drop what it read before the write."""

    def __init__(self, url: Optional[str] = None):
        self.url = url or default_store_url()
        try:
            self.engine = self._make_engine(self.url)
            _meta.create_all(self.engine)
            self._add_columns()
        except ImportError as exc:
            raise StoreError(f"cannot open the job store {self.url!r}: its database driver is "
                             f"not installed ({exc}). For PostgreSQL: pip install "
                             "'pixcrawler[serve]' (psycopg); for another database, its "
                             "SQLAlchemy driver.") from exc
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            raise StoreError(f"cannot open the job store {self.url!r}: {exc}. Check the URL "
                             "(sqlite:////abs/path.db or postgresql+psycopg://user@host/db) and "
                             "that the directory or database exists and is writable.") from exc
        self._salt: Optional[str] = None
        self._generation = 0
        self._generation_lock = threading.Lock()

    @property
    def generation(self) -> int:
        return self._generation

    def _wrote(self) -> None:
        with self._generation_lock:
            self._generation += 1

    def _add_columns(self) -> None:
        """Columns added since a store was first created (``create_all`` makes missing tables
        only): ``jobs.started_at``."""
        if "started_at" in {c["name"] for c in sa.inspect(self.engine).get_columns("jobs")}:
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN started_at FLOAT"))
        except sa.exc.SQLAlchemyError:
            # Another process added it meanwhile; anything else fails the check below.
            columns = {c["name"] for c in sa.inspect(self.engine).get_columns("jobs")}
            if "started_at" not in columns:
                raise

    @staticmethod
    def _make_engine(url: str) -> Engine:
        path = sqlite_path(url)
        if path is None:
            return sa.create_engine(url, pool_pre_ping=True)
        private_file(path)
        engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL: readers do not wait for the writer (replica + CLI + reconciler at once).
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine

    @property
    def directory(self) -> Optional[Path]:
        """The SQLite file's directory (jobs' spec files and default outputs go there)."""
        path = sqlite_path(self.url)
        return path.parent if path else None

    def close(self) -> None:
        self.engine.dispose()

    # -- API keys ---------------------------------------------------------------------------

    @property
    def salt(self) -> str:
        if self._salt is None:
            self._salt = os.environ.get("PIXCRAWLER_KEY_SALT") or self._stored_salt()
        return self._salt

    def _stored_salt(self) -> str:
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(meta_table.c.value)
                               .where(meta_table.c.key == "key_salt")).first()
            if row:
                return row[0]
            salt = secrets.token_hex(16)
            try:
                conn.execute(meta_table.insert().values(key="key_salt", value=salt))
            except sa.exc.IntegrityError:
                pass
        with self.engine.connect() as conn:
            return conn.execute(sa.select(meta_table.c.value)
                                .where(meta_table.c.key == "key_salt")).scalar_one()

    def create_key(self, name: str) -> tuple[str, ApiKey]:
        """A new key: returns (plaintext, record). The plaintext is not kept anywhere."""
        name = name.strip()
        if not name:
            raise StoreError("a key needs a name (who or what uses it)")
        if any(k.name == name and k.active for k in self.list_keys()):
            raise StoreError(f"an active key named {name!r} exists; revoke it first or pick "
                             "another name")
        key_id = secrets.token_hex(6)
        plaintext = f"{KEY_PREFIX}{secrets.token_urlsafe(32)}"
        record = ApiKey(id=key_id, name=name, prefix=plaintext[:10], created_at=time.time())
        with self.engine.begin() as conn:
            conn.execute(keys_table.insert().values(
                id=key_id, name=name, key_hash=_hash_key(self.salt, plaintext),
                prefix=record.prefix, created_at=record.created_at))
        self._wrote()
        return plaintext, record

    def verify_key(self, plaintext: str) -> Optional[ApiKey]:
        """The active key with this plaintext, or None."""
        if not KEY_FORM.fullmatch(plaintext):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(keys_table).where(
                keys_table.c.key_hash == _hash_key(self.salt, plaintext))).mappings().first()
        if row is None or row["revoked_at"] is not None:
            return None
        return _key(row)

    def active_key(self, key_id: str) -> Optional[ApiKey]:
        """The active key with this id, or None (revoked or unknown)."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(keys_table).where(
                keys_table.c.id == key_id)).mappings().first()
        if row is None or row["revoked_at"] is not None:
            return None
        return _key(row)

    def revoked_owners(self, owners: Iterable[str]) -> set[str]:
        """Those of ``owners`` that are keys since revoked (not unknown ids, nor the
        anonymous owner of a server without keys)."""
        wanted = sorted(set(owners))
        if not wanted:
            return set()
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(keys_table.c.id).where(
                keys_table.c.id.in_(wanted), keys_table.c.revoked_at.is_not(None))).all()
        return {r[0] for r in rows}

    def list_keys(self) -> list[ApiKey]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(keys_table)
                                .order_by(keys_table.c.created_at)).mappings().all()
        return [_key(r) for r in rows]

    def revoke_key(self, name_or_id: str) -> list[ApiKey]:
        """Revoke the active key(s) with this id or name; returns what was revoked. Their
        queued jobs end "cancelled" here; the reconciler stops their running ones
        (``serve.jobs.Reconciler``)."""
        hits = [k for k in self.list_keys() if k.active and name_or_id in (k.id, k.name)]
        if not hits:
            raise StoreError(f"no active key with id or name {name_or_id!r}; "
                             "`pixcrawler keys list` shows them")
        now = time.time()
        ids = [k.id for k in hits]
        with self.engine.begin() as conn:
            conn.execute(keys_table.update().where(keys_table.c.id.in_(ids))
                         .values(revoked_at=now))
            conn.execute(jobs_table.update()
                         .where(jobs_table.c.owner.in_(ids), jobs_table.c.state == "queued")
                         .values(state="cancelled", cancel_requested=True, updated_at=now,
                                 ended_at=now, error=REVOKED_QUEUED_ERROR))
        self._wrote()
        for k in hits:
            k.revoked_at = now
        return hits

    # -- jobs -------------------------------------------------------------------------------

    def create_job(self, job_id: str, owner: str, name: str, spec: dict[str, Any],
                   output_uri: str, max_active: Optional[int] = None,
                   queued: bool = False) -> JobRow:
        """A new job, "starting" (or "queued", for ``serve.schedule`` to start). With
        ``max_active``, only while ``owner`` has fewer active (queued or running) jobs, else
        TooManyJobs: the count and the insert are one statement (``INSERT ...
        SELECT ... WHERE count < cap``), so replicas sharing the store cannot both pass the
        check. SQLite runs a writing statement under its database write lock; PostgreSQL's
        READ COMMITTED would let two such statements count at once, so there the owner's
        inserts are first serialised with a transaction-scoped advisory lock. JobIdTaken when
        the id is in use."""
        now = time.time()
        row = JobRow(id=job_id, owner=owner, name=name,
                     state="queued" if queued else "starting", created_at=now, updated_at=now,
                     output_uri=output_uri, spec=spec, started_at=None if queued else now)
        values: dict[str, Any] = {
            "id": job_id, "owner": owner, "name": name, "state": row.state, "created_at": now,
            "updated_at": now, "output_uri": output_uri, "spec_json": _dumps(spec),
            "cancel_requested": False, "started_at": row.started_at}
        try:
            self._insert_job(values, owner, max_active)
        except sa.exc.IntegrityError:
            if self.get_job(job_id) is not None:
                raise JobIdTaken(job_id) from None
            raise
        self._wrote()
        return row

    def prune_ended(self, owner: str, keep_jobs: int, keep_chars: int) -> int:
        """Delete ``owner``'s ended jobs past the ``keep_jobs`` that ended last, or past
        ``keep_chars`` characters of their stored spec, progress and stats, the last ended
        kept first; returns how many went. Only the rows go: the datasets stay where they were
        written. Without it, a key submitting large specs and cancelling them while queued
        grew the store without end.

        The ended job that started last always stays: the scheduler's turns go by each key's
        last start (``last_starts``), and a key whose started jobs were all pruned counted as
        never started, first in line."""
        size = sum(sa.func.coalesce(sa.func.length(jobs_table.c[name]), 0)
                   for name in ("spec_json", "progress_json", "stats_json"))
        query = (sa.select(jobs_table.c.id, size, jobs_table.c.started_at)
                 .where(jobs_table.c.owner == owner, jobs_table.c.state.in_(sorted(TERMINAL)))
                 .order_by(sa.func.coalesce(jobs_table.c.ended_at,
                                            jobs_table.c.updated_at).desc(), jobs_table.c.id))
        with self.engine.connect() as conn:
            ended = conn.execute(query).all()
        started = [(at, job_id) for job_id, _, at in ended if at is not None]
        last_started = max(started)[1] if started else None
        held, old = 0, []
        for n, (job_id, chars, _) in enumerate(ended):
            held += int(chars or 0)
            if (n >= keep_jobs or held > keep_chars) and job_id != last_started:
                old.append(job_id)
        for start in range(0, len(old), 500):
            with self.engine.begin() as conn:
                conn.execute(jobs_table.delete().where(
                    jobs_table.c.id.in_(old[start:start + 500]),
                    jobs_table.c.state.in_(sorted(TERMINAL))))
        if old:
            self._wrote()
        return len(old)

    def _insert_job(self, values: dict[str, Any], owner: str,
                    max_active: Optional[int]) -> None:
        with self.engine.begin() as conn:
            if max_active is None:
                conn.execute(jobs_table.insert().values(**values))
            else:
                if conn.dialect.name == "postgresql":
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:owner))"),
                                 {"owner": owner})
                active = self._active_count(owner).scalar_subquery()
                source = sa.select(*[sa.literal(value, type_=jobs_table.c[key].type).label(key)
                                     for key, value in values.items() if value is not None]
                                   ).where(active < max_active)
                # preserve_rowcount: SQLAlchemy keeps an INSERT's rowcount only when asked
                # (psycopg's is lost otherwise, and every submit would read as refused).
                columns = [key for key, value in values.items() if value is not None]
                inserted = conn.execute(jobs_table.insert().from_select(columns, source)
                                        .execution_options(preserve_rowcount=True))
                if inserted.rowcount != 1:
                    count = int(conn.execute(self._active_count(owner)).scalar_one())
                    raise TooManyJobs(owner, count, max_active)

    def get_job(self, job_id: str, owner: Optional[str] = None) -> Optional[JobRow]:
        """The job, or None; with ``owner``, only that owner's job."""
        query = sa.select(jobs_table).where(jobs_table.c.id == job_id)
        if owner is not None:
            query = query.where(jobs_table.c.owner == owner)
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return _job(row) if row else None

    def list_jobs(self, owner: Optional[str], *, states: Optional[Iterable[str]] = None,
                  limit: int = 20, offset: int = 0, brief: bool = False,
                  oldest_first: bool = False) -> tuple[list[JobRow], int]:
        """A page of jobs, newest first (``oldest_first``: oldest first), and the total count
        matching the filter. ``brief``: without each job's per-class progress (the API's job
        list shows none, and a replica keeps its pages a while: a job of 1,000 classes holds
        hundreds of KB of it)."""
        where = []
        if owner is not None:
            where.append(jobs_table.c.owner == owner)
        if states:
            where.append(jobs_table.c.state.in_(list(states)))
        # A page needs neither the spec nor the final stats (GET /v1/jobs/{id} has them).
        cols = [c for c in jobs_table.c if c.name not in ("spec_json", "stats_json")]
        query = (sa.select(*cols).where(*where)
                 .order_by(jobs_table.c.created_at if oldest_first
                           else jobs_table.c.created_at.desc(), jobs_table.c.id)
                 .limit(limit).offset(offset))
        count = sa.select(sa.func.count()).select_from(jobs_table).where(*where)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
            total = conn.execute(count).scalar_one()
        jobs = [_job(r) for r in rows]
        if brief:
            for job in jobs:
                if job.progress:
                    job.progress.pop("classes", None)
        return jobs, int(total)

    def active_jobs(self, owner: Optional[str] = None) -> list[JobRow]:
        """Jobs not yet ended (all owners unless ``owner`` is given)."""
        rows, _ = self.list_jobs(owner, states=ACTIVE, limit=10_000)
        return rows

    @staticmethod
    def _active_count(owner: str) -> sa.Select:
        return (sa.select(sa.func.count()).select_from(jobs_table)
                .where(jobs_table.c.owner == owner, jobs_table.c.state.in_(sorted(ACTIVE))))

    def claim_queued(self, job_id: str, max_running: int, max_running_per_owner: int) -> bool:
        """Move a queued job to "starting" if the cluster runs fewer than ``max_running`` jobs
        (states in STARTED) and its owner fewer than ``max_running_per_owner``; True if this
        call moved it. One statement, like ``create_job``'s cap (PostgreSQL: serialised by an
        advisory lock), so replicas sharing the store never start more than the caps allow
        nor the same job twice."""
        now = time.time()
        other = jobs_table.alias("other")
        running = sorted(STARTED)
        total = (sa.select(sa.func.count()).select_from(other)
                 .where(other.c.state.in_(running)).scalar_subquery())
        owners = (sa.select(sa.func.count()).select_from(other)
                  .where(other.c.state.in_(running), other.c.owner == jobs_table.c.owner)
                  .scalar_subquery())
        query = (jobs_table.update()
                 .where(jobs_table.c.id == job_id, jobs_table.c.state == "queued",
                        total < max_running, owners < max_running_per_owner)
                 .values(state="starting", started_at=now, updated_at=now))
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('pixcrawler-"
                                     "schedule'))"))
            moved = conn.execute(query).rowcount == 1
        if moved:
            self._wrote()
        return moved

    def cancel_queued(self, job_id: str, error: Optional[str] = None) -> bool:
        """End a job that is still queued as "cancelled" (saying why, if ``error``); False if
        it is not queued (any more): a scheduler started it meanwhile, and it is cancelled as
        a running job."""
        now = time.time()
        query = (jobs_table.update()
                 .where(jobs_table.c.id == job_id, jobs_table.c.state == "queued")
                 .values(state="cancelled", cancel_requested=True, updated_at=now,
                         ended_at=now, **({"error": error} if error else {})))
        with self.engine.begin() as conn:
            moved = conn.execute(query).rowcount == 1
        if moved:
            self._wrote()
        return moved

    def last_starts(self) -> dict[str, float]:
        """When each owner's latest job was started (owners with none started are absent)."""
        query = (sa.select(jobs_table.c.owner, sa.func.max(jobs_table.c.started_at))
                 .where(jobs_table.c.started_at.is_not(None)).group_by(jobs_table.c.owner))
        with self.engine.connect() as conn:
            return {owner: float(at) for owner, at in conn.execute(query)}

    def count_active(self, owner: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(self._active_count(owner)).scalar_one())

    def update_job(self, job_id: str, *, state: Optional[str] = None,
                   ray_status: Optional[str] = None, cancel_requested: Optional[bool] = None,
                   error: Optional[str] = None, progress: Optional[dict[str, Any]] = None,
                   stats: Optional[dict[str, Any]] = None,
                   output_uri: Optional[str] = None) -> None:
        """Change the given fields. A job that ended keeps its end state (the first wins), and
        a state never moves back: an update that would (a reader that saw the job a moment
        earlier) changes nothing, its progress included. A job that succeeded has no error."""
        values: dict[str, Any] = {"updated_at": time.time()}
        if state is not None:
            if state not in STATES:
                raise StoreError(f"unknown job state {state!r}; valid: {', '.join(STATES)}")
            values["state"] = state
            if state in TERMINAL:
                values["ended_at"] = values["updated_at"]
        for key, value in (("ray_status", ray_status), ("cancel_requested", cancel_requested),
                           ("error", error), ("output_uri", output_uri)):
            if value is not None:
                values[key] = value
        if state == "succeeded":
            # A stop that came too late (the job had published whole) left its reason, which
            # says a partial dataset was published.
            values["error"] = None
        if progress is not None:
            values["progress_json"] = _dumps(progress)
        if stats is not None:
            values["stats_json"] = _dumps(stats)
        allowed = states_before(state) if state is not None else list(ACTIVE)
        query = (jobs_table.update().where(jobs_table.c.id == job_id)
                 .where(jobs_table.c.state.in_(allowed)).values(**values))
        with self.engine.begin() as conn:
            conn.execute(query)
        self._wrote()


def _key(row: Any) -> ApiKey:
    return ApiKey(id=row["id"], name=row["name"], prefix=row["prefix"],
                  created_at=row["created_at"], revoked_at=row["revoked_at"])


def _job(row: Any) -> JobRow:
    return JobRow(id=row["id"], owner=row["owner"], name=row["name"], state=row["state"],
                  created_at=row["created_at"], updated_at=row["updated_at"],
                  output_uri=row["output_uri"],
                  spec=_loads(row.get("spec_json")) or {},
                  ended_at=row["ended_at"], ray_status=row["ray_status"],
                  cancel_requested=bool(row["cancel_requested"]), error=row["error"],
                  progress=_loads(row["progress_json"]), stats=_loads(row.get("stats_json")),
                  started_at=row.get("started_at"))
