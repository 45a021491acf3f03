"""``pixcrawler recheck --write``: what it refuses to copy, an empty copy, a source and a
destination on different storage, and what a failed copy leaves behind.

The dataset is four images of the sandbox's ``mutable`` site, whose robots.txt a test changes
after the build (and puts back)."""

from __future__ import annotations

import csv
import json
import shutil
import uuid
from pathlib import Path

import pytest

from builder.errors import StorageError
from builder.journal import Journal
from builder.pipeline import run_local
from builder.spec import parse_spec
from builder.storage import open_fs
from cluster.cli import EXIT_EMPTY, EXIT_FAILED, main
from tests.e2e.helpers import check_accounting, reasons_by_url

IMAGES = {"cat": ("/m/cat0.jpg", "/m/cat1.jpg"), "dog": ("/m/dog0.jpg", "/m/dog1.jpg")}


@pytest.fixture(scope="module")
def built(sandbox, tmp_path_factory):
    """The dataset (two shards of two images per split) and the folder to copy it into."""
    tmp = tmp_path_factory.mktemp("recheck")
    mutable = sandbox.site_url("mutable")
    listing = tmp / "urls.csv"
    with listing.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "label"])
        writer.writerows([mutable + path, label] for label, paths in IMAGES.items()
                         for path in paths)
    out = tmp / "out"
    spec = parse_spec({
        "name": "recheck", "target": 10, "classes": {"cat": None, "dog": None},
        "sources": [{"engine": "urllist", "path": str(listing)}],
        "download": {"timeout_s": 5.0, "retries": 0, "allow_private_networks": True},
        "output": {"uri": str(out), "formats": ["parquet", "imagefolder"],
                   "splits": {"train": 1.0}, "shard_size": 2},
    })
    assert run_local(spec).stats["accepted"] == 4
    return sandbox, out, spec


@pytest.fixture
def source(built, tmp_path):
    """A copy of the dataset for a test to change, and where its recheck copy goes."""
    _, out, spec = built
    src = tmp_path / "src"
    shutil.copytree(out, src)
    return src, tmp_path / "copy", spec


@pytest.fixture
def refused(built):
    """The mutable site's robots.txt refuses ``path`` from here to the end of the test."""
    site = built[0].site("mutable")

    def refuse(path: str) -> None:
        site.robots_txt = f"User-agent: *\nDisallow: {path}\n"

    yield refuse
    site.robots_txt = None


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def recheck_write(src, copy, *extra: str) -> int:
    return main(["recheck", str(src), "--out", str(Path(copy).parent / "removals.csv"),
                 "--write", str(copy), "--allow-private-networks", *extra])


@pytest.mark.parametrize("marker, journal", [(False, True), (True, True), (False, False)],
                         ids=["interrupted-job", "marker-and-journal", "no-marker"])
def test_write_refuses_a_source_that_is_not_a_published_dataset(source, capsys, marker,
                                                                 journal):
    """An interrupted retry's dataset (no marker, its journal there) was copied and marked
    complete, with stats that counted fewer images than its shards held."""
    src, copy, spec = source
    if not marker:
        (src / "_SUCCESS").unlink()
    if journal:
        Journal(str(src), "recheck-retry-abc123").start(spec)
    before = files_under(src)
    assert recheck_write(src, copy) == EXIT_FAILED
    out, err = capsys.readouterr()
    assert "checked" not in out  # refused before the origins were asked
    assert "pixcrawler build SPEC --resume" in err
    assert ("interrupted job (recheck-retry-abc123)" in err) == journal
    assert not copy.exists() and files_under(src) == before


def test_the_copy_of_a_partial_dataset_says_it_is_partial(source, capsys):
    """The copy is marked _PARTIAL as its source is; the command said only where it was."""
    src, copy, _ = source
    marker = json.loads((src / "_SUCCESS").read_text())
    (src / "_SUCCESS").unlink()
    (src / "_PARTIAL").write_text(json.dumps({**marker, "status": "partial",
                                              "reason": "cancelled"}))
    stats = json.loads((src / "stats.json").read_text())
    (src / "stats.json").write_text(json.dumps({**stats, "partial": True,
                                                "partial_reason": "cancelled"}))
    assert recheck_write(src, copy) == 0
    assert "marked _PARTIAL as" in capsys.readouterr().out
    assert (copy / "_PARTIAL").exists() and not (copy / "_SUCCESS").exists()


def test_write_that_removes_every_image_is_an_empty_partial_dataset(source, refused, capsys):
    """It was marked _SUCCESS with accepted 0, and the command exited 0."""
    src, copy, _ = source
    refused("/")
    assert recheck_write(src, copy) == EXIT_EMPTY
    assert "is not a dataset (marked _PARTIAL)" in capsys.readouterr().err
    assert (copy / "_PARTIAL").exists() and not (copy / "_SUCCESS").exists()
    assert json.loads((copy / "_PARTIAL").read_text())["reason"] == "empty"
    stats = check_accounting(str(copy))
    assert stats["accepted"] == 0 and stats["partial_reason"] == "empty"
    assert set(reasons_by_url(str(copy)).values()) == {"robots_disallowed"}


def test_write_that_removes_some_images_is_complete(source, refused):
    src, copy, _ = source
    refused("/m/cat")
    assert recheck_write(src, copy) == 0
    assert (copy / "_SUCCESS").exists() and not (copy / "_PARTIAL").exists()
    stats = check_accounting(str(copy))
    assert stats["accepted"] == 2 and stats["classes"]["cat"]["accepted"] == 0
    assert not (copy / "_journal").exists()


@pytest.mark.parametrize("missing", ["rejects.parquet", "stats.json"])
def test_write_reads_the_whole_source_before_writing(source, capsys, missing):
    """A source without its rejects or stats was found out only after every shard was copied:
    the destination kept them and a journal, and a rerun was refused until --overwrite."""
    src, copy, _ = source
    (src / missing).rename(src / f"{missing}.away")
    assert recheck_write(src, copy) == EXIT_FAILED
    out, err = capsys.readouterr()
    assert f"has no {missing}" in err and "checked" not in out
    assert not copy.exists()
    (src / f"{missing}.away").rename(src / missing)
    assert recheck_write(src, copy) == 0
    assert (copy / "_SUCCESS").exists()


def test_a_copy_that_fails_midway_leaves_what_a_rerun_takes(source, monkeypatch, capsys):
    """The shards were written when publishing failed: they stayed, with a journal no job
    could resume, and a rerun was refused until --overwrite."""
    from builder.writers import DatasetPublisher

    src, copy, _ = source

    def fail(*args, **kwargs):
        raise StorageError("cannot publish to the copy: disk full (test)")

    with monkeypatch.context() as patch:
        patch.setattr(DatasetPublisher, "publish", fail)
        assert recheck_write(src, copy) == EXIT_FAILED
    assert "disk full" in capsys.readouterr().err
    assert not [f for f in files_under(copy) if f.split("/")[0] in
                ("data", "imagefolder", "_journal")]
    assert recheck_write(src, copy) == 0
    assert check_accounting(str(copy))["accepted"] == 4


def test_a_copy_whose_publish_fails_after_its_manifests_leaves_what_a_rerun_takes(
        source, monkeypatch, capsys):
    """The manifests, rejects and stats.json were written when the card failed: they stayed
    with no marker, and every rerun was refused, --overwrite or not, with advice to pass
    --overwrite."""
    import builder.writers as writers_mod

    src, copy, _ = source
    real = writers_mod.atomic_write

    def card_fails(fs, path, data):
        if path.endswith("/README.md"):
            raise StorageError("cannot publish to the copy: disk full (test)")
        real(fs, path, data)

    with monkeypatch.context() as patch:
        patch.setattr(writers_mod, "atomic_write", card_fails)
        assert recheck_write(src, copy) == EXIT_FAILED
    assert "disk full" in capsys.readouterr().err
    assert files_under(copy) == []
    assert recheck_write(src, copy) == 0
    assert check_accounting(str(copy))["accepted"] == 4


def test_a_copy_whose_cleanup_fails_reports_the_first_error(source, monkeypatch, capsys,
                                                            caplog):
    import builder.recheck as recheck_mod
    from builder.writers import DatasetPublisher

    src, copy, _ = source

    def fail(*args, **kwargs):
        raise StorageError("cannot publish to the copy: disk full (test)")

    def cannot_delete(*args, **kwargs):
        raise PermissionError("read-only (test)")

    monkeypatch.setattr(DatasetPublisher, "publish", fail)
    monkeypatch.setattr(recheck_mod, "delete_tree", cannot_delete)
    assert recheck_write(src, copy) == EXIT_FAILED
    assert "disk full" in capsys.readouterr().err
    assert "rerun with --overwrite" in caplog.text and "read-only (test)" in caplog.text


def test_write_reads_an_s3_source_with_its_own_storage_options(source, moto_s3, monkeypatch):
    """The source was read with the destination's options: an s3:// source copied to a local
    path was asked of AWS itself (EndpointConnectionError)."""
    from tests.conftest import make_bucket

    src, copy, _ = source
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIXCRAWLER_S3_ENDPOINT", moto_s3)
    bucket = f"recheck-{uuid.uuid4().hex[:8]}"
    make_bucket(moto_s3, bucket)
    fs, _ = open_fs(f"s3://{bucket}", {"endpoint_url": moto_s3})
    fs.put(f"{src}/", f"{bucket}/ds/", recursive=True)
    assert main(["recheck", f"s3://{bucket}/ds", "--out", str(copy.parent / "r.csv"),
                 "--write", str(copy), "--allow-private-networks"]) == 0
    assert check_accounting(str(copy))["accepted"] == 4
    back = copy.parent / "back"
    assert main(["recheck", str(copy), "--out", str(copy.parent / "r2.csv"),
                 "--write", f"s3://{bucket}/back", "--allow-private-networks"]) == 0
    fs.get(f"{bucket}/back/", f"{back}/", recursive=True)
    assert (back / "_SUCCESS").exists() and check_accounting(str(back))["accepted"] == 4


def test_a_killed_copy_is_refused_before_any_request_with_advice_a_recheck_can_follow(
        source, monkeypatch, capsys):
    """A copy killed before its marker (SIGKILL: no cleanup) leaves its shards and journal.
    A rerun asked every origin again and only then refused the destination, telling the user
    to choose another output.uri (--output), which recheck has not."""
    import builder.recheck as recheck_mod
    from builder.writers import DatasetPublisher

    src, copy, _ = source

    def killed(*args, **kwargs):
        raise StorageError("killed (test)")

    with monkeypatch.context() as patch:  # what SIGKILL leaves: no cleanup runs
        patch.setattr(DatasetPublisher, "publish", killed)
        patch.setattr(recheck_mod, "delete_tree", lambda *a, **k: None)
        patch.setattr(Journal, "remove", lambda self: None)
        assert recheck_write(src, copy) == EXIT_FAILED
    assert any(f.startswith("data/") for f in files_under(copy))
    capsys.readouterr()

    def no_requests(*args, **kwargs):
        raise AssertionError("the recheck ran before the destination was checked")

    with monkeypatch.context() as patch:
        patch.setattr(recheck_mod, "recheck", no_requests)
        assert recheck_write(src, copy) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "recheck --write" in err and "--overwrite" in err, err
    assert "--output" not in err and "--resume" not in err, err
    assert recheck_write(src, copy, "--overwrite") == 0
    assert check_accounting(str(copy))["accepted"] == 4


def test_a_full_recheck_reads_each_images_page_again(monkeypatch):
    """With signals.page_meta the build read each image's page for its robots meta tags, but
    --full fetched the images alone: a page that opted out after the build went unseen."""
    import asyncio

    from builder import recheck as recheck_mod
    from builder.rights import REFUSE, Signal
    from builder.spec import DownloadSpec

    asked: list[str] = []

    class PageAwareFetcher:
        def __init__(self, cfg, resolver=None):
            self.cfg = cfg

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return None

        async def fetch_many(self, records, on_result):
            for record in records:
                asked.append(record.candidate.page_url)
                if record.candidate.page_url.endswith("/opted-out.html"):
                    record.rights = (Signal("page_meta", "noai", "the page's meta", REFUSE),)
                on_result(record)

    monkeypatch.setattr(recheck_mod, "Fetcher", PageAwareFetcher)
    rows = [{"id": "a", "label": "cat", "split": "train", "url": "http://h/a.jpg",
             "final_url": "", "page_url": "http://h/opted-out.html"},
            {"id": "b", "label": "cat", "split": "train", "url": "http://h/b.jpg",
             "final_url": "", "page_url": None}]
    result = recheck_mod.RecheckResult("mem://x", "full")
    asyncio.run(recheck_mod._by_fetch(rows, DownloadSpec(), result, None))
    assert asked == ["http://h/opted-out.html", ""]
    assert [r.id for r in result.removals] == ["a"]


def test_a_full_recheck_holds_no_image_bodies(monkeypatch):
    """A batch's records kept their bodies until the whole batch was fetched: 256 bodies of
    up to max_bytes each (5 GB at the default 20 MB), though the recheck reads none."""
    import asyncio

    from builder import recheck as recheck_mod
    from builder.fetch import Fetcher
    from builder.sandbox import SandboxWeb
    from builder.spec import DownloadSpec, SignalsSpec

    held: list[int] = []
    real = Fetcher.fetch_many

    async def fetch_many(self, records, **kw):
        out = await real(self, records, **kw)
        held.append(sum(r.data is not None for r in records))
        return out

    monkeypatch.setattr(Fetcher, "fetch_many", fetch_many)
    with SandboxWeb(classes=["cat"], images_per_class=4) as web:
        rows = [{"id": str(i), "label": "cat", "split": "train", "final_url": "",
                 "url": f"{web.base_url}/heavy/{i}.jpg?bytes=100000", "page_url": None}
                for i in range(4)]
        result = recheck_mod.RecheckResult("mem://x", "full")
        cfg = DownloadSpec(allow_private_networks=True, respect_robots=False,
                           signals=SignalsSpec(tdmrep=False, content_usage=False,
                                               content_signal=False, ai_txt=False))
        asyncio.run(recheck_mod._by_fetch(rows, cfg, result, None))
    assert held == [0] and result.unreachable == 0 and not result.removals


def test_the_removal_list_holds_no_spreadsheet_formula(tmp_path):
    """A server's header value (or a URL) that starts with =, +, - or @ would be a formula
    to a spreadsheet opening the removal list."""
    from builder.recheck import RecheckResult, Removal, write_removals
    from builder.rights import Signal

    removal = Removal(id="i1", label="-cat", split="train", url="http://h/1.jpg",
                      final_url="http://h/1.jpg",
                      signal=Signal("x_robots_tag", '=HYPERLINK("https://evil.example/")',
                                    "header x-robots-tag", "refuse"))
    out = tmp_path / "removals.csv"
    write_removals(RecheckResult(uri="u", mode="quick", removals=[removal]), str(out))
    (row,) = csv.DictReader(out.open(newline=""))
    assert row["value"] == '\'=HYPERLINK("https://evil.example/")' and row["label"] == "-cat"
    assert row["url"] == "http://h/1.jpg" and row["detail"].startswith("recheck: ")
