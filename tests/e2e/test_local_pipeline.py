"""The whole job in one process (no Ray) against the sandbox web: faults, accounting, outputs."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from builder.pipeline import run_local
from builder.spec import parse_spec
from builder.sandbox import FAULTS
from builder.writers import is_complete
from tests.conftest import make_bucket
from tests.e2e.helpers import (KillWatch, accepted_urls, check_accounting, fault_list_spec,
                               reasons_by_url, sandbox_spec)


@pytest.fixture(scope="module")
def fault_run(sandbox, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    out = str(tmp / "out")
    result = run_local(fault_list_spec(sandbox, tmp, out))
    return sandbox, out, result


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_fault_lands_with_its_reason(fault_run, fault):
    sandbox, out, _ = fault_run
    url = sandbox.fault_urls()[fault]
    expected = FAULTS[fault]
    if expected == "accepted":
        assert url in accepted_urls(out)
    else:
        assert reasons_by_url(out).get(url) == expected


def test_fault_run_accounting(fault_run):
    _, out, result = fault_run
    stats = check_accounting(out)
    assert stats["candidates"] == len(FAULTS) + 1 and not result.partial
    rejects = pq.read_table(Path(out) / "rejects.parquet").to_pylist()
    dup = [r for r in rejects if r["reason"] == "exact_duplicate"][0]
    assert dup["duplicate_of"] and dup["stage"] == "dedup"


def test_ssrf_guard_blocks_the_sandbox_by_default(sandbox, tmp_path):
    spec = fault_list_spec(sandbox, tmp_path, str(tmp_path / "out"),
                           download={"allow_private_networks": False})
    run_local(spec)
    reasons = set(reasons_by_url(str(tmp_path / "out")).values())
    assert reasons <= {"blocked_address", "unsupported_scheme"} and "blocked_address" in reasons


def test_workers_started_for_another_count_are_refused_and_closed(sandbox, tmp_path):
    """``started`` must be what ``local_workers`` says the job runs; anything else is the
    caller's mistake: refused before any download, its processes closed."""
    from builder.worker_start import StartedWorkers, local_workers

    out = tmp_path / "ds"
    spec = sandbox_spec(sandbox, str(out), target=8, resources={"workers": 2})
    assert local_workers(spec) == 2
    started = StartedWorkers(1)
    with pytest.raises(ValueError, match="started 1 worker processes for a job that runs 2"):
        run_local(spec, started=started)
    assert all(p.poll() is not None for p in started.procs)
    assert not Path(started.dir).exists() and not out.exists()


def test_multi_class_job_reaches_targets_and_outputs_read_back(sandbox, tmp_path):
    out = str(tmp_path / "ds")
    result = run_local(sandbox_spec(sandbox, out, target=8))
    stats = check_accounting(out)
    assert all(c["accepted"] == 8 and c["shortfall"] == 0 for c in stats["classes"].values())
    assert is_complete(out) and result.uri.endswith("ds")
    root = Path(out)
    table = pq.read_table(root / "data")
    assert table.num_rows == 24
    assert set(table.column("label_name").to_pylist()) == {"cat", "dog", "bird"}
    assert len(set(table.column("id").to_pylist())) == 24
    df = pd.read_parquet(root / "data")
    for row in df.head(5).itertuples():
        Image.open(io.BytesIO(row.image["bytes"])).load()
        assert row.split in ("train", "validation", "test") and row.engine == "sandbox"
    files = list((root / "imagefolder").rglob("*.*"))
    assert len(files) == 24 and {f.parent.name for f in files} == {"cat", "dog", "bird"}
    tars = list((root / "webdataset").glob("*.tar"))
    members = [m for t in tars for m in tarfile.open(t).getnames()]
    assert sum(m.endswith(".json") for m in members) == 24
    assert len(json.loads((root / "labels.json").read_text())) == 24
    assert len(list(csv.DictReader((root / "labels.csv").open()))) == 24
    assert len(yaml.safe_load((root / "labels.yaml").read_text())) == 24
    assert len((root / "labels.txt").read_text().splitlines()) == 24
    assert "cat" in (root / "README.md").read_text()


def test_sources_run_dry_reports_shortfall(sandbox, tmp_path):
    out = str(tmp_path / "dry")
    spec = sandbox_spec(sandbox, out, target=200, classes=("bird",))
    run_local(spec)
    stats = check_accounting(out)
    bird = stats["classes"]["bird"]
    assert 0 < bird["accepted"] < 200 and bird["shortfall"] == 200 - bird["accepted"]
    assert stats["shortfall"] == {"bird": bird["shortfall"]}


def test_credentials_in_the_spec_stay_out_of_the_published_dataset(sandbox, tmp_path):
    """A proxy's or endpoint's password, or a key in its query, was published as written in
    spec.yaml and the card: in the folder a user shares or uploads."""
    out = str(tmp_path / "ds")
    spec = sandbox_spec(sandbox, out, target=2, classes=("cat",),
                        search={"llm_base_url": "https://u:llmpass@llm.example/v1?key=k3y"})
    run_local(spec)
    assert check_accounting(out)["accepted"] == 2
    for name in ("spec.yaml", "README.md"):
        text = (Path(out) / name).read_text()
        assert "llmpass" not in text and "k3y" not in text, name
        assert "https://***@llm.example/v1?key=***" in text, name


def test_existing_dataset_is_not_overwritten(sandbox, tmp_path):
    from builder.errors import OutputExistsError

    out = str(tmp_path / "ds")
    run_local(sandbox_spec(sandbox, out, target=2))
    with pytest.raises(OutputExistsError):
        run_local(sandbox_spec(sandbox, out, target=2))
    run_local(sandbox_spec(sandbox, out, target=3, output={"overwrite": True}))
    assert check_accounting(out)["accepted"] == 9


def test_cancel_leaves_partial_not_complete(sandbox, tmp_path):
    import asyncio

    from builder.pipeline import run_local_async

    out = str(tmp_path / "ds")
    holder = {}

    async def main():
        task = asyncio.ensure_future(run_local_async(
            sandbox_spec(sandbox, out, target=25), runner_hook=lambda r: holder.setdefault("r", r)))
        while "r" not in holder or holder["r"].counts.accepted < 3:
            await asyncio.sleep(0.05)
        holder["r"].cancel()
        return await task

    result = asyncio.run(main())
    assert result.partial and not is_complete(out)
    assert (Path(out) / "_PARTIAL").exists()
    stats = check_accounting(out)
    assert stats["partial"] is True and stats["accepted"] < 75


def test_s3_output_through_moto(sandbox, moto_s3, tmp_path):
    import s3fs

    make_bucket(moto_s3, "local-ds")
    out = "s3://local-ds/pets/v1"
    run_local(sandbox_spec(sandbox, out, target=3), storage_options={"endpoint_url": moto_s3})
    assert is_complete(out, {"endpoint_url": moto_s3})
    fs = s3fs.S3FileSystem(endpoint_url=moto_s3)
    stats = json.loads(fs.cat(f"{out}/stats.json"))
    assert stats["accepted"] == 9
    shards = fs.glob(f"{out}/data/*.parquet")
    assert sum(pq.read_metadata(fs.open(p)).num_rows for p in shards) == 9


def test_resize_and_reencode_keep_original_size(sandbox, tmp_path):
    out = str(tmp_path / "ds")
    run_local(sandbox_spec(sandbox, out, target=3, output={
        "resize": {"max_side": 64, "mode": "center_crop"}, "encode": {"format": "webp"}}))
    t = pq.read_table(Path(out) / "data").to_pylist()
    assert all(r["width"] == r["height"] == 64 and r["format"] == "webp" for r in t)
    assert all(r["orig_width"] > 64 for r in t)


def test_over_target_images_are_released_so_a_later_copy_is_kept(sandbox, tmp_path):
    """A valid image rejected over_target leaves the index: a later candidate with the same
    bytes (for a class with room) is accepted, not an exact_duplicate of an image that is
    not in the dataset."""
    cat = sandbox.class_image_urls("cat")
    copy = sandbox.fault_urls()["exact_duplicate"]
    original = sandbox.class_image_urls("cat")[0]
    urls = tmp_path / "urls.parquet"
    # unit 1: two cats for a class that wants one; unit 2: a copy of the second cat as a dog
    pq.write_table(pa.table({"label": ["cat", "cat", "dog"],
                             "url": [cat[1], original, copy]}), urls)
    spec = parse_spec({"name": "release", "classes": {"cat": {"target": 1}, "dog": None},
                       "target": 5, "sources": [{"engine": "urllist", "path": str(urls)}],
                       "download": {"timeout_s": 1.0, "allow_private_networks": True},
                       "output": {"uri": str(tmp_path / "ds")},
                       "resources": {"batch_size": 2, "max_in_flight_batches": 1, "workers": 1}})
    run_local(spec)
    reasons = reasons_by_url(str(tmp_path / "ds"))
    assert reasons[original] == "over_target"
    assert copy in accepted_urls(str(tmp_path / "ds"))
    check_accounting(str(tmp_path / "ds"))


def test_a_url_named_twice_for_one_class_in_one_unit_is_one_image(sandbox, tmp_path):
    """Both candidates had the same claim, which the index answers as the candidate's own:
    both were fetched and accepted, and the dataset held the same image twice. The second
    is now a duplicate_url, as it is when the two are in different units."""
    cat = sandbox.class_image_urls("cat")
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"label": ["cat"] * 4, "url": [cat[0], cat[1], cat[0], cat[2]]}),
                   urls)
    out = str(tmp_path / "ds")
    run_local(parse_spec({"name": "twice", "target": 10, "classes": {"cat": None},
                          "sources": [{"engine": "urllist", "path": str(urls)}],
                          "download": {"timeout_s": 1.0, "allow_private_networks": True},
                          "output": {"uri": out}}))
    stats = check_accounting(out)
    assert (stats["accepted"], stats["rejected_by_reason"]) == (3, {"duplicate_url": 1})
    assert sorted(accepted_urls(out)) == sorted(cat[:3])


def test_a_relabelled_image_is_counted_once_under_its_new_class(sandbox, tmp_path, monkeypatch):
    """wrong_class: relabel moves an image to another class: its candidate is counted there,
    so accepted + rejected == candidates holds per class."""
    import dataclasses

    import builder.slow as slow

    class CatsAreDogs:
        def __call__(self, records):
            for r in records:
                if not r.rejected and r.label == "cat":
                    r.relabelled_from = "cat"
                    r.candidate = dataclasses.replace(r.candidate, label="dog")
            return records

    monkeypatch.setattr(slow, "check_slow_requirements", lambda spec: None)
    monkeypatch.setattr(slow, "make_slow_validator", lambda spec, device: CatsAreDogs())
    out = str(tmp_path / "ds")
    result = run_local(sandbox_spec(sandbox, out, target=4, classes=("cat", "dog"),
                                    validation={"level": "slow"}))
    stats = check_accounting(out)
    assert stats["classes"]["cat"]["accepted"] == 0
    assert stats["classes"]["dog"]["accepted"] == 4
    moved = sum(r["images"] for r in stats["relabelled"] if (r["from"], r["to"]) == ("cat",
                                                                                        "dog"))
    assert moved > 0 and result.stats["relabelled"] == stats["relabelled"]


def test_progress_counts_fetched_images_before_their_unit_ends(sandbox, tmp_path):
    """With a gap between requests to the host a unit takes seconds; its fetched candidates
    show in the progress (``in_flight``) while it runs, before any is accepted."""
    spec = sandbox_spec(sandbox, str(tmp_path / "out"), target=4, classes=("cat",),
                        download={"per_host_delay_s": 0.15})
    snaps: list[dict] = []
    run_local(spec, progress=snaps.append)
    early = [s["in_flight"] for s in snaps if s["accepted"] == 0]
    assert early and max(early) >= 2, [(s["accepted"], s["in_flight"]) for s in snaps]
    assert snaps[-1]["accepted"] == 4 and snaps[-1]["in_flight"] == 0


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "fresh-interpreters"])
def test_a_killed_worker_process_loses_nothing_and_doubles_nothing(sandbox, tmp_path,
                                                                   monkeypatch, fork):
    """The in-process runner's workers are processes: one SIGKILLed mid-job is a lost worker,
    its units go to the other, a fresh process takes its place and is sent units, and the
    dataset is the same as an uninterrupted run's over the same URL list. Worker 1 is forked
    by worker 0 on Linux, a fresh interpreter elsewhere."""
    import asyncio
    import os
    import signal

    import builder.worker_start as worker_start
    from builder.pipeline import run_local_async

    monkeypatch.setattr(worker_start, "FORK_WORKERS", fork)

    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"{label}\t{u}\n" for label in ("cat", "dog", "bird")
                            for u in sandbox.class_image_urls(label)))

    def spec(out: str):
        return sandbox_spec(sandbox, out, target=1000,
                            sources=[{"engine": "urllist", "path": str(urls)}],
                            download={"per_host_delay_s": 0.04},
                            resources={"batch_size": 8, "workers": 2,
                                       "max_in_flight_batches": 1})

    whole = str(tmp_path / "whole")
    run_local(spec(whole))
    out = str(tmp_path / "ds")
    watch = KillWatch()

    async def main():
        task = asyncio.ensure_future(run_local_async(spec(out), runner_hook=watch))
        await watch.until_accepted(task, 8)
        proc = watch.runner.executor.procs[1]
        assert isinstance(proc, worker_start.ForkedWorker) == fork
        os.kill(proc.pid, signal.SIGKILL)
        watch.killed = True
        return await task

    result = asyncio.run(main())
    assert watch.killed and not result.partial and is_complete(out)
    assert (1, True) in watch.ran, "no process took the killed worker's place"
    stats, reference = check_accounting(out), check_accounting(whole)
    assert stats["resent_units"] > 0
    for key in ("candidates", "accepted", "rejected", "rejected_by_reason"):
        assert stats[key] == reference[key], key
    ids = pq.read_table(Path(out) / "data", columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == stats["accepted"]
    assert sorted(ids) == sorted(pq.read_table(Path(whole) / "data", columns=["id"])["id"]
                                 .to_pylist())
    labels = json.loads((Path(out) / "labels.json").read_text())
    assert all((Path(out) / e["path"]).exists() for e in labels)
    assert all(p.poll() is not None for p in watch.runner.executor.procs)  # none left


KILLER = '''
import os

import builder.validate as _validate

_call = _validate.ImageValidator.__call__


def _call_or_die(self, records):
    """As a decoder's segfault would: the process validating these images dies."""
    if any(r.candidate.url in {urls!r} for r in records):
        os._exit(70)
    return _call(self, records)


_validate.ImageValidator.__call__ = _call_or_die
'''


def _killer_job(sandbox, tmp_path, monkeypatch, hook: str, **spec_extra) -> tuple[str, str]:
    """A --local URL-list job over the sandbox's cat and dog images, run once as it is
    (``whole``) and once with ``hook`` as the ``sitecustomize`` of every process it starts
    (``out``); the second must complete, with at least 2 units resent isolated."""
    urls = tmp_path / "urls.txt"
    lines = [f"{label}\t{u}" for label in ("cat", "dog") for u in sandbox.class_image_urls(label)]
    urls.write_text("\n".join(lines) + "\n")

    def spec(out: str):
        return sandbox_spec(sandbox, out, target=1000, classes=("cat", "dog"),
                            sources=[{"engine": "urllist", "path": str(urls)}],
                            download={"per_host_delay_s": 0.01},
                            resources={"batch_size": 8, "workers": 2,
                                       "max_in_flight_batches": 1}, **spec_extra)

    whole = str(tmp_path / "whole")
    run_local(spec(whole))
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(hook)
    monkeypatch.setenv("PYTHONPATH", str(hooks))
    out = str(tmp_path / "ds")
    result = run_local(spec(out))
    assert not result.partial and is_complete(out)
    assert check_accounting(out)["isolated_units"] >= 2
    return out, whole


def test_images_that_kill_their_worker_are_rejected_and_the_job_completes(
        sandbox, tmp_path, monkeypatch):
    """An image whose decoding kills the process (a decoder's segfault, the OOM killer) took
    its worker with it each time its unit was sent, until the job stopped (or, once every
    worker was gone, after 2 minutes); ``--resume`` met it again. Now the unit that was
    running is resent isolated: its images are validated in a process of their own, and the
    one that kills it is rejected, the rest decided as before. A fresh process takes the lost
    worker's place, so two such images (more than one per worker) cost no worker. The fault is
    put in every process the job starts (the workers and their validating processes) by a
    ``sitecustomize`` on their PYTHONPATH."""
    killers = {sandbox.class_image_urls("cat")[4], sandbox.class_image_urls("dog")[4]}
    out, whole = _killer_job(sandbox, tmp_path, monkeypatch, KILLER.format(urls=killers))
    stats, reference = check_accounting(out), check_accounting(whole)
    assert killers <= accepted_urls(whole)
    reasons = reasons_by_url(out)
    assert {reasons[u] for u in killers} == {"validator_crashed"}
    assert stats["candidates"] == reference["candidates"]
    assert stats["accepted"] == reference["accepted"] - 2
    assert accepted_urls(out) == accepted_urls(whole) - killers
    ids = pq.read_table(Path(out) / "data", columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == stats["accepted"]


TRANSFORM_KILLER = '''
import os

import builder.transform as _transform

_apply = _transform.ImageTransformer.apply


def _apply_or_die(self, record):
    """As a crash in a full-size decode would: the process resizing this image dies."""
    if record.candidate.url in {urls!r}:
        os._exit(70)
    return _apply(self, record)


_transform.ImageTransformer.apply = _apply_or_die
'''


def test_images_whose_resize_kills_their_worker_are_kept_as_they_came(
        sandbox, tmp_path, monkeypatch):
    """An image validation passes (its 1/8 decode) but whose full-size decode for a resize
    kills the process: its isolated unit was resized in the worker again, which died again,
    until the job stopped. Now an isolated unit is resized in its validator's process, and
    the image that kills it keeps its bytes as they came (accepted and counted already, as
    when Pillow cannot resize one); every other image is as in an uninterrupted run."""
    killers = {sandbox.class_image_urls("cat")[3], sandbox.class_image_urls("dog")[5]}
    out, whole = _killer_job(sandbox, tmp_path, monkeypatch,
                             TRANSFORM_KILLER.format(urls=killers),
                             output={"resize": {"max_side": 24}})
    stats, reference = check_accounting(out), check_accounting(whole)
    for key in ("candidates", "accepted", "rejected", "rejected_by_reason"):
        assert stats[key] == reference[key], key
    assert killers <= accepted_urls(out) == accepted_urls(whole)
    sides = {r["url"]: max(r["width"], r["height"]) for p in (Path(out) / "data").glob("*.parquet")
             for r in pq.read_table(p, columns=["url", "width", "height"]).to_pylist()}
    assert all(sides[u] > 24 for u in killers)
    assert all(side <= 24 for u, side in sides.items() if u not in killers)
