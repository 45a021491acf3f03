"""Connect to Ray: an embedded local Ray sized to the machine, or an existing cluster."""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import ray
from ray.job_config import JobConfig

from actors import NAMESPACE
from builder.errors import PixCrawlerError

log = logging.getLogger("pixcrawler.connect")

# The job config Ray hands a `ray job submit` driver (ray._private.runtime_env.constants).
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"

# Ray kills a worker process that has been idle for a second once the node has more workers
# than CPUs, which a job's actors always make true. The shard writes come every few seconds, so
# each one would start (and import Ray Data into) a new process: keep idle workers for a while.
# Applies to the embedded Ray; a cluster's head sets its own system config (ray_cluster.yaml).
EMBEDDED_SYSTEM_CONFIG: dict[str, Any] = {"idle_worker_killing_time_threshold_ms": 60_000}

# Ray starts its worker processes 15 nice levels below the node (Ray's own job supervisor sets
# this to 0 for drivers), so batch work yields to interactive work. Set in a runtime_env's
# env_vars, it gives the worker another increment: 0 runs it at the priority of the process that
# started Ray. An embedded Ray that runs only this command's job sets it for the whole node
# instead (SAME_PRIORITY_CONFIG): a job with a runtime_env cannot use the workers that Ray
# starts, one per CPU, while ray.init runs (they have none), so each of its actors would start a
# process of its own beside two idle ones (bench/README.md, ninth session).
WORKER_NICENESS_ENV = "RAY_worker_niceness"
SAME_PRIORITY_ENV: dict[str, Any] = {"env_vars": {WORKER_NICENESS_ENV: "0"}}
SAME_PRIORITY_CONFIG: dict[str, Any] = {"worker_niceness": 0}

# What only a dashboard (or a metrics scraper pointed at it) reads: every task's state events,
# sent to the GCS each second, and the metrics each Ray process records per call. An embedded
# Ray started without --dashboard has no reader for either, so it records neither.
UNOBSERVED_CONFIG: dict[str, Any] = {"task_events_report_interval_ms": 0,
                                     "enable_metrics_collection": False}

# An embedded Ray serves this machine only, so none of its servers may listen beyond loopback:
# the dashboard agent accepts job submissions, i.e. runs code. Ray's GCS, raylet, object
# manager, core workers and agents bind 127.0.0.1 only when the node's address is exactly
# "127.0.0.1" (otherwise 0.0.0.0, ::, or the machine's address).
# ray.init(_node_ip_address="127.0.0.1") is not enough on its own: Ray swaps a loopback
# address for the machine's interface address (services.resolve_ip_for_localhost) unless its
# single-machine mode is on, which it is by default only on macOS and Windows; the switch is
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read once when ray is imported
# (ray_constants.ENABLE_RAY_CLUSTER). ``_loopback_node`` turns it on around ray.init.
LOOPBACK = "127.0.0.1"
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# Loopback keeps other machines out, not the other users of this one: any of them could send
# the dashboard agent a job to run as this user. So an embedded Ray runs with Ray's token
# authentication (ray.init's own default since Ray 2.59), its token readable by this user only
# (``private_token``). RAY_AUTH_MODE set by the caller decides instead (the tests set disabled).
AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"


def private_token() -> None:
    """Make sure the token an embedded Ray will use exists and only this user can read it.

    Ray reads it from ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH`` names, else
    ``~/.ray/auth_token``, and writes that last one itself when it is missing, as the umask
    leaves it (readable by everyone, usually), so that another user of the machine could read
    it and send jobs after all. The default file is written here first, 0600, in a 0700
    folder, whole or not at all; an existing one of this user's that others may read is made
    0600 (its owner's own tools read it as before). Where no such file can be had (a home
    that cannot be written, a token file another user owns), this command's Ray gets a token
    of its own in ``RAY_AUTH_TOKEN``, which its processes inherit and other users cannot
    read."""
    if os.environ.get(TOKEN_ENV):
        return
    named = os.environ.get(TOKEN_PATH_ENV)
    path = Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"
    try:
        if not named and not path.exists():
            _write_token(path)
        info = path.stat()
        if info.st_mode & 0o077:
            if info.st_uid != os.geteuid():
                raise PermissionError(f"{path} is another user's, and others may read it")
            path.chmod(info.st_mode & 0o700)
            log.warning("the Ray token %s could be read by other users of this machine, who "
                        "could then run code as you through Ray: it is now readable by you "
                        "only", path)
    except OSError as exc:
        if named:
            return  # Ray says what is wrong with the token file it was told to read
        log.warning("no private Ray token file (%s): this command's Ray uses a token of its "
                    "own", exc)
        os.environ[TOKEN_ENV] = secrets.token_hex(32)


# Ray makes its folder (``ray`` in the system's temp folder, /tmp/ray by default) and each
# session's folders in it writable by everyone, without the sticky bit: another user of the
# machine could replace the sockets that the workers connect to, or plant files in the
# folders that runtime environments are unpacked into, and run code as this user. Serve's
# HAProxy keeps its config and an admin socket open to all in /tmp/haproxy-serve. An
# embedded Ray's files go in a folder only this user can enter (``private_folder``).
PRIVATE_TEMP_PREFIX = "pixcrawler-"
MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107
"""The longest path of a Unix socket, as Ray checks it (on macOS Ray uses /tmp whatever
TMPDIR says)."""
SESSION_SOCKET_TAIL = len("/session_2026-12-06_17-08-30_277701_4194304/sockets/dash_TaskEventsHead")
"""The longest socket path Ray makes in its temp folder, past the folder's own path."""


class UnsafeTempFolder(PixCrawlerError):
    """No folder that only this user can enter can be had for an embedded Ray's files."""


def _temp_root() -> Path:
    """The system's temp folder, links resolved now (one re-pointed later cannot move it)."""
    from ray._common.utils import get_default_system_temp_dir

    return Path(os.path.realpath(get_default_system_temp_dir()))


_CHOSEN: dict[Path, Path] = {}
"""The private folder chosen in each temp folder by this process: one per command, even where
it is a new one of a random name (Ray's and HAProxy's files together, one warning)."""


def private_folder() -> Path:
    """A folder of this user's, closed to others, in the system's temp folder
    (``RAY_TMPDIR``, else ``TMPDIR``, else /tmp): that folder itself where it is so already;
    else ``pixcrawler-<uid>`` in it, made 0700. A ``pixcrawler-<uid>`` that is a link, another
    user's, or was left open to others (who may hold a way in still) is not used: a new
    folder of a random name is, with a warning. A temp folder others could rename things in
    (writable by them without the sticky bit /tmp has, as a Kubernetes emptyDir is) gets a
    warning: they could swap the private folder for theirs while Ray runs."""
    root = _temp_root()
    chosen = _CHOSEN.get(root)
    if chosen is not None and chosen.is_dir():
        return chosen
    _CHOSEN[root] = folder = _private_folder(root)
    return folder


def _private_folder(root: Path) -> Path:
    uid = os.geteuid()
    try:
        root.mkdir(parents=True, exist_ok=True)
        info = root.stat()
    except OSError as exc:
        raise UnsafeTempFolder(f"cannot use the temp folder {root} for Ray's files ({exc}): "
                               "set RAY_TMPDIR to a folder of yours") from None
    if info.st_uid == uid and not info.st_mode & 0o077:
        return root
    if info.st_uid not in (0, uid) or (info.st_mode & 0o022
                                       and not info.st_mode & stat.S_ISVTX):
        log.warning("the temp folder %s lets others rename what is in it (it is another "
                    "user's, or writable by others without the sticky bit): any other user "
                    "of this machine could swap Ray's private folder in it for theirs. Set "
                    "RAY_TMPDIR to a folder only you can write (mode 0700) to close this",
                    root)
    folder = root / f"{PRIVATE_TEMP_PREFIX}{uid}"
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise UnsafeTempFolder(f"cannot make {folder} for Ray's files ({exc}): set RAY_TMPDIR "
                               "to a folder of yours") from None
    info = folder.lstat()
    if stat.S_ISDIR(info.st_mode) and info.st_uid == uid and not info.st_mode & 0o077:
        return folder
    ours = stat.S_ISDIR(info.st_mode) and info.st_uid == uid
    new = Path(tempfile.mkdtemp(prefix=PRIVATE_TEMP_PREFIX, dir=root))
    log.warning("%s %s: this command's Ray keeps its files in %s instead%s", folder,
                "was open to other users of this machine, who may still hold a way in"
                if ours else "is not a folder of yours", new,
                " (remove the old folder to have it made again)" if ours else "")
    return new


def private_temp_dir() -> Optional[str]:
    """The temp folder for an embedded Ray (``ray`` in ``private_folder``), or None where
    Ray's own is private already (the system's temp folder is). Refused
    (``UnsafeTempFolder``) where Ray's socket paths in it would be too long."""
    folder = private_folder()
    if folder == _temp_root():
        return None
    ray_dir = folder / "ray"
    require_socket_room(ray_dir, SESSION_SOCKET_TAIL, "Ray")
    return str(ray_dir)


def require_socket_room(folder: Path, tail: int, whose: str) -> None:
    """Refuse (``UnsafeTempFolder``) a private ``folder`` in which ``whose`` sockets, at most
    ``tail`` bytes past it, would be longer than a socket path may be."""
    if len(os.fsencode(folder)) + tail > MAX_SOCKET_PATH:
        raise UnsafeTempFolder(
            f"{whose}'s socket paths in {folder} would be longer than {MAX_SOCKET_PATH} "
            "bytes: set RAY_TMPDIR to a folder of yours with a shorter path, or make "
            f"{_temp_root()} yours alone (chmod 700), where no folder is made in it")


TPU_LOGS_ENV, SHARED_TPU_LOGS = "TPU_LOG_DIR", "/tmp/tpu_logs"


def _no_foreign_tpu_logs() -> None:
    """Ray links ``TPU_LOG_DIR`` (or, where that is no folder, /tmp/tpu_logs) into the
    session's logs, whose files its log monitor prints on the driver's terminal and its
    dashboard shows: a /tmp/tpu_logs another user made (before this or while Ray starts)
    would put their files (or links to this user's) there. Unless it is this user's own
    folder, Ray is pointed at an empty folder of this user's instead."""
    if os.path.isdir(os.environ.get(TPU_LOGS_ENV, "")):
        return
    try:
        info = os.lstat(SHARED_TPU_LOGS)
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid():
            return
    except OSError:
        pass
    empty = private_folder() / "tpu_logs"
    empty.mkdir(mode=0o700, exist_ok=True)
    os.environ[TPU_LOGS_ENV] = str(empty)


def _write_token(path: Path) -> None:
    """A new token at ``path``, 0600: written under another name, then linked into place,
    so a Ray starting meanwhile never reads it empty (and one written meanwhile is kept)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(temp, path)
        except FileExistsError:
            pass
    finally:
        temp.unlink()


def connect(address: Optional[str] = None, *, num_cpus: Optional[int] = None,
            dashboard: bool = False, quiet: bool = True,
            runtime_env: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Start or join Ray. With no address (and no RAY_ADDRESS, as ``ray job submit`` sets),
    start an embedded local Ray on 127.0.0.1; otherwise join that cluster. ``runtime_env`` is
    this driver's: the actors it starts (and theirs, detached ones included) inherit it.

    An embedded Ray's workers do this command's work in the foreground, so by default they run
    at the command's own priority (``SAME_PRIORITY_CONFIG``; with a ``runtime_env``, as
    ``pixcrawler serve`` passes, that environment decides), not 15 nice levels below it, where
    any busy process on the machine would starve them. On a cluster they keep Ray's default.
    Without ``dashboard`` an embedded Ray starts lean (``_lean_head``, ``UNOBSERVED_CONFIG``).

    An embedded Ray listens on 127.0.0.1 only (see ``LOOPBACK``): its GCS, raylet, object
    manager, workers, dashboard and dashboard agent. It takes a token (``private_token``) and
    keeps its files where only this user can reach them (``private_temp_dir``).

    Returns {"mode": "embedded"|"cluster", "address", "dashboard_url", "resources",
    "ray_job_id", "started"}; "started" is False when this process was already connected, and
    then the caller leaves the connection to whoever made it.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    started = not ray.is_initialized()
    if started:
        common: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": not quiet,
                                  "configure_logging": not quiet}
        _warn_of_a_relative_import_path()
        job_config = _job_config(address, runtime_env, dashboard)
        if job_config is not None:
            common["job_config"] = job_config
        if address:
            if runtime_env:
                common["runtime_env"] = runtime_env
            check_reachable(address)
            _join(address, common)
        else:
            system_config = dict(EMBEDDED_SYSTEM_CONFIG)
            if runtime_env:
                common["runtime_env"] = runtime_env
            else:
                system_config.update(SAME_PRIORITY_CONFIG)
            if not dashboard:
                system_config.update(UNOBSERVED_CONFIG)
            if AUTH_MODE_ENV not in os.environ:
                os.environ[AUTH_MODE_ENV] = "token"
                # Ray read the mode when it was imported: read again, as ray.init does where it
                # turns token auth on itself (which also logs a warning saying so).
                ray._raylet.Config.initialize("")
            if os.environ[AUTH_MODE_ENV].lower() == "token":
                private_token()
            recorded = recorded_head()
            if recorded:
                log.info("a Ray head is recorded on this machine (%s, by `ray start`): not "
                         "joining it, starting an embedded Ray for this command; pass its "
                         "address (--address HOST:PORT, or RAY_ADDRESS) to run on that "
                         "cluster", recorded)
            # address="local": ray.init() with none would join the recorded head (and refuse
            # num_cpus there, or fail on a stale record).
            temp_dir = private_temp_dir()
            _no_foreign_tpu_logs()
            with _loopback_node(), _lean_head(dashboard=dashboard, quiet=quiet):
                ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 2,
                         include_dashboard=dashboard,
                         dashboard_host=LOOPBACK, _node_ip_address=LOOPBACK,
                         _temp_dir=temp_dir, _system_config=system_config, **common)
    ctx = ray.get_runtime_context()
    info = {
        "mode": "cluster" if address else "embedded",
        "address": address or "local",
        "dashboard_url": getattr(ray.get_runtime_context(), "dashboard_url", None)
        or _dashboard_url(),
        "resources": ray.cluster_resources(),
        "ray_job_id": ctx.get_job_id(),
        "started": started,
    }
    return info


# Runtime-env fields Ray's driver prepares itself in ray.init (uploads a local folder or
# module, exports a setup hook), which it skips for a job marked as a client's.
DRIVER_PREPARED_FIELDS = ("working_dir", "py_modules", "worker_process_setup_hook", "excludes")
# Set, it names a function ray.init lets rewrite the runtime_env (ray_constants).
RUNTIME_ENV_HOOK_ENV = "RAY_RUNTIME_ENV_HOOK"


def _job_config(address: Optional[str], runtime_env: Optional[dict[str, Any]],
                dashboard: bool) -> Optional[JobConfig]:
    """A job config that keeps this command's folder off its workers' import path.

    ``ray.init`` puts the driver's current folder first on every worker's import path
    (``JobConfig._py_driver_sys_path``) unless the job has a ``working_dir`` or comes from a
    Ray client (``_client_job``): where other users can write that folder (``/tmp``), a
    package they put there (``builder/``, ``numpy/``) is imported by the workers before the
    installed one and runs as this user. Marked as a client's, the job keeps it off; the
    workers still run in the folder Ray's processes started in, so relative paths resolve
    there as before.

    The mark also skips the driver's own preparation of a runtime_env
    (``DRIVER_PREPARED_FIELDS``: uploads, a setup hook) and its check that no local path is
    left in one, so a job whose environment needs them is not marked: one with a
    ``working_dir`` needs no mark (Ray leaves the folder off itself); for the others, and
    where ray.init may rewrite the environment itself (``RAY_RUNTIME_ENV_HOOK``; a driver
    under ``uv run``, which uploads the folder as the job's ``working_dir``), the command
    warns where others can write the folder. A ``ray://`` client's folder is never passed
    on. None: leave ``ray.init``'s default."""
    if (address or "").startswith("ray://"):
        return None
    env = dict(runtime_env or {})
    injected = os.environ.get(JOB_CONFIG_ENV)  # (set by Ray for a `ray job submit` driver)
    if injected:
        env.update(json.loads(injected).get("runtime_env") or {})
    if _ray_rewrites_the_env():
        _warn_of_a_folder_others_write("the workers import from it, or from a copy of it, "
                                       "before the installed packages")
        return None
    if env.get("working_dir") is not None:
        return None
    if any(name in env for name in DRIVER_PREPARED_FIELDS):
        _warn_of_a_folder_others_write("Ray imports from it in every worker (before the "
                                       "installed packages), with this runtime_env")
        return None
    if dashboard and not address:
        # The dashboard's agent joins Ray from this folder without a job config of ours, so
        # the supervisors of the jobs submitted to it have the folder on their path.
        _warn_of_a_folder_others_write("Ray's job supervisors import from it")
    return JobConfig(_client_job=True)


def _ray_rewrites_the_env() -> bool:
    """Whether ``ray.init`` will rewrite this driver's runtime_env: a hook named in
    ``RAY_RUNTIME_ENV_HOOK``, or ``uv run`` found among this process's parents (Ray's own
    test, on by default)."""
    if os.environ.get(RUNTIME_ENV_HOOK_ENV):
        return True
    from ray._private import ray_constants
    from ray._private.runtime_env.uv_runtime_env_hook import _get_uv_run_cmdline

    return bool(ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV and _get_uv_run_cmdline())


def _warn_of_a_relative_import_path() -> None:
    """An empty or relative entry in PYTHONPATH (``export PYTHONPATH=$PYTHONPATH:/x`` leaves
    one where it was unset) puts the command's folder on every import path, this command's
    and its workers' (they run there) alike, whatever the job's mark: say so where others
    can write the folder."""
    value = os.environ.get("PYTHONPATH")
    if value and any(not os.path.isabs(entry) for entry in value.split(os.pathsep)):
        _warn_of_a_folder_others_write("PYTHONPATH has an empty or relative entry, which puts "
                                       "it on every import path, this command's and Ray's "
                                       "workers'")


def _warn_of_a_folder_others_write(why: str) -> None:
    """Say where other users can write the folder this command runs in, and ``why`` that
    matters (see ``_job_config``, for what Ray imports from it)."""
    if not hasattr(os, "geteuid"):
        return  # (Windows: no such owners and modes)
    try:
        here = os.getcwd()
        mode = os.stat(here)
    except OSError:
        return
    # (a folder its group can write is left alone: with a user's private group, as
    # Debian's umask 002 gives, the group is the user)
    if mode.st_mode & stat.S_IWOTH or mode.st_uid not in (os.geteuid(), 0):
        log.warning("this command runs in %s, which other users can write, and %s: a "
                    "package put there would run as you. Run pixcrawler from a folder only "
                    "you can write", here, why)


class ClusterUnreachable(PixCrawlerError):
    """Nothing answers at the Ray address given (--address or RAY_ADDRESS)."""


class ClientServerFailed(PixCrawlerError):
    """A Ray cluster's client server (``ray://``) failed to start this driver's server on
    every attempt."""


# Ray's client proxier forks a server for each ``ray://`` driver, and gRPC sometimes aborts
# in that fork (ray-project/ray#63202, about 7% of connections in Ray's report; seen here in
# the ray:// test). The driver then gets "Starting Ray client server failed" from ray.init,
# and a new connection, which gets a new server, passes. When the server dies before the
# proxier has read its command line, the proxier fails instead on psutil's ZombieProcess in
# ``start_specific_server`` (seen once in five runs of the ray:// test), and the driver gets
# that traceback. Only these two failures are retried.
CLIENT_SERVER_FAILED = "Starting Ray client server failed"
CLIENT_SERVER_DIED = ("start_specific_server", "ZombieProcess")
CLIENT_ATTEMPTS = 3


def _server_failed_to_start(exc: ConnectionError) -> bool:
    """Whether ``ray.init`` failed because the proxier could not start this driver's server."""
    message = str(exc)
    return CLIENT_SERVER_FAILED in message or all(part in message
                                                  for part in CLIENT_SERVER_DIED)


def _join(address: str, init_kwargs: dict[str, Any]) -> None:
    """``ray.init`` on a cluster, retrying a ``ray://`` connection whose server the cluster
    failed to start (``_server_failed_to_start``), at most ``CLIENT_ATTEMPTS`` times in all."""
    for attempt in range(1, CLIENT_ATTEMPTS + 1):
        try:
            ray.init(address=address, **init_kwargs)
            return
        except ConnectionError as exc:
            if not _server_failed_to_start(exc):
                raise
            if attempt == CLIENT_ATTEMPTS:
                raise ClientServerFailed(
                    f"the Ray cluster at {address} failed to start a client server for this "
                    f"driver {CLIENT_ATTEMPTS} times (Ray's ray-project/ray#63202; the head's "
                    "logs hold ray_client_server*.err). Run the command again, or submit it "
                    "to the cluster as a job: ray job submit --address http://HEAD:8265 "
                    "--working-dir . -- pixcrawler build spec.yaml") from exc
            log.warning("the Ray cluster at %s failed to start a client server for this "
                        "driver (attempt %d of %d; a known Ray fault, ray-project/ray#63202): "
                        "connecting again", address, attempt, CLIENT_ATTEMPTS)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once, saying what to do, when nothing listens at a ``host:port`` GCS address;
    ray.init would retry for minutes, printing its own warnings. Other forms (``auto``,
    ``ray://``) are left to Ray."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        source = "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") == address else "--address"
        raise ClusterUnreachable(
            f"no Ray cluster answers at {address} ({source}): {exc.strerror or exc}. Start "
            f"it (`ray start --head`), correct the address, or unset RAY_ADDRESS and leave "
            "out --address to run on an embedded Ray") from None


def recorded_head() -> Optional[str]:
    """The address of the Ray head that ``ray start`` last recorded on this machine (it may
    have stopped since), or None."""
    from ray._private.utils import read_ray_address

    try:
        return read_ray_address() or None
    except OSError:
        return None


@contextmanager
def _loopback_node() -> Iterator[None]:
    """Ray's single-machine mode while an embedded Ray starts, so that it keeps 127.0.0.1 as
    the node address. Set in this process (Ray read the variable at import) and in the
    environment the Ray processes started now inherit; both are restored afterwards, so a
    later connection to a cluster from this process advertises a reachable address."""
    from ray._private import ray_constants

    saved_env = os.environ.get(SINGLE_MACHINE_ENV)
    saved = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(SINGLE_MACHINE_ENV, None)
        else:
            os.environ[SINGLE_MACHINE_ENV] = saved_env


@contextmanager
def _lean_head(*, dashboard: bool, quiet: bool) -> Iterator[None]:
    """An embedded Ray without the head processes that a one-node job has no use for.

    ``ray.init`` always starts three Python processes beside the GCS and the raylet, and on a
    machine of a few cores their start competes with the job's own workers (bench/README.md):
    the dashboard's API server, which it also waits for (with the dashboard off it loads only
    Ray's usage-stats module, and usage stats are off); the autoscaler monitor (one node never
    autoscales); the log monitor (it only forwards the workers' output to a driver that asked
    for it, ``log_to_driver``). ``ray.init`` has no option for any of them, so they are left
    out here by Ray's own ``Node`` methods, for this start only: with ``dashboard`` the API
    server and the monitor start as usual, and without ``quiet`` the log monitor does.
    """
    from ray._private.node import Node

    skip = [name for name, keep in (("start_api_server", dashboard), ("start_monitor", dashboard),
                                    ("start_log_monitor", not quiet))
            if not keep and callable(getattr(Node, name, None))]
    saved = {name: getattr(Node, name) for name in skip}
    for name in skip:
        setattr(Node, name, _skipped)
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(Node, name, method)


def _skipped(self: Any, *args: Any, **kwargs: Any) -> None:
    """A head process left out (``_lean_head``)."""


def shutdown() -> None:
    """Leave Ray now; for an embedded Ray, stop its processes too.

    Ray's own exit hook does the same, but it sleeps half a second first, and it gives each of
    the embedded Ray's processes a second to exit on SIGTERM: the autoscaler monitor always
    takes that second. A one-node embedded Ray never autoscales and the monitor holds nothing
    of the job's, so it is killed outright. Harmless when Ray is not initialized, and on a
    cluster (where it only disconnects).
    """
    if not ray.is_initialized():
        return
    for process in _embedded_monitor():
        if process.poll() is None:
            process.kill()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("Ray's autoscaler monitor (pid %d) did not exit on SIGKILL",
                            process.pid)
    ray.shutdown()


def _embedded_monitor() -> list[Any]:
    """The autoscaler monitor process of the Ray this process started, if any. It is found
    through Ray's private node object; should that move, Ray's own shutdown still stops it."""
    try:
        from ray._private import ray_constants, worker
    except ImportError:
        return []
    node = getattr(worker, "_global_node", None)
    if node is None or not node.is_head():
        return []
    kind = getattr(ray_constants, "PROCESS_TYPE_MONITOR", "monitor")
    return [info.process for info in getattr(node, "all_processes", {}).get(kind, [])]


def _dashboard_url() -> Optional[str]:
    try:
        from ray._private.worker import global_worker

        url = global_worker.node.address_info.get("webui_url") if global_worker.node else None
        return f"http://{url}" if url else None
    except (AttributeError, ImportError):
        return None
