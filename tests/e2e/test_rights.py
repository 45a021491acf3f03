"""Opt-out signals end to end: a job through ``run_local`` over every signal case of the sandbox
web (each lands with its reason, or is kept with its ledger), the rights summary in stats.json and
the card, captions from a URL list, then ``pixcrawler recheck`` after the origins change their
minds."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from builder.pipeline import run_local
from builder.sandbox.sites import ACCEPTED, SIGNAL_CASES, default_sites
from builder.signals import AI_TXT_PATH, TDMREP_PATH
from builder.spec import parse_spec
from cluster.cli import main
from tests.e2e.helpers import check_accounting, reasons_by_url

LATE = ("/late-robots/a.jpg", "/late-header/a.jpg")
"""Images of the sandbox's mutable site: kept at build time, refused afterwards."""


def rows_by_url(out: str) -> dict[str, dict]:
    rows = {}
    for path in sorted((Path(out) / "data").glob("*.parquet")):
        for row in pq.read_table(path, columns=["url", "caption", "rights"]).to_pylist():
            rows[row["url"]] = row
    return rows


@pytest.fixture(scope="module")
def built(sandbox, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rights")
    urls = dict(sandbox.signal_urls())
    mutable = sandbox.site_url("mutable")
    urls.update({f"late{i}": mutable + path for i, path in enumerate(LATE)})
    listing = tmp / "urls.csv"
    with listing.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "label", "alt"])
        for case, url in urls.items():
            writer.writerow([url, "cat", f"alt text of {case}"])
    out = str(tmp / "out")
    spec = parse_spec({
        "name": "rights", "target": 100, "classes": {"cat": None},
        "sources": [{"engine": "urllist", "path": str(listing), "caption_column": "alt"}],
        "download": {"timeout_s": 5.0, "retries": 0, "allow_private_networks": True},
        "output": {"uri": out, "formats": ["parquet"], "splits": {"train": 1.0}},
    })
    result = run_local(spec)
    return sandbox, tmp, out, urls, result


@pytest.mark.parametrize("case", sorted(SIGNAL_CASES))
def test_each_signal_lands_with_its_reason_and_ledger(built, case):
    _, _, out, urls, _ = built
    expected = SIGNAL_CASES[case]
    url = urls[case]
    if expected.outcome == ACCEPTED:
        row = rows_by_url(out)[url]
        assert {"signal": expected.signal, "verdict": expected.verdict} in \
            [{"signal": s["signal"], "verdict": s["verdict"]} for s in row["rights"]]
        assert all(s["verdict"] != "refuse" for s in row["rights"])
        assert row["caption"] == f"alt text of {case}"
    else:
        assert reasons_by_url(out).get(url) == expected.outcome
        rejects = pq.read_table(Path(out) / "rejects.parquet").to_pylist()
        detail = next(r["detail"] for r in rejects if r["url"] == url)
        assert expected.signal.replace("robots_txt", "robots.txt") in detail.replace(
            "robots.txt disallows", "robots.txt")


def test_rights_summary_in_stats_and_card(built):
    _, _, out, _, result = built
    stats = check_accounting(out)
    rights = stats["rights"]
    refusing = [c for c in SIGNAL_CASES.values() if c.outcome != ACCEPTED]
    assert rights["refused"] == len(refusing) and rights["checked"] == stats["candidates"]
    assert rights["honoured"] == ["robots_txt", "content_signal", "content_usage", "tdmrep",
                                  "ai_txt", "x_robots_tag", "xmp_datamining"]
    for name in ("tdmrep", "content_usage", "robots_txt"):
        expected = sum(1 for c in refusing if c.signal == name)
        assert rights["signals"][name]["refused"] == expected, name
    card = (Path(out) / "README.md").read_text()
    assert "## Rights and opt-outs" in card and "| `xmp_datamining` |" in card
    sites = {c.site for c in SIGNAL_CASES.values()} | {"mutable"}
    retried = sum(path in (TDMREP_PATH, AI_TXT_PATH) for site in sites  # asked once more
                  for path in default_sites()[site].down)
    assert retried == 2
    assert result.stats["fetch"]["signal_fetches"] == 2 * len(sites) + retried


def test_recheck_finds_images_whose_origin_opted_out_after_the_build(built):
    sandbox, tmp, out, urls, _ = built
    late_robots, late_header = urls["late0"], urls["late1"]
    kept = rows_by_url(out)
    assert late_robots in kept and late_header in kept
    site = sandbox.site("mutable")
    site.robots_txt = "User-agent: *\nAllow: /\nContent-Usage: /late-robots/ train-ai=n\n"
    site.headers = {"/late-header/": {"tdm-reservation": "1"}}
    try:
        removals = tmp / "removals.csv"
        clean = str(tmp / "clean")
        assert main(["recheck", out, "--out", str(removals), "--write", clean,
                     "--allow-private-networks"]) == 0
        full = tmp / "removals-full.csv"
        assert main(["recheck", out, "--full", "--out", str(full),
                     "--allow-private-networks"]) == 0
    finally:
        site.robots_txt, site.headers = None, {}
    listed = list(csv.DictReader(removals.open()))
    assert [(r["url"], r["signal"], r["reason"]) for r in listed] == \
        [(late_robots, "content_usage", "opted_out")]
    assert listed[0]["value"] == "train-ai=n" and "robots.txt" in listed[0]["source"]
    # the full recheck asks every image again, and also sees the new header
    assert sorted((r["url"], r["signal"]) for r in csv.DictReader(full.open())) == \
        sorted([(late_robots, "content_usage"), (late_header, "tdmrep")])
    # the new dataset: the same images less the removed one, which is now a reject
    stats = check_accounting(clean)
    assert late_robots not in rows_by_url(clean) and late_header in rows_by_url(clean)
    assert reasons_by_url(clean)[late_robots] == "opted_out"
    row = pq.read_table(Path(clean) / "rejects.parquet").filter(
        pc.equal(pc.field("url"), late_robots)).to_pylist()[0]
    [was] = pq.read_table(Path(out) / "data", filters=[("url", "=", late_robots)],
                          columns=["engine", "rank"]).to_pylist()  # the candidate as built
    assert (row["engine"], row["rank"], row["caption"]) == \
        (was["engine"], was["rank"], "alt text of late0")
    moved = row["rights"]
    assert moved[:-1] == rows_by_url(out)[late_robots]["rights"]  # its build's ledger, then
    assert (moved[-1]["signal"], moved[-1]["verdict"]) == ("content_usage", "refuse")
    assert moved[-1]["source"].startswith("recheck: ")
    before = json.loads((Path(out) / "stats.json").read_text())
    assert stats["accepted"] == before["accepted"] - 1
    assert stats["recheck"]["removed"] == 1
    assert stats["rights"]["refused"] == before["rights"]["refused"] + 1


def test_recheck_refuses_to_write_over_the_dataset_it_reads(built):
    """Writing the copy over the source (``--write`` = the dataset, ``--overwrite``) once
    cleared the dataset before reading it: every file was gone."""
    _, tmp, out, _, _ = built
    before = sorted(p.relative_to(out) for p in Path(out).rglob("*") if p.is_file())
    assert main(["recheck", out, "--out", str(tmp / "same.csv"), "--write", out,
                 "--overwrite", "--allow-private-networks"]) != 0
    assert sorted(p.relative_to(out) for p in Path(out).rglob("*") if p.is_file()) == before


def test_recheck_of_a_partial_dataset_writes_a_partial_copy(built):
    """The copy of a cancelled (``_PARTIAL``) dataset is partial too, not marked complete."""
    _, tmp, out, _, _ = built
    partial = tmp / "partial"
    shutil.copytree(out, partial)
    stats = json.loads((partial / "stats.json").read_text())
    (partial / "stats.json").write_text(json.dumps({**stats, "partial": True,
                                                    "partial_reason": "cancelled"}))
    (partial / "_SUCCESS").rename(partial / "_PARTIAL")
    copy = tmp / "partial-copy"
    assert main(["recheck", str(partial), "--out", str(tmp / "p.csv"), "--write",
                 str(copy), "--allow-private-networks"]) == 0
    assert (copy / "_PARTIAL").exists() and not (copy / "_SUCCESS").exists()
    assert json.loads((copy / "stats.json").read_text())["partial_reason"] == "cancelled"
