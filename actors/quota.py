"""The job's quota ledger as an actor (``builder.quota.QuotaLedger``): grants per unit, the
committed counts per class, and shard numbers.

The driver works the ledger out (from the journal when the job resumes, and the published
dataset when it continues one) and hands it to the first start. A restart rebuilds it from
the journal (``builder.pipeline.recover_ledger``); only then does the actor import the job's
modules, which would cost every job's ledger about 0.4 s of CPU and 80 MB."""

from __future__ import annotations

import uuid
from typing import Any, Optional

import ray

from actors import restarted
from builder.quota import QuotaLedger


@ray.remote
class QuotaActor:
    def __init__(self, ledger: QuotaLedger, recovery: dict[str, Any]):
        """``recovery``: ``recover_ledger``'s arguments, for a restart."""
        if restarted():
            from builder.pipeline import recover_ledger

            ledger = recover_ledger(**recovery)
        self.ledger = ledger
        self.incarnation = uuid.uuid4().hex

    def call(self, method: str, *args: Any) -> tuple[str, Any]:
        """Run ``QuotaLedger.<method>(*args)``; returns (incarnation, result)."""
        return self.incarnation, getattr(self.ledger, method)(*args)

    def alive(self) -> bool:
        """For a worker waiting on a call: the actor is placed and answering."""
        return True

    def snapshot(self) -> Optional[dict[str, Any]]:
        return self.ledger.snapshot()
