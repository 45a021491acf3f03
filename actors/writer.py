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
import pyarrow.compute as pc
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
               updates: Optional[dict[str, dict]] = None) -> pa.Table | list[dict]:
    """The output rows of one shard: selected, updated by the slow validators (scores,
    embedding, relabel), split, transformed.

    With nothing to update or transform (the common case) the rows never leave Arrow: the
    selected ids are filtered out of each table and the split column is set, so the image bytes
    are not copied into Python objects and back.
    """
    updates = updates or {}
    transformer = ImageTransformer(output.resize, output.encode)
    ids_in_shard = [i for _, ids in parts for i in ids]
    if not transformer.active and not any(i in updates for i in ids_in_shard):
        return _select_arrow(parts, output)
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


def _select_arrow(parts: list[tuple[pa.Table, list[str]]], output: OutputSpec) -> pa.Table:
    """The selected rows of each table (each id once), with their splits assigned."""
    pieces = []
    for table, ids in parts:
        picked = table.filter(pc.is_in(table["id"], value_set=pa.array(ids, pa.string())))
        if picked.num_rows > len(set(ids)):
            first = {}
            for index, image_id in enumerate(picked["id"].to_pylist()):
                first.setdefault(image_id, index)
            picked = picked.take(sorted(first.values()))
        pieces.append(picked)
    table = pa.concat_tables(pieces) if pieces else pa.table({})
    if table.num_rows == 0:
        return table
    splits = pa.array([assign_split(i, output.splits) for i in table["id"].to_pylist()],
                      pa.string())
    return table.set_column(table.schema.get_field_index("split"), "split", splits)


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
