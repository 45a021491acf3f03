"""This driver as a Ray job (``ray job submit``, or a job the HTTP API started): its submission
id, the cluster's job API, and how a cancelled job ends so that Ray records it as STOPPED.

Ray's job supervisor records a job STOPPED only when it was asked to stop it
(``JobSubmissionClient.stop_job``, ``ray job stop``); a driver that exits by itself with a
non-zero code is FAILED ("exit code 130"). A job cancelled another way (its progress actor, a
signal from outside Ray) writes its partial result first, then asks the supervisor to stop it:
the supervisor signals the driver, which by then has nothing left to do, and records STOPPED.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Optional

log = logging.getLogger("pixcrawler.rayjob")

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor for the entrypoint of a job; its metadata holds the id."""
SUBMISSION_ID_KEY = "job_submission_id"
STOP_WAIT_S = 30.0
"""How long a driver that asked to be stopped waits for the supervisor's signal."""


def submission_id() -> Optional[str]:
    """The Ray job submission id this process runs as, or None outside ``ray job submit``."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        metadata = json.loads(raw).get("metadata") or {}
    except (ValueError, AttributeError):
        return None
    value = metadata.get(SUBMISSION_ID_KEY)
    return value if isinstance(value, str) and value else None


def dashboard_address() -> Optional[str]:
    """The connected cluster's dashboard (job API) address, as Ray publishes it, or None."""
    from ray._private import ray_constants
    from ray.experimental import internal_kv

    if not internal_kv._internal_kv_initialized():
        return None
    raw = internal_kv._internal_kv_get(ray_constants.DASHBOARD_ADDRESS,
                                       namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
    return f"http://{raw.decode()}" if raw else None


def stop_request() -> Optional[tuple[str, str]]:
    """(job API address, submission id) for ``end_as_stopped``, read while connected to Ray;
    None when this driver is not a Ray job or the cluster runs no job API."""
    job = submission_id()
    address = dashboard_address() if job else None
    return (address, job) if address and job else None


def end_as_stopped(request: tuple[str, str], wait_s: float = STOP_WAIT_S) -> None:
    """Ask Ray's job supervisor to stop this (cancelled, already written) job, so that it is
    recorded STOPPED, then wait for its signal, which ends the process. Returns only if the
    request failed or no signal came in ``wait_s``; the caller then exits as it would have."""
    from ray.job_submission import JobSubmissionClient

    address, job = request
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        if not JobSubmissionClient(address).stop_job(job):
            return
    except (RuntimeError, ConnectionError, OSError) as exc:
        log.warning("could not ask Ray to record job %s as stopped (%s); it shows as failed",
                    job, exc)
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(0.2)
