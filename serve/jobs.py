"""Jobs on the cluster: start them as Ray jobs, read their live progress, cancel them, and
reconcile the store with what Ray says.

A job is a Ray job (``JobSubmissionClient``), so it shows in the dashboard's Jobs view with its
logs. Its entrypoint is ``python -m cluster.cli build SPEC --job-id ID --address GCS``; the
spec travels in the job's runtime_env (``PIXCRAWLER_SPEC_YAML``, read by ``--spec-env``) when
it is under 100 kB, else as a JSON file under ``jobs_dir``, which must
then be on a filesystem every node that runs job drivers can read (the head node, by default).

While the job runs, its progress actor (``progress:<id>``) holds its live state. When the actor
is gone the job has ended (or never got going), and Ray's job status plus the output's marker
(``_SUCCESS`` / ``_PARTIAL``) and ``stats.json`` say how it ended. ``Reconciler`` applies that
to the store, so a job never stays "running" after its driver died or the cluster restarted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import ray
import yaml

from actors import NAMESPACE
from actors.progress import cancel_job, progress_name
from builder.card import empty_failure
from builder.errors import PixCrawlerError, StorageError
from builder.storage import open_fs, storage_errors
from builder.writers import PARTIAL, SUCCESS, read_marker
from cluster.cli import EXIT_CANCELLED
from cluster.rayjob import dashboard_address
from serve.cache import ReadCache
from serve.store import REVOKED_ERROR, TERMINAL, JobRow, JobStore, private_mode

log = logging.getLogger("pixcrawler.serve.jobs")

SPEC_ENV = "PIXCRAWLER_SPEC_YAML"
_MAX_ERROR_CHARS = 4000
# The lines of a driver's log that say where the cluster is, not what went wrong (failure_text).
_ENTRYPOINT_LINE = "Running entrypoint for job "
_QUIET_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+\s+(?:DEBUG|INFO)\s")
_NODE_ADDRESS = re.compile(r"(\([^()\s]*\s?pid=\d+), ip=[^)\s]+\)")
# Linux caps one environment string at 128 KiB; a bigger spec goes through a file.
_MAX_ENV_SPEC_CHARS = 100_000
# How long JobLauncher.submit retries while the head's dashboard agent is not registered yet.
AGENT_WAIT_S = 10.0
# A job's row is written ("starting") before it is handed to Ray, so Ray may not know a young
# job yet: the reconciler fails such a row only when it is older than the longest submit, the
# agent wait plus Ray's own submit request (which takes no timeout), with a wide margin.
SUBMIT_GRACE_S = AGENT_WAIT_S + 50.0
STOP_GRACE_S = 3600.0
"""How long a job stopped for ``max_job_hours`` may take, from the stop, to publish what it
accepted before Ray stops its driver (``JobLauncher.stop``): a driver that never acts on the
cancel (its loop wedged) held its place in the cluster, and its key's queue, for ever."""


def failure_text(message: str) -> str:
    """A failed job's error as its owner sees it: the end of Ray's message (the driver's exit
    code and the last lines of its log) without what tells where things are rather than what
    went wrong: Ray's "Running entrypoint" line (this server's Python, the cluster's GCS
    address), INFO and DEBUG log records (the cluster's and its dashboard's addresses, output
    paths) and the node address in the prefix of a remote actor's lines. The whole log stays
    in Ray's dashboard for the operator."""
    lines = [_NODE_ADDRESS.sub(r"\1)", line) for line in message.splitlines()
             if not line.startswith(_ENTRYPOINT_LINE) and not _QUIET_RECORD.match(line)]
    return "\n".join(lines).strip()[-_MAX_ERROR_CHARS:] or "the job failed"


class ClusterUnavailable(PixCrawlerError):
    """Ray's job API cannot be reached; the message says what to check."""


class SubmitUnconfirmed(ClusterUnavailable):
    """A submit whose answer was lost (a reset connection, a proxy's 5xx): Ray may have taken
    the job. Its row stays "starting", for the reconciler to find at Ray, or to fail once
    Ray has shown no record of it for the submit grace period."""


def _refused(exc: BaseException) -> bool:
    """Whether a failed submit surely left Ray without the job: its job API answered a 4xx
    (``JobSubmissionClient`` raises RuntimeError naming the status), or the connection was
    refused. A reset, a timeout or a 5xx (a proxy's) may come after Ray took it."""
    text = str(exc)
    if isinstance(exc, RuntimeError):
        return re.search(r"status code 5\d\d", text) is None
    return "refused" in text.lower()


@dataclass
class RayJob:
    status: str
    message: str = ""


def spec_env_text(spec: dict[str, Any]) -> str:
    """The spec as one line of ASCII YAML, for an environment variable that the job reads
    back with ``yaml.safe_load`` (``--spec-env``).

    JSON would not do: ``json.dumps`` writes an emoji as a surrogate pair (``\\ud83d\\ude3a``),
    which YAML reads as two lone surrogates, and the job fails when it writes them out; and
    unescaped JSON holds characters YAML refuses (C1 controls, U+FFFE). YAML's own escapes
    (``\\U0001F63A``, ``\\x80``, ``\\0`` for a NUL, which no environment string can hold)
    read back exactly."""
    return yaml.safe_dump(spec, allow_unicode=False, default_flow_style=True, sort_keys=False,
                          width=float("inf")).strip()


class JobLauncher:
    """Submits, inspects and stops the Ray jobs that run PixCrawler jobs."""

    def __init__(self, jobs_dir: Path, address: Optional[str] = None,
                 python: str = sys.executable):
        self.jobs_dir = Path(jobs_dir)
        self.address = address
        self.python = python
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                from ray.job_submission import JobSubmissionClient

                address = self.address or dashboard_address()
                if not address:
                    raise ClusterUnavailable(
                        "the Ray cluster runs no dashboard, which serves Ray's job API: start "
                        "the head with the dashboard (`ray start --head --include-dashboard="
                        "true`, or ray.init(include_dashboard=True)), or pass its address as "
                        "dashboard_address")
                try:
                    self._client = JobSubmissionClient(address)
                except (ConnectionError, RuntimeError, OSError) as exc:
                    raise ClusterUnavailable(
                        f"cannot reach Ray's job API at {address}: {exc}. The head node must "
                        "run the dashboard: `ray start --head --include-dashboard=true`, or "
                        "ray.init(include_dashboard=True)") from exc
            return self._client

    def command(self, job_id: str, spec: dict[str, Any]) -> tuple[str, dict[str, str]]:
        """The entrypoint and the environment variables that run ``spec`` as ``job_id``.

        The driver gets this cluster's GCS address explicitly: Ray gives a job's driver
        RAY_ADDRESS from ``ray_current_cluster`` (written by ``ray start`` only) or else from
        *any* GCS process found on the machine, which for an embedded Ray beside other Rays
        can be someone else's cluster."""
        tail = ["--job-id", job_id, "--address", ray.get_runtime_context().gcs_address]
        base = [self.python, "-P", "-m", "cluster.cli", "build"]  # -P: as in worker_start
        text = spec_env_text(spec)
        if len(text) <= _MAX_ENV_SPEC_CHARS:
            return shlex.join(base + ["--spec-env", SPEC_ENV] + tail), {SPEC_ENV: text}
        self.jobs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        private_mode(self.jobs_dir)  # an earlier version's folder, and the specs in it
        path = self.jobs_dir / f"{job_id}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the job's spec
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(spec, indent=1))
        return shlex.join(base + [str(path)] + tail), {}

    def submit(self, job_id: str, spec: dict[str, Any], owner_name: str,
               agent_wait_s: float = AGENT_WAIT_S) -> None:
        """Start the Ray job. Right after the cluster starts, its dashboard agent may not be
        registered yet ("No available agent"): that is retried for ``agent_wait_s``."""
        entrypoint, env = self.command(job_id, spec)
        deadline = time.monotonic() + agent_wait_s
        while True:
            try:
                self.client.submit_job(entrypoint=entrypoint, submission_id=job_id,
                                       runtime_env={"env_vars": env} if env else None,
                                       metadata={"pixcrawler_job": job_id,
                                                 "owner": owner_name,
                                                 "dataset": str(spec.get("name", ""))})
                return
            except (RuntimeError, ConnectionError, OSError) as exc:
                if "No available agent" in str(exc) and time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                if not _refused(exc):
                    raise SubmitUnconfirmed(
                        f"Ray's answer to the job's submission was lost ({exc}): it may run, "
                        "and waits as starting until Ray shows it or the grace period "
                        "ends") from exc
                hint = (" (the head node's dashboard agent is not serving HTTP: is another "
                        "Ray on this machine holding its port, 52365?)"
                        if "No available agent" in str(exc) else "")
                raise ClusterUnavailable(f"Ray refused the job: {exc}{hint}") from exc

    def status(self, job_id: str) -> Optional[RayJob]:
        """Ray's view of the job, or None if Ray has no such job (e.g. it restarted)."""
        try:
            info = self.client.get_job_info(job_id)
        except RuntimeError as exc:
            if "does not exist" in str(exc):
                return None
            raise ClusterUnavailable(f"cannot read job {job_id} from Ray: {exc}") from exc
        except (ConnectionError, OSError) as exc:
            raise ClusterUnavailable(f"cannot read job {job_id} from Ray: {exc}") from exc
        status = getattr(info.status, "value", str(info.status))
        return RayJob(status=status, message=info.message or "")

    def stop(self, job_id: str) -> bool:
        """SIGTERM the job's driver (it then writes a partial result, like a cancel)."""
        try:
            return bool(self.client.stop_job(job_id))
        except RuntimeError as exc:
            if "does not exist" in str(exc):
                return False
            raise ClusterUnavailable(f"cannot stop job {job_id}: {exc}") from exc


class ProgressReader:
    """Reads progress actors without blocking the event loop. An answer is reused for
    ``ttl_s``; up to ``stale_s`` old it is still answered at once while one call refreshes
    it, so many clients watching one job cost its actor one call per ``ttl_s`` and never wait
    on the actor while a recent answer exists."""

    def __init__(self, ttl_s: float = 0.25, stale_s: float = 1.0):
        self.ttl_s = ttl_s
        self._handles: dict[str, Any] = {}
        self._answers: ReadCache[Optional[dict[str, Any]]] = ReadCache(ttl_s, stale_s)

    async def get(self, job_id: str) -> Optional[dict[str, Any]]:
        """The live state of a running job, or None when no progress actor holds it."""
        return await self._answers.get(job_id, lambda: self._read(job_id))

    async def _read(self, job_id: str) -> Optional[dict[str, Any]]:
        handle = self._handles.get(job_id)
        if handle is None:
            handle = await asyncio.to_thread(_lookup_actor, job_id)
            if handle is None:
                return None
            if len(self._handles) > 1000:
                self._handles.clear()
            self._handles[job_id] = handle
        try:
            return await asyncio.wait_for(handle.get.remote(), ACTOR_WAIT_S)
        except ray.exceptions.RayActorError:
            self._handles.pop(job_id, None)
            return None
        except asyncio.TimeoutError:  # waiting for a node to restart on: the store's row
            return None

    def forget(self, job_id: str) -> None:
        self._handles.pop(job_id, None)
        self._answers.forget(job_id)


def _lookup_actor(job_id: str) -> Any:
    try:
        return ray.get_actor(progress_name(job_id), namespace=NAMESPACE)
    except ValueError:
        return None


def read_live(job_id: str) -> Optional[dict[str, Any]]:
    """Synchronous progress read (for the reconciler thread)."""
    return read_live_all([job_id])[job_id]


def read_live_all(job_ids: list[str]) -> dict[str, Optional[dict[str, Any]]]:
    """Synchronous progress reads of many jobs, all asked at once: those that do not answer
    within ``ACTOR_WAIT_S`` in all (their node lost: they wait for room to restart) read None,
    as do jobs with no actor. One at a time, each stuck actor cost the reconcile pass its own
    wait, and the jobs after it (the scheduler's too) waited for them all."""
    asked: dict[str, Any] = {}
    for job_id in job_ids:
        handle = _lookup_actor(job_id)
        if handle is not None:
            asked[job_id] = handle.get.remote()
    out: dict[str, Optional[dict[str, Any]]] = dict.fromkeys(job_ids)
    if not asked:
        return out
    ready, _ = ray.wait(list(asked.values()), num_returns=len(asked), timeout=ACTOR_WAIT_S)
    answered = set(ready)
    for job_id, ref in asked.items():
        if ref in answered:
            try:
                out[job_id] = ray.get(ref)
            except ray.exceptions.RayError as exc:  # gone (RayActorError), or its answer lost
                if not isinstance(exc, ray.exceptions.RayActorError):
                    log.warning("[%s] its progress actor's answer could not be read: %s",
                                job_id, exc)
    return out


API_CANCEL = "cancelled through the HTTP API"
CANCELLED_UNPUBLISHED = ("cancelled, and no dataset of this job's was found at its output: a "
                         "cancel that meets units a lost worker left half-written publishes "
                         "nothing, and the job's journal stays there")
ACTOR_WAIT_S = 10.0
"""How long the API waits for a job's progress actor to answer. One whose node was lost waits
for another to restart on, and its calls with it, for ever where none has room: the store's
row answers reads meanwhile, and a cancel goes to Ray (which stops the driver)."""


def request_cancel(job_id: str, reason: str = API_CANCEL) -> bool:
    """Ask the job's progress actor to stop the job; False if no actor took it (none runs,
    or it has not answered in ``ACTOR_WAIT_S``): the caller then has Ray stop the driver."""
    try:
        return cancel_job(job_id, reason, timeout=ACTOR_WAIT_S)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False


def read_outcome(uri: str, job_id: Optional[str] = None
                 ) -> tuple[Optional[str], Optional[dict[str, Any]]]:
    """The output's marker (``_SUCCESS``/``_PARTIAL``/None) and its stats.json (or None).

    With ``job_id``, only an outcome that job wrote counts: an earlier run to the same output
    leaves its marker and stats there until this one publishes, and they say nothing about
    how this one ended. A stats.json that is not a JSON object is read as missing."""
    try:
        marker = read_marker(uri)
        if marker is None:
            return None, None
        fs, root = open_fs(uri)
        with storage_errors(uri, "read stats.json from"):
            stats = json.loads(fs.cat_file(f"{root}/stats.json"))
    except (StorageError, ValueError) as exc:
        log.warning("cannot read the outcome at %s: %s", uri, exc)
        return None, None
    if not isinstance(stats, dict):
        log.warning("the stats.json at %s is not a JSON object; ignored", uri)
        stats = None
    if job_id is not None:
        writer = (stats or {}).get("job_id") or marker.get("job_id")
        if writer != job_id:
            log.info("the outcome at %s is job %s's, not %s's; ignored", uri, writer, job_id)
            return None, None
    return marker["marker"], stats


def progress_from_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """The final figures in the live progress' shape (what the page draws)."""
    duration = float(stats.get("duration_s") or 0.0)
    return {
        "elapsed_s": duration,
        "candidates": stats.get("candidates", 0),
        "accepted": stats.get("accepted", 0),
        "rejected": stats.get("rejected", 0),
        "images_per_s": round(stats.get("accepted", 0) / duration, 2) if duration else 0.0,
        "classes": {label: {k: c.get(k, 0) for k in ("target", "accepted", "candidates",
                                                       "rejected")}
                    for label, c in (stats.get("classes") or {}).items()},
    }


class Reconciler:
    """Brings the store's active jobs in line with their progress actors and Ray."""

    def __init__(self, store: JobStore, launcher: JobLauncher,
                 submit_grace_s: float = SUBMIT_GRACE_S, max_job_s: Optional[float] = None):
        self.store = store
        self.launcher = launcher
        self.submit_grace_s = submit_grace_s
        self.max_job_s = max_job_s
        self._asked: dict[str, float] = {}
        """When this replica asked a job to stop, or first saw it asked (``_limit_time``)."""
        self._killed: set[str] = set()
        """Jobs whose driver this replica had Ray stop (``_limit_time``), each once."""
        self._unseen: dict[str, float] = {}
        """When this replica first saw each starting job that Ray does not know yet."""

    def apply_live(self, row: JobRow, live: dict[str, Any]) -> JobRow:
        """Store what a progress actor says; a terminal state there ends the job here."""
        state = live.get("state", row.state)
        progress = live.get("progress") or None
        if state in TERMINAL:
            # stats.json is what was published (a partial one says so); the actor's copy is
            # the fallback where this server cannot read the output.
            _, stats = read_outcome(live.get("output_uri") or row.output_uri, row.id)
            stats = stats or live.get("stats")
            self.store.update_job(row.id, state=state, stats=stats,
                                  error=live.get("error") or row.error,
                                  progress=progress_from_stats(stats) if stats else progress,
                                  output_uri=live.get("output_uri"))
        elif state != row.state or progress:
            self.store.update_job(row.id, state=state, progress=progress,
                                  error=live.get("error"))
        return self.store.get_job(row.id) or row

    def reconcile(self, row: JobRow, check_live: bool = True,
                  live: Optional[dict[str, Any]] = None) -> JobRow:
        """Check one active job against its actor, else against Ray; returns the new row.
        ``check_live=False`` when the caller has just read the actor's answer, ``live`` (None:
        no actor answered). A queued job is not Ray's yet (serve.schedule starts it)."""
        if row.terminal or row.state == "queued":
            return row
        self._limit_time(row)
        if check_live:
            live = read_live(row.id)
        if live is not None:
            if row.cancel_requested and not live.get("cancel_requested") \
                    and live.get("state") in ("starting", "running"):
                # Its progress actor was started again (its node was lost) and so forgot the
                # cancel it held: the driver would run the job to its end.
                log.warning("[%s] the job's progress actor forgot its cancel; asking again",
                            row.id)
                request_cancel(row.id, row.error or API_CANCEL)
            return self.apply_live(row, live)
        ray_job = self.launcher.status(row.id)
        if ray_job is None and self._maybe_being_submitted(row):
            return row
        if ray_job is None and row.cancel_requested and row.ray_status is None:
            # cancelled, and never seen at Ray: the replica that started it died first
            self.store.update_job(row.id, state="cancelled", ray_status="UNKNOWN",
                                  error=row.error or "cancelled before it started: nothing "
                                                     "was crawled or published")
        elif ray_job is None:
            self.store.update_job(row.id, state="failed", ray_status="UNKNOWN",
                                  error="the Ray cluster has no record of this job (it was "
                                        "restarted while the job ran?); submit it again")
        elif ray_job.status in ("PENDING", "RUNNING"):
            # Starting up (no actor yet), or its driver is exiting (the actor is already gone).
            if ray_job.status != row.ray_status:
                self.store.update_job(row.id, ray_status=ray_job.status)
        else:
            self._finish(row, ray_job)
        return self.store.get_job(row.id) or row

    def _limit_time(self, row: JobRow) -> None:
        """A job running longer than ``max_job_s`` (the policy's ``max_job_hours``) is
        stopped as a cancel is: what it accepted is published as a partial dataset, and its
        error says why. Its fetches are bounded one by one (the policy's caps), but a job of
        many slow ones could hold its place in the cluster for days."""
        started = row.started_at
        if self.max_job_s is None or started is None:
            return
        now = time.time()
        if now - started <= self.max_job_s:
            return
        if not row.cancel_requested:
            self._stop(row, f"stopped after {self.max_job_s / 3600:g} h, this server's limit "
                            "for a job (max_job_hours); what it accepted is published as a "
                            "partial dataset")
            return
        asked = self._asked.setdefault(row.id, now)  # (or first seen asked, by this replica)
        if now - asked <= STOP_GRACE_S or row.id in self._killed:
            return
        why = (f"stopped after {self.max_job_s / 3600:g} h, this server's limit for a job "
               "(max_job_hours); it did not stop within an hour of being asked, so Ray stopped "
               "its driver: a partial dataset is published only if it got that far")
        log.warning("[%s] %s", row.id, why)
        self.store.update_job(row.id, error=why)
        self.launcher.stop(row.id)
        self._killed.add(row.id)

    def _stop(self, row: JobRow, why: str) -> None:
        """Stop a running job as a cancel does, with ``why`` as its error."""
        self._asked[row.id] = time.time()
        self.store.update_job(row.id, cancel_requested=True, error=why)
        log.warning("[%s] %s", row.id, why)
        if not request_cancel(row.id, why):
            self.launcher.stop(row.id)

    def _maybe_being_submitted(self, row: JobRow) -> bool:
        """A row Ray has not been seen to know, started (handed to the launcher) recently
        enough that its submit may still run: this replica has seen it so for less than the
        grace period. Timed on this replica's clock: ``started_at`` is the clock of the
        replica that started it, and one ahead of it failed jobs still being submitted."""
        if row.state != "starting" or row.ray_status is not None:
            self._unseen.pop(row.id, None)
            return False
        if len(self._unseen) > 10_000:
            self._unseen.clear()
        first = self._unseen.setdefault(row.id, time.monotonic())
        if time.monotonic() - first < self.submit_grace_s:
            return True
        self._unseen.pop(row.id, None)
        return False

    def _finish(self, row: JobRow, ray_job: RayJob) -> None:
        marker, stats = read_outcome(row.output_uri, row.id)
        progress = progress_from_stats(stats) if stats else None
        if marker == SUCCESS:  # this job's own (read_outcome): it published whole, then
            state, error = "succeeded", None  # was stopped or failed on its way out
        elif marker == PARTIAL and (stats or {}).get("partial_reason") == "empty":
            state, error = "failed", empty_failure(stats or {})
        elif marker == PARTIAL or ray_job.status == "STOPPED":
            state, error = "cancelled", row.error  # why it was stopped, if it was said
        elif ray_job.status == "SUCCEEDED":
            # Exit 0 means published; stats stay empty if this server cannot read the output.
            state, error = "succeeded", None
        elif marker is None and row.cancel_requested and re.match(
                rf"Job entrypoint command failed with exit code {EXIT_CANCELLED}\b",
                ray_job.message):
            # the driver's own exit on a cancel that found nothing it could publish
            state, error = "cancelled", CANCELLED_UNPUBLISHED
        else:
            state, error = "failed", failure_text(ray_job.message)
        self.store.update_job(row.id, state=state, ray_status=ray_job.status, error=error,
                              stats=stats, progress=progress)

    def reconcile_all(self) -> int:
        """Reconcile every active job of every owner; returns how many were checked. A job
        whose key was revoked is stopped first (``revoke_key`` ended its queued ones)."""
        rows = self.store.active_jobs()
        revoked = self.store.revoked_owners(row.owner for row in rows)
        for row in rows:
            if row.owner in revoked and not row.cancel_requested \
                    and row.state != "queued":  # (the scheduler ends a queued one)
                with self._guard(row):
                    self._stop(row, REVOKED_ERROR)
        rows = [self.store.get_job(row.id) or row for row in rows] if revoked else rows
        try:
            live = read_live_all([row.id for row in rows
                                  if not row.terminal and row.state != "queued"])
        except Exception:  # noqa: BLE001 - the pass goes on with Ray's records of the jobs
            # (a GCS that does not answer ray.get_actor, say): the time limits and the
            # scheduler after the pass still run
            log.exception("cannot read the jobs' progress actors")
            live = {}
        for row in rows:
            with self._guard(row):
                self.reconcile(row, check_live=False, live=live.get(row.id))
        return len(rows)

    @contextmanager
    def _guard(self, row: JobRow) -> Iterator[None]:
        """One job's step in a pass: what goes wrong is logged, and the pass goes on."""
        try:
            yield
        except ClusterUnavailable as exc:
            log.warning("cannot reconcile %s now: %s", row.id, exc)
        except Exception:  # noqa: BLE001 - one job's bad outcome must not stop the pass
            # A loop guard: whatever one job's output or Ray record holds, the jobs after it
            # (other owners' too) are still checked; the error is logged with its trace.
            log.exception("cannot reconcile %s", row.id)


class ReconcileLoop:
    """A replica's background thread: reconcile all active jobs every ``interval_s``, then
    run ``then`` (the scheduler, which starts queued jobs in the places that freed up)."""

    def __init__(self, reconciler: Reconciler, interval_s: float = 5.0,
                 then: Optional[Callable[[], Any]] = None):
        self.reconciler = reconciler
        self.interval_s = interval_s
        self.then = then
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pixcrawler-reconcile",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconciler.reconcile_all()
                if self.then is not None:
                    self.then()
            except Exception:  # noqa: BLE001 - a background loop logs and keeps going
                log.exception("reconcile pass failed")
            self._stop.wait(self.interval_s)
