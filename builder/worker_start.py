"""Starting the in-process runner's shard worker processes, with nothing but the standard library.

A worker process takes about a second of CPU to import what it runs (``builder.worker_procs``);
the runner's own imports take about as long. ``StartedWorkers`` is importable before either, so
the command line starts the workers as soon as it knows the job runs in this process, and both
sets of imports run at once on two cores (``builder.worker_procs.WorkerProcesses`` takes the
started processes over once the job is planned). The processes connect to a Unix socket that
is already listening; they wait in its backlog until the runner accepts them.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Optional, Union

if TYPE_CHECKING:
    from builder.spec import DatasetSpec

log = logging.getLogger("pixcrawler.procs")

LOCAL_CPU_THREADS = max(2, min(os.cpu_count() or 2, 4))
"""The in-process runner's shard worker processes (``builder.worker_procs``), or at the slow
level its validating threads and processes (``builder.validate_pool``): one per core, up to 4
(cluster.runner chooses Ray on bigger machines)."""


def local_workers(spec: DatasetSpec) -> int:
    """How many shard worker processes the in-process runner starts for ``spec``: none at the
    slow level (its scorers run in the runner's process)."""
    return 0 if spec.validation.level == "slow" else spec.resources.workers or LOCAL_CPU_THREADS


SOCKET_DIR_PREFIX = "pixcrawler-"
"""The temporary directory of the runner's socket (``StartedWorkers``)."""

CLOSE_TIMEOUT_S = 10.0
"""How long a worker process may take to exit once told to (then it is killed)."""

FORK_WORKERS = sys.platform.startswith("linux")
"""Whether worker 0 forks the others. Elsewhere each worker is a fresh interpreter: on macOS a
process that has loaded system frameworks (numpy may link Accelerate) is not safe to fork,
which is why Python's own multiprocessing spawns there."""

EXIT_UNKNOWN = -256
"""``ForkedWorker.poll`` of a worker that is gone: its exit code went to worker 0."""


class ForkedWorker:
    """A worker process that worker 0 forked: not this process's child, known by the pid it
    sends when it connects. Worker 0 ignores SIGCHLD, so a forked worker that exits is gone at
    once (while worker 0 lives, which ``outlive_children`` sees to); its exit code is not known
    here."""

    def __init__(self) -> None:
        self.pid = 0

    def poll(self) -> Optional[int]:
        """None while it runs (or has not connected yet), else ``EXIT_UNKNOWN``. A zombie
        counts as gone: orphaned by worker 0, it waits for the machine's init to reap it."""
        if not self.pid:
            return None
        try:
            os.kill(self.pid, 0)
        except (ProcessLookupError, PermissionError):  # gone, or the pid was reused
            return EXIT_UNKNOWN
        return EXIT_UNKNOWN if _is_zombie(self.pid) else None

    def kill(self) -> None:
        if self.pid and self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: Optional[float] = None) -> None:
        """Until it is gone; at once if it never connected (it leaves when it finds the
        runner's socket closed)."""
        deadline = time.monotonic() + (timeout if timeout is not None else math.inf)
        while self.pid and self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"worker pid {self.pid}", timeout)
            time.sleep(0.02)


def _is_zombie(pid: int) -> bool:
    """Whether ``pid`` has exited and waits to be reaped (Linux: its state in /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state in (b"Z", b"X")


WorkerProcess = Union[subprocess.Popen, ForkedWorker]


class StartedWorkers:
    """``workers`` shard worker processes and the listening socket they connect to, in a
    temporary directory only this user can enter (mode 0700): the pickles that later cross the
    socket come from the job's own processes. ``close`` undoes it all, and may be called again."""

    def __init__(self, workers: int):
        self.workers = workers
        self.procs: list[WorkerProcess] = []
        self.retired: list[subprocess.Popen] = []
        """This process's children that were lost and replaced (``replace``, which killed
        them): reaped at ``close``."""
        self.dir = tempfile.mkdtemp(prefix=SOCKET_DIR_PREFIX)
        self.path = os.path.join(self.dir, "s")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._closed = False
        try:
            self.sock.bind(self.path)
            self.sock.listen(max(workers, 1))  # every worker fits the backlog before accept
            # A fresh interpreter, not multiprocessing's spawn: that one imports the caller's
            # __main__ again, which a script without a main guard cannot take.
            per_process = max(workers, 1) if FORK_WORKERS else 1
            for first in range(0, workers, per_process):
                count = min(per_process, workers - first)
                self.procs.append(self._spawn(first, count))
                self.procs.extend(ForkedWorker() for _ in range(count - 1))
        except BaseException:
            self.close()
            raise

    def _spawn(self, first: int, count: int) -> subprocess.Popen:
        # -P: not the current folder first on the import path, where anyone who can write
        # there (/tmp) could plant a builder/worker_procs.py that runs as this user
        return subprocess.Popen([sys.executable, "-P", "-m", "builder.worker_procs", self.path,
                                 str(first), str(count), str(os.getpid())],
                                stdin=subprocess.DEVNULL)

    def replace(self, worker: int) -> None:
        """Start a fresh interpreter in the place of worker ``worker``, which was lost (a
        child of this process is killed, should it still run; a forked worker is not: its pid
        may have gone to another process since)."""
        if self._closed:
            raise RuntimeError("the worker processes are closed")
        old = self.procs[worker]
        if isinstance(old, subprocess.Popen):
            old.kill()
            self.retired.append(old)
        self.procs[worker] = self._spawn(worker, 1)

    def close(self) -> None:
        """Close the socket (a worker waiting for its plan finds it closed and exits), wait
        until every process is gone (killing one that will not go) and remove the directory."""
        if self._closed:
            return
        self._closed = True
        self.sock.close()
        for proc in self.retired:  # killed when replaced
            proc.wait()
        for w, proc in enumerate(self.procs):
            try:
                proc.wait(CLOSE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("shard worker process %d did not exit; killing it", w)
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
