"""The shard worker actor's services: a call to a slow-level scorer that cannot run ends."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from builder.errors import JobInterrupted


def test_a_scorer_waiting_for_a_gpu_fails_the_job_naming_resume(ray_session, monkeypatch):
    """A scorer whose GPU node was lost restarts where a GPU is free; with none left, every
    call to it waited for ever, and the job with it. Here the scorer asks for a GPU the test
    cluster does not have, so it is never placed, as such a scorer."""
    import ray

    from actors import worker

    if ray.cluster_resources().get("GPU"):
        pytest.skip("this Ray has a GPU: the scorer would be placed")

    @ray.remote(num_gpus=1)
    class Scorer:
        def score(self, batch):
            return batch.records

    scorer = Scorer.remote()
    monkeypatch.setattr(worker, "SCORE_WAIT_S", 1.0)
    services = worker.RayServices.__new__(worker.RayServices)
    services.scorers, services._scored = [scorer], 0
    services._prep = SimpleNamespace(prepare=lambda records: SimpleNamespace(
        records=records, index=[], nsfw_pixels=None, clip_pixels=None))
    pool = ThreadPoolExecutor(1)
    try:
        with pytest.raises(JobInterrupted, match="did not answer within 1 s.*--resume"):
            asyncio.run(services.score([], pool))
    finally:
        pool.shutdown()
        ray.kill(scorer)
