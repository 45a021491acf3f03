"""The best copy of a picture is kept, whichever arrives first, on both runners."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from builder.spec import parse_spec
from tests.e2e.helpers import accepted_urls, check_accounting, run_on


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_the_larger_copy_is_kept_though_the_smaller_arrived_first(runner, sandbox, tmp_path,
                                                                    request):
    """One unit holds a 90% re-encoded copy and, after it, the original: the dataset keeps the
    original and the copy's reject names it."""
    original = sandbox.class_image_urls("cat")[0]
    copy = sandbox.fault_urls()["near_duplicate"]
    urls = tmp_path / "urls.txt"
    urls.write_text(f"cat\t{copy}\ncat\t{original}\n")
    out = str(tmp_path / "ds")
    spec = parse_spec({"name": "bestcopy", "classes": {"cat": None}, "target": 5,
                       "sources": [{"engine": "urllist", "path": str(urls)}],
                       "download": {"timeout_s": 2.0, "allow_private_networks": True},
                       "output": {"uri": out}, "resources": {"batch_size": 8}})
    run_on(runner, spec, request)
    assert accepted_urls(out) == {original}
    rejects = pq.read_table(f"{out}/rejects.parquet").to_pylist()
    assert [(r["url"], r["reason"]) for r in rejects] == [(copy, "near_duplicate")]
    kept = pq.read_table(f"{out}/data", columns=["id"]).column("id").to_pylist()
    assert rejects[0]["duplicate_of"] == kept[0]
    check_accounting(out)
