"""The sandbox web's search endpoint as an engine, against answers of the wrong shape."""

from __future__ import annotations

import email.utils
import time

import pytest

from builder.engines.sandbox import SandboxEngine
from builder.errors import EngineError
from tests.builder.engines.fakes import FakeServer, Response


def _search(srv: FakeServer, page: int = 0):
    return SandboxEngine(srv.url, timeout_s=3, allow_private_networks=True).search(
        "cat", label="cat", page=page, per_page=10)


def test_maps_results():
    body = {"results": [{"url": "http://h/a.jpg", "page_url": "http://h/a", "title": "A",
                         "license": "CC0", "author": "me"}], "has_more": True}
    with FakeServer(lambda req: Response(200, body)) as srv:
        page = _search(srv, page=2)
    hit = page.hits[0]
    assert (hit.url, hit.rank, hit.page_url, hit.title, hit.license, hit.author) == \
        ("http://h/a.jpg", 20, "http://h/a", "A", "CC0", "me")
    assert page.has_more
    assert srv.requests[0].path == "/search"
    assert srv.requests[0].query == {"q": "cat", "page": "2", "per_page": "10"}


def test_malformed_results_keep_the_good_hits_with_text_fields():
    body = {"results": [{"title": "no url"}, {"url": None}, {"url": 12345}, {"url": {"a": 1}},
                        {"url": ""}, "junk", None,
                        {"url": "http://h/a.jpg", "title": ["t"], "page_url": 5,
                         "license": None, "author": 7}],
            "has_more": False}
    with FakeServer(lambda req: Response(200, body)) as srv:
        page = _search(srv)
    assert [(h.url, h.rank) for h in page.hits] == [("http://h/a.jpg", 7)]
    hit = page.hits[0]
    assert (hit.title, hit.page_url, hit.license, hit.author) == ("", "", "", "7")


@pytest.mark.parametrize("body", [[1, 2], {"results": {"url": "http://h/a.jpg"}}, "x",
                                  b"[" * 50_000, b"<html>blocked</html>"])
def test_answer_of_the_wrong_shape_is_a_retryable_engine_error(body):
    with FakeServer(lambda req: Response(200, body)) as srv:
        with pytest.raises(EngineError) as info:
            _search(srv)
    assert info.value.retryable


def test_http_date_retry_after_is_parsed():
    past = "Wed, 21 Oct 2015 07:28:00 GMT"
    future = email.utils.formatdate(time.time() + 120, usegmt=True)
    with FakeServer(lambda req: Response(200, {"results": []})) as srv:
        srv.fail_next(status=503, headers={"Retry-After": past})
        srv.fail_next(status=429, headers={"Retry-After": future})
        srv.fail_next(status=503, headers={"Retry-After": "soon"})
        errors = []
        for _ in range(3):
            with pytest.raises(EngineError) as info:
                _search(srv)
            errors.append(info.value)
    assert all(e.retryable for e in errors)
    assert [e.status for e in errors] == [503, 429, 503]
    assert errors[0].retry_after == 0.0
    assert 60 < errors[1].retry_after <= 120
    assert errors[2].retry_after is None
