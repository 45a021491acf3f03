"""Shard workers in processes of their own, for the in-process runner.

One Python process holds the GIL for everything it does, and the per-image work of a worker
(fetching, validating, building rows, writing shards) is mostly Python: one process keeps about
one core busy. ``ProcessExecutor`` runs ``workers`` ``builder.worker.WorkerRuntime`` in
processes of their own, the same runtime the Ray runner runs in its actors. Worker 0 is a fresh
interpreter (``python -m builder.worker_procs``, started by ``builder.worker_start``); on Linux,
once its imports are done (about 1 s of CPU here), it forks the others, so they start with them
done (``FORK_WORKERS``). The job's services stay in the runner's process (``LocalServices``: the
dedup index, the quota ledger, the search governors) and the workers reach them over a Unix
socket (``Channel``), as Ray workers reach their actors. Only counts, units and the index's
payloads cross; image bytes never do. The socket lives in a temporary directory only this user
can enter (mode 0700), so the pickles it carries come from the job's own processes.

A worker process that dies (killed, out of memory) is a lost worker: its units are resent to
the others (``WorkerLost``), and a fresh interpreter takes its place
(``ProcessExecutor.revive`` says when it is ready), as Ray restarts a lost actor. The processes
ignore SIGINT and SIGTERM, so a Ctrl-C stops the job through the runner (units end
``cancelled``, the partial result is written), and they exit when the runner's end of the
socket closes, whatever ends the runner.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import shutil
import signal
import struct
import sys
import warnings
from typing import Any, Callable, Optional, Sequence, Union

from builder.dedup import DedupClient
from builder.engines import SearchEngine, SearchPage
from builder.errors import EngineError
from builder.job import WorkerLost
from builder.units import UnitReport, WorkerEvents, WorkUnit
from builder.worker import (JobPlan, LedgerCalls, LocalServices, WorkerRuntime,
                            settle_process)
from builder.worker_start import (CLOSE_TIMEOUT_S, EXIT_UNKNOWN, SOCKET_DIR_PREFIX, ForkedWorker,
                                  StartedWorkers, WorkerProcess)

log = logging.getLogger("pixcrawler.procs")

_HEADER = struct.Struct("!Q")
START_TIMEOUT_S = 120.0
"""How long the workers may take to start (spawn, imports, the output check)."""


class ChannelClosed(ConnectionError):
    """The process at the other end of a channel went away."""


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any failure to pickle means: send a description
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class Channel:
    """Calls both ways over one stream: ``call(method, *args)`` awaits the other side's
    ``handler.<method>(*args)``; the other side's calls run on ``handler``. Messages are
    length-prefixed pickles; writes never block the event loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 handler: Any):
        self.reader = reader
        self.writer = writer
        self.handler = handler
        self.pending: dict[int, asyncio.Future] = {}
        self.tasks: set[asyncio.Task] = set()
        self.closed: Optional[BaseException] = None
        self._next = 0
        self._reading = asyncio.ensure_future(self._read())
        self.done = asyncio.get_running_loop().create_future()
        """Resolves when the other side has gone."""

    def _send(self, message: tuple) -> None:
        _write_frame(self.writer, message)

    async def call(self, method: str, *args: Any) -> Any:
        if self.closed is not None:
            raise ChannelClosed(str(self.closed))
        self._next += 1
        key = self._next
        future = asyncio.get_running_loop().create_future()
        self.pending[key] = future
        self._send(("call", key, method, args))
        try:
            try:
                await self.writer.drain()
            except ConnectionError as exc:
                closed = ChannelClosed(f"the other process went away ({exc})")
                self._close(closed)
                raise closed from None
            return await future
        finally:
            self.pending.pop(key, None)

    def notify(self, method: str, *args: Any) -> None:
        """Run ``method`` on the other side; no answer."""
        if self.closed is None:
            self._send(("call", 0, method, args))

    async def _read(self) -> None:
        try:
            while True:
                self._dispatch(await _read_frame(self.reader))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self._close(ChannelClosed(f"the other process went away ({type(exc).__name__})"))
        except (pickle.UnpicklingError, AttributeError, EOFError, ImportError, IndexError,
                TypeError, ValueError) as exc:
            # A message that does not read back: the calls waiting on this channel would
            # wait for ever, so it closes, and they fail as when the other side goes.
            log.error("a message from the other process could not be read: %s: %s",
                      type(exc).__name__, exc)
            self._close(ChannelClosed(f"a message from the other process could not be read "
                                      f"({type(exc).__name__}: {exc})"))
        except asyncio.CancelledError:
            self._close(ChannelClosed("the channel was closed"))
            raise

    def _dispatch(self, message: tuple) -> None:
        if message[0] == "reply":
            _, key, ok, value = message
            future = self.pending.get(key)
            if future is not None and not future.done():
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
            return
        _, key, method, args = message
        task = asyncio.ensure_future(self._answer(key, method, args))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, key: int, method: str, args: tuple) -> None:
        try:
            value, ok = await _maybe_await(getattr(self.handler, method)(*args)), True
        except Exception as exc:  # noqa: BLE001 - the caller on the other side gets it
            value, ok = _portable(exc), False
        if key and self.closed is None:
            self._send(("reply", key, ok, value))
            try:
                await self.writer.drain()
            except ConnectionError:
                pass

    def _close(self, exc: BaseException) -> None:
        if self.closed is not None:
            return
        self.closed = exc
        for future in self.pending.values():
            if not future.done():
                future.set_exception(exc)
        if not self.done.done():
            self.done.set_result(None)

    async def aclose(self) -> None:
        self._reading.cancel()
        await asyncio.gather(self._reading, return_exceptions=True)
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


async def _maybe_await(value: Any) -> Any:
    if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
        return await value
    return value


# -- the runner's side --------------------------------------------------------------------------


class ServiceHandler:
    """What a worker process may call in the runner's process: the job's ``LocalServices``."""

    def __init__(self, services: LocalServices):
        self.services = services

    async def dedup(self, partition: int, method: str, payload: dict[str, Any]) -> Any:
        return await self.services.dedup_call(partition, method, payload)

    async def grant(self, uid: str, wants: dict[str, int], floor: dict[str, int]
                    ) -> dict[str, int]:
        return await self.services.grant(uid, wants, floor)

    async def rooms(self) -> dict[str, int]:
        return await self.services.rooms()

    async def commit(self, uid: str, accepted: dict[str, int]) -> None:
        await self.services.commit(uid, accepted)

    async def next_shard(self, split: str) -> int:
        return await self.services.next_shard(split)

    def acquire(self, unit: WorkUnit) -> float:
        return self.services.acquire(unit)

    def record(self, unit: WorkUnit, ok: bool, status: int, retry_after: Optional[float],
               requests: int = 1) -> None:
        self.services.record(unit, ok, status, retry_after, requests)


def _exit_text(code: Optional[int]) -> str:
    if code is None:
        return "still running"
    if code == EXIT_UNKNOWN:
        return "exit code unknown: a forked worker"
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"




class WorkerProcesses:
    """The worker processes of one job, started before the job is planned (their interpreter
    start and imports overlap the planning, and with ``StartedWorkers`` the runner's imports
    too) and handed the job's plan once it exists."""

    def __init__(self, started: StartedWorkers):
        self.started = started
        self.workers = started.workers
        self.channels: list[Optional[Channel]] = [None] * self.workers
        self._server: Optional[asyncio.AbstractServer] = None
        self._joined: dict[int, asyncio.Future] = {}
        self._plan: Optional[asyncio.Future] = None
        self._closing = False

    @property
    def procs(self) -> list[WorkerProcess]:
        return self.started.procs

    @classmethod
    async def launch(cls, workers: int,
                     started: Optional[StartedWorkers] = None) -> "WorkerProcesses":
        """Take over ``started`` (else start ``workers`` processes now); the processes connect
        and wait for ``join``'s plan."""
        self = cls(started or StartedWorkers(workers))
        loop = asyncio.get_running_loop()
        self._joined = {w: loop.create_future() for w in range(self.workers)}
        self._plan = loop.create_future()
        try:
            self._server = await asyncio.start_unix_server(self._connected,
                                                           sock=self.started.sock)
        except BaseException:
            await self.close()
            raise
        return self

    async def _connected(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        assert self._plan is not None
        worker, pid = await _read_frame(reader)
        if self._closing:  # a replacement that started as the job ended: it exits on EOF
            writer.close()
            return
        proc = self.procs[worker]
        if isinstance(proc, ForkedWorker):
            proc.pid = pid
        try:
            plan, handler = await self._plan
        except asyncio.CancelledError:  # closed before the job was planned
            writer.close()
            return
        _write_frame(writer, plan)
        self.channels[worker] = Channel(reader, writer, handler)
        self._joined[worker].set_result(None)

    async def join(self, plan: JobPlan, handler: Any) -> None:
        """Hand every process the plan and wait until each is connected."""
        assert self._plan is not None
        self._plan.set_result((plan, handler))
        await self._wait_joined(range(self.workers))

    async def _wait_joined(self, workers: Sequence[int]) -> None:
        try:
            await asyncio.wait_for(self._joining(workers), START_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RuntimeError(f"the shard worker processes did not start within "
                               f"{START_TIMEOUT_S:g} s; the machine may be "
                               "overloaded") from None

    async def _joining(self, workers: Sequence[int]) -> None:
        pending = {self._joined[w] for w in workers}
        while pending:
            _, pending = await asyncio.wait(pending, timeout=0.5)
            dead = [w for w in workers
                    if not self._joined[w].done() and self.procs[w].poll() is not None]
            if dead:
                raise RuntimeError(f"shard worker process {dead[0]} exited while starting "
                                   f"({_exit_text(self.procs[dead[0]].poll())})")

    async def replace(self, worker: int) -> None:
        """Start a fresh process in the place of lost worker ``worker``, and wait until it
        has connected and taken the plan."""
        old = self.channels[worker]
        self.channels[worker] = None
        if old is not None:
            await old.aclose()
        self._joined[worker] = asyncio.get_running_loop().create_future()
        self.started.replace(worker)
        await self._wait_joined([worker])

    async def close(self) -> None:
        """Ask each connected worker to close (its fetcher and pool), then make sure every
        process is gone."""
        async def one(channel: Channel) -> None:
            try:
                await asyncio.wait_for(channel.call("close"), CLOSE_TIMEOUT_S)
            except (ChannelClosed, asyncio.TimeoutError):
                pass
            await channel.aclose()

        self._closing = True
        if self._plan is not None and not self._plan.done():
            self._plan.cancel()  # processes waiting for a plan see the socket close
        await asyncio.gather(*(one(c) for c in self.channels if c is not None))
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await asyncio.to_thread(self.started.close)


class ProcessExecutor:
    """The job's shard workers in ``WorkerProcesses`` (see the module docstring)."""

    def __init__(self, plan: JobPlan, services: LocalServices, processes: WorkerProcesses):
        if services.slow:
            raise ValueError("the slow level scores in the runner's process: use LocalExecutor")
        self.plan = plan
        self.services = services
        self.processes = processes
        self.workers = processes.workers
        self.late: set[int] = set()
        """Workers not started yet: lost ones while their replacement starts (``start``
        waits for the first ones)."""
        self._replacing: dict[int, asyncio.Task] = {}

    @property
    def procs(self) -> list[WorkerProcess]:
        return self.processes.procs

    @property
    def channels(self) -> list[Optional[Channel]]:
        return self.processes.channels

    async def start(self) -> None:
        """Hand the workers the plan, wait until each has connected and checked it can write
        the output (a worker that cannot raises here, before any download)."""
        await self.processes.join(self.plan, ServiceHandler(self.services))
        await asyncio.gather(*(self._channel(w).call("start") for w in range(self.workers)))

    def _channel(self, worker: int) -> Channel:
        channel = self.channels[worker]
        assert channel is not None, "start() first"
        return channel

    def _lost(self, worker: int, exc: BaseException) -> WorkerLost:
        """The worker's process is gone: a replacement starts (``revive`` says when it is
        ready), as Ray restarts a lost actor."""
        code = self.procs[worker].poll() if worker < len(self.procs) else None
        if worker not in self.late:  # a replacement that could not start stays late
            self.late.add(worker)
            self._replacing[worker] = asyncio.ensure_future(self._replace(worker))
        return WorkerLost(worker, f"worker process {worker} is gone ({_exit_text(code)}): "
                                  f"{exc}")

    async def _replace(self, worker: int) -> None:
        await self.processes.replace(worker)
        await self._channel(worker).call("start")

    async def run(self, worker: int, unit: WorkUnit) -> tuple[UnitReport, WorkerEvents]:
        try:
            return await self._channel(worker).call("run", unit)
        except ChannelClosed as exc:
            raise self._lost(worker, exc) from None

    async def flush(self) -> list[Union[WorkerEvents, WorkerLost]]:
        async def one(w: int) -> Union[WorkerEvents, WorkerLost]:
            if w in self.late:
                return WorkerLost(w, f"worker process {w} is being started again")
            try:
                return await self._channel(w).call("flush")
            except ChannelClosed as exc:
                return self._lost(w, exc)

        return list(await asyncio.gather(*(one(w) for w in range(self.workers))))

    async def revive(self, worker: int) -> bool:
        """Whether a lost worker's replacement is ready (without waiting for it). One that
        cannot start is not tried again."""
        task = self._replacing.get(worker)
        if task is None or not task.done():
            return False
        del self._replacing[worker]
        error = task.exception()
        if error is not None:  # it stays late: sent nothing, flushed, reset or replaced never
            log.warning("worker process %d could not be started again: %s", worker, error)
            return False
        self.late.discard(worker)
        log.info("worker process %d was started again and rejoins the job", worker)
        return True

    async def reset(self) -> None:
        await asyncio.gather(*(self._channel(w).call("discard") for w in range(self.workers)
                               if w not in self.late and self._channel(w).closed is None))

    def cancel(self) -> None:
        for channel in self.channels:
            if channel is not None:
                channel.notify("cancel")

    async def in_flight(self) -> dict[str, dict[str, int]]:
        async def one(channel: Channel) -> dict[str, dict[str, int]]:
            try:
                return await channel.call("in_flight")
            except ChannelClosed:
                return {}

        out: dict[str, dict[str, int]] = {}
        for part in await asyncio.gather(*(one(c) for c in self.channels if c is not None)):
            out.update(part)
        return out

    async def close(self) -> None:
        for task in self._replacing.values():
            task.cancel()
        await asyncio.gather(*self._replacing.values(), return_exceptions=True)
        self._replacing.clear()
        await self.processes.close()


# -- the worker's side --------------------------------------------------------------------------


class ChannelServices(LedgerCalls):
    """A worker process's services: calls to the runner's process."""

    def __init__(self, plan: JobPlan, call: Callable[..., Any]):
        v = plan.spec.validation
        self._call = call
        self.dedup = DedupClient(v.near_duplicate_threshold, v.level != "fast", 1,
                                 self._dedup)

    async def _dedup(self, partition: int, method: str, payload: dict[str, Any]) -> Any:
        return await self._call("dedup", partition, method, payload)

    async def _ledger(self, method: str, *args: Any) -> Any:
        return await self._call(method, *args)

    async def search(self, unit: WorkUnit, engine: SearchEngine) -> SearchPage:
        await asyncio.sleep(await self._call("acquire", unit))
        try:
            page = await asyncio.to_thread(engine.search, unit.query, label=unit.label,
                                           page=unit.page, per_page=unit.per_page)
        except EngineError as exc:
            await self._call("record", unit, False, exc.status, exc.retry_after, exc.requests)
            raise
        await self._call("record", unit, True, 200, None, page.requests)
        return page


class WorkerHandler:
    """What the runner's process may call in a worker process."""

    def __init__(self, runtime: WorkerRuntime, stop: asyncio.Event):
        self.runtime = runtime
        self.stop = stop

    async def start(self) -> None:
        await self.runtime.start()

    async def run(self, unit: WorkUnit) -> tuple[UnitReport, WorkerEvents]:
        return await self.runtime.run(unit)

    async def flush(self) -> WorkerEvents:
        return await self.runtime.flush()

    async def discard(self) -> list[str]:
        return await self.runtime.discard()

    def cancel(self) -> None:
        self.runtime.cancel()

    def in_flight(self) -> dict[str, dict[str, int]]:
        return self.runtime.in_flight()

    async def close(self) -> None:
        await self.runtime.close()
        self.stop.set()


def _write_frame(writer: asyncio.StreamWriter, value: Any) -> None:
    body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_HEADER.pack(len(body)) + body)


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    header = await reader.readexactly(_HEADER.size)
    return pickle.loads(await reader.readexactly(_HEADER.unpack(header)[0]))


def worker_main(path: str, first: int, count: int, runner: int) -> None:
    """Worker ``first``: fork workers ``first + 1`` to ``first + count - 1`` once the imports
    are done, then each connects to the runner (process ``runner``, this one's parent),
    takes the job's plan, and serves until told to close or the runner goes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    settle_process()
    worker = first
    forked: list[int] = []
    if count > 1:
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the forked workers need no reaping
        sys.stdout.flush()
        sys.stderr.flush()
        with warnings.catch_warnings():
            # Python 3.12+ warns that a process with threads forks. The only threads here are
            # native ones started by imports (jemalloc's, OpenBLAS's), which reset themselves
            # in a forked child; no Python thread or event loop exists yet.
            warnings.simplefilter("ignore", DeprecationWarning)
            for w in range(first + 1, first + count):
                pid = os.fork()
                if pid == 0:
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    worker = w
                    forked.clear()
                    break
                forked.append(pid)
    asyncio.run(_serve(path, worker))
    outlive_children(forked)
    if worker == first and os.getppid() != runner:
        remove_orphaned_socket(path)


def remove_orphaned_socket(path: str) -> None:
    """Remove the runner's socket and its directory (``StartedWorkers``), which the runner
    removes when it closes: this worker outlived it (the runner was killed, SIGKILL or the
    kernel's OOM killer), and nothing else would, so each such end left a directory in the
    machine's temporary folder."""
    folder = os.path.dirname(path)
    if os.path.basename(folder).startswith(SOCKET_DIR_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)


def outlive_children(pids: Sequence[int]) -> None:
    """Return once the children ``pids`` are gone (SIGCHLD ignored: none is left a zombie).

    Worker 0 exits after the workers it forked. One that outlived it would be reparented to
    the machine's init, and until init reaps it, it is a zombie the runner sees as alive:
    that took 1.9 s at the end of every job in a container whose init reaps slowly, and one
    whose init never reaps (a shell) would leave it for good. Its other children are not
    waited for: multiprocessing's resource tracker (started with an isolating validator's
    processes) only leaves once this process has."""
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


async def _serve(path: str, worker: int) -> None:
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        _write_frame(writer, (worker, os.getpid()))
        plan: JobPlan = await _read_frame(reader)
    except (OSError, asyncio.IncompleteReadError):
        return  # the job ended (or failed) before it needed this worker
    stop = asyncio.Event()
    holder: dict[str, Channel] = {}

    async def call(method: str, *args: Any) -> Any:
        return await holder["channel"].call(method, *args)

    runtime = WorkerRuntime(plan, ChannelServices(plan, call), worker_id=f"w{worker}")
    channel = holder["channel"] = Channel(reader, writer, WorkerHandler(runtime, stop))
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({stopped, channel.done}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not stop.is_set():  # the runner went away: stop what runs, close quietly
        runtime.cancel()
        await runtime.close()
    else:
        await asyncio.sleep(0)  # let the reply to "close" go out
    await channel.aclose()


if __name__ == "__main__":
    # (a runner of the version before passes no pid: a worker it starts after an upgrade in
    # place takes its parent's)
    worker_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                int(sys.argv[4]) if len(sys.argv) > 4 else os.getppid())
