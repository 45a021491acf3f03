"""Both runners size the dedup index for the job's targets (``JobLifecycle.index_signatures``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import builder.pipeline
from builder.dedup import LocalPartitions
from builder.pipeline import run_local
from builder.similarity import MAX_STORED
from tests.e2e.helpers import check_accounting, sandbox_spec


class _RecordingActor:
    """Stands in for ``DedupPartitionActor`` in the coordinator: notes each partition's
    ``signatures`` argument, then creates the real actor."""

    def __init__(self, real: Any, seen: list[float]):
        self.real, self.seen = real, seen

    def options(self, **kwargs: Any) -> Any:
        options, seen = self.real.options(**kwargs), self.seen

        class _Remote:
            def remote(self, *args: Any, **kwargs: Any) -> Any:
                seen.append(kwargs["signatures"])
                return options.remote(*args, **kwargs)

        return _Remote()


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_the_index_is_sized_for_the_jobs_targets(runner, sandbox, tmp_path, monkeypatch,
                                                 request):
    out = str(tmp_path / "ds")
    spec = sandbox_spec(sandbox, out, target=6, classes=("cat", "dog"))
    seen: list[float] = []
    if runner == "local":
        class Recording(LocalPartitions):
            def __init__(self, *args: Any, signatures: float = 0.0, **kwargs: Any):
                seen.append(signatures)
                super().__init__(*args, signatures=signatures, **kwargs)

        monkeypatch.setattr(builder.pipeline, "LocalPartitions", Recording)
        run_local(spec)
    else:
        request.getfixturevalue("ray_session")
        import cluster.coordinator

        monkeypatch.setattr(cluster.coordinator, "DedupPartitionActor",
                            _RecordingActor(cluster.coordinator.DedupPartitionActor, seen))
        asyncio.run(cluster.coordinator.run_job_async(spec))
    assert seen and set(seen) == {12 * MAX_STORED}
    check_accounting(out)
