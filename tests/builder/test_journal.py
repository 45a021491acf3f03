"""builder.journal: streaming a journal of many unit files in batches gives every file's rows,
in name order, whatever the batch boundaries; and the publish step's rejects are the units'
rejected rows in that order. On a local dir and on S3 (moto). A journal on S3 that cannot be
read (no credentials, access denied) is a ``StorageError`` naming it, not a botocore
traceback."""

from __future__ import annotations

import json
import random
import re
import threading
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from builder import journal as journal_mod
from builder.errors import StorageError
from builder.journal import (SHARD_SCHEMA, UNIT_SCHEMA, WRITTEN_COLUMNS, Journal, ResumeError,
                             published_spec, resumable_jobs)
from builder.pipeline import JobLifecycle
from builder.records import REJECT_SCHEMA, with_columns
from builder.rights import RIGHTS_TYPE
from builder.spec import parse_spec
from builder.units import ClassTally, SearchOutcome, UnitReport, WorkUnit
from tests.conftest import make_bucket

UNITS = 23


CATS = parse_spec({"name": "ds", "classes": {"cat": {"urls": ["http://h/1"]}}})
"""A spec of the datasets these tests journal (``index_payloads`` reads which rejects a run
decides again from it)."""


def unit_table(u: int, rng: random.Random) -> pa.Table:
    """A unit of 0-9 candidates, some accepted, some with values CSV must quote."""
    n = rng.randint(0, 9)
    accepted = [rng.random() < 0.3 for _ in range(n)]
    return with_columns(pa.table({
        "key": [f"cat\thttp://h/{u}/{i}" for i in range(n)],
        "url": [f"http://h/{u}/{i}" if i % 4 else f"http://h/{u}/a,b{i}" for i in range(n)],
        "label": ["cat"] * n, "query": [rng.choice(["", "q", None]) for _ in range(n)],
        "engine": ["urllist"] * n,
        "stage": [None if a else "fetch" for a in accepted],
        "reason": [None if a else "http_client_error" for a in accepted],
        "detail": [None if a else f"HTTP {400 + i}" for i, a in enumerate(accepted)],
        "duplicate_of": [None] * n,
        "http_status": [None if a else 404 for a in accepted],
        "rights": pa.array([None if a else [{"signal": "robots_txt", "value": "", "source":
                                              f"robots.txt of h/{u}", "verdict": "none"}]
                            for a in accepted], RIGHTS_TYPE),
        "accepted": accepted,
        "image_id": [f"{u:04d}{i:04d}" if a else None for i, a in enumerate(accepted)],
        "url_hash": [u * 100 + i for i in range(n)], "claim": [u * 7 + i for i in range(n)],
    }), UNIT_SCHEMA, UNIT_SCHEMA.names).cast(UNIT_SCHEMA)


def write_journal(uri: str, options) -> tuple[Journal, list[pa.Table]]:
    journal = Journal(uri, "job1", options)
    rng = random.Random(7)
    tables = []
    for u in range(UNITS):
        table = unit_table(u, rng)
        unit = WorkUnit(uid=f"l00-{u:05d}", seq=u, kind="list", source=0, start=u)
        report = UnitReport(unit.uid)
        accepted = int(pc.sum(table["accepted"].cast(pa.int64())).as_py() or 0)
        report.classes["cat"] = ClassTally(table.num_rows, accepted,
                                           {"http_client_error": table.num_rows - accepted})
        journal.write_unit(unit, report, table)
        tables.append(table)
    return journal, tables


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ds"), None
    endpoint = request.getfixturevalue("moto_s3")
    bucket = f"journal-{uuid.uuid4().hex[:8]}"
    make_bucket(endpoint, bucket)
    return f"s3://{bucket}/ds", {"endpoint_url": endpoint}


@pytest.mark.parametrize("files, rows", [(1, 1), (3, 10), (4, 1000), (64, 7)])
def test_batched_reads_give_every_unit_file_in_order(location, monkeypatch, files, rows):
    monkeypatch.setattr(journal_mod, "READ_FILES", files)
    journal, written = write_journal(*location)
    per_file = [pq.read_table(journal.fs.open(p, "rb")) for p in journal.unit_files()]
    assert len(per_file) == UNITS
    batches = list(journal.iter_tables("units", rows=rows))
    assert pa.concat_tables(batches).equals(pa.concat_tables(written))
    assert pa.concat_tables(batches).equals(
        pa.concat_tables([t.replace_schema_metadata(None) for t in per_file]))
    # Each table is whole files: it ends where a file ends, and only its last file takes it
    # to ``rows`` or past it.
    ends, total = set(), 0
    for t in written:
        total += t.num_rows
        ends.add(total)
    total = 0
    for batch in batches:
        total += batch.num_rows
        assert total in ends
    assert all(b.num_rows < rows + 10 for b in batches)
    assert len(batches) >= -(-total // (rows + 9))
    assert [u.uid for u, _ in journal.iter_unit_reports()] == [
        f"l00-{u:05d}" for u in range(UNITS)]


def test_columns_are_read_alone(location):
    journal, written = write_journal(*location)
    table = pa.concat_tables(journal.iter_tables("units", ["url_hash", "claim"], rows=5))
    assert table.column_names == ["url_hash", "claim"]
    assert table.equals(pa.concat_tables(written).select(["url_hash", "claim"]))


def test_a_unit_file_written_before_a_column_was_added_reads_it_as_nulls(tmp_path):
    """A journal an older version left (its unit files without ``rights``) still resumes:
    the column comes back as nulls of its type, in the place asked for."""
    journal, written = write_journal(str(tmp_path / "ds"), None)
    old = journal.unit_files()[0]
    table = pq.read_table(journal.fs.open(old, "rb"))
    meta = table.schema.metadata
    with journal.fs.open(old, "wb") as f:
        pq.write_table(table.drop_columns(["rights"]).replace_schema_metadata(meta), f)
    columns = ["url", "rights", "accepted"]
    got = pa.concat_tables(journal.iter_tables("units", columns, rows=1000))
    assert got.column_names == columns
    assert got.schema.field("rights").type == RIGHTS_TYPE
    first = written[0].num_rows
    assert got["rights"].slice(0, first).null_count == first
    assert got.slice(first).equals(pa.concat_tables(written[1:]).select(columns))
    whole = pa.concat_tables(journal.iter_tables("units"))
    assert whole.column_names == UNIT_SCHEMA.names


def test_published_rejects_are_the_units_rejected_rows_in_order(location, monkeypatch):
    monkeypatch.setattr(journal_mod, "READ_FILES", 4)
    monkeypatch.setattr(journal_mod, "TABLE_ROWS", 11)
    uri, options = location
    journal, written = write_journal(uri, options)
    spec = parse_spec({"name": "j", "target": 5, "classes": {"cat": {"urls": ["http://h/1"]}},
                       "output": {"uri": uri, "formats": ["parquet"]}})
    life = JobLifecycle(spec, uri=uri, job_id="job1", storage_options=options)
    life.journal = journal
    got = pa.concat_tables(life._reject_tables())
    expected = pa.concat_tables([t.filter(pc.invert(t["accepted"])) for t in written])
    assert got.equals(expected.select(REJECT_SCHEMA.names))
    assert got.num_rows > 11


def test_a_recovered_ledger_knows_the_journaled_units_and_counts_them_once(tmp_path):
    """On Ray the worker journals a unit, then commits it to the ledger: a ledger restarted in
    between rebuilds from the journal and then gets the retried commit, and the resent unit's
    (the reviewer's case: 4 accepted became 12, and the job ran out of room)."""
    from builder.pipeline import recover_ledger

    uri = str(tmp_path / "ds")
    journal, tables = write_journal(uri, None)
    accepted = sum(int(pc.sum(t["accepted"].cast(pa.int64())).as_py() or 0) for t in tables)
    spec = parse_spec({"name": "ds", "target": 1000, "classes": {"cat": None},
                       "sources": [{"engine": "urllist", "path": str(tmp_path / "urls.txt")}],
                       "output": {"uri": uri}})
    ledger = recover_ledger(spec, uri, "job1", None, merge=False)
    assert ledger.accepted["cat"] == accepted
    ledger.commit("l00-00003", {"cat": 5})  # a retried commit of a journaled unit
    ledger.grant("l00-00003", {"cat": 5})  # ... and the same unit resent
    ledger.commit("l00-00003", {"cat": 5})
    ledger.commit("l00-99999", {"cat": 2})  # a new unit counts
    assert ledger.snapshot()["cat"] == {"target": 1000, "accepted": accepted + 2, "granted": 0}


def test_a_recovered_ledger_never_hands_out_a_number_the_lost_one_handed_out(tmp_path):
    """A worker gets a shard number, then journals the shard's intent as its upload begins.
    A ledger restarted in between read the journal without that number and handed it out
    again: two shards of one name. With ``unjournaled`` it goes on past every number the lost
    ledger may have handed out, in every split, and records its own numbers as it goes."""
    from builder.pipeline import recover_ledger
    from builder.quota import RESERVE_BLOCK

    uri = str(tmp_path / "ds")
    journal, _ = write_journal(uri, None)
    journal.write_shard_intent("train-00004", [])
    spec = parse_spec({"name": "ds", "target": 1000, "classes": {"cat": None},
                       "sources": [{"engine": "urllist", "path": str(tmp_path / "urls.txt")}],
                       "output": {"uri": uri, "splits": {"train": 0.8, "validation": 0.2}}})
    lost = recover_ledger(spec, uri, "job1", None, merge=False)
    workers = 2  # each holds one number not journaled yet
    handed = {("train", lost.next_shard("train")), ("validation", lost.next_shard("validation"))}
    assert handed == {("train", 5), ("validation", 0)}
    again = recover_ledger(spec, uri, "job1", None, merge=False)
    assert {("train", again.next_shard("train"))} <= handed  # what the fix prevents
    again = recover_ledger(spec, uri, "job1", None, merge=False, unjournaled=workers)
    after = {(split, again.next_shard(split)) for split in ("train", "validation")
             for _ in range(3)}
    assert not handed & after
    assert min(n for split, n in after if split == "train") == 5 + workers
    # That ledger is lost too before any of its numbers is journaled by a worker: the one
    # rebuilt after it goes on past every number it handed out, however many.
    more = {("train", again.next_shard("train")) for _ in range(RESERVE_BLOCK + 5)}
    third = recover_ledger(spec, uri, "job1", None, merge=False, unjournaled=workers)
    last = {(split, third.next_shard(split)) for split in ("train", "validation")
            for _ in range(3)}
    assert not (handed | after | more) & last
    # The records are intents of no files: nothing for a finishing job to clean up.
    assert journal.orphan_files() == []


CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                   "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                   "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                   "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE")


class _DenyAll(BaseHTTPRequestHandler):
    """An S3 endpoint that refuses every request, as for credentials without permission."""

    BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
            b"<Message>Access Denied</Message></Error>")

    def _deny(self) -> None:
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(self.BODY)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.BODY)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _deny

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(params=["no credentials", "access denied"])
def unreadable(request, tmp_path, monkeypatch):
    """An S3 dataset holding an interrupted job's journal, and storage options that cannot
    read it: the credentials are gone (expired), or the endpoint answers 403 AccessDenied."""
    if request.param == "access denied":
        server = ThreadingHTTPServer(("127.0.0.1", 0), _DenyAll)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        request.addfinalizer(lambda: (server.shutdown(), server.server_close(), thread.join()))
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        return "s3://denied/ds", {"endpoint_url": endpoint, "skip_instance_cache": True}
    endpoint = request.getfixturevalue("moto_s3")
    bucket = f"journal-{uuid.uuid4().hex[:8]}"
    make_bucket(endpoint, bucket)
    uri = f"s3://{bucket}/ds"
    journal, _ = write_journal(uri, {"endpoint_url": endpoint})
    journal.write_shard_intent("train-00000", ["data/train-00000.parquet"])
    for name in CREDENTIAL_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return uri, {"endpoint_url": endpoint, "skip_instance_cache": True}


READERS = {
    "meta": lambda j: j.meta(),
    "load": lambda j: j.load(parse_spec({"name": "j", "target": 5,
                                         "classes": {"cat": {"urls": ["http://h/1"]}}})),
    "unit_uids": lambda j: j.unit_uids(),
    "shard_names": lambda j: j.shard_names(),
    "iter_unit_reports": lambda j: list(j.iter_unit_reports()),
    "iter_tables": lambda j: list(j.iter_tables("units")),
    "next_shard_numbers": lambda j: j.next_shard_numbers(),
    "orphan_files": lambda j: j.orphan_files(),
    "shard_exists": lambda j: j.shard_exists("train-00000"),
    "resumable_jobs": lambda j: resumable_jobs(j.uri, j.storage_options),
    "published_spec": lambda j: published_spec(j.uri, j.storage_options),
}


@pytest.mark.parametrize("reader", list(READERS))
def test_an_unreadable_journal_is_a_storage_error_naming_the_location(unreadable, reader):
    """What ``--resume`` and ``retry-failed`` read before a job starts: the CLI prints a
    ``StorageError`` in one line, and any other exception as a traceback."""
    uri, options = unreadable
    with pytest.raises(StorageError, match=rf"^cannot [a-z. ]+ {re.escape(uri)}: "):
        READERS[reader](Journal(uri, "job1", options))


def test_a_spec_yaml_that_is_not_utf8_is_a_resume_error_naming_it(tmp_path):
    """``build --resume`` and ``retry-failed`` print a ``ResumeError`` in one line."""
    (tmp_path / "spec.yaml").write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ResumeError, match=rf"^{re.escape(str(tmp_path / 'spec.yaml'))} is not "
                       r"UTF-8 text \(invalid continuation byte at byte 9\): put back the spec"):
        published_spec(str(tmp_path))


def test_the_journals_removal_reaches_the_disk(tmp_path, monkeypatch):
    """The journal is removed once its dataset is published: a crash with the removal still in
    memory would bring it back beside the marker, for a ``--resume`` to take up again."""
    from builder import storage

    journal = Journal(str(tmp_path), "cats-1")
    journal.start(parse_spec({"name": "cats", "classes": {"cat": None},
                              "sources": [{"engine": "wikimedia"}]}))
    meta = next(tmp_path.rglob("job.json"))
    flushed_with_meta = []

    def syncfs(fd: int) -> int:
        flushed_with_meta.append(meta.exists())
        return 0

    monkeypatch.setattr(storage, "_libc_syncfs", lambda: syncfs)
    journal.remove()
    assert flushed_with_meta == [False] and not meta.exists()


def test_without_spec_yaml_the_error_says_what_to_do(tmp_path):
    """An interrupted job (only ``_journal/``) is continued with ``build SPEC --resume``; a
    location with no dataset is not one to retry or continue (no 'pass the spec': retry-failed
    takes none)."""
    Journal(str(tmp_path), "cats-1").start(parse_spec({"name": "cats", "classes": {"cat": None},
                                                       "sources": [{"engine": "wikimedia"}]}))
    with pytest.raises(ResumeError, match=r"holds an interrupted job \(cats-1\), not a published "
                       r"dataset: continue it with `pixcrawler build SPEC --resume`"):
        published_spec(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ResumeError, match=r"has no spec\.yaml, so it holds no dataset that "
                       r"PixCrawler 0\.1\+ published: check the URI, or build the dataset again"):
        published_spec(str(empty))


def test_a_resume_may_spell_the_output_another_way_but_not_change_the_spec(tmp_path,
                                                                          monkeypatch):
    """A job started with output ``/abs/ds`` and resumed with ``--output ds`` (the same
    folder) was refused: the URI was part of the fingerprint. Journals written before it
    left the URI out still resume with the URI as it was."""
    import json

    from builder.journal import JOURNAL, spec_fingerprint

    monkeypatch.chdir(tmp_path)

    def spec(uri: str, target: int = 10):
        return parse_spec({"name": "fp", "target": target, "classes": {"cat": ["q"]},
                           "sources": [{"engine": "sandbox", "url": "http://127.0.0.1:1"}],
                           "output": {"uri": uri}})

    absolute = str(tmp_path / "ds")
    Journal(absolute, "j1").start(spec(absolute))
    Journal("ds", "j1").load(spec("ds"))
    with pytest.raises(ResumeError, match="spec differs"):
        Journal("ds", "j1").load(spec("ds", target=5))
    meta_path = tmp_path / "ds" / JOURNAL / "j1" / "job.json"
    meta = json.loads(meta_path.read_text())
    meta["fingerprint"] = spec_fingerprint(spec(absolute), legacy=True,
                                           with_uri=True)  # an older journal
    meta_path.write_text(json.dumps(meta))
    Journal(absolute, "j1").load(spec(absolute))


def test_a_resume_that_lists_the_splits_in_another_order_is_refused(tmp_path):
    """The fingerprint sorts its keys, so splits listed in another order passed as the same
    spec, and about a third of the resumed job's images went to another split than the same
    ids of its first run."""
    from builder.splits import assign_split

    def spec(splits: dict):
        return parse_spec({"name": "fp", "target": 10, "classes": {"cat": ["q"]},
                           "sources": [{"engine": "sandbox", "url": "http://127.0.0.1:1"}],
                           "output": {"uri": str(tmp_path / "ds"), "splits": splits}})

    first = {"train": 0.8, "validation": 0.1, "test": 0.1, "extra": 0.0}
    again = {"test": 0.1, "train": 0.8, "validation": 0.1, "extra": 0.0}
    moved = sum(assign_split(f"{i:016x}", first) != assign_split(f"{i:016x}", again)
                for i in range(1000))
    assert moved > 100  # what a resume must not do
    Journal(str(tmp_path / "ds"), "j1").start(spec(first))
    Journal(str(tmp_path / "ds"), "j1").load(spec(dict(first)))
    Journal(str(tmp_path / "ds"), "j1").load(spec({"extra": 0.0, **first}))  # places nothing
    with pytest.raises(ResumeError, match=r"output\.splits lists test, train, validation where "
                       r"the first run listed train, validation, test"):
        Journal(str(tmp_path / "ds"), "j1").load(spec(again))


def test_a_journal_keeps_no_credentials_and_a_new_password_resumes(tmp_path):
    """job.json held the spec as written, a proxy's password included; the fingerprint
    leaves credentials out, so a password changed between runs still resumes, and a journal
    whose fingerprint held them (written before) resumes too."""
    import json

    from builder.journal import JOURNAL, spec_fingerprint

    def spec(password: str):
        return parse_spec({"name": "fp", "target": 10, "classes": {"cat": ["q"]},
                           "sources": [{"engine": "duckduckgo",
                                        "options": {"proxy": f"http://me:{password}@p:3128"}}],
                           "output": {"uri": str(tmp_path / "ds")}})

    Journal(str(tmp_path / "ds"), "j1").start(spec("old-pw"))
    meta_path = tmp_path / "ds" / JOURNAL / "j1" / "job.json"
    assert "old-pw" not in meta_path.read_text()
    assert json.loads(meta_path.read_text())["spec"]["sources"][0]["options"]["proxy"] == \
        "http://***@p:3128"
    Journal(str(tmp_path / "ds"), "j1").load(spec("new-pw"))
    meta = json.loads(meta_path.read_text())
    meta["fingerprint"] = spec_fingerprint(spec("old-pw"), legacy=True)
    meta_path.write_text(json.dumps(meta))
    Journal(str(tmp_path / "ds"), "j1").load(spec("old-pw"))


def test_a_journal_written_before_class_urls_were_masked_resumes(tmp_path):
    """The published spec masks the credentials in the classes' image URLs now, and the
    fingerprint is taken from it: a journal written before (servers masked, image URLs as
    written) was refused as another spec's."""
    import json

    from builder.journal import JOURNAL, _fingerprint_of

    spec = parse_spec({"name": "fp", "target": 10,
                       "classes": {"cat": {"urls": ["https://s3.example/a.jpg?"
                                                    "X-Amz-Signature=abc"]}},
                       "output": {"uri": str(tmp_path / "ds")}})
    Journal(str(tmp_path / "ds"), "j1").start(spec)
    meta_path = tmp_path / "ds" / JOURNAL / "j1" / "job.json"
    meta = json.loads(meta_path.read_text())
    assert "abc" not in meta_path.read_text()
    before = {**spec.public_dump(), "classes": spec.model_dump(mode="json")["classes"]}
    meta["fingerprint"] = _fingerprint_of(before)
    meta_path.write_text(json.dumps(meta))
    Journal(str(tmp_path / "ds"), "j1").load(spec)
    # Saved with a field this version reads otherwise (a contact of several words): the
    # saved spec, upgraded, is compared, with its image URLs as that version wrote them.
    saved = {**before, "download": {**before["download"],
                                    "contact": "me@example.org or my office"}}
    meta.update(spec=saved, fingerprint=_fingerprint_of(saved))
    meta_path.write_text(json.dumps(meta))
    with_contact = parse_spec({**spec.model_dump(mode="json"),
                               "download": {**spec.model_dump(mode="json")["download"],
                                            "contact": "me@example.org"}})
    Journal(str(tmp_path / "ds"), "j1").load(with_contact)


def test_a_journal_written_before_a_field_was_added_resumes(tmp_path):
    """download.deadline_s joined every fingerprint, so a journal written before it (its
    fingerprint and saved spec without the field, credentials in them) was refused as
    another spec's."""
    import json

    from builder.journal import ADDED_FIELDS, JOURNAL

    def spec(**download):
        return parse_spec({"name": "fp", "target": 10, "classes": {"cat": ["q"]},
                           "sources": [{"engine": "duckduckgo",
                                        "options": {"proxy": "http://me:pw@p:3128"}}],
                           "download": download, "output": {"uri": str(tmp_path / "ds")}})

    assert [field[:2] for field in ADDED_FIELDS] == [("download", "deadline_s")]
    Journal(str(tmp_path / "ds"), "j1").start(spec())
    meta_path = tmp_path / "ds" / JOURNAL / "j1" / "job.json"
    meta = json.loads(meta_path.read_text())
    old = spec().model_dump(mode="json")  # as the version before wrote it
    del old["download"]["deadline_s"]
    meta["spec"] = old
    meta["fingerprint"] = _old_fingerprint(old)
    meta_path.write_text(json.dumps(meta))
    Journal(str(tmp_path / "ds"), "j1").load(spec())
    with pytest.raises(ResumeError, match="spec differs"):
        Journal(str(tmp_path / "ds"), "j1").load(spec(deadline_s=60))
    # a job whose requests may take 300 s: the deadline it now gets is raised to that
    slow = spec(timeout_s=300).model_dump(mode="json")
    assert slow["download"].pop("deadline_s") == 300
    meta.update(spec=slow, fingerprint=_old_fingerprint(slow))
    meta_path.write_text(json.dumps(meta))
    Journal(str(tmp_path / "ds"), "j1").load(spec(timeout_s=300))


def _old_fingerprint(data: dict) -> str:
    """The fingerprint as the version before this one computed it."""
    import hashlib
    import json

    kept = {k: v for k, v in data.items() if k != "resources"}
    kept["output"] = {k: v for k, v in kept["output"].items() if k not in ("overwrite", "uri")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def test_a_job_started_with_a_field_its_engine_ignored_resumes_without_it(tmp_path, caplog):
    """Earlier versions took a url on a duckduckgo source and did nothing with it; this one
    refuses it. The journal's fingerprint holds it: the job resumes with the spec less that
    field, and only then. A dataset's spec.yaml holding it still loads (with a warning)."""
    import json

    import yaml

    from builder.journal import JOURNAL, _fingerprint_of

    def spec(target: int = 10):
        return parse_spec({"name": "fp", "target": target, "classes": {"cat": ["q"]},
                           "sources": [{"engine": "duckduckgo"}],
                           "output": {"uri": str(tmp_path / "ds")}})

    uri = str(tmp_path / "ds")
    Journal(uri, "j1").start(spec())
    meta_path = tmp_path / "ds" / JOURNAL / "j1" / "job.json"
    meta = json.loads(meta_path.read_text())
    meta["spec"]["sources"][0]["url"] = "http://127.0.0.1:9"  # as an earlier version kept it
    meta["fingerprint"] = _fingerprint_of(meta["spec"])
    meta_path.write_text(json.dumps(meta))
    Journal(uri, "j1").load(spec())
    with pytest.raises(ResumeError, match="spec differs"):
        Journal(uri, "j1").load(spec(target=5))
    (tmp_path / "ds" / "spec.yaml").write_text(yaml.safe_dump(meta["spec"]))
    with caplog.at_level("WARNING"):
        assert published_spec(uri).sources[0].url is None
    assert "sources.0.url left out" in caplog.text


def test_only_a_new_job_starts_with_an_empty_index(tmp_path):
    """On Ray a new job's index partitions read nothing at their first start
    (``JobLifecycle.index_starts_empty``): that must hold only where ``index_payloads`` has
    nothing to give. A resumed job's partitions load what its journal committed."""
    from builder.dedup import LocalPartitions

    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"http://h/{i}\n" for i in range(50)))
    data = {"name": "ds", "target": 1000, "classes": {"cat": None},
            "sources": [{"engine": "urllist", "path": str(urls)}],
            "output": {"uri": str(tmp_path / "ds"), "formats": ["parquet"]}}
    client = LocalPartitions(8, near=True, k=1).client()
    new = JobLifecycle(parse_spec(data), uri=data["output"]["uri"])
    new.prepare()
    assert new.index_starts_empty
    assert list(new.index_payloads(client)) == []

    assert new.journal is not None
    table = unit_table(0, random.Random(3))
    unit = WorkUnit(uid="l00-00000", seq=0, kind="list", source=0, start=0)
    report = UnitReport(unit.uid)
    report.classes["cat"] = ClassTally(table.num_rows, 0, {"http_client_error": table.num_rows})
    new.journal.write_unit(unit, report, table)  # the run was killed after this unit
    resumed = JobLifecycle(parse_spec(data), uri=data["output"]["uri"], resume=True)
    resumed.prepare()
    assert not resumed.index_starts_empty
    assert list(resumed.index_payloads(client))


def test_a_resumed_jobs_ledger_comes_from_the_reports_it_read_not_a_second_read(tmp_path,
                                                                                monkeypatch):
    """``Journal.load`` reads every committed unit's file for its report; the driver's
    ledger then counted those same reports by reading every file again."""
    from builder.journal import Journal, ResumeState
    from builder.pipeline import JobLifecycle, recover_ledger

    uri = str(tmp_path / "ds")
    journal, _ = write_journal(uri, None)
    spec = parse_spec({"name": "ds", "target": 1000, "classes": {"cat": None},
                       "sources": [{"engine": "urllist", "path": str(tmp_path / "urls.txt")}],
                       "output": {"uri": uri}})
    expected = recover_ledger(spec, uri, "job1", None, merge=False)
    life = JobLifecycle(spec, uri=uri, job_id="job1")
    life.job_id = "job1"
    life.state = ResumeState("job1", reports=list(journal.iter_unit_reports()))
    assert life.state.reports

    def read_again(self: Journal) -> None:
        raise AssertionError("the unit reports were read again")

    monkeypatch.setattr(Journal, "iter_unit_reports", read_again)
    got = life.ledger()
    assert got.snapshot() == expected.snapshot() and got.committed == expected.committed
    assert got.committed and got._next_shard == expected._next_shard


def _shard_rows(rng: random.Random, n: int,
                sigs: list[list[tuple[int, int]]]) -> tuple[pa.Table, pa.Table]:
    """Shard journal rows (the columns the index reads, and the whole row) of ``n`` images
    with stored signatures ``sigs``."""
    from builder.journal import SHARD_SCHEMA

    table = pa.table({
        "id": [f"{rng.getrandbits(64):016x}" for _ in range(n)],
        "claim": pa.array([rng.getrandbits(64) for _ in range(n)], pa.uint64()),
        "sig_a": pa.array([[a for a, _ in s] for s in sigs], pa.list_(pa.uint64())),
        "sig_b": pa.array([[b for _, b in s] for s in sigs], pa.list_(pa.uint64()))})
    return table, pa.table({f.name: table[f.name] if f.name in table.column_names
                            else pa.nulls(n, f.type) for f in SHARD_SCHEMA})


def test_a_journals_shards_give_the_index_their_images_and_signatures_as_tuples_would(
        tmp_path, monkeypatch):
    """``index_payloads`` turns the shard rows into arrays without a Python object per
    signature; each partition gets what the ``(id, claim, signatures)`` tuples of the same
    rows give, rows without signatures included, in chunks of ``INDEX_CHUNK`` rows."""
    from builder import pipeline
    from builder.dedup import LocalPartitions, id_number

    monkeypatch.setattr(pipeline, "INDEX_CHUNK", 4)
    rng = random.Random(11)
    journal = Journal(str(tmp_path / "ds"), "job1", None)
    rows = []
    for shard in range(3):
        n = 5 + shard
        sigs = [[(rng.getrandbits(64), rng.getrandbits(64)) for _ in range(rng.randint(0, 4))]
                for _ in range(n)]
        table, full = _shard_rows(rng, n, sigs)
        journal.write_shard(f"train-{shard:05d}", full)
        rows += [(id_number(i), c, s) for i, c, s in zip(table["id"].to_pylist(),
                                                          table["claim"].to_pylist(), sigs)]
    client = LocalPartitions(4, k=3).client()
    got = list(pipeline.index_payloads(client, CATS, str(tmp_path / "ds"), "job1", None,
                                       merge=False, retry=False, journal=True))
    assert len(got) == 5  # 18 rows, read as one table, in chunks of 4
    for p, theirs in enumerate(client.load_payloads([], rows)):
        for name, values in theirs.items():
            mine = np.concatenate([chunk[p][name] for chunk in got if name in chunk[p]])
            if name == "u_done":
                continue
            assert mine.dtype == values.dtype and np.array_equal(mine, values), name


def test_a_shard_row_whose_signature_lists_differ_in_length_is_refused(tmp_path):
    """Pairs cannot be made of them: the journal is damaged, and the resume says so."""
    from builder.dedup import LocalPartitions
    from builder.pipeline import index_payloads

    rng = random.Random(12)
    _, full = _shard_rows(rng, 2, [[(1, 2)], [(3, 4)]])
    damaged = full.set_column(full.schema.get_field_index("sig_b"), "sig_b",
                              pa.array([[2], [4, 5]], pa.list_(pa.uint64())))
    Journal(str(tmp_path / "ds"), "job1", None).write_shard("train-00000", damaged)
    with pytest.raises(ResumeError, match="sig_a and sig_b differ in length"):
        list(index_payloads(LocalPartitions(4, k=1).client(), CATS, str(tmp_path / "ds"),
                            "job1", None, merge=False, retry=False, journal=True))


def test_the_published_figures_a_merge_continues_are_kept_once(location):
    """``keep_base`` copies stats.json and rejects.parquet into the journal once: a publish
    that replaces them later, and a resume that keeps the base again, leave the copy as it
    was when the merge began."""
    from builder.storage import open_fs

    uri, options = location
    fs, root = open_fs(uri, options)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/stats.json", b'{"accepted": 3}')
    fs.pipe_file(f"{root}/rejects.parquet", b"rejects before")
    journal = Journal(uri, "job1", options)
    assert journal.base_uri() is None
    journal.keep_base(resuming=False)
    fs.pipe_file(f"{root}/stats.json", b'{"accepted": 5}')  # the merge's publish, half done
    fs.pipe_file(f"{root}/rejects.parquet", b"rejects after")
    again = Journal(uri, "job1", options)
    again.keep_base(resuming=True)
    base = again.base_uri()
    assert base == f"{uri}/_journal/job1/base"
    kept_fs, kept = open_fs(base, options)
    assert kept_fs.cat_file(f"{kept.rstrip('/')}/stats.json") == b'{"accepted": 3}'
    assert kept_fs.cat_file(f"{kept.rstrip('/')}/rejects.parquet") == b"rejects before"


def test_the_kept_figures_come_from_the_dataset_even_where_its_path_reads_as_a_glob(
        tmp_path):
    """``runs[1]`` is a glob to fsspec's ``copy``: it copied the sibling ``runs1``'s files."""
    from builder.storage import open_fs

    for name, figures in (("runs[1]", b'{"accepted": 1}'), ("runs1", b'{"accepted": 9}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "stats.json").write_bytes(figures)
        (tmp_path / name / "rejects.parquet").write_bytes(name.encode())
    journal = Journal(str(tmp_path / "runs[1]"), "job1")
    journal.keep_base(resuming=False)
    fs, kept = open_fs(journal.base_uri())
    assert fs.cat_file(f"{kept}/rejects.parquet") == b"runs[1]"
    assert fs.cat_file(f"{kept}/stats.json") == b'{"accepted": 1}'


def test_a_dataset_this_job_published_into_is_not_kept_as_its_base_on_resume(tmp_path):
    """A resumed job whose journal has no copy (a publish that stopped half way, by an older
    version): the figures there already count its work, and would count it twice. A new job
    of the same id (``--job-id``, used again) continues them as any other: its earlier run
    finished; a copy an earlier job of that id left is not its base."""
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "stats.json").write_text(json.dumps({"job_id": "job1", "accepted": 3}))
    with pytest.raises(ResumeError, match="counted twice"):
        Journal(str(tmp_path / "ds"), "job1").keep_base(resuming=True)
    assert Journal(str(tmp_path / "ds"), "job1").base_uri() is None
    left = tmp_path / "ds" / "_journal" / "job1" / "base"
    left.mkdir(parents=True)
    (left / "stats.json").write_text(json.dumps({"job_id": "job0", "accepted": 1}))
    Journal(str(tmp_path / "ds"), "job1").keep_base(resuming=False)
    assert json.loads((left / "stats.json").read_text())["accepted"] == 3


def test_a_journal_is_no_longer_resumable_once_its_removal_begins(tmp_path, monkeypatch):
    """job.json goes first: a removal that stops half way leaves nothing a --resume takes up
    (its copy of the base may be gone already)."""
    from builder import journal as journal_mod

    journal = Journal(str(tmp_path / "ds"), "job1")
    journal.start(parse_spec({"name": "ds", "target": 1, "classes": {"cat": None},
                              "sources": [{"engine": "urllist", "path": "u.txt"}],
                              "output": {"uri": str(tmp_path / "ds")}}))

    def stops(fs, root):
        raise OSError("the store went away")

    monkeypatch.setattr(journal_mod, "delete_tree", stops)
    with pytest.raises(StorageError):
        journal.remove()
    assert resumable_jobs(str(tmp_path / "ds")) == []


def test_a_new_job_refuses_an_interrupted_journal_of_its_id_and_clears_leftovers(location):
    """--job-id used again: an interrupted job's journal (job.json) is refused unless the
    build replaces it; what a removal that stopped half way left (no job.json) is deleted."""
    uri, options = location
    spec = parse_spec({"name": "j", "classes": {"a": None},
                       "sources": [{"engine": "sandbox", "url": "http://127.0.0.1:1"}]})
    journal, _ = write_journal(uri, options)
    journal.start(spec)
    with pytest.raises(ResumeError, match=f"--resume --job-id {journal.job_id}"):
        journal.begin_new(replaced=False)
    journal.begin_new(replaced=True)  # left to the publisher's prepare, which removes it
    assert journal.meta()["job_id"] == journal.job_id and journal.unit_files()
    journal.fs.rm_file(journal._path("job.json"))
    journal.begin_new(replaced=False)
    journal.fs.invalidate_cache()
    assert not journal.fs.exists(journal.root)
    journal.begin_new(replaced=False)  # nothing there: nothing to do


def test_a_rebuilt_ledger_that_cannot_record_its_numbers_hands_none_out(tmp_path, monkeypatch):
    """The record is written before a number is handed out: a storage failure is the job's
    StorageError (what to check, not a remote traceback), and no number is lost or doubled."""
    from builder.errors import StorageError
    from builder.journal import Journal
    from builder.pipeline import recover_ledger

    uri = str(tmp_path / "ds")
    write_journal(uri, None)
    spec = parse_spec({"name": "ds", "target": 1000, "classes": {"cat": None},
                       "sources": [{"engine": "urllist", "path": str(tmp_path / "urls.txt")}],
                       "output": {"uri": uri}})
    ledger = recover_ledger(spec, uri, "job1", None, merge=False, unjournaled=2)
    write = Journal.write_shard_intent

    def refused(self: Journal, name: str, files: list[str]) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Journal, "write_shard_intent", refused)
    with pytest.raises(StorageError) as exc:
        ledger.next_shard("train")
    assert "record shard numbers" in str(exc.value)
    monkeypatch.setattr(Journal, "write_shard_intent", write)
    assert [ledger.next_shard("train") for _ in range(2)] == [2, 3]


def test_a_recovered_ledger_holds_room_for_the_images_half_written_units_wrote(tmp_path):
    """A unit some of whose images are in committed shards, but which never committed (its
    driver killed, or on Ray its ledger lost), runs again and keeps those images: it asks
    the ledger for room first. A rebuilt ledger knew nothing of them, so other units could
    fill the class; the rerun then left every candidate unused, and the manifest held
    images no count had (publish failed, and every --resume again)."""
    from builder.pipeline import recover_ledger

    uri = str(tmp_path / "ds")
    journal = Journal(uri, "job1")
    spec = parse_spec({"name": "ds", "target": 10, "classes": {"cat": None, "dog": None},
                       "sources": [{"engine": "urllist", "path": str(tmp_path / "urls.txt")}],
                       "output": {"uri": uri}})
    journal.start(spec)
    committed = WorkUnit("done", 0, "list", 0, engine="urllist", slice=0)
    report = UnitReport("done")
    report.classes["cat"] = ClassTally(4, 4, Counter())
    journal.write_unit(committed, report, UNIT_SCHEMA.empty_table())
    rows = [{"id": f"i{n}", "uid": uid, "label": label, "split": "train"}
            for n, (uid, label) in enumerate([("done", "cat")] * 4 + [("half", "cat")] * 3
                                             + [("half", "dog")] * 2 + [("other", "dog")])]
    journal.write_shard("train-00000", with_columns(pa.Table.from_pylist(rows), SHARD_SCHEMA,
                                                    SHARD_SCHEMA.names))
    assert journal.partial_units({"done"}) == {"half": {"cat": 3, "dog": 2}, "other": {"dog": 1}}
    ledger = recover_ledger(spec, uri, "job1", None, merge=False)
    assert ledger.rooms() == {"cat": 3, "dog": 7}
    assert ledger.grants["half"] == {"cat": 3, "dog": 2}
    # the rerun asks again: its written images, and the room no other unit took
    assert ledger.grant("half", {"cat": 7, "dog": 2}, {"cat": 3, "dog": 2}) == \
        {"cat": 6, "dog": 2}


def test_half_written_units_that_never_finished_publish_nothing_and_say_why(tmp_path):
    """A half-written unit that the resumed run never finished (its source kept failing, its
    list changed) left images in shards no count holds: publishing failed on the manifest's
    count with no word of why. Nothing is published, and the error names the unit."""
    from builder.errors import CancelledUnpublished, JobInterrupted
    from builder.job import RunOutcome

    uri = str(tmp_path / "ds")
    spec = parse_spec({"name": "ds", "target": 10, "classes": {"cat": None},
                       "sources": [{"engine": "urllist", "path": str(tmp_path / "urls.txt")}],
                       "output": {"uri": uri}})
    life = JobLifecycle(spec, uri=uri, job_id="job1")
    life.journal = Journal(uri, "job1")
    life.journal.start(spec)
    life.publisher = object()  # never reached
    life.partial_units = {"half": {"cat": 2}}
    rows = [{"id": f"i{n}", "uid": "half", "label": "cat", "split": "train"} for n in range(2)]
    life.journal.write_shard("train-00000", with_columns(pa.Table.from_pylist(rows),
                                                         SHARD_SCHEMA, SHARD_SCHEMA.names))
    with pytest.raises(JobInterrupted, match="1 half-written units never finished .*e.g. half"
                                             ".*--resume"):
        life.publish(RunOutcome({}, cancelled=False), {})
    with pytest.raises(CancelledUnpublished, match="--resume"):
        life.publish(RunOutcome({}, cancelled=True), {})
    assert not (tmp_path / "ds" / "_SUCCESS").exists()
    # one the run met but whose images no committed shard holds is nothing to refuse for
    life.partial_units = {"lost": {"cat": 1}}
    life.journal.write_unit(WorkUnit("half", 0, "list", 0, engine="urllist", slice=0),
                            UnitReport("half"), UNIT_SCHEMA.empty_table())

    class Reached(Exception):
        pass

    class Publisher:  # the first use of the publisher is past the check
        def __getattr__(self, name):
            raise Reached(name)

    life.publisher = Publisher()
    with pytest.raises(Reached):
        life.publish(RunOutcome({"accepted": 0, "rejected": 0, "candidates": 0},
                                cancelled=True), {})


def test_a_units_written_rows_read_each_shard_file_once_for_its_units(tmp_path, monkeypatch):
    """A resent unit takes back what an earlier attempt wrote (``unit_rows``). Its worker
    keeps which units each shard file holds, so a later resent unit reads only the shard
    files written since, and then the files that hold it."""
    uri = str(tmp_path / "ds")
    journal = Journal(uri, "job1")
    journal.start(parse_spec({"name": "ds", "classes": {"cat": None},
                              "sources": [{"engine": "urllist",
                                           "path": str(tmp_path / "urls.txt")}],
                              "output": {"uri": uri}}))

    def shard(name: str, uids: list[str]) -> None:
        rows = [{"id": f"{name}{n}", "uid": uid, "claim": n, "label": "cat", "url": f"u{n}"}
                for n, uid in enumerate(uids)]
        schema = pa.schema([SHARD_SCHEMA.field(k) for k in rows[0]])
        journal.write_shard(name, with_columns(pa.Table.from_pylist(rows, schema=schema),
                                               SHARD_SCHEMA, SHARD_SCHEMA.names))

    read: list[str] = []
    contents = Journal._contents

    def counted(self, paths):
        read.extend(p.rsplit("/", 1)[-1] for p in paths)
        return contents(self, paths)

    monkeypatch.setattr(Journal, "_contents", counted)
    seen: dict[str, frozenset[str]] = {}
    shard("train-00000", ["a", "b", "a"])
    shard("train-00001", ["b"])
    assert [r["id"] for r in journal.unit_rows("a", seen)] == ["train-000000", "train-000002"]
    assert read == ["train-00000.parquet", "train-00001.parquet", "train-00000.parquet"]
    read.clear()
    shard("train-00002", ["c", "a"])
    rows = journal.unit_rows("a", seen)
    assert [(r["id"], r["claim"], r["url"]) for r in rows] == [
        ("train-000000", 0, "u0"), ("train-000002", 2, "u2"), ("train-000021", 1, "u1")]
    assert read == ["train-00002.parquet", "train-00000.parquet", "train-00002.parquet"]
    assert journal.unit_rows("z", seen) == [] and set(rows[0]) == set(WRITTEN_COLUMNS)
    # a journal written before shard rows kept their rights ledger: read as none
    pq.write_table(pa.table({"id": ["old"], "uid": ["d"], "claim": pa.array([7], pa.uint64())}),
                   journal._path("shards", "train-00003.parquet"))
    [old] = journal.unit_rows("d", seen)
    assert (old["id"], old["claim"], old["rights"]) == ("old", 7, None)


def test_a_search_outcome_is_journaled_without_its_default_fields():
    """A field added to ``SearchOutcome`` (``refused``, ``probes_failed``) made every journaled
    search carry it, and a version before it, resuming the journal, failed on the unknown
    field. What is at its default stays out; an outcome written in full still reads."""
    unit = WorkUnit(seq=1, uid="s0", kind="search", source=0, engine="sandbox", label="cat",
                    query="q", page=2)
    report = UnitReport("s0", search=SearchOutcome(hits=3, has_more=True))
    data = json.loads(json.dumps(journal_mod.report_to_json(unit, report)))
    assert data["search"] == {"hits": 3, "has_more": True}
    assert journal_mod.report_from_json(data)[1].search == report.search
    data["search"] = {"hits": 0, "has_more": False, "error": "", "retryable": False,
                      "retry_after": None, "final": False}
    assert journal_mod.report_from_json(data)[1].search == SearchOutcome()
