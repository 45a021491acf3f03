"""builder.text: text from outside (headers, lists, search answers, JSON) that holds lone
surrogates is made well-formed before it is hashed, put in a URL or written to Arrow."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from multidict import CIMultiDict

from builder.reasons import Reason
from builder.records import (ROW_SCHEMA, REJECT_SCHEMA, Candidate, Record, accepted_row,
                             reject_row)
from builder.rights import first_refusal
from builder.signals import ResponseSignals, parse_tdmrep
from builder.spec import DownloadSpec
from builder.text import well_formed
from builder.urls import check_url


def _escaped(raw: bytes) -> str:
    """A header value as aiohttp gives it: UTF-8, undecodable bytes kept as surrogates."""
    return raw.decode("utf-8", "surrogateescape")


@pytest.mark.parametrize("text,expected", [
    ("plain ascii", "plain ascii"),
    ("café, 猫", "café, 猫"),
    (_escaped(b"caf\xe9"), "café"),  # a Latin-1 byte, escaped: read as Latin-1
    (json.loads('"a\\ud800b"'), "a\ufffdb"),  # a lone surrogate spelled in JSON
    (json.loads('"\\ud83d\\ude00"'), "\U0001F600"),  # a pair is a character, left alone
])
def test_well_formed_replaces_only_lone_surrogates(text, expected):
    assert well_formed(text) == expected
    well_formed(text).encode("utf-8")


def test_a_candidate_with_lone_surrogates_is_checked_keyed_and_written():
    """A URL list or search answer can carry ``\\ud800`` escapes: the candidate's text is
    made well-formed, so its URL is checked, its key made and its rows written."""
    odd = json.loads('"\\ud800"')
    c = Candidate(f"http://example.com/a{odd}.jpg?q={odd}", "cat", title=f"t{odd}",
                  caption=f"c{odd}", page_url=f"http://example.com/{odd}")
    assert "\ufffd" in c.url and c.title == "t\ufffd" and c.caption == "c\ufffd"
    norm, reason, _ = check_url(c.url)
    assert reason is None and norm
    assert len(c.key) == 16
    record = Record(c, data=b"x", sha256="ab" * 32, format="jpeg", width=1, height=1)
    pa.Table.from_pylist([accepted_row(record)], schema=ROW_SCHEMA)
    record.reject(*check_url("ftp://x")[1:])
    pa.Table.from_pylist([reject_row(record)], schema=REJECT_SCHEMA)


def test_opt_out_headers_with_undecodable_bytes_reach_the_rights_column_and_the_rejects():
    """A site's X-Robots-Tag or Content-Usage header with a Latin-1 byte (aiohttp keeps it as
    a surrogate) is read, recorded in the accepted row's ``rights`` and, when it refuses, in
    the reject's detail, instead of stopping the unit at the write."""
    read = ResponseSignals(DownloadSpec())
    allowed = read(CIMultiDict({"X-Robots-Tag": _escaped(b"index, caf\xe9")}))
    record = Record(Candidate("http://example.com/a.jpg", "cat"), data=b"x", sha256="ab" * 32,
                    format="jpeg", width=1, height=1, rights=allowed)
    table = pa.Table.from_pylist([accepted_row(record)], schema=ROW_SCHEMA)
    values = [s["value"] for s in table.column("rights").to_pylist()[0]]
    assert "index, café" in values
    refused = read(CIMultiDict({"Content-Usage": _escaped(b"train-ai=n; note=caf\xe9")}))
    refusal = first_refusal(refused)
    assert refusal is not None
    record.reject(Reason.OPTED_OUT, refusal.describe())
    assert "café" in record.detail
    pa.Table.from_pylist([reject_row(record)], schema=REJECT_SCHEMA)


def test_a_tdmrep_policy_with_a_lone_surrogate_is_written():
    rules, _ = parse_tdmrep(200, b'[{"location": "*", "tdm-reservation": 0, '
                                 b'"tdm-policy": "x\\udc80"}]')
    record = Record(Candidate("http://example.com/a.jpg", "cat"), data=b"x", sha256="ab" * 32,
                    format="jpeg", width=1, height=1, rights=(rules[0].signal,))
    pa.Table.from_pylist([accepted_row(record)], schema=ROW_SCHEMA)
