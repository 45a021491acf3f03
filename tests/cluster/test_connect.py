"""How ``connect`` starts or joins Ray (``ray.init`` recorded, not run: no Ray here)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest
from ray._private.runtime_env import uv_runtime_env_hook

from cluster import connect as connect_module
from cluster.connect import EMBEDDED_SYSTEM_CONFIG, SAME_PRIORITY_ENV


def run_child(script: str, *args: str, timeout: float = 180, prepare: Any = None,
              cwd: Optional[Path] = None, **env: Any) -> subprocess.CompletedProcess:
    """``script`` in an interpreter of its own in ``cwd`` (the repository root by default),
    which it does not import from (``-P``, as the ``pixcrawler`` command does not), with a Ray
    temp folder of its own (short: Ray's socket paths in it), removed after; its environment
    this process's with ``env`` over it (None unsets a variable) and RAY_ADDRESS unset.
    ``prepare(ray_tmp)`` runs first. Fails the test where the child fails."""
    ray_tmp = tempfile.mkdtemp(prefix="pxcon", dir="/tmp")
    child_env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_ADDRESS": None, **env}
    try:
        if prepare is not None:
            prepare(ray_tmp)
        out = subprocess.run([sys.executable, "-P", "-c", script, *args],
                             env={k: v for k, v in child_env.items() if v is not None},
                             capture_output=True, text=True, timeout=timeout,
                             cwd=cwd or Path(__file__).resolve().parents[2])
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def last_json(out: subprocess.CompletedProcess) -> Any:
    return json.loads(out.stdout.strip().splitlines()[-1])


class StopAfterInit(Exception):
    pass


@pytest.fixture
def init_calls(monkeypatch, tmp_path) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # private: no folder made for Ray

    def fake_init(**kwargs: Any) -> None:
        calls.append(kwargs)
        raise StopAfterInit

    monkeypatch.setattr(connect_module.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(connect_module.ray, "init", fake_init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(connect_module.JOB_CONFIG_ENV, raising=False)
    monkeypatch.delenv(connect_module.RUNTIME_ENV_HOOK_ENV, raising=False)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    # (under `uv run pytest`, Ray would take this process for a `uv run` driver)
    monkeypatch.setattr(uv_runtime_env_hook, "_get_uv_run_cmdline", lambda: None)
    return calls


def test_embedded_workers_run_at_the_commands_priority(init_calls):
    """Ray would start them 15 nice levels below the command that does the work. The node's
    own setting does it, not a runtime_env: workers of a job with a runtime_env cannot be the
    ones Ray starts ahead of any job. Nothing reads task events or metrics without a
    dashboard, so they are not recorded."""
    with pytest.raises(StopAfterInit):
        connect_module.connect(None, num_cpus=2)
    (kwargs,) = init_calls
    assert "runtime_env" not in kwargs
    config = kwargs["_system_config"]
    assert EMBEDDED_SYSTEM_CONFIG.items() <= config.items()
    assert config["worker_niceness"] == 0
    assert config["task_events_report_interval_ms"] == 0
    assert config["enable_metrics_collection"] is False
    assert kwargs["dashboard_host"] == "127.0.0.1"


PLANTED_CHILD = """
import json, os, ray
from cluster.connect import connect, shutdown
connect(None, num_cpus=1)

@ray.remote(num_cpus=0)
def probe():
    import builder
    return [os.getcwd(), builder.__file__]

result = ray.get(probe.remote())
shutdown()
print(json.dumps(result))
"""


def test_rays_workers_never_import_from_the_folder_the_command_runs_in(tmp_path):
    """Ray put the driver's folder first on every worker's import path: a user who can write
    where the command runs (``/tmp``) put ``builder/`` there, and the workers imported it and
    ran it as the command's user. The workers still run in that folder (relative paths)."""
    here = tmp_path / "here"
    (here / "builder").mkdir(parents=True)
    marker = tmp_path / "planted-code-ran"
    (here / "builder" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    cwd, imported = last_json(run_child(PLANTED_CHILD, cwd=here, RAY_AUTH_MODE="disabled",
                                        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0"))  # (uv run pytest)
    assert cwd == str(here.resolve())
    assert not marker.exists() and not imported.startswith(str(here)), imported


@pytest.mark.parametrize("address", [None, "127.0.0.1:6379"])
def test_the_job_is_marked_to_keep_the_folder_off_the_workers_path(init_calls, monkeypatch,
                                                                    address):
    """Embedded or joining, the job is marked so (``_client_job``); with a runtime_env of
    environment variables too, as ``pixcrawler serve`` and the jobs it submits have."""
    monkeypatch.setattr(connect_module, "check_reachable", lambda address: None)
    for env in (None, {"env_vars": {"A": "1"}}):
        with pytest.raises(StopAfterInit):
            connect_module.connect(address, num_cpus=2, runtime_env=env)
    monkeypatch.setenv(connect_module.JOB_CONFIG_ENV,
                       json.dumps({"runtime_env": {"env_vars": {"B": "2"}}}))
    with pytest.raises(StopAfterInit):
        connect_module.connect(address, num_cpus=2)
    assert [kwargs["job_config"]._client_job for kwargs in init_calls] == [True] * 3


@pytest.mark.parametrize("mode,warns", [(0o700, False), (0o775, False), (0o1777, True),
                                        (0o757, True)])
def test_a_job_that_cannot_be_marked_names_a_folder_others_can_write(
        init_calls, monkeypatch, tmp_path, caplog, mode, warns):
    """A runtime_env the driver must prepare (a setup hook, local modules) cannot be marked,
    nor one ray.init may rewrite (a hook named in RAY_RUNTIME_ENV_HOOK; ``uv run``, which
    uploads the folder): there Ray imports from the command's folder, and where others can
    write it the command says so. So it does for an embedded dashboard, whose job
    supervisors Ray starts from that folder. A ``working_dir`` (Ray leaves the folder off
    itself) and a ``ray://`` client (its folder is not passed on) need neither."""
    here = tmp_path / "here"
    here.mkdir()
    here.chmod(mode)
    monkeypatch.chdir(here)
    monkeypatch.setattr(connect_module, "check_reachable", lambda address: None)

    def marked_and_warned(address: Optional[str], runtime_env: Optional[dict[str, Any]],
                          dashboard: bool = False) -> tuple[bool, bool]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="pixcrawler.connect"), \
                pytest.raises(StopAfterInit):
            connect_module.connect(address, num_cpus=2, runtime_env=runtime_env,
                                   dashboard=dashboard)
        said = [r.getMessage() for r in caplog.records
                if "other users can write" in r.getMessage()]
        assert not said or str(here) in said[0]
        config = init_calls[-1].get("job_config")
        return config is not None and config._client_job, bool(said)

    assert marked_and_warned(None, {"worker_process_setup_hook": "setup.hook"}) == \
        (False, warns)
    assert marked_and_warned("127.0.0.1:6379", {"py_modules": ["./mods"]}) == (False, warns)
    assert marked_and_warned(None, None, dashboard=True) == (True, warns)
    assert marked_and_warned(None, {"working_dir": "./code"}) == (False, False)
    assert marked_and_warned("ray://127.0.0.1:10001", None) == (False, False)
    assert marked_and_warned(None, None) == (True, False)
    assert marked_and_warned("127.0.0.1:6379", None, dashboard=True) == (True, False)
    monkeypatch.setenv(connect_module.RUNTIME_ENV_HOOK_ENV, "hooks.rewrite")
    assert marked_and_warned(None, None) == (False, warns)
    monkeypatch.delenv(connect_module.RUNTIME_ENV_HOOK_ENV)
    monkeypatch.setattr(uv_runtime_env_hook, "_get_uv_run_cmdline", lambda: ["uv", "run"])
    assert marked_and_warned(None, None) == (False, warns)
    monkeypatch.setattr(uv_runtime_env_hook, "_get_uv_run_cmdline", lambda: None)
    for pythonpath in (os.pathsep + "/opt/lib", "lib"):  # the folder on every import path
        monkeypatch.setenv("PYTHONPATH", pythonpath)
        assert marked_and_warned(None, None) == (True, warns)
        assert marked_and_warned("ray://127.0.0.1:10001", None) == (False, warns)
    monkeypatch.setenv("PYTHONPATH", "/opt/lib")
    assert marked_and_warned(None, None) == (True, False)


def test_an_embedded_ray_with_a_runtime_env_and_a_dashboard_keeps_rays_settings(init_calls):
    """``pixcrawler serve``: its serving path asks for the command's priority in its
    runtime_env, and the crawls it submits as Ray jobs keep Ray's; its dashboard shows task
    events and metrics."""
    with pytest.raises(StopAfterInit):
        connect_module.connect(None, num_cpus=2, dashboard=True, runtime_env=SAME_PRIORITY_ENV)
    (kwargs,) = init_calls
    assert kwargs["runtime_env"] == SAME_PRIORITY_ENV
    assert kwargs["_system_config"] == EMBEDDED_SYSTEM_CONFIG


def test_a_dead_ray_address_fails_at_once_saying_what_to_do(init_calls, monkeypatch):
    """ray.init would retry a GCS address nobody listens on for minutes."""
    from builder.ports import free_port

    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(connect_module.ClusterUnreachable, match="RAY_ADDRESS") as exc:
        connect_module.connect(None)
    assert address in str(exc.value) and "ray start --head" in str(exc.value)
    assert init_calls == []


def test_a_cluster_keeps_rays_priorities_unless_asked(init_calls):
    with pytest.raises(StopAfterInit):
        connect_module.connect("ray://head:10001")
    with pytest.raises(StopAfterInit):
        connect_module.connect("auto", runtime_env={"env_vars": {"X": "1"}})
    assert "runtime_env" not in init_calls[0]
    assert init_calls[1]["runtime_env"] == {"env_vars": {"X": "1"}}


def client_server_failure() -> ConnectionAbortedError:
    """What ray.init raises when a cluster's client proxier could not start the driver's
    server (ray/util/client/worker.py, ``Worker._server_init``, Ray 2.60)."""
    return ConnectionAbortedError(
        "Initialization failure from server:\nTraceback (most recent call last):\n"
        '  File "ray/util/client/server/proxier.py", line 773, in Datapath\n'
        "RuntimeError: Starting Ray client server failed. See ray_client_server_23001.err "
        "for detailed logs.\n")


def client_server_death() -> ConnectionAbortedError:
    """What ray.init raises when the driver's server died before the proxier read its command
    line: psutil's ZombieProcess in the proxier's ``start_specific_server`` (the traceback's
    frames as Ray 2.60's proxier and psutil 7.2.2 print them; seen in the ray:// test)."""
    return ConnectionAbortedError(
        "Initialization failure from server:\nTraceback (most recent call last):\n"
        '  File "ray/util/client/server/proxier.py", line 765, in Datapath\n'
        "    if not self.proxy_manager.start_specific_server(\n"
        '  File "ray/util/client/server/proxier.py", line 396, in start_specific_server\n'
        "    cmd = psutil_proc.cmdline()\n"
        '  File "ray/thirdparty_files/psutil/_pslinux.py", line 1648, in _raise_if_zombie\n'
        "    raise ZombieProcess(self.pid, self._name, self._ppid)\n"
        "psutil.ZombieProcess: PID still exists but it's a zombie (pid=16482)\n")


@dataclass
class Joins:
    """ray.init on a cluster, recorded, not run: it fails with ``errors`` in turn, then
    connects."""
    errors: list[BaseException] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)

    def init(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)
        if self.errors:
            raise self.errors.pop(0)


@pytest.fixture
def joins(monkeypatch) -> Joins:
    recorder = Joins()
    monkeypatch.setattr(connect_module.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(connect_module.ray, "init", recorder.init)
    monkeypatch.setattr(connect_module.ray, "get_runtime_context", lambda: StubContext())
    monkeypatch.setattr(connect_module.ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return recorder


class StubContext:
    dashboard_url = None

    def get_job_id(self) -> str:
        return "01000000"


@pytest.mark.parametrize("failures", [
    [client_server_failure, client_server_failure],
    [client_server_failure, client_server_death],
], ids=["start-failed-twice", "start-failed-then-died"])
def test_a_client_server_the_cluster_failed_to_start_is_asked_for_again(joins, caplog,
                                                                      failures):
    """Ray's proxier sometimes dies forking a driver's server (ray-project/ray#63202), or the
    server dies before the proxier has seen it start; a new connection gets a new server. The
    user is told, and the job goes on."""
    joins.errors.extend(failure() for failure in failures)
    with caplog.at_level("WARNING", logger="pixcrawler.connect"):
        info = connect_module.connect("ray://head:10001")
    assert [call["address"] for call in joins.calls] == ["ray://head:10001"] * 3
    assert info["mode"] == "cluster" and info["started"] is True
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "attempt 1 of 3" in warnings[0]
    assert "ray-project/ray#63202" in warnings[1]


def test_a_client_server_that_never_starts_fails_saying_what_to_do(joins):
    joins.errors.extend([client_server_failure() for _ in range(3)])
    with pytest.raises(connect_module.ClientServerFailed) as exc:
        connect_module.connect("ray://head:10001")
    assert len(joins.calls) == connect_module.CLIENT_ATTEMPTS
    message = str(exc.value)
    assert "ray://head:10001" in message and "3 times" in message
    assert "ray job submit" in message
    assert isinstance(exc.value.__cause__, ConnectionAbortedError)


@pytest.mark.parametrize("error", [
    ConnectionAbortedError("Initialization failure from server:\nValueError: bad runtime_env"),
    ConnectionError("ray client connection timeout"),
    RuntimeError("Starting Ray client server failed"),
    ConnectionAbortedError(
        "Initialization failure from server:\nTraceback (most recent call last):\n"
        '  File "ray/util/client/server/proxier.py", line 765, in Datapath\n'
        '  File "ray/util/client/server/proxier.py", line 365, in start_specific_server\n'
        '  File "ray/util/client/server/proxier.py", line 341, in _create_runtime_env\n'
        "TimeoutError: GetOrCreateRuntimeEnv request failed after 3 attempts.\n"),
], ids=["other-init-failure", "timeout", "not-a-connection-error", "runtime-env-timeout"])
def test_other_connection_failures_are_not_retried(joins, error):
    """Only the proxier's fork failure is known to pass on a second try."""
    joins.errors.append(error)
    with pytest.raises(type(error)):
        connect_module.connect("ray://head:10001")
    assert len(joins.calls) == 1


SHUTDOWN_CHILD = """
import json, os, sys, ray
from cluster.connect import connect, shutdown
info = connect(None, num_cpus=1, dashboard=sys.argv[1] == "dashboard")
again = connect(None)

@ray.remote(num_cpus=0)
class Nice:
    def level(self):
        return os.nice(0)

worker_nice = ray.get(Nice.remote().level.remote())
node = ray._private.worker._global_node
procs = {kind: [p.process for p in infos] for kind, infos in node.all_processes.items()}
shutdown()
print(json.dumps({"started": [info["started"], again["started"]], "kinds": sorted(procs),
                  "alive": sorted(kind for kind, ps in procs.items()
                                  if any(p.poll() is None for p in ps)),
                  "initialized": ray.is_initialized(), "nice": [os.nice(0), worker_nice]}))
"""


@pytest.mark.parametrize("dashboard", ["dashboard", "no-dashboard"])
def test_shutdown_stops_every_process_of_the_embedded_ray(dashboard):
    """A real embedded Ray in its own process: connect reports that it started Ray (and that a
    second call did not), and shutdown leaves none of its processes running, the autoscaler
    monitor (killed outright, not given Ray's one-second grace) included. Without the
    dashboard, Ray's API server, autoscaler monitor and log monitor are not started at all;
    the workers run at the command's priority either way."""
    result = last_json(run_child(SHUTDOWN_CHILD, dashboard, timeout=120,
                                 RAY_AUTH_MODE="disabled"))
    assert result["started"] == [True, False]
    assert "raylet" in result["kinds"] and "gcs_server" in result["kinds"]
    head_extras = {"dashboard", "monitor", "log_monitor"} & set(result["kinds"])
    assert head_extras == ({"dashboard", "monitor"} if dashboard == "dashboard" else set())
    assert result["alive"] == [] and result["initialized"] is False
    assert result["nice"][0] == result["nice"][1]


AUTH_CHILD = """
import json, os, stat, sys, urllib.error, urllib.request
import ray
from cluster.connect import connect, shutdown

connect(None, num_cpus=1)
port = ray._private.worker.global_worker.node.dashboard_agent_listen_port
job = json.dumps({"entrypoint": f"touch {sys.argv[1]}"}).encode()
request = urllib.request.Request(f"http://127.0.0.1:{port}/api/job_agent/jobs/", data=job,
                                 headers={"Content-Type": "application/json"}, method="POST")
try:
    status = urllib.request.urlopen(request, timeout=30).status
except urllib.error.HTTPError as exc:
    status = exc.code
token = os.path.expanduser("~/.ray/auth_token")
modes = [stat.S_IMODE(os.stat(p).st_mode) if os.path.exists(p) else None
         for p in (os.path.dirname(token), token)]
shutdown()
print(json.dumps({"status": status, "modes": modes, "mode": os.environ.get("RAY_AUTH_MODE")}))
"""


def test_an_embedded_ray_runs_no_job_another_user_of_the_machine_sends(tmp_path):
    """An embedded Ray ran with token authentication off, on the grounds that it listens on
    127.0.0.1 only: any other user of the machine could send its dashboard agent a job, and
    the job ran as the user of the command. It now uses Ray's token authentication, with the
    token readable by that user only (Ray writes it as the umask leaves it)."""
    ran = tmp_path / "ran"
    result = last_json(run_child(AUTH_CHILD, str(ran), HOME=str(tmp_path), RAY_AUTH_MODE=None,
                                 RAY_AUTH_TOKEN=None, RAY_AUTH_TOKEN_PATH=None))
    assert result["mode"] == "token" and result["status"] == 401, result
    assert result["modes"] == [0o700, 0o600] and not ran.exists()


def test_the_embedded_rays_token_is_private_or_the_commands_own(tmp_path, monkeypatch):
    """Without a private token file, token auth would be no lock: a missing one is written
    0600 in a 0700 folder, a readable one of the user's is made 0600, and where none can be
    had (a home that cannot be written) the command's Ray gets a token in its environment
    instead of the command failing."""
    import stat

    from cluster.connect import TOKEN_ENV, TOKEN_PATH_ENV, private_token

    for name in (TOKEN_ENV, TOKEN_PATH_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    private_token()
    token = tmp_path / ".ray" / "auth_token"
    assert len(token.read_text()) == 64 and TOKEN_ENV not in os.environ
    assert [stat.S_IMODE(p.stat().st_mode) for p in (token.parent, token)] == [0o700, 0o600]
    assert os.listdir(token.parent) == ["auth_token"]
    token.chmod(0o644)
    private_token()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    home = tmp_path / "not-a-folder"
    home.write_text("")
    monkeypatch.setenv("HOME", str(home))
    private_token()
    assert len(os.environ[TOKEN_ENV]) == 64


TEMP_CHILD = """
import json, os, stat, subprocess, sys
import ray
from cluster.connect import connect, shutdown

def nobody():
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)

connect(None, num_cpus=1)
session = ray._private.worker.global_worker.node.get_session_dir_path()
planted = None
if os.geteuid() == 0:  # as another user of the machine, plant a file beside Ray's sockets
    planted = subprocess.run(["touch", os.path.join(session, "sockets", "planted")],
                             preexec_fn=nobody, capture_output=True, cwd="/").returncode == 0
shutdown()
print(json.dumps({"session": session, "planted": planted}))
"""


def test_an_embedded_rays_files_are_out_of_other_users_reach():
    """Ray makes its folder and each session's writable by everyone (no sticky bit): another
    user could replace the sockets the workers connect to, or plant code where runtime
    environments are unpacked. An embedded Ray's folder is inside one only its user can enter,
    where the system's temp folder is open to others (as /tmp is)."""
    shared = Path(tempfile.mkdtemp(prefix="pxshr", dir="/tmp"))  # /tmp: others can reach it
    try:
        shared.chmod(0o1777)
        result = last_json(run_child(TEMP_CHILD, RAY_TMPDIR=str(shared)))
        private = shared / f"pixcrawler-{os.geteuid()}"
        assert Path(result["session"]).parent == private / "ray", result
        assert stat.S_IMODE(private.stat().st_mode) == 0o700 and not (shared / "ray").exists()
        assert result["planted"] in (None, False), result
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.fixture
def short_tmp():
    """A folder in /tmp, short enough for Ray's socket paths (a test's own is not)."""
    path = Path(tempfile.mkdtemp(prefix="pxt", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_rays_folder_is_made_private_or_a_new_one_is_taken(short_tmp, monkeypatch, caplog):
    """A private temp folder needs nothing; an open one gets ``pixcrawler-<uid>`` made 0700.
    A name that is a link, another user's folder, or one of the user's left open to others
    (who may hold a way into it still) is not used: a new folder is, and the warning names
    it; a command chooses once. A temp folder others may rename things in gets a warning
    saying how to close that; one too deep for Ray's socket paths is refused."""
    from cluster.connect import UnsafeTempFolder

    monkeypatch.setenv("RAY_TMPDIR", str(short_tmp))

    def private_folder() -> Path:  # as a new command would choose
        connect_module._CHOSEN.clear()
        return connect_module.private_folder()

    def private_temp_dir() -> Optional[str]:
        connect_module._CHOSEN.clear()
        return connect_module.private_temp_dir()

    short_tmp.chmod(0o700)
    assert private_temp_dir() is None
    short_tmp.chmod(0o1777)
    mine = short_tmp / f"pixcrawler-{os.geteuid()}"
    assert private_temp_dir() == str(mine / "ray")
    assert stat.S_IMODE(mine.stat().st_mode) == 0o700
    assert private_temp_dir() == str(mine / "ray")

    def taken_instead() -> Path:
        taken = private_folder()
        assert taken.parent == short_tmp
        assert taken.name.startswith("pixcrawler-") and taken != mine
        assert stat.S_IMODE(taken.stat().st_mode) == 0o700 and str(taken) in caplog.text
        return taken

    mine.chmod(0o755)
    caplog.clear()
    taken_instead()
    assert "may still hold a way in" in caplog.text
    assert stat.S_IMODE(mine.stat().st_mode) == 0o755  # left as it is, and not used
    caplog.clear()
    elsewhere = short_tmp / "elsewhere"
    mine.rename(elsewhere)
    mine.symlink_to(elsewhere)
    taken_instead()
    assert "is not a folder of yours" in caplog.text
    if os.geteuid() == 0:
        mine.unlink()
        mine.mkdir()
        os.chown(mine, 65534, 65534)
        caplog.clear()
        taken_instead()
    short_tmp.chmod(0o777)  # no sticky bit (a Kubernetes emptyDir): others may swap it
    caplog.clear()
    private_folder()
    assert "without the sticky bit" in caplog.text and "RAY_TMPDIR" in caplog.text
    deep = short_tmp / ("d" * 70)
    deep.mkdir(mode=0o1777)
    deep.chmod(0o1777)
    monkeypatch.setenv("RAY_TMPDIR", str(deep))
    with pytest.raises(UnsafeTempFolder, match="longer than 107 bytes"):
        private_temp_dir()


def test_rays_log_monitor_is_not_pointed_at_another_users_tpu_logs(short_tmp, monkeypatch):
    """Ray links /tmp/tpu_logs into the session's logs, which its log monitor prints and its
    dashboard shows: one made by another user points it at an empty folder of this one's."""
    shared = short_tmp / "shared"
    shared.mkdir()
    monkeypatch.setattr(connect_module, "SHARED_TPU_LOGS", str(shared))
    monkeypatch.setenv("RAY_TMPDIR", str(short_tmp))
    monkeypatch.setenv("TPU_LOG_DIR", "")
    connect_module._no_foreign_tpu_logs()  # the user's own: Ray may show it
    assert os.environ["TPU_LOG_DIR"] == ""
    empty = short_tmp / "tpu_logs"
    shared.rmdir()  # none yet: another user may make it while Ray starts
    connect_module._no_foreign_tpu_logs()
    assert os.environ["TPU_LOG_DIR"] == str(empty) and empty.is_dir()
    assert not any(empty.iterdir()) and empty.stat().st_uid == os.geteuid()
    if os.geteuid() != 0:
        pytest.skip("making a folder another user's takes root")
    shared.mkdir()
    os.chown(shared, 65534, 65534)
    monkeypatch.setenv("TPU_LOG_DIR", "")
    connect_module._no_foreign_tpu_logs()
    assert os.environ["TPU_LOG_DIR"] == str(empty)


LISTENERS_CHILD = """
import json, os, sys, time
import ray
import psutil  # ships with ray (ray/thirdparty_files), importable once ray is imported
from cluster.connect import shutdown

if sys.argv[1] == "serve":
    from serve.cli import connect_with_jobs
    connect_with_jobs(None, num_cpus=1)
else:
    from cluster.connect import connect
    connect(None, num_cpus=1, dashboard=True)

@ray.remote
class Pinger:
    def ping(self):
        return os.getpid()

@ray.remote
def task():
    return os.getpid()

pinger = Pinger.remote()
ray.get([pinger.ping.remote(), task.remote()])
me = psutil.Process()


def listeners():
    found = []
    for proc in [me] + me.children(recursive=True):
        try:
            cmd = proc.cmdline()
            name = " ".join([proc.name()] + [os.path.basename(a) for a in cmd[:2]])
            conns = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr):  # TCP, UDP
                found.append([proc.pid, name, c.laddr.ip, c.laddr.port])
    return found


# The agents open their ports after the node registers, each at its own pace: wait until
# the GCS, the raylet and the dashboard agent listen and the list has not changed for 2 s.
deadline, found, same_since = time.monotonic() + 90, [], time.monotonic()
settled = False
while time.monotonic() < deadline:
    now = listeners()
    kinds = " ".join(name for _pid, name, _ip, _port in now)
    if sorted(now) != sorted(found):
        found, same_since = now, time.monotonic()
    elif (all(k in kinds for k in ("gcs_server", "raylet", "DashboardAgent"))
          and time.monotonic() - same_since >= 2):
        settled = True
        break
    time.sleep(0.25)
node_ip = ray._private.worker.global_worker.node.node_ip_address
shutdown()
print(json.dumps({"listening": found, "node_ip": node_ip, "settled": settled}))
"""


def _is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address.split("%", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


@pytest.mark.parametrize("command", ["build", "serve"])
def test_an_embedded_ray_listens_on_loopback_only(command):
    """The embedded Ray of `pixcrawler build` / `demo` (connect) and `pixcrawler serve`
    (connect_with_jobs): its dashboard agent takes job submissions (here with token auth off),
    so none of its processes (GCS, raylet, dashboard, agents, workers, this driver) may listen on
    anything but loopback. Listed from the sockets of the processes the test started."""
    result = last_json(run_child(LISTENERS_CHILD, command, RAY_AUTH_MODE="disabled",
                                 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=None))
    listening = result["listening"]
    assert result["settled"], f"the listeners never held still for 2 s: {listening}"
    kinds = {name for _pid, name, _ip, _port in listening}
    assert len(listening) >= 6 and any("gcs_server" in k for k in kinds) and \
        any("raylet" in k for k in kinds) and any("DashboardAgent" in k for k in kinds), \
        listening
    exposed = [entry for entry in listening if not _is_loopback(entry[2])]
    assert exposed == [], f"listening beyond loopback: {exposed}"
    assert result["node_ip"] == "127.0.0.1"


def test_an_embedded_ray_never_joins_a_ray_recorded_on_the_machine(init_calls):
    """``ray.init()`` with no address joins the cluster that ``ray start`` recorded in
    ``/tmp/ray/ray_current_cluster`` (and then refuses num_cpus): an embedded Ray is asked for
    with ``address="local"``, which always starts one."""
    with pytest.raises(StopAfterInit):
        connect_module.connect(None, num_cpus=2)
    assert init_calls[0]["address"] == "local"


RECORDED_HEAD_CHILD = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
from cluster.connect import connect, shutdown
info = connect(None, num_cpus=1)
print("MODE", info["mode"], info["started"])
shutdown()
"""


def test_build_next_to_a_recorded_ray_head_starts_its_own_and_says_so(tmp_path):
    """A head that `ray start` recorded on this machine (here a stale record, as a head that
    has since died leaves): `pixcrawler build` / `demo` start their own Ray and say so in one
    line, instead of Ray's raw ValueError about num_cpus."""
    from builder.ports import free_port

    recorded = f"127.0.0.1:{free_port()}"

    def record(ray_tmp: str) -> None:
        os.makedirs(f"{ray_tmp}/ray")
        Path(f"{ray_tmp}/ray/ray_current_cluster").write_text(recorded)

    out = run_child(RECORDED_HEAD_CHILD, prepare=record, RAY_AUTH_MODE="disabled")
    assert "MODE embedded True" in out.stdout
    said = [line for line in out.stderr.splitlines() if recorded in line]
    assert len(said) == 1 and "--address HOST:PORT" in said[0], out.stderr[-3000:]
    assert "ValueError" not in out.stderr
