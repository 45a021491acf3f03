"""The Ray Data stage that turns accepted Arrow batches into the dataset's shards.

The coordinator knows, for each shard, which validator tables (object refs) hold its images and
which ids to keep (``plan_shards``). Ray Data then maps one row per shard through
``write_shards``: fetch those tables, keep the selected rows, assign splits, resize/re-encode,
and write the shard through ``builder.writers.DatasetWriter``. No shuffle is needed, and each
shard task reads only its own images.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pyarrow as pa
import ray

from builder.spec import OutputSpec
from builder.splits import assign_split
from builder.transform import ImageTransformer
from builder.writers import DatasetWriter

ShardPlan = dict[int, list[tuple[Any, list[str]]]]


def plan_shards(selected: dict[int, list[str]], tables: dict[int, Any],
                shard_size: int, first: int = 0) -> ShardPlan:
    """Cut the selected ids, in batch order, into shards of ``shard_size`` rows numbered from
    ``first``."""
    plan: ShardPlan = {}
    shard, count = first, 0
    for batch in sorted(selected):
        ids = selected[batch]
        start = 0
        while start < len(ids):
            take = min(shard_size - count, len(ids) - start)
            plan.setdefault(shard, []).append((tables[batch], ids[start:start + take]))
            start += take
            count += take
            if count == shard_size:
                shard, count = shard + 1, 0
    return plan


def shard_rows(parts: list[tuple[pa.Table, list[str]]], output: OutputSpec,
               updates: Optional[dict[str, dict]] = None) -> list[dict]:
    """The output rows of one shard: selected, updated by the slow validators (scores,
    embedding, relabel), split, transformed."""
    updates = updates or {}
    transformer = ImageTransformer(output.resize, output.encode)
    rows = []
    for table, ids in parts:
        keep = set(ids)
        for row in table.to_pylist():
            if row["id"] in keep:
                keep.discard(row["id"])
                row.update(updates.get(row["id"], {}))
                row["split"] = assign_split(row["id"], output.splits)
                if transformer.active:
                    transformer.apply_row(row)
                rows.append(row)
    return rows


def write_shards(batch: dict[str, np.ndarray], *, plan: ShardPlan, output: OutputSpec,
                 writer: DatasetWriter, updates: Optional[dict[str, dict]] = None) -> pa.Table:
    """Ray Data ``map_batches`` function: write the shards named in ``batch['shard']``."""
    manifest: list[dict] = []
    for shard in batch["shard"].tolist():
        parts = plan[int(shard)]
        tables = ray.get([ref for ref, _ in parts])
        rows = shard_rows([(t, ids) for t, (_, ids) in zip(tables, parts)], output, updates)
        manifest.extend(writer.write_shard(rows, int(shard)))
    return pa.Table.from_pylist(manifest)
