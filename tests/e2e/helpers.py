"""Specs and checks shared by the end-to-end tests."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from builder.pipeline import run_local
from builder.rights import RightsTally
from builder.spec import DatasetSpec, parse_spec


def run_on(runner: str, spec: DatasetSpec, request: Any) -> None:
    """Run ``spec`` to its end in this process (``local``) or on the session's Ray (``ray``),
    for the tests parametrized over both runners."""
    if runner == "local":
        run_local(spec)
        return
    request.getfixturevalue("ray_session")
    from cluster.coordinator import run_job_async

    asyncio.run(run_job_async(spec))


def sandbox_spec(sandbox, out: str, *, target: int = 10, classes=("cat", "dog", "bird"),
                 **overrides: Any) -> DatasetSpec:
    data: dict[str, Any] = {
        "name": "e2e",
        "target": target,
        "classes": {c: [f"{c} photo"] for c in classes},
        "sources": [{"engine": "sandbox", "url": sandbox.base_url, "per_page": 12}],
        "download": {"timeout_s": 1.0, "retries": 1, "backoff_s": 0.05,
                     "max_bytes": 1_000_000, "allow_private_networks": True},
        "output": {"uri": out, "shard_size": 8, "formats": ["parquet", "imagefolder",
                                                            "webdataset"]},
        "resources": {"batch_size": 16},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_spec(data)


def fault_list_spec(sandbox, tmp: Path, out: str, **overrides: Any) -> DatasetSpec:
    """A URL-list job over one instance of every sandbox fault (plus the duplicates' original)."""
    urls = [sandbox.class_image_urls(sandbox.classes[0])[0]]
    urls += list(sandbox.fault_urls().values())
    path = tmp / "faults.txt"
    path.write_text("".join(f"cat\t{u}\n" for u in urls))
    data: dict[str, Any] = {
        "name": "faults",
        "target": 1000,
        "classes": {"cat": None},
        "sources": [{"engine": "urllist", "path": str(path)}],
        "download": {"timeout_s": 1.0, "retries": 1, "backoff_s": 0.05,
                     "max_bytes": 1_000_000, "allow_private_networks": True},
        "output": {"uri": out},
        "resources": {"batch_size": 8},
    }
    data.update(overrides)
    return parse_spec(data)


def check_accounting(out: str) -> dict[str, Any]:
    """accepted + rejected == candidates, in stats.json and in the files; returns stats."""
    root = Path(out)
    stats = json.loads((root / "stats.json").read_text())
    assert stats["accepted"] + stats["rejected"] == stats["candidates"]
    rejects = pq.read_table(root / "rejects.parquet")
    assert rejects.num_rows == stats["rejected"]
    shards = sorted((root / "data").glob("*.parquet"))
    rows = sum(pq.read_metadata(p).num_rows for p in shards)
    assert rows == stats["accepted"]
    if (root / "labels.json").exists():  # one manifest row per image (a merge listed some twice)
        ids = [entry["id"] for entry in json.loads((root / "labels.json").read_text())]
        assert len(ids) == len(set(ids)) == stats["accepted"]
    for label, c in stats["classes"].items():
        assert c["accepted"] + c["rejected"] == c["candidates"], label
        assert sum(c["rejected_by_reason"].values()) == c["rejected"]
    by_reason = Counter(rejects.column("reason").to_pylist())
    assert dict(by_reason) == stats["rejected_by_reason"]
    check_rights(stats, shards, rejects)
    return stats


def check_rights(stats: dict[str, Any], shards: list[Path], rejects: pa.Table) -> None:
    """The rights summary is the sum of the ledgers the dataset's rows hold (images' and
    rejects'): one record per candidate."""
    tally = RightsTally()
    for path in shards:
        tally.add_column(pq.read_table(path, columns=["rights"])["rights"])
    tally.add_column(rejects["rights"])
    summary = {k: v for k, v in tally.summary().items() if k != "honoured"}
    assert summary == {k: v for k, v in stats["rights"].items() if k != "honoured"}
    assert summary["records"] == stats["candidates"]


def reasons_by_url(out: str) -> dict[str, str]:
    t = pq.read_table(Path(out) / "rejects.parquet", columns=["url", "reason"]).to_pylist()
    return {r["url"]: r["reason"] for r in t}


def accepted_urls(out: str) -> set[str]:
    urls: set[str] = set()
    for p in (Path(out) / "data").glob("*.parquet"):
        urls.update(pq.read_table(p, columns=["url"]).column("url").to_pylist())
    return urls


class KillWatch:
    """A runner hook for a test that kills worker ``victim`` mid-job: it keeps the runner, and
    records for each unit that reported the worker it ran on and whether it was sent after
    the kill (``killed``, set by the test).

    Units sent to the other workers after the kill wait (up to ``BACK_WAIT_S``) until the
    victim's replacement has started (or has run a unit), so that some unit is left for it
    however slowly the machine starts a process: on a loaded machine the survivors could
    finish the job first, and the test could not see the replacement take part."""

    BACK_WAIT_S = 60.0

    def __init__(self, victim: int = 1) -> None:
        self.victim = victim
        self.runner: Any = None
        self.killed = False
        self.ran: list[tuple[int, bool]] = []
        self.back = asyncio.Event()

    def __call__(self, runner: Any) -> None:
        self.runner = runner
        executor = runner.executor
        original_run, original_revive = executor.run, executor.revive

        async def run(worker: int, unit: Any) -> Any:
            sent_after_kill = self.killed
            if sent_after_kill and worker != self.victim:
                try:
                    await asyncio.wait_for(self.back.wait(), self.BACK_WAIT_S)
                except asyncio.TimeoutError:  # the test's assertion says it never came back
                    self.back.set()  # and the units after this one wait no more
            report = await original_run(worker, unit)
            self.ran.append((worker, sent_after_kill))
            if sent_after_kill and worker == self.victim:
                self.back.set()  # however it came back
            return report

        async def revive(worker: int) -> bool:
            started = await original_revive(worker)
            if started and worker == self.victim and self.killed:
                self.back.set()
            return started

        executor.run, executor.revive = run, revive

    async def until_accepted(self, job: asyncio.Future, n: int) -> None:
        """Wait until the job has accepted ``n`` images (failing if it ends first)."""
        while self.runner is None or self.runner.counts.accepted < n:
            assert not job.done(), job.exception()
            await asyncio.sleep(0.02)
