"""Both runners take ``resources.max_held_mb``: a job at 0 (only a worker's oldest unit may
start a download while any image is held) still decides every candidate, and stats.json says
what the workers held. How units wait for room is tested in ``tests/builder/test_held.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.spec import parse_spec
from tests.e2e.helpers import check_accounting, run_on


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_a_strict_held_budget_still_builds_the_whole_dataset(runner, sandbox, tmp_path, request):
    out = str(tmp_path / "ds")
    urls = sandbox.class_image_urls(sandbox.classes[0])[:24]
    spec = parse_spec({
        "name": "held", "target": 100, "classes": {"cat": {"urls": urls}},
        "download": {"timeout_s": 5.0, "allow_private_networks": True},
        "output": {"uri": out, "shard_size": 8},
        "resources": {"batch_size": 3, "max_held_mb": 0}})
    run_on(runner, spec, request)
    stats = check_accounting(out)
    assert stats["candidates"] == 24 and stats["accepted"] > 0
    fetch = json.loads(Path(out, "stats.json").read_text())["fetch"]
    assert fetch["held_bytes_peak"] > 0
