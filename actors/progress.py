"""The job's progress actor: the CLI, the HTTP API and the dashboard metrics read it.

It is named ``progress:<job_id>`` in the ``pixcrawler`` namespace, so any process of the cluster
can look a running job up (``get_progress(job_id)``) and ask it to stop (``cancel()``); the
coordinator sees the request on its next update.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import ray

from actors import NAMESPACE


@ray.remote(num_cpus=0.05)
class ProgressActor:
    def __init__(self, job_id: str, name: str):
        self.job_id = job_id
        self.state: dict[str, Any] = {"job_id": job_id, "name": name, "state": "starting",
                                      "updated": time.time(), "progress": {}}
        self._cancel_reason: Optional[str] = None
        from actors.metrics import counters, queue_depth

        self._counters = counters()
        self._queue = queue_depth()

    def update(self, snapshot: dict[str, Any], deltas: Optional[dict[str, Any]] = None) -> bool:
        """Store the latest snapshot, export metric deltas; returns True if a cancel was asked."""
        self.state["progress"] = snapshot
        self.state["updated"] = time.time()
        if self.state["state"] == "starting":
            self.state["state"] = "running"
        job = self.job_id
        for label, n in (deltas or {}).get("candidates", {}).items():
            self._counters["candidates"].inc(n, tags={"job": job, "label": label})
        for label, n in (deltas or {}).get("accepted", {}).items():
            self._counters["accepted"].inc(n, tags={"job": job, "label": label})
        for key, n in (deltas or {}).get("rejected", {}).items():
            stage, reason = key.split(":", 1)
            self._counters["rejected"].inc(n, tags={"job": job, "stage": stage, "reason": reason})
        if (deltas or {}).get("bytes"):
            self._counters["bytes"].inc(deltas["bytes"], tags={"job": job})
        for queue, depth in (deltas or {}).get("queues", {}).items():
            self._queue.set(depth, tags={"job": job, "queue": queue})
        return self._cancel_reason is not None

    def set_state(self, state: str, **info: Any) -> None:
        self.state["state"] = state
        self.state.update(info)
        self.state["updated"] = time.time()

    def get(self) -> dict[str, Any]:
        return dict(self.state, cancel_requested=self._cancel_reason)

    def cancel(self, reason: str = "stop requested") -> None:
        self._cancel_reason = reason

    def cancelled(self) -> bool:
        return self._cancel_reason is not None


def progress_name(job_id: str) -> str:
    return f"progress:{job_id}"


def get_progress(job_id: str) -> Optional[dict[str, Any]]:
    """The live progress of a running job, or None if no such job runs in this cluster."""
    try:
        actor = ray.get_actor(progress_name(job_id), namespace=NAMESPACE)
    except ValueError:
        return None
    return ray.get(actor.get.remote())


def cancel_job(job_id: str, reason: str = "stop requested",
               timeout: Optional[float] = None) -> bool:
    """Ask a running job to stop; False if no such job runs. ``timeout``: raises Ray's
    ``GetTimeoutError`` when the actor has not taken the cancel by then (it waits for a node
    to restart on, and may wait for ever)."""
    try:
        actor = ray.get_actor(progress_name(job_id), namespace=NAMESPACE)
    except ValueError:
        return False
    ray.get(actor.cancel.remote(reason), timeout=timeout)
    return True
