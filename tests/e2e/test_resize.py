"""Both runners resize accepted images as ``output.resize`` says (the filter included), and
keep every candidate's account. How one image is resized is tested in
``tests/builder/test_validate_transform.py``."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from builder.spec import parse_spec
from tests.e2e.helpers import check_accounting, run_on


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_both_runners_resize_with_the_asked_filter(runner, sandbox, tmp_path, request):
    out = str(tmp_path / "ds")
    urls = sandbox.class_image_urls(sandbox.classes[0])[:12]
    spec = parse_spec({
        "name": "resized", "target": 100, "classes": {"cat": {"urls": urls}},
        "download": {"timeout_s": 5.0, "allow_private_networks": True},
        "output": {"uri": out, "formats": ["parquet"], "shard_size": 8,
                   "resize": {"max_side": 40, "resample": "box"},
                   "encode": {"format": "jpeg", "quality": 90}}})
    run_on(runner, spec, request)
    stats = check_accounting(out)
    assert stats["candidates"] == 12 and stats["accepted"] > 0
    rows = [r for p in sorted(Path(out, "data").glob("*.parquet")) for r in pq.read_table(
        p, columns=["image", "format", "width", "height", "orig_width", "orig_height"]
    ).to_pylist()]
    assert len(rows) == stats["accepted"]
    for r in rows:
        img = Image.open(io.BytesIO(r["image"]["bytes"]))
        assert (img.format, r["format"]) == ("JPEG", "jpeg")
        assert img.size == (r["width"], r["height"])
        assert max(img.size) == 40 < max(r["orig_width"], r["orig_height"])
