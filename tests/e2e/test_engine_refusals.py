"""An engine that refuses for a while (its breaker open) delays a job; it does not cut it short."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request

import pytest

from builder.spec import parse_spec
from tests.builder.engines.fakes import FakeServer, Request, Response
from tests.e2e.helpers import check_accounting, run_on

COOLDOWN_S = 12.0
"""Longer than three of a refused search's old retries (5 s apart), which ended the job."""


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_a_429_storm_that_opens_the_breaker_delays_the_job_and_it_still_fills(
        runner, sandbox, tmp_path, request):
    """The engine answers 429 for its first 2 s (its breaker, at the default 5 failures in a
    row, opens for 12 s), then serves. The classes have one query each and no other source:
    each waits out the cooldown, the probe succeeds, and every class fills. Before, three
    errors ended a query, refusals of the open breaker among them, a few seconds apart, and
    the job ended with nothing while the engine was back 12 s later."""
    first: list[float] = []

    def handle(req: Request) -> Response:
        first.append(time.monotonic())
        if first[-1] - first[0] < 2.0:
            return Response(429, {})
        qs = urllib.parse.urlencode(req.query)
        body = urllib.request.urlopen(f"{sandbox.base_url}/search?{qs}", timeout=5).read()
        return Response(200, json.loads(body))

    out = tmp_path / "o"
    with FakeServer(handle) as server:
        spec = parse_spec({
            "name": "refused", "target": 4,
            "classes": {"cat": ["cat a"], "dog": ["dog a"]},
            "sources": [{"engine": "sandbox", "url": server.url, "per_page": 4,
                         "options": {"cooldown_s": COOLDOWN_S}}],
            "download": {"timeout_s": 2.0, "retries": 0, "allow_private_networks": True},
            "output": {"uri": str(out)}})
        started = time.monotonic()
        run_on(runner, spec, request)
        took = time.monotonic() - started
    stats = check_accounting(str(out))
    assert {label: c["accepted"] for label, c in stats["classes"].items()} == \
        {"cat": 4, "dog": 4}
    assert took >= COOLDOWN_S * 0.9, f"the job ended in {took:.1f}s, before the cooldown"
    refusals = [e for e in stats["search_errors"] if "circuit open" in e["error"]]
    assert sorted(e["label"] for e in refusals) == ["cat", "dog"]  # one each, not one a try
