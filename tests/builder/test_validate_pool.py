"""Validation in worker processes gives the caller's records what validation in this process
would, on the same objects."""

from __future__ import annotations

import copy

from builder.reasons import Reason
from builder.records import Candidate, Record
from builder.spec import ValidationSpec
from builder.validate import ImageValidator
from builder.validate_pool import ProcessValidator
from tests.images import encode, jpeg, picture


def batch() -> list[Record]:
    bodies = [jpeg(1, (640, 480)), encode(picture(2), "PNG"), jpeg(3)[:900], b"not an image",
              jpeg(1, (640, 480))]
    return [Record(Candidate(f"http://x/{i}", "cat"), data=body) for i, body in enumerate(bodies)]


def test_processes_validate_as_this_process_does_onto_the_same_records():
    cfg = ValidationSpec(level="medium")
    here = ImageValidator(cfg)(batch())
    records = batch()
    candidates = [r.candidate for r in records]
    pool = ProcessValidator(cfg, 2)
    try:
        out = pool(records)
    finally:
        pool.close()
    assert out is records and [r.candidate for r in records] == candidates
    assert all(a.candidate is b for a, b in zip(records, candidates))  # the same objects
    assert [vars(r) for r in records] == [vars(r) for r in here]
    assert [r.rejected for r in records] == [False, False, True, True, False]
    assert records[0].phash and records[0].sha256 == records[4].sha256


def test_a_record_rejected_before_is_left_as_it_was():
    records = batch()[:1]
    records[0].reject(Reason.TIMEOUT, "gave up")
    before = copy.deepcopy(vars(records[0]))
    pool = ProcessValidator(ValidationSpec(level="medium"), 1)
    try:
        pool(records)
    finally:
        pool.close()
    assert vars(records[0]) == before
