"""builder.worker_start: worker processes started before the runner's imports, and closed
whatever happens to the job."""

from __future__ import annotations

import os
import pickle
import socket
import struct
import subprocess
import sys
import time

import pytest

from builder import worker_start
from builder.worker_start import EXIT_UNKNOWN, ForkedWorker, StartedWorkers, _is_zombie

LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"),
                           reason="workers fork on Linux only")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return _is_zombie(pid)


def _hello(conn: socket.socket) -> tuple[int, int]:
    """The first frame a worker sends: (its worker number, its pid)."""
    conn.settimeout(120)
    data = b""
    while len(data) < 8 or len(data) < 8 + struct.unpack("!Q", data[:8])[0]:
        chunk = conn.recv(65536)
        assert chunk, "the worker closed the connection before saying who it is"
        data += chunk
    return pickle.loads(data[8:])


@pytest.mark.parametrize("fork", [True, False] if sys.platform.startswith("linux") else [False])
def test_started_workers_connect_before_anyone_accepts_and_close_leaves_nothing(monkeypatch,
                                                                                fork):
    """The socket listens before the processes start, so each worker's connection waits in its
    backlog until the runner's event loop exists; closing ends every process and removes the
    socket's directory."""
    monkeypatch.setattr(worker_start, "FORK_WORKERS", fork)
    started = StartedWorkers(2)
    conns = []
    try:
        assert isinstance(started.procs[1], ForkedWorker) == fork
        started.sock.settimeout(120)
        for _ in range(2):
            conns.append(started.sock.accept()[0])
        hellos = sorted(_hello(c) for c in conns)
        assert [w for w, _ in hellos] == [0, 1]
        if fork:
            started.procs[1].pid = hellos[1][1]
        assert all(p.poll() is None for p in started.procs)
    finally:
        for conn in conns:
            conn.close()  # as the runner's end closing: the workers leave
        started.close()
    assert all(_gone(pid) for _, pid in hellos)
    assert not os.path.exists(started.dir)
    started.close()  # again: nothing left to do


def test_workers_closed_before_the_job_exists_exit_without_connecting():
    """A command that fails before its job starts (a bad output, an existing dataset) closes
    the workers it started: they find no one listening and exit."""
    started = StartedWorkers(2)
    first = started.procs[0]
    started.close()
    assert first.poll() is not None
    assert not os.path.exists(started.dir)


@pytest.mark.parametrize("fork", [True, False] if sys.platform.startswith("linux") else [False])
def test_workers_of_a_killed_runner_remove_its_socket_directory(fork, tmp_path):
    """A runner killed outright (SIGKILL, the OOM killer) cannot remove its socket's
    directory: each such end left one in the machine's temporary folder (8 a run of the
    resume tests). Its workers find it gone and remove it."""
    script = (f"import sys, time\nfrom builder import worker_start\n"
              f"worker_start.FORK_WORKERS = {fork}\n"
              "started = worker_start.StartedWorkers(2)\n"
              "print(started.dir, flush=True)\ntime.sleep(120)\n")
    runner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        folder = runner.stdout.readline().strip()
        assert os.path.basename(folder).startswith("pixcrawler-") and os.path.isdir(folder)
    finally:
        runner.kill()
        runner.wait()
        runner.stdout.close()
    deadline = time.monotonic() + 60
    while os.path.exists(folder):
        assert time.monotonic() < deadline, f"{folder} is still there"
        time.sleep(0.05)


@LINUX
def test_a_forked_worker_left_a_zombie_counts_as_gone():
    """Orphaned by worker 0, a forked worker that exits is a zombie until init reaps it; the
    runner must not wait on it (``kill(pid, 0)`` still succeeds on a zombie)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while not _is_zombie(child.pid):
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        worker = ForkedWorker()
        worker.pid = child.pid
        assert worker.poll() == EXIT_UNKNOWN
        worker.wait(timeout=1)
    finally:
        child.wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        worker = ForkedWorker()
        worker.pid = running.pid
        assert worker.poll() is None
    finally:
        running.kill()
        running.wait()


def test_a_worker_started_in_a_folder_others_write_imports_the_installed_package(tmp_path,
                                                                                 monkeypatch):
    """``python -m`` put the current folder first on the worker's import path: a user who
    can write where the command runs (``/tmp``) planted ``builder/worker_procs.py`` there,
    and it ran as the user of ``pixcrawler``."""
    planted = tmp_path / "builder"
    planted.mkdir()
    (planted / "__init__.py").write_text("")
    marker = tmp_path / "planted-code-ran"
    (planted / "worker_procs.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path)
    started = StartedWorkers(1)
    try:
        started.sock.settimeout(120)
        conn = started.sock.accept()[0]  # the real worker connects and says who it is
        assert _hello(conn)[0] == 0
        conn.close()
    finally:
        started.close()
    assert not marker.exists()
