"""Downloader: an async actor running many concurrent fetches (builder.fetch.Fetcher)."""

from __future__ import annotations

import time

import ray

from builder.fetch import Fetcher
from builder.records import Record
from builder.spec import DownloadSpec


@ray.remote
class Downloader:
    """One aiohttp session per actor; each ``fetch`` call is a batch, many run at once."""

    def __init__(self, cfg: DownloadSpec, job_id: str = ""):
        self.cfg = cfg
        self.job_id = job_id
        self._fetcher: Fetcher | None = None
        self._latency = None

    async def _get(self) -> Fetcher:
        if self._fetcher is None:
            self._fetcher = Fetcher(self.cfg)
            await self._fetcher.__aenter__()
            from actors.metrics import stage_latency

            self._latency = stage_latency()
        return self._fetcher

    async def fetch(self, records: list[Record]) -> list[Record]:
        fetcher = await self._get()
        t0 = time.perf_counter()
        out = await fetcher.fetch_many(records)
        if self._latency is not None:
            self._latency.observe(time.perf_counter() - t0, tags={"stage": "fetch",
                                                                  "job": self.job_id})
        return out

    async def stats(self) -> dict:
        return dict(self._fetcher.stats) if self._fetcher else {}

    async def close(self) -> None:
        if self._fetcher is not None:
            await self._fetcher.close()
            self._fetcher = None
