"""The job's quota ledger as an actor (``builder.quota.QuotaLedger``): grants per unit, the
committed counts per class, and shard numbers. It recovers from the journal when it restarts."""

from __future__ import annotations

import uuid
from typing import Any, Callable, Optional

import ray

from builder.quota import QuotaLedger


@ray.remote
class QuotaActor:
    def __init__(self, make_ledger: Callable[[], QuotaLedger]):
        self.ledger = make_ledger()
        self.incarnation = uuid.uuid4().hex

    def call(self, method: str, *args: Any) -> tuple[str, Any]:
        """Run ``QuotaLedger.<method>(*args)``; returns (incarnation, result)."""
        return self.incarnation, getattr(self.ledger, method)(*args)

    def snapshot(self) -> Optional[dict[str, Any]]:
        return self.ledger.snapshot()
