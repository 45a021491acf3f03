"""Metric tags: Ray encodes tag values as ASCII, so every label (café, 猫, 😺) is written as a
readable, reversible ASCII escape instead of failing the job with UnicodeEncodeError. Ray's
metric objects record without a running Ray, so no cluster is needed here."""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path

import pytest

from actors.metrics import counters, exported_series, queue_depth, stage_latency, tag_value

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


ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "cluster" / "grafana" / "pixcrawler.json"
SERIES = re.compile(r"\bray_pixcrawler_\w+")


def _queries(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def test_the_grafana_dashboard_queries_only_what_the_job_exports_and_all_of_it():
    exported = exported_series()
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {name for expr in _queries(dashboard) for name in SERIES.findall(expr)}
    assert queried and queried <= set(exported), queried - set(exported)
    bases = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in exported}
    assert bases <= {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in queried}
    for expr in _queries(dashboard):
        tags = set().union(*(exported[n] for n in SERIES.findall(expr)))
        grouped = {t.strip() for group in re.findall(r"by \(([^)]*)\)", expr)
                   for t in group.split(",")}
        matched = set(re.findall(r"(\w+)=~?\"", expr))
        assert grouped | matched <= tags, (expr, (grouped | matched) - tags)


def test_the_readme_lists_the_metrics_as_exported():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("**Watching a job.**", 1)[1].split("**Grafana.**", 1)[0]
    listed = set(re.findall(r"`(ray_pixcrawler_\w+)\{([^}]*)\}`", section))
    exported = exported_series()
    assert {name for name, _ in listed} | {
        "ray_pixcrawler_stage_latency_s_sum", "ray_pixcrawler_stage_latency_s_count"} == \
        set(exported)
    for name, tags in listed:
        assert tuple(tags.split(",")) == exported[name]
    assert "cluster/grafana/pixcrawler.json" in readme
