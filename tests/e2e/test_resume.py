"""Resume after SIGKILL, resume of a cancelled (partial) dataset, and retry-failed."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from builder.pipeline import run_local, run_local_async
from builder.rights import RightsTally
from builder.sandbox import SandboxWeb
from builder.spec import parse_spec
from builder.writers import is_complete
from tests.conftest import make_bucket
from tests.e2e.helpers import check_accounting, reasons_by_url, sandbox_spec

BIN = Path(sys.executable).parent


def list_spec(sandbox, tmp: Path, out: str, labels: tuple[str, ...] = ("cat", "dog", "bird"),
              **extra) -> dict:
    urls = tmp / "urls.txt"
    urls.write_text("".join(f"{label}\t{u}\n" for label in labels
                            for u in sandbox.search_urls(label)))
    data = {"name": "resume", "target": 1000, "classes": {label: None for label in labels},
            "sources": [{"engine": "urllist", "path": str(urls), "per_page": 8}],
            "download": {"timeout_s": 1.0, "retries": 1, "backoff_s": 0.05,
                         "allow_private_networks": True, "max_bytes": 1_000_000},
            "output": {"uri": out, "shard_size": 4, "formats": ["parquet", "imagefolder"]},
            "resources": {"batch_size": 8, "max_in_flight_batches": 1}}
    data.update(extra)
    return data


def accepted_ids(out: str) -> list[str]:
    return pq.read_table(Path(out) / "data", columns=["id"]).column("id").to_pylist()


def test_sigkilled_job_resumes_to_the_same_dataset(ray_session, sandbox, tmp_path):
    ref_out = str(tmp_path / "reference")
    run_local(parse_spec(list_spec(sandbox, tmp_path, ref_out)))
    reference = accepted_ids(ref_out)
    ref_stats = check_accounting(ref_out)

    out = str(tmp_path / "killed")
    data = list_spec(sandbox, tmp_path, out)
    data["download"]["per_host_delay_s"] = 0.03
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    journal = Path(out) / "_journal" / "killme"
    _killed_build(spec_path, ["--local", "--job-id", "killme"],
                  lambda: len(list(journal.glob("units/*.parquet"))) >= 2)
    assert not is_complete(out) and journal.exists()

    from cluster.coordinator import run_job_async

    spec = parse_spec(data)
    result = asyncio.run(run_job_async(spec, resume=True))
    assert result.job_id == "killme" and result.stats["resumed"]
    assert is_complete(out) and not journal.exists()
    got = accepted_ids(out)
    assert len(got) == len(set(got)), "an image was written twice"
    assert sorted(got) == sorted(reference)
    stats = check_accounting(out)
    assert stats["candidates"] == ref_stats["candidates"]
    assert stats["rejected_by_reason"] == ref_stats["rejected_by_reason"]
    assert len(list((Path(out) / "imagefolder").rglob("*.*"))) == len(reference)


def test_resume_without_anything_to_resume_is_a_clear_error(sandbox, tmp_path):
    from builder.journal import ResumeError

    with pytest.raises(ResumeError, match="nothing to resume"):
        run_local(parse_spec(list_spec(sandbox, tmp_path, str(tmp_path / "none"))), resume=True)


def test_resume_refuses_a_changed_spec(sandbox, tmp_path):
    from builder.journal import Journal, ResumeError

    out = str(tmp_path / "o")
    Journal(out, "j1").start(parse_spec(list_spec(sandbox, tmp_path, out)))
    changed = parse_spec(list_spec(sandbox, tmp_path, out, target=5))
    with pytest.raises(ResumeError, match="spec differs"):
        run_local(changed, resume=True)


def test_cancelled_partial_dataset_is_continued(sandbox, tmp_path):
    out = str(tmp_path / "partial")
    data = list_spec(sandbox, tmp_path, out, target=6)
    data["download"]["per_host_delay_s"] = 0.05
    holder = {}

    async def cancel_early():
        task = asyncio.ensure_future(run_local_async(
            parse_spec(data), runner_hook=lambda r: holder.setdefault("r", r)))
        while "r" not in holder or holder["r"].counts.accepted < 4:
            await asyncio.sleep(0.02)
        holder["r"].cancel()
        return await task

    first = asyncio.run(cancel_early())
    assert first.partial and (Path(out) / "_PARTIAL").exists()
    before = set(accepted_ids(out))
    result = run_local(parse_spec(data), resume=True)
    assert is_complete(out) and not (Path(out) / "_PARTIAL").exists()
    ids = accepted_ids(out)
    assert len(ids) == len(set(ids)) == 18 and before <= set(ids)
    stats = check_accounting(out)
    assert all(c["accepted"] == 6 for c in stats["classes"].values())
    assert result.stats["candidates"] == stats["candidates"]


def test_retry_failed_turns_flaky_500s_into_images(tmp_path):
    from cluster.cli import main

    with SandboxWeb(classes=("cat", "dog"), images_per_class=24, fault_every=2, slow_s=2.0) as web:
        flaky = [u for label in ("cat", "dog") for u in web.search_urls(label)
                 if web.outcome_of(u) == "accepted" and "/flaky_500/" in u]
        assert flaky, "the sandbox should list flaky URLs"
        urls = tmp_path / "urls.txt"
        urls.write_text("".join(f"{label}\t{u}\n" for label in ("cat", "dog")
                                for u in web.search_urls(label)))
        out = str(tmp_path / "ds")
        spec = parse_spec({"name": "retry", "target": 1000, "classes": {"cat": None, "dog": None},
                           "sources": [{"engine": "urllist", "path": str(urls)}],
                           "download": {"timeout_s": 1.0, "retries": 0,
                                        "allow_private_networks": True},
                           "output": {"uri": out, "shard_size": 10}})
        run_local(spec)
        first = check_accounting(out)
        assert all(reasons_by_url(out)[u] == "http_server_error" for u in flaky)
        shards_before = len(list((Path(out) / "data").glob("*.parquet")))

        assert main(["retry-failed", out, "--local", "--allow-private-networks"]) == 0
        assert is_complete(out)
        after = check_accounting(out)
        accepted = set(pq.read_table(Path(out) / "data", columns=["url"]).column(
            "url").to_pylist())
        assert set(flaky) <= accepted
        assert after["candidates"] == first["candidates"]
        assert after["accepted"] > first["accepted"]
        ids = accepted_ids(out)
        assert len(ids) == len(set(ids))
        assert len(list((Path(out) / "data").glob("*.parquet"))) > shards_before
        still = Counter(reasons_by_url(out).values())
        assert still["http_server_error"] < first["rejected_by_reason"]["http_server_error"]


def test_retry_failed_retries_a_url_its_list_named_twice(tmp_path):
    """A URL a list names twice in a class (in two slices) ends as a transient reject and a
    duplicate_url reject of the same key. The retry found the key held by the kept duplicate
    row, dropped the candidate as decided before, and lost its reject row: one candidate
    fewer, and the image never retried."""
    from cluster.cli import main

    with SandboxWeb(classes=("cat",), images_per_class=24, fault_every=2, slow_s=2.0) as web:
        flaky = [u for u in web.search_urls("cat")
                 if web.outcome_of(u) == "accepted" and "/flaky_500/" in u]
        assert flaky, "the sandbox should list flaky URLs"
        urls = tmp_path / "urls.txt"
        urls.write_text("".join(f"cat\t{u}\n" for u in web.search_urls("cat") + flaky))
        out = str(tmp_path / "ds")
        spec = parse_spec({"name": "twice", "target": 1000, "classes": {"cat": None},
                           "sources": [{"engine": "urllist", "path": str(urls)}],
                           "download": {"timeout_s": 1.0, "retries": 0,
                                        "allow_private_networks": True},
                           "output": {"uri": out, "shard_size": 10},
                           "resources": {"batch_size": 5}})
        run_local(spec)
        first = check_accounting(out)
        assert first["rejected_by_reason"]["duplicate_url"] == len(flaky)
        # a retry reads the rejects, not the list (spec.yaml masks a list URL's credentials)
        urls.unlink()
        assert main(["retry-failed", out, "--local", "--allow-private-networks"]) == 0
    after = check_accounting(out)
    accepted = set(pq.read_table(Path(out) / "data", columns=["url"]).column("url").to_pylist())
    assert set(flaky) <= accepted
    assert after["candidates"] == first["candidates"]
    assert after["rejected_by_reason"]["duplicate_url"] == len(flaky)


def test_retry_failed_decides_the_candidate_its_source_found(tmp_path):
    """The rejects kept only a candidate's url, label, query and engine: a retried image lost
    its page, title, license and author, and with ``page_meta`` its page was never read (an
    image rejected because its page was down came back with no page check at all)."""
    from cluster.cli import main

    with SandboxWeb(classes=("cat",), images_per_class=24, fault_every=2, slow_s=2.0) as web:
        out = str(tmp_path / "ds")
        spec = parse_spec({"name": "again", "target": 1000, "classes": {"cat": None},
                           "sources": [{"engine": "sandbox", "url": web.base_url}],
                           "download": {"timeout_s": 1.0, "retries": 0,
                                        "allow_private_networks": True,
                                        "signals": {"page_meta": True}},
                           "output": {"uri": out, "shard_size": 10}})
        run_local(spec)
        flaky = {u for u, reason in reasons_by_url(out).items() if reason == "http_server_error"}
        assert flaky, "the sandbox should serve flaky URLs"
        rejects = pq.read_table(Path(out) / "rejects.parquet").to_pylist()
        found = {r["url"]: r for r in rejects if r["url"] in flaky}
        assert all(r["page_url"] and r["title"] and r["rank"] for r in found.values())
        assert main(["retry-failed", out, "--local", "--allow-private-networks"]) == 0
    check_accounting(out)
    rows = {r["url"]: r for r in pq.read_table(Path(out) / "data").to_pylist()
            if r["url"] in flaky}
    assert rows, "the retry should accept some of the flaky images"
    for url, row in rows.items():
        was = found[url]
        assert (row["page_url"], row["title"], row["rank"], row["license"], row["author"]) == \
            (was["page_url"], was["title"], was["rank"], was["license"], was["author"])
        assert any(e["signal"] == "robots_meta" and e["source"].startswith("page ")
                   for e in row["rights"]), row["rights"]


def test_retry_failed_keeps_the_rights_summary_whole_and_says_what_it_could_not_take_out(
        tmp_path):
    """A retry takes the ledgers of the rejects it decides again out of the published rights
    summary (rejects.parquet holds them) and adds the new ones: the summary is the sum of the
    dataset's ledgers. A dataset written before rejects kept ledgers is retried too; its
    summary then says how many earlier ledgers it still holds."""
    from builder.pipeline import count_retryable
    from cluster.cli import main

    with SandboxWeb(classes=("cat", "dog"), images_per_class=16, fault_every=2) as web:
        urls = tmp_path / "urls.txt"
        urls.write_text("".join(f"{label}\t{u}\n" for label in ("cat", "dog")
                                for u in web.search_urls(label)))
        outs = [str(tmp_path / name) for name in ("current", "legacy")]
        for out in outs:
            run_local(parse_spec({
                "name": "rights", "target": 1000, "classes": {"cat": None, "dog": None},
                "sources": [{"engine": "urllist", "path": str(urls)}],
                "download": {"timeout_s": 1.0, "retries": 0, "allow_private_networks": True},
                "output": {"uri": out, "shard_size": 10}}))
        legacy = Path(outs[1]) / "rejects.parquet"
        pq.write_table(pq.read_table(legacy).drop_columns(["rights"]), legacy)
        again = count_retryable(outs[1])
        assert again > 0
        for out in outs:
            assert main(["retry-failed", out, "--local", "--allow-private-networks"]) == 0
    current = check_accounting(outs[0])
    assert "earlier_ledgers" not in current["rights"]
    stats = json.loads((Path(outs[1]) / "stats.json").read_text())
    assert stats["rights"]["records"] == stats["candidates"] == current["candidates"]
    assert stats["rights"]["earlier_ledgers"] == again
    assert "earlier ledgers of" in (Path(outs[1]) / "README.md").read_text()


def _killed_build(spec_path: Path, args: list[str], until, env=None) -> None:
    """Start ``pixcrawler build`` and SIGKILL it, its worker processes with it, once
    ``until()`` holds. What the killed processes leave in their temporary folder (their
    socket's directory, multiprocessing's) is in one of the test's own, removed after: each
    killed build left two in the machine's."""
    scratch = tempfile.mkdtemp(prefix="pxkilled-")
    try:
        proc = subprocess.Popen([str(BIN / "pixcrawler"), "build", str(spec_path), *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True,
                                env={**(env or os.environ), "TMPDIR": scratch})
        deadline = time.time() + 120
        while time.time() < deadline and not until():
            assert proc.poll() is None, "the job ended before it could be killed"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_resume_on_s3_after_a_sigkilled_driver_publishes_on_the_first_try(sandbox, moto_s3,
                                                                          tmp_path):
    import s3fs

    make_bucket(moto_s3, "resume")
    out = "s3://resume/killed"
    data = list_spec(sandbox, tmp_path, out)
    data["download"]["per_host_delay_s"] = 0.03
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    fs = s3fs.S3FileSystem(endpoint_url=moto_s3)
    env = dict(os.environ, AWS_ENDPOINT_URL=moto_s3)

    def committed() -> bool:
        fs.invalidate_cache()
        return len(fs.glob(f"{out}/_journal/killme/units/*.parquet")) >= 2

    _killed_build(spec_path, ["--local", "--job-id", "killme"], committed, env)
    assert not is_complete(out, {"endpoint_url": moto_s3})
    result = run_local(parse_spec(data), resume=True, storage_options={"endpoint_url": moto_s3})
    assert result.stats["resumed"] and is_complete(out, {"endpoint_url": moto_s3})
    fs.invalidate_cache()
    assert not fs.exists(f"{out}/_journal")
    stats = json.loads(fs.cat(f"{out}/stats.json"))
    ids = []
    for path in fs.glob(f"{out}/data/*.parquet"):
        ids += pq.read_table(fs.open(path), columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == stats["accepted"]
    assert stats["accepted"] + stats["rejected"] == stats["candidates"]


def test_sigterm_under_local_stops_with_a_partial_dataset(sandbox, tmp_path):
    out = tmp_path / "stopped"
    data = list_spec(sandbox, tmp_path, str(out), target=1000)
    data["download"]["per_host_delay_s"] = 0.1
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    hangs = _while_a_fetch_hangs(sandbox)
    proc = subprocess.Popen([str(BIN / "pixcrawler"), "build", str(spec_path), "--local"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not hangs():
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    assert hangs(), "the job never asked for its slow URL"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert (out / "_PARTIAL").exists() and not is_complete(str(out))
    stats = check_accounting(str(out))
    assert stats["partial"] and stats["rejected_by_reason"].get("cancelled", 0) > 0


PUBLISH_SIGNALLED = """
import os, signal, sys, time
from builder.pipeline import run_local
from builder.spec import load_spec
from builder.writers import DatasetPublisher

real = DatasetPublisher.publish

def publish(self, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.3)  # the loop's handlers run while this thread writes
    return real(self, **kwargs)

DatasetPublisher.publish = publish
result = run_local(load_spec(sys.argv[1]), install_signals=True)
print("published", result.partial)
"""


def test_a_signal_while_publishing_waits_for_the_publish(sandbox, tmp_path):
    """The publish runs in a thread the interpreter joins: a Ctrl-C there ended the command
    as interrupted while the thread went on to write _SUCCESS, and a SIGTERM (the handlers of
    the crawl were gone) killed it halfway through the files."""
    out = str(tmp_path / "out")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(list_spec(sandbox, tmp_path, out, labels=("cat",),
                                                  target=6)))
    proc = subprocess.run([sys.executable, "-c", PUBLISH_SIGNALLED, str(spec_path)],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "published False" in proc.stdout and "being published" in proc.stderr
    assert is_complete(out)
    check_accounting(out)


def test_a_new_job_refuses_an_interrupted_jobs_output_unless_told_to_start_over(sandbox,
                                                                               tmp_path):
    """A fresh build where a killed job left its shards and journal once published its own
    _SUCCESS over the dead job's shards (more rows than stats said); it now names --resume
    and --overwrite, and with --overwrite starts clean."""
    from builder.errors import OutputExistsError

    out = str(tmp_path / "out")
    data = list_spec(sandbox, tmp_path, out)
    data["download"]["per_host_delay_s"] = 0.03
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    journal = Path(out) / "_journal" / "killme"
    _killed_build(spec_path, ["--local", "--job-id", "killme"],
                  lambda: len(list(journal.glob("units/*.parquet"))) >= 2)
    assert list((Path(out) / "data").glob("*.parquet"))
    with pytest.raises(OutputExistsError, match="killme.*--resume.*--overwrite"):
        run_local(parse_spec(data))
    data["output"]["overwrite"] = True
    run_local(parse_spec(data))
    assert not journal.exists()
    check_accounting(out)


def test_a_new_job_refuses_a_partial_dataset_unless_told_to_replace_it(sandbox, tmp_path):
    """The same build run again over a cancelled dataset deleted it without a word (hours of
    crawling, where --resume would have continued it)."""
    from builder.errors import OutputExistsError

    out = str(tmp_path / "out")
    data = list_spec(sandbox, tmp_path, out)
    data["download"]["per_host_delay_s"] = 0.03
    _cancelled_early(data, lambda r: r.counts.accepted >= 4)
    before = sorted(accepted_ids(out))
    with pytest.raises(OutputExistsError, match="partial dataset.*cancelled.*--resume"):
        run_local(parse_spec(data))
    assert sorted(accepted_ids(out)) == before and (Path(out) / "_PARTIAL").exists()
    data["output"]["overwrite"] = True
    run_local(parse_spec(data))
    assert is_complete(out)


def _cancelled_early(data: dict, until) -> None:
    """Run ``data`` in this process and cancel it once ``until(runner)`` holds."""
    holder: dict = {}

    async def run():
        task = asyncio.ensure_future(run_local_async(
            parse_spec(data), runner_hook=lambda r: holder.setdefault("r", r)))
        while "r" not in holder or not until(holder["r"]):
            if task.done():
                await task
                pytest.fail("the job ended before the moment to cancel it came")
            await asyncio.sleep(0.02)
        holder["r"].cancel()
        return await task

    assert asyncio.run(run()).partial


def _while_a_fetch_hangs(sandbox):
    """A cancel condition that leaves a candidate undecided unless the cancel takes a second
    or more: the list's one ``slow`` URL (the last class's first page) has been requested. Its
    answer waits ``slow_s`` (3 s), longer than the list's fetch timeout (1 s, one retry), so
    its candidate stays undecided for about 2 s after the request arrives. (A count of accepted
    images was no such moment: under load, the units in flight could all have decided before
    the cancel, leaving nothing ``cancelled``.)"""
    slow = next(u for u in sandbox.search_urls("bird") if sandbox.outcome_of(u) == "timeout")
    before = sandbox.hits(slow)
    return lambda *_: sandbox.hits(slow) > before


def test_continuing_a_cancelled_dataset_decides_what_the_cancel_left_undecided(sandbox,
                                                                              tmp_path):
    """The candidates a cancel left undecided (``cancelled``) were taken as decided when the
    dataset was continued: the resume published fewer images than an uninterrupted run over
    the same list, with a _SUCCESS, and retry-failed found nothing to retry."""
    whole = str(tmp_path / "whole")
    run_local(parse_spec(list_spec(sandbox, tmp_path, whole)))
    out = str(tmp_path / "out")
    data = list_spec(sandbox, tmp_path, out)
    data["download"]["per_host_delay_s"] = 0.03
    _cancelled_early(data, _while_a_fetch_hangs(sandbox))
    assert check_accounting(out)["rejected_by_reason"].get("cancelled", 0) > 0
    run_local(parse_spec(data), resume=True)
    assert is_complete(out)
    stats, reference = check_accounting(out), check_accounting(whole)
    assert "cancelled" not in stats["rejected_by_reason"]
    for key in ("candidates", "accepted", "rejected", "rejected_by_reason"):
        assert stats[key] == reference[key], key
    assert sorted(accepted_ids(out)) == sorted(accepted_ids(whole))


def test_cancelled_candidates_a_continuation_never_finds_again_keep_their_rejects(sandbox,
                                                                                 tmp_path):
    """A continuation decides the candidates a cancel left undecided where its crawl finds
    them again, which it need not (the list changed, a class filled first, an engine
    answered otherwise). Those it never found vanished: no reject row, one candidate fewer
    each, and a _SUCCESS over them. They now stay as the cancel left them."""
    out = str(tmp_path / "out")
    data = list_spec(sandbox, tmp_path, out)
    data["download"]["per_host_delay_s"] = 0.03
    _cancelled_early(data, _while_a_fetch_hangs(sandbox))
    first = check_accounting(out)
    rejects = pq.read_table(Path(out) / "rejects.parquet").to_pylist()
    cancelled = {r["key"]: r for r in rejects if r["reason"] == "cancelled"}
    assert cancelled, "the cancel should leave candidates undecided"
    gone = {r["url"] for r in cancelled.values()}
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(line + "\n" for line in urls.read_text().splitlines()
                            if line.split("\t")[1] not in gone))
    run_local(parse_spec(data), resume=True)
    assert is_complete(out)
    stats = check_accounting(out)
    after = {r["key"]: r for r in pq.read_table(Path(out) / "rejects.parquet").to_pylist()}
    for key, row in cancelled.items():
        assert after[key]["reason"] == "cancelled" and after[key]["url"] == row["url"]
    assert stats["rejected_by_reason"]["cancelled"] == len(cancelled)
    assert stats["candidates"] >= first["candidates"]


def test_a_killed_continuation_of_a_partial_dataset_resumes_and_publishes(sandbox, tmp_path):
    """A partial dataset continued with --resume, killed, then resumed again: the resumed job
    counts the published dataset it adds to, as its first run did (it failed to publish, with
    the rejects manifest holding more rows than it counted, every time)."""
    out = str(tmp_path / "out")
    data = list_spec(sandbox, tmp_path, out)
    data["download"]["per_host_delay_s"] = 0.03
    _cancelled_early(data, lambda r: r.counts.accepted >= 8)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    journals = Path(out) / "_journal"
    _killed_build(spec_path, ["--local", "--resume"],
                  lambda: len(list(journals.glob("*/units/*.parquet"))) >= 3)
    result = run_local(parse_spec(data), resume=True)
    assert is_complete(out) and not list(journals.glob("*/job.json"))
    stats = check_accounting(out)
    assert result.stats["accepted"] == stats["accepted"]
    assert "cancelled" not in stats["rejected_by_reason"]  # what the cancel left is decided


def test_retry_failed_keeps_a_partial_dataset_partial(tmp_path):
    """retry-failed decides transient rejects again but does not continue the crawl: a
    cancelled dataset stays _PARTIAL (cancelled), and the command says how to continue it."""
    from cluster.cli import main

    with SandboxWeb(classes=("cat", "dog"), images_per_class=24, fault_every=2, slow_s=2.0) as web:
        data = list_spec(web, tmp_path, str(tmp_path / "out"), ("cat", "dog"), target=40)
        data["download"].update(retries=0, per_host_delay_s=0.05)
        _cancelled_early(data, lambda r: r.counts.by_reason()["http_server_error"] >= 1)
        out = data["output"]["uri"]
        assert main(["retry-failed", out, "--local", "--allow-private-networks"]) == 0
    assert (Path(out) / "_PARTIAL").exists() and not is_complete(out)
    stats = check_accounting(out)
    assert stats["partial_reason"] == "cancelled"


def test_retry_failed_without_parquet_is_refused_before_the_output_is_touched(tmp_path):
    """It reads the dataset's images from its Parquet shards: a webdataset-only dataset once
    lost its _SUCCESS to the retry, which then failed."""
    from cluster.cli import main

    with SandboxWeb(classes=("cat",), images_per_class=8) as web:
        out = tmp_path / "out"
        data = list_spec(web, tmp_path, str(out), ("cat",))
        data["output"]["formats"] = ["webdataset"]
        run_local(parse_spec(data))
        before = sorted(p.name for p in out.iterdir())
        assert main(["retry-failed", str(out), "--local", "--allow-private-networks"]) != 0
    assert sorted(p.name for p in out.iterdir()) == before and is_complete(str(out))


def _half_written_list_spec(web, tmp_path: Path, out: str) -> tuple[dict, Path]:
    """A list job that writes a shard per image (so units are often half written), slowly
    enough to be killed meanwhile; its spec data and file."""
    data = list_spec(web, tmp_path, out)
    data["output"]["shard_size"] = 1
    data["download"]["per_host_delay_s"] = 0.03
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    return data, spec_path


def _kill_half_written(spec_path: Path, out: str) -> set[str]:
    """Build ``spec_path`` as job ``killme`` and SIGKILL it once two units have committed and
    another has images in a committed shard; returns the ids of the images that the units
    which never committed wrote."""
    journal = Path(out) / "_journal" / "killme"
    shards: dict[Path, list[tuple[str, str]]] = {}  # each shard file read once

    def committed() -> set[str]:
        return {p.stem for p in journal.glob("units/*.parquet")}

    def written() -> dict[str, set[str]]:
        for p in journal.glob("shards/*.parquet"):
            if p not in shards:
                table = pq.read_table(p, columns=["uid", "id"])
                shards[p] = list(zip(table["uid"].to_pylist(), table["id"].to_pylist()))
        images: dict[str, set[str]] = {}
        for rows in shards.values():
            for uid, image in rows:
                images.setdefault(uid, set()).add(image)
        return images

    def half_written() -> bool:
        # The shards first, the commits last, then the kill at once: a unit is half written
        # only while it uploads its shards, a tenth of a second or so. (Commits read first
        # left the reading of every shard between them and the kill: under load, the unit
        # had committed by then and nothing was half written.)
        images = written()
        done = committed()
        return len(done) >= 2 and bool(set(images) - done)

    _killed_build(spec_path, ["--local", "--job-id", "killme"], half_written)
    done = committed()
    return {image for uid, ids in written().items() if uid not in done for image in ids}


def test_a_resume_cancelled_before_its_half_written_units_publishes_nothing(sandbox,
                                                                            tmp_path):
    """Units a killed run wrote shards of but never committed must finish before anything is
    published: cancelled first, the resume once published those images outside every count
    (30 Parquet rows for 21 accepted); now it publishes nothing, keeps the journal, and the
    next --resume publishes exactly."""
    from builder.errors import CancelledUnpublished

    out = str(tmp_path / "out")
    data, spec_path = _half_written_list_spec(sandbox, tmp_path, out)
    _kill_half_written(spec_path, out)
    with pytest.raises(CancelledUnpublished, match="--resume"):
        run_local(parse_spec(data), resume=True, runner_hook=lambda r: r.cancel())
    assert not (Path(out) / "_SUCCESS").exists() and not (Path(out) / "_PARTIAL").exists()
    assert (Path(out) / "_journal" / "killme" / "job.json").exists()
    run_local(parse_spec(data), resume=True)
    assert is_complete(out)
    check_accounting(out)


def test_a_resume_whose_server_is_gone_keeps_what_the_half_written_units_wrote(tmp_path):
    """A killed run left units with images in committed shards but no commit. The resumed
    run fetched their candidates again; with the image server gone, every fetch failed, so
    the written images ended rejects while their shards kept them: publishing failed on the
    manifest's count, and on every --resume after. They are now taken back as written,
    without a fetch, and the dataset publishes with every count whole."""
    out = str(tmp_path / "out")
    with SandboxWeb(classes=("cat", "dog", "bird"), images_per_class=30) as web:
        data, spec_path = _half_written_list_spec(web, tmp_path, out)
        kept = _kill_half_written(spec_path, out)
    run_local(parse_spec(data), resume=True)
    assert is_complete(out)
    stats = check_accounting(out)
    assert kept and kept <= set(accepted_ids(out))
    assert stats["rejected_by_reason"].get("connection_error", 0) > 0  # the server was gone


def test_a_resume_whose_list_changed_is_refused_until_the_list_is_back(sandbox, tmp_path):
    """The URL list changed after the kill: a resume cut it again, so rows fell in no slice
    or in two, silently. It is refused now, naming the source, and goes on once the list is
    back as it was, keeping what the killed run half wrote."""
    from builder.journal import ResumeError

    out = str(tmp_path / "out")
    data, spec_path = _half_written_list_spec(sandbox, tmp_path, out)
    kept = _kill_half_written(spec_path, out)
    urls = tmp_path / "urls.txt"
    whole = urls.read_text()
    urls.write_text(whole.splitlines(keepends=True)[0])  # one line left
    with pytest.raises(ResumeError, match=r"sources\.0\.path .* is not the list this job's "
                                          "first run cut"):
        run_local(parse_spec(data), resume=True)
    assert not is_complete(out)
    urls.write_text(whole)
    run_local(parse_spec(data), resume=True)
    assert is_complete(out)
    check_accounting(out)
    assert kept and kept <= set(accepted_ids(out))


def test_a_resume_whose_engine_is_gone_finishes_the_half_written_pages_last(tmp_path):
    """The search engine (and its images) went away after the kill: the resumed run's
    searches failed until the planner gave the source up, so the pages the killed run half
    wrote were never decided, and nothing could be published, then or on any --resume. Each
    now finishes last, from what its shards hold."""
    out = str(tmp_path / "out")
    with SandboxWeb(classes=("cat", "dog", "bird"), images_per_class=30) as web:
        spec = sandbox_spec(web, out, target=60, output={"shard_size": 1},
                            download={"per_host_delay_s": 0.03},
                            sources=[{"engine": "sandbox", "url": web.base_url, "per_page": 4,
                                      "max_pages": 8}])
        spec_path = tmp_path / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
        kept = _kill_half_written(spec_path, out)
    run_local(parse_spec(yaml.safe_load(spec_path.read_text())), resume=True)
    assert is_complete(out)
    stats = check_accounting(out)
    assert kept and kept <= set(accepted_ids(out))
    assert stats["search_errors"]  # the engine was gone


def test_retry_failed_that_accepts_images_ends_an_empty_dataset(tmp_path):
    """A dataset built while its image server was down is _PARTIAL (empty). A retry once the
    server is back accepted every image but kept the marker (and exited 3 saying no image was
    accepted), and the next retry found nothing to retry: the dataset stayed empty for good."""
    from builder.ports import free_port
    from cluster.cli import main

    port = free_port()
    with SandboxWeb(classes=("cat", "dog"), images_per_class=6, port=port) as web:
        data = list_spec(web, tmp_path, str(tmp_path / "out"), ("cat", "dog"))
    data["download"]["retries"] = 0
    out = data["output"]["uri"]
    result = run_local(parse_spec(data))
    assert result.partial and result.stats["accepted"] == 0
    assert json.loads((Path(out) / "_PARTIAL").read_text())["reason"] == "empty"
    with SandboxWeb(classes=("cat", "dog"), images_per_class=6, port=port):
        assert main(["retry-failed", out, "--local", "--allow-private-networks"]) == 0
    assert is_complete(out) and not (Path(out) / "_PARTIAL").exists()
    stats = check_accounting(out)
    assert stats["accepted"] > 0 and not stats["partial"] and stats["crawl_partial"] == ""


def test_a_cancelled_retry_of_a_complete_dataset_leaves_it_partial_only_until_the_next(
        tmp_path):
    """A retry cancelled midway publishes _PARTIAL (cancelled). The crawl itself had
    finished, so the next retry, which decides what the cancel left, publishes _SUCCESS; it
    once said the dataset "stays partial (its crawl was cancelled before this retry)" for
    good."""
    from builder.pipeline import plan_retry
    from cluster.cli import main

    with SandboxWeb(classes=("cat", "dog"), images_per_class=24, fault_every=2, slow_s=2.0) as web:
        data = list_spec(web, tmp_path, str(tmp_path / "out"), ("cat", "dog"))
        data["download"].update(retries=0, per_host_delay_s=0.05)
        out = data["output"]["uri"]
        run_local(parse_spec(data))
        assert is_complete(out)
        assert check_accounting(out)["rejected_by_reason"].get("http_server_error")
        before = check_accounting(out)
        spec, cont = plan_retry(out, allow_private_networks=True)
        cancelled = run_local(spec, continuation=cont, runner_hook=lambda r: r.cancel())
        assert cancelled.partial
        assert json.loads((Path(out) / "_PARTIAL").read_text())["reason"] == "cancelled"
        after = check_accounting(out)
        assert after["crawl_partial"] == ""
        # The rejects it never got to stay as they were (they were dropped, 72 -> 66).
        for key in ("candidates", "accepted", "rejected", "rejected_by_reason"):
            assert after[key] == before[key], key
        assert main(["retry-failed", out, "--local", "--allow-private-networks"]) == 0
    assert is_complete(out) and not (Path(out) / "_PARTIAL").exists()
    assert not check_accounting(out)["partial"]


def test_retry_failed_without_stats_json_is_refused_before_the_output_is_touched(tmp_path):
    """Its counts come from stats.json: without it they were taken as 0 and the retry
    published _SUCCESS with stats short of the shards' rows."""
    from cluster.cli import main

    with SandboxWeb(classes=("cat",), images_per_class=8, fault_every=2) as web:
        out = tmp_path / "out"
        data = list_spec(web, tmp_path, str(out), ("cat",))
        data["download"]["retries"] = 0
        run_local(parse_spec(data))
        (out / "stats.json").unlink()
        before = sorted(p.name for p in out.iterdir())
        assert main(["retry-failed", str(out), "--local", "--allow-private-networks"]) != 0
    assert sorted(p.name for p in out.iterdir()) == before and is_complete(str(out))


def test_retry_failed_decides_a_full_class_s_rejects_and_keeps_rows_it_cannot_retry(tmp_path):
    """Two kinds of reject rows vanished from the dataset in a retry: those of a class already
    at its target (skipped as unused hits, though they were candidates), and one without a
    URL (a traceback, after _SUCCESS was removed). The first are decided over_target now,
    without a request; the second stays as it was."""
    from cluster.cli import main

    with SandboxWeb(classes=("cat", "dog"), images_per_class=24, fault_every=2) as web:
        data = list_spec(web, tmp_path, str(tmp_path / "out"), ("cat", "dog"))
        data["classes"]["cat"] = {"target": 3}  # full; dog still needs images, so units run
        data["download"].update(retries=0)
        out = data["output"]["uri"]
        run_local(parse_spec(data))
        before = check_accounting(out)
        assert before["classes"]["cat"]["accepted"] == 3
        rejects = pq.read_table(Path(out) / "rejects.parquet")
        template = rejects.slice(0, 1).to_pylist()[0]
        full = web.class_image_urls("cat")[-1]
        added = [{**template, "url": url, "label": "cat", "reason": "timeout", "stage": "fetch",
                  "key": f"{i:016x}", "detail": "", "duplicate_of": ""}
                 for i, url in enumerate([full, None])]
        pq.write_table(pa.concat_tables([rejects, pa.Table.from_pylist(added, rejects.schema)]),
                       Path(out) / "rejects.parquet")
        stats = json.loads((Path(out) / "stats.json").read_text())
        for where in (stats, stats["classes"]["cat"]):
            where["candidates"] += 2
            where["rejected"] += 2
            where["rejected_by_reason"]["timeout"] = 2
        stats["rejected_by_stage"]["fetch"] = stats["rejected_by_stage"].get("fetch", 0) + 2
        rights = RightsTally.from_summary(stats["rights"])
        rights.add_column(pa.Table.from_pylist(added, rejects.schema)["rights"])
        stats["rights"] = rights.summary()
        (Path(out) / "stats.json").write_text(json.dumps(stats))
        hits = web.hits(full)
        assert main(["retry-failed", out, "--local", "--allow-private-networks"]) == 0
        assert web.hits(full) == hits
    after = check_accounting(out)
    assert after["candidates"] == before["candidates"] + 2
    assert after["accepted"] == before["accepted"]
    assert after["classes"]["cat"]["rejected_by_reason"]["over_target"] == \
        before["classes"]["cat"]["rejected_by_reason"].get("over_target", 0) + 1
    assert after["classes"]["cat"]["rejected_by_reason"]["timeout"] == 1
    reasons = pq.read_table(Path(out) / "rejects.parquet", columns=["url", "reason"]).to_pylist()
    assert {"url": None, "reason": "timeout"} in reasons
    assert {"url": full, "reason": "over_target"} in reasons


class _FailsOnce:
    """``atomic_write`` that fails the first write of README.md: a publish that stops after
    it replaced stats.json and rejects.parquet, before the marker (an object store error,
    or the node lost)."""

    def __init__(self, real):
        self.real = real
        self.failed = False

    def __call__(self, fs, path, data):
        from builder.errors import StorageError

        if not self.failed and path.endswith("/README.md"):
            self.failed = True
            raise StorageError("simulated failure writing README.md")
        return self.real(fs, path, data)


def test_a_continuation_whose_publish_failed_resumes_counting_the_dataset_once(
        sandbox, tmp_path, monkeypatch):
    """The continuation's publish replaced stats.json with its merged figures, then failed.
    Its resume must add its journal to the dataset it continued, not to those figures (it
    failed to publish every time, the manifest holding fewer images than it counted)."""
    from builder import writers

    out = str(tmp_path / "out")
    data = list_spec(sandbox, tmp_path, out)
    data["download"]["per_host_delay_s"] = 0.03
    _cancelled_early(data, lambda r: r.counts.accepted >= 8)
    monkeypatch.setattr(writers, "atomic_write", _FailsOnce(writers.atomic_write))
    with pytest.raises(Exception, match="simulated failure"):
        run_local(parse_spec(data), resume=True)
    assert not is_complete(out)
    result = run_local(parse_spec(data), resume=True)
    assert is_complete(out)
    stats = check_accounting(out)
    assert result.stats["accepted"] == stats["accepted"]
    ids = accepted_ids(out)
    assert len(ids) == len(set(ids))


def _flaky_dataset(tmp_path) -> str:
    """A published dataset whose flaky 500s a retry-failed decides again."""
    out = str(tmp_path / "ds")
    with SandboxWeb(classes=("cat", "dog"), images_per_class=24, fault_every=2, slow_s=2.0) as web:
        urls = tmp_path / "urls.txt"
        urls.write_text("".join(f"{label}\t{u}\n" for label in ("cat", "dog")
                                for u in web.search_urls(label)))
        run_local(parse_spec({"name": "retry", "target": 1000,
                              "classes": {"cat": None, "dog": None},
                              "sources": [{"engine": "urllist", "path": str(urls)}],
                              "download": {"timeout_s": 1.0, "retries": 0,
                                           "allow_private_networks": True},
                              "output": {"uri": out, "shard_size": 10}}))
    return out


def test_a_retry_stopped_while_it_kept_the_dataset_resumes_as_a_retry(tmp_path, monkeypatch):
    """The journal says it merges from its first write on: a retry stopped while it copied
    the dataset's figures (the marker already gone) was resumed as a plain build, which
    published its own images only, leaving the dataset's out of the manifests."""
    from builder.errors import StorageError
    from builder.journal import Journal
    from builder.pipeline import plan_retry

    out = _flaky_dataset(tmp_path)
    first = check_accounting(out)
    real = Journal.keep_base

    def stops(self, resuming):
        raise StorageError("simulated: the copy of rejects.parquet failed")

    monkeypatch.setattr(Journal, "keep_base", stops)
    spec, continuation = plan_retry(out, allow_private_networks=True)
    with pytest.raises(StorageError, match="simulated"):
        run_local(spec, continuation=continuation)
    monkeypatch.setattr(Journal, "keep_base", real)
    run_local(spec, resume=True, uri=out)
    after = check_accounting(out)
    assert after["candidates"] == first["candidates"]
    assert after["accepted"] >= first["accepted"]


def test_a_dataset_whose_figures_do_not_add_up_is_refused_before_it_is_touched(tmp_path):
    """An older version published unbalanced figures after a cancel: a retry could never
    publish them again, and used to find that out after removing the marker."""
    from builder.journal import ResumeError
    from builder.pipeline import plan_retry

    out = _flaky_dataset(tmp_path)
    stats_path = Path(out) / "stats.json"
    stats = json.loads(stats_path.read_text())
    stats_path.write_text(json.dumps({**stats, "candidates": stats["candidates"] + 1}))
    spec, continuation = plan_retry(out, allow_private_networks=True)
    with pytest.raises(ResumeError, match="does not add up"):
        run_local(spec, continuation=continuation)
    assert is_complete(out) and not list(Path(out).glob("_journal/*/job.json"))


def test_a_retry_whose_publish_failed_resumes_with_each_reject_once(tmp_path, monkeypatch):
    """A retry that accepts nothing (the origin is down) and fails to publish after it
    replaced rejects.parquet: resumed, it decides the dataset's rejects as they were, once
    each, and the dataset keeps its candidates."""
    from builder import writers
    from builder.pipeline import plan_retry

    out = _flaky_dataset(tmp_path)
    first = check_accounting(out)
    keys = pq.read_table(Path(out) / "rejects.parquet").column("key").to_pylist()
    monkeypatch.setattr(writers, "atomic_write", _FailsOnce(writers.atomic_write))
    spec, continuation = plan_retry(out, allow_private_networks=True)
    with pytest.raises(Exception, match="simulated failure"):
        run_local(spec, continuation=continuation)
    run_local(spec, resume=True, uri=out)
    assert is_complete(out)
    after = check_accounting(out)
    assert after["candidates"] == first["candidates"]
    assert sorted(pq.read_table(Path(out) / "rejects.parquet").column("key").to_pylist()) \
        == sorted(keys)


def test_retries_under_one_job_id_each_continue_the_dataset_the_last_one_left(tmp_path):
    """``--job-id`` may name a retry again: the dataset's stats.json then carries that id
    from the earlier, finished run, and is the new run's base like any other."""
    from builder.pipeline import plan_retry

    out = _flaky_dataset(tmp_path)
    first = check_accounting(out)
    for _ in range(2):
        spec, continuation = plan_retry(out, job_id="nightly", allow_private_networks=True)
        run_local(spec, continuation=continuation)
        assert is_complete(out)
        after = check_accounting(out)
        assert after["candidates"] == first["candidates"] and after["job_id"] == "nightly"



def test_a_job_id_used_again_after_a_removal_that_stopped_half_way_starts_clean(
        tmp_path, monkeypatch):
    """A journal removal that stopped after job.json left the shard records of a published
    build: the next build under the same --job-id (--overwrite) listed them as its own."""
    from builder import journal as journal_mod
    from builder.errors import StorageError

    real_delete = journal_mod.delete_tree

    def stops(fs, path):
        raise StorageError(f"simulated failure deleting {path}")

    with SandboxWeb(classes=("cat", "dog"), images_per_class=12) as web:
        out = str(tmp_path / "ds")
        spec = parse_spec({"name": "again", "target": 6, "classes": {"cat": None, "dog": None},
                           "sources": [{"engine": "sandbox", "url": web.base_url}],
                           "download": {"allow_private_networks": True},
                           "output": {"uri": out, "shard_size": 4, "overwrite": True}})
        monkeypatch.setattr(journal_mod, "delete_tree", stops)
        with pytest.raises(StorageError, match="simulated failure"):
            run_local(spec, job_id="nightly")
        monkeypatch.setattr(journal_mod, "delete_tree", real_delete)
        left = Path(out) / "_journal" / "nightly"
        assert is_complete(out) and any((left / "shards").glob("*.parquet"))
        assert not (left / "job.json").exists()
        run_local(spec, job_id="nightly")
    after = check_accounting(out)
    assert after["accepted"] == 12 and after["job_id"] == "nightly"
    assert not left.exists()
