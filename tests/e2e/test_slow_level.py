"""validation.level: slow end to end: the real opennsfw model and a tiny CLIP saved in the test,
loaded through the same code users run, as actor pools on Ray (CPU here) and in-process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from builder.errors import ModelLoadError
from builder.pipeline import run_local
from tests.builder.models.conftest import tiny_clip_dir  # noqa: F401  (fixture)
from tests.e2e.helpers import check_accounting, sandbox_spec

pytestmark = pytest.mark.ml
pytest.importorskip("torch")
pytest.importorskip("onnxruntime")


def run_ray(spec):
    from cluster.coordinator import run_job_async

    return asyncio.run(run_job_async(spec))


def slow_spec(sandbox, out, clip_dir, **validation):
    return sandbox_spec(sandbox, out, target=4, classes=("cat", "dog"),
                        validation={"level": "slow", "clip_model": str(clip_dir), **validation})


def test_slow_level_on_ray_scores_and_keeps_embeddings(ray_session, sandbox, tmp_path,
                                                       tiny_clip_dir):  # noqa: F811
    out = str(tmp_path / "slow")
    result = run_ray(slow_spec(sandbox, out, tiny_clip_dir, nsfw_threshold=1.0,
                               clip_threshold=-1.0, wrong_class="ignore", keep_embedding=True,
                               embedding_dedup_threshold=1.0))  # settles with the scorers
    stats = check_accounting(out)
    assert all(c["accepted"] == 4 for c in stats["classes"].values())
    assert result.stats["pools"]["slow"] and result.stats["pools"]["gpus_per_actor"] == 0
    rows = pq.read_table(Path(out) / "data").to_pylist()
    assert all(0.0 <= r["nsfw_score"] < 1.0 for r in rows)
    assert all(r["clip_score"] is not None for r in rows)
    dims = {len(r["embedding"]) for r in rows}
    assert len(dims) == 1 and dims.pop() > 0


def test_semantic_threshold_rejects_on_ray(ray_session, sandbox, tmp_path,
                                           tiny_clip_dir):  # noqa: F811
    out = str(tmp_path / "semantic")
    run_ray(slow_spec(sandbox, out, tiny_clip_dir, nsfw=False, clip_threshold=1.0))
    stats = check_accounting(out)
    assert stats["accepted"] == 0
    assert set(stats["rejected_by_stage"]) >= {"semantic"}
    assert set(stats["rejected_by_reason"]) & {"off_topic", "wrong_class"}
    assert stats["shortfall"] == {"cat": 4, "dog": 4}


def test_nsfw_threshold_rejects_in_process(sandbox, tmp_path, tiny_clip_dir):  # noqa: F811
    out = str(tmp_path / "nsfw")
    run_local(slow_spec(sandbox, out, tiny_clip_dir, nsfw_threshold=0.0, clip=False))
    stats = check_accounting(out)
    assert stats["accepted"] == 0 and stats["rejected_by_reason"]["nsfw"] > 0
    assert stats["rejected_by_stage"]["nsfw"] == stats["rejected_by_reason"]["nsfw"]


def test_missing_model_fails_at_planning(sandbox, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = sandbox_spec(sandbox, str(tmp_path / "x"), target=1,
                        validation={"level": "slow", "clip_model": "no-such-org/no-such-clip"})
    with pytest.raises(ModelLoadError, match="locally"):
        run_local(spec)
    assert not (tmp_path / "x" / "_SUCCESS").exists()


def test_clip_in_process_keeps_only_the_dataset_s_images_in_its_embedding_store(
        sandbox, tmp_path, tiny_clip_dir):  # noqa: F811
    """The in-process runner scores from several threads: CLIP's first load raced there and
    failed the job. Its embedding store took every image the slow level kept, over-target
    ones included, so later images could be rejected as near duplicates of images the
    dataset does not hold; the unit's final decisions now take those out."""
    holder = {}
    out = str(tmp_path / "clip")
    run_local(slow_spec(sandbox, out, tiny_clip_dir, nsfw=False, clip_threshold=-1.0,
                        wrong_class="ignore", embedding_dedup_threshold=1.0),
              runner_hook=lambda r: holder.setdefault("runner", r))
    stats = check_accounting(out)
    assert stats["rejected_by_reason"].get("over_target")
    slow = holder["runner"].executor.runtime.services._slow
    accepted = set(pq.read_table(Path(out) / "data", columns=["id"])["id"].to_pylist())
    assert set(slow._kept.ids) == accepted


def test_two_scorers_on_ray_keep_no_pair_within_the_embedding_threshold(
        ray_session, sandbox, tmp_path, tiny_clip_dir):  # noqa: F811
    """Each scorer kept its own embedding store, so with two of them an image was kept next
    to a near duplicate that the other scorer had kept. The first scorer now holds the store
    for both: no two images of the dataset are within the threshold."""
    import numpy as np

    threshold = 0.9
    out = str(tmp_path / "two")
    spec = slow_spec(sandbox, out, tiny_clip_dir, nsfw=False, clip_threshold=-1.0,
                     wrong_class="ignore", keep_embedding=True,
                     embedding_dedup_threshold=threshold)
    spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={
        "gpu_actors": 2, "gpu_actor_cpus": 0.25, "batch_size": 4})})
    result = run_ray(spec)
    check_accounting(out)
    assert result.stats["pools"]["slow"]
    rows = pq.read_table(Path(out) / "data", columns=["id", "embedding"]).to_pylist()
    emb = np.array([r["embedding"] for r in rows], dtype=np.float32)
    cosines = emb @ emb.T - 2 * np.eye(len(rows))
    assert len(rows) > 1 and cosines.max() < threshold, cosines.max()
    rejects = pq.read_table(Path(out) / "rejects.parquet", columns=["detail"]).to_pylist()
    assert any(r["detail"].startswith("embedding cosine ") for r in rejects)
