"""The shard plan and the shard rows of the Ray Data write stage (no Ray needed)."""

from __future__ import annotations

import io

import pyarrow as pa
import pytest
from PIL import Image

from actors.writer import plan_shards, shard_rows
from builder.records import ACCEPTED_SCHEMA
from builder.spec import OutputSpec
from builder.splits import assign_split
from builder.writers import to_accepted_table
from tests.builder.test_writers import make_rows


def tables() -> tuple[pa.Table, pa.Table]:
    rows = make_rows()
    return (pa.Table.from_pylist(rows[:7], schema=ACCEPTED_SCHEMA),
            pa.Table.from_pylist(rows[7:], schema=ACCEPTED_SCHEMA))


def ids(table: pa.Table) -> list[str]:
    return table["id"].to_pylist()


def test_plan_shards_cuts_in_batch_order():
    selected = {1: ["c", "d", "e"], 0: ["a", "b"]}
    plan = plan_shards(selected, {0: "t0", 1: "t1"}, shard_size=2, first=5)
    assert plan == {5: [("t0", ["a", "b"])], 6: [("t1", ["c", "d"])], 7: [("t1", ["e"])]}


def test_arrow_path_selects_each_id_once_with_splits():
    a, b = tables()
    keep_a, keep_b = ids(a)[1:5], ids(b)[:2]
    doubled = pa.concat_tables([a, a.slice(1, 1)])
    output = OutputSpec(formats=["parquet"])
    out = shard_rows([(doubled, keep_a), (b, keep_b)], output)
    assert isinstance(out, pa.Table)
    assert ids(out) == keep_a + keep_b
    assert out["split"].to_pylist() == [assign_split(i, output.splits) for i in ids(out)]
    assert out["image"].to_pylist() == [r["image"] for r in
                                        a.to_pylist()[1:5] + b.to_pylist()[:2]]


def test_arrow_and_row_paths_write_the_same_rows():
    a, b = tables()
    parts = [(a, ids(a)[::2]), (b, ids(b)[1:])]
    output = OutputSpec(formats=["parquet"])
    fast = to_accepted_table(shard_rows(parts, output))
    unrelated = {"not-in-this-shard": {"nsfw_score": 0.5}}
    assert isinstance(shard_rows(parts, output, unrelated), pa.Table)
    first = ids(a)[0]
    slow_rows = shard_rows(parts, output, {first: {"nsfw_score": 0.25}})
    assert isinstance(slow_rows, list)
    slow = to_accepted_table(slow_rows)
    assert slow["nsfw_score"].to_pylist()[0] == pytest.approx(0.25)
    for name in ACCEPTED_SCHEMA.names:
        if name != "nsfw_score":
            assert fast[name].to_pylist() == slow[name].to_pylist(), name


def test_resize_takes_the_row_path():
    a, _ = tables()
    output = OutputSpec(formats=["parquet"], resize={"max_side": 8})
    rows = shard_rows([(a, ids(a)[:2])], output)
    assert isinstance(rows, list) and len(rows) == 2
    assert all(max(r["width"], r["height"]) <= 8 for r in rows)


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def test_resize_of_unusual_or_unwritable_images_keeps_every_row():
    """The Ray write path resizes after acceptance: a 16-bit PNG is converted and resized, and
    an image Pillow cannot rewrite keeps its original bytes; no row is lost and nothing
    raises (accepted + rejected == candidates)."""
    rows = make_rows()[:3]
    rows[0]["image"] = _png(Image.new("I;16", (40, 30), 30000))
    rows[0]["format"], rows[0]["width"], rows[0]["height"] = "png", 40, 30
    garbage = b"\x89PNG\r\n\x1a\n" + b"\0" * 40
    rows[1]["image"], rows[1]["format"] = garbage, "png"
    table = pa.Table.from_pylist(rows, schema=ACCEPTED_SCHEMA)
    output = OutputSpec(formats=["parquet"], resize={"max_side": 8})
    out = shard_rows([(table, ids(table))], output)
    assert isinstance(out, list) and [r["id"] for r in out] == ids(table)
    assert max(out[0]["width"], out[0]["height"]) == 8
    assert Image.open(io.BytesIO(out[0]["image"])).mode == "L"
    assert out[1]["image"] == garbage and out[1]["bytes"] == len(garbage)
    assert (out[1]["width"], out[1]["height"]) == (rows[1]["width"], rows[1]["height"])
    assert max(out[2]["width"], out[2]["height"]) <= 8
