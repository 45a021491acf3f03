"""A fair share of the cluster between API keys.

Every job submitted through the API is stored "queued"; the scheduler hands queued jobs to Ray
by one rule:

- at most ``max_running_jobs`` API jobs run at once in the cluster, each with its pools sized to
  its share (``ApiPolicy.job_share``: the cluster's CPUs / ``max_running_jobs``), and at most
  ``max_running_jobs_per_key`` of them are one key's;
- when a place is free, the next job is the oldest queued job of the key that has the fewest
  jobs running; among keys with as many, the key whose last job started longest ago (a key
  with none started yet first). So keys take turns, whatever one key has queued;
- a running job keeps its place until it ends: nothing is stopped to make room. The longest
  wait for a place is therefore bounded by the jobs already running, which the policy's caps
  (classes, targets, total images) bound in turn;
- a revoked key's queued jobs never start: they end "cancelled" (its running ones are
  stopped by the reconciler).

The scheduler runs when a job is submitted and after each reconcile pass (every
``reconcile_interval_s``), on every replica; ``JobStore.claim_queued`` makes each start one
statement, so replicas sharing the store never exceed the caps nor start a job twice.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Optional

from serve.jobs import ClusterUnavailable, JobLauncher, SubmitUnconfirmed
from serve.store import REVOKED_QUEUED_ERROR, STARTED, JobRow, JobStore

log = logging.getLogger("pixcrawler.serve.schedule")

REFUSED_ERROR = ("the Ray cluster refused to start the job (the server's log has the details); "
                 "submit it again later")
"""A refused job's error as its owner sees it: what Ray said (the cluster's addresses,
advice for whoever runs it) goes to the server's log."""

_MAX_ROWS = 10_000


def next_job(queued: list[JobRow], running: dict[str, int], last_start: dict[str, float],
             per_key: int) -> Optional[JobRow]:
    """The queued job to start next by the rule above, or None if no key may start one."""
    oldest: dict[str, JobRow] = {}
    for row in sorted(queued, key=lambda r: (r.created_at, r.id)):
        oldest.setdefault(row.owner, row)
    ready = [owner for owner in oldest if running.get(owner, 0) < per_key]
    if not ready:
        return None
    owner = min(ready, key=lambda o: (running.get(o, 0), last_start.get(o, 0.0),
                                      oldest[o].created_at))
    return oldest[owner]


class Scheduler:
    """Starts queued jobs while the caps allow (see the module docstring)."""

    def __init__(self, store: JobStore, launcher: JobLauncher, max_running: int,
                 per_key: int):
        self.store = store
        self.launcher = launcher
        self.max_running = max_running
        self.per_key = per_key

    def start_ready(self) -> dict[str, ClusterUnavailable]:
        """Start queued jobs until the caps are reached or none is left. Returns the jobs
        that Ray refused (each is marked failed), by id."""
        refused: dict[str, ClusterUnavailable] = {}
        passed: set[str] = set()  # claims lost to another replica: not tried again this pass
        while True:
            # oldest first: past _MAX_ROWS queued jobs, the newest wait, not the oldest (one
            # key's 10,000 would hide the others', which max_concurrent_jobs, 4, rules out)
            queued, _ = self.store.list_jobs(None, states=["queued"], limit=_MAX_ROWS,
                                             oldest_first=True)
            queued = [row for row in queued if row.id not in passed]
            revoked = self.store.revoked_owners(row.owner for row in queued)
            for row in queued:
                if row.owner in revoked:  # queued by a replica that had not seen the revoke
                    self.store.cancel_queued(row.id, REVOKED_QUEUED_ERROR)
            queued = [row for row in queued if row.owner not in revoked]
            if not queued:
                return refused
            started, _ = self.store.list_jobs(None, states=sorted(STARTED), limit=_MAX_ROWS)
            if len(started) >= self.max_running:
                return refused
            running = Counter(row.owner for row in started)
            job = next_job(queued, running, self.store.last_starts(), self.per_key)
            if job is None:
                return refused
            if not self.store.claim_queued(job.id, self.max_running, self.per_key):
                passed.add(job.id)  # another replica started it, or took the place meanwhile
                continue
            row = self.store.get_job(job.id)
            if row is None:
                continue
            try:
                self.launcher.submit(row.id, row.spec, self._owner_name(row.owner))
            except SubmitUnconfirmed as exc:  # it may run: the reconciler decides
                log.warning("job %s: %s", row.id, exc)
                continue
            except ClusterUnavailable as exc:
                log.warning("job %s: Ray refused it: %s", row.id, exc)
                self.store.update_job(row.id, state="failed", error=REFUSED_ERROR)
                refused[row.id] = exc
                continue
            self._submitted(row)

    def _owner_name(self, owner: str) -> str:
        names = {key.id: key.name for key in self.store.list_keys()}
        return names.get(owner, owner)

    def _submitted(self, row: JobRow) -> None:
        """A cancel that came while the job was being handed to Ray found nothing to stop,
        and a row ended meanwhile (the reconciler gave up on a submit slower than its grace
        period) is no longer watched: either way the job is stopped now rather than left to
        run untracked."""
        now = self.store.get_job(row.id)
        if now is None or now.terminal or now.cancel_requested:
            log.warning("job %s ended or was cancelled while it was submitted; stopping it",
                        row.id)
            try:
                self.launcher.stop(row.id)
            except ClusterUnavailable as exc:
                log.warning("cannot stop job %s: %s", row.id, exc)
