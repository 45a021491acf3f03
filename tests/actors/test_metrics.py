"""Metric tags: Ray encodes tag values as ASCII, so every label (café, 猫, 😺) is written as a
readable, reversible ASCII escape instead of failing the job with UnicodeEncodeError. Ray's
metric objects record without a running Ray, so no cluster is needed here."""

from __future__ import annotations

import codecs

import pytest

from actors.metrics import counters, queue_depth, stage_latency, tag_value

LABELS = ["café", "猫", "😺", "mammals/dog", "a\\u00e9", "a\\b", "tab\there", "plain"]


def test_tag_values_are_ascii_readable_and_reversible():
    assert tag_value("café") == "caf\\u00e9"
    assert tag_value("猫") == "\\u732b"
    assert tag_value("😺") == "\\U0001f63a"
    assert tag_value("mammals/red_fox") == "mammals/red_fox"
    values = [tag_value(label) for label in LABELS]
    assert all(v.isascii() and v.isprintable() for v in values)
    assert len(set(values)) == len(LABELS)  # a label written like an escape stays distinct
    assert [codecs.decode(v, "unicode_escape") for v in values] == LABELS


@pytest.mark.parametrize("label", LABELS)
def test_every_metric_takes_any_label(label):
    c = counters()
    c["candidates"].inc(3, tags={"job": "j-1", "label": label})
    c["accepted"].inc(1, tags={"job": "j-1", "label": label})
    queue_depth().set(2, tags={"job": "j-1", "queue": label})
    stage_latency().observe(0.1, tags={"job": "j-1", "stage": label})
