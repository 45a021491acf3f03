"""Google Custom Search engine against a fake of the JSON API."""

from __future__ import annotations

import logging
from datetime import date

import pytest

from builder.engines.google import SUNSET, GoogleEngine
from builder.errors import EngineError, EngineUnavailable
from tests.builder.engines.fakes import (
    FakeServer,
    Response,
    fake_images,
    google_handler,
    google_quota_error,
)

KEY, CX = "AIza-test-key", "cx-test"
TODAY = date(2026, 12, 2)
"""These tests run as of this date, whatever the clock says (the API ends on 2027-01-01)."""


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GOOGLE_API_KEY", "GOOGLE_CSE_KEY", "GOOGLE_CSE_ID"):
        monkeypatch.delenv(name, raising=False)


def _engine(srv: FakeServer, **kw) -> GoogleEngine:
    return GoogleEngine(f"{srv.url}/customsearch/v1", api_key=KEY, cse_id=CX, today=TODAY,
                        allow_private_networks=True, **kw)


def test_missing_credentials_name_the_env_vars(monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(EngineUnavailable, match="GOOGLE_API_KEY and GOOGLE_CSE_ID"):
        GoogleEngine(today=TODAY)
    monkeypatch.setenv("GOOGLE_CSE_KEY", "k")
    with pytest.raises(EngineUnavailable, match="missing: GOOGLE_CSE_ID") as info:
        GoogleEngine(today=TODAY)
    assert "ends on 2027-01-01, in 30 days" in str(info.value)
    monkeypatch.setenv("GOOGLE_CSE_ID", "c")
    assert GoogleEngine(today=TODAY).api_key == "k"


def test_maps_items_and_requests_image_search():
    images = fake_images(15)
    with FakeServer(google_handler(images, key=KEY, cx=CX)) as srv:
        page = _engine(srv, region="de-de").search("cat", label="cat", page=0, per_page=5)
    assert [h.url for h in page.hits] == [img["url"] for img in images[:5]]
    hit = page.hits[3]
    assert (hit.rank, hit.page_url, hit.title) == (3, images[3]["page_url"], "Cat number 3")
    assert page.has_more
    q = srv.requests[0].query
    assert (q["searchType"], q["start"], q["num"], q["cx"]) == ("image", "1", "5", CX)
    assert q["safe"] == "active" and q["gl"] == "de"


def test_pages_of_more_than_10_take_several_requests_and_stop_at_the_end():
    images = fake_images(23)
    with FakeServer(google_handler(images, key=KEY, cx=CX)) as srv:
        engine = _engine(srv)
        first = engine.search("cat", label="cat", page=0, per_page=15)
        second = engine.search("cat", label="cat", page=1, per_page=15)
    assert [len(first.hits), len(second.hits)] == [15, 8]
    assert [first.has_more, second.has_more] == [True, False]
    assert [h.rank for h in second.hits] == list(range(15, 23))
    assert [(r.query["start"], r.query["num"]) for r in srv.requests] == \
        [("1", "10"), ("11", "5"), ("16", "10")]


def test_a_search_counts_its_requests_for_the_limiter():
    """The limiter charges an engine's budget per request: a page of 25 is three requests
    to Google, and a search that fails on its second request took two."""
    handler = google_handler(fake_images(60), key=KEY, cx=CX)

    def second_search_fails_on_its_second_request(req):
        return Response(500, b"oops") if len(srv.requests) == 5 else handler(req)

    with FakeServer(second_search_fails_on_its_second_request) as srv:
        engine = _engine(srv)
        assert engine.search("cat", label="cat", page=0, per_page=25).requests == 3
        with pytest.raises(EngineError) as info:
            engine.search("cat", label="cat", page=0, per_page=25)
    assert info.value.requests == 2 and len(srv.requests) == 5


def test_never_asks_past_the_first_100_results():
    images = fake_images(150)
    with FakeServer(google_handler(images, key=KEY, cx=CX)) as srv:
        engine = _engine(srv)
        last = engine.search("cat", label="cat", page=4, per_page=20)
        beyond = engine.search("cat", label="cat", page=5, per_page=20)
    assert len(last.hits) == 20 and not last.has_more
    assert beyond.hits == [] and not beyond.has_more
    assert all(int(r.query["start"]) + int(r.query["num"]) - 1 <= 100 for r in srv.requests)


def test_no_items_is_an_empty_last_page():
    with FakeServer(google_handler([], key=KEY, cx=CX)) as srv:
        page = _engine(srv).search("zzz", label="zzz", page=0, per_page=10)
    assert page.hits == [] and not page.has_more


def test_rate_limit_429_is_retryable_daily_quota_403_is_not():
    with FakeServer(google_handler(fake_images(5), key=KEY, cx=CX)) as srv:
        srv.fail_next(status=429, body=google_quota_error(429), headers={"Retry-After": "30"})
        srv.fail_next(status=403, body=google_quota_error(403))
        engine = _engine(srv)
        with pytest.raises(EngineError) as rate:
            engine.search("cat", label="cat", page=0, per_page=5)
        with pytest.raises(EngineError) as daily:
            engine.search("cat", label="cat", page=0, per_page=5)
    assert rate.value.retryable and rate.value.status == 429 and rate.value.retry_after == 30
    assert not daily.value.retryable and daily.value.status == 403
    assert "Quota exceeded" in str(daily.value)
    assert str(daily.value).startswith("google: 403: the key's daily quota is spent")
    assert KEY not in str(rate.value) and KEY not in str(daily.value)


def test_bad_key_is_a_non_retryable_error():
    with FakeServer(google_handler(fake_images(5), key="other", cx=CX)) as srv:
        with pytest.raises(EngineError) as info:
            _engine(srv).search("cat", label="cat", page=0, per_page=5)
    assert info.value.status == 400 and not info.value.retryable


@pytest.mark.parametrize("queries", [[], ["nextPage"], "x", None, {"nextPage": []}])
def test_malformed_items_keep_the_good_hits_with_text_fields(queries):
    """``image`` as a string, a dict as link, odd ``queries``: good items come through and the
    paging ends."""
    body = {"queries": queries, "items": [
        {"link": "https://a.example/x.jpg", "image": "s", "title": ["t"]},
        {"link": {"x": 1}}, {"link": 12345}, "junk", None,
        {"link": "https://a.example/y.jpg", "image": {"contextLink": 5}, "title": 3},
        {"link": "https://a.example/z.jpg", "image": {"contextLink": "https://p.example/z"}},
    ]}
    with FakeServer(lambda req: Response(200, body)) as srv:
        page = _engine(srv).search("cat", label="cat", page=0, per_page=10)
    assert [(h.url, h.rank) for h in page.hits] == [("https://a.example/x.jpg", 0),
                                                    ("https://a.example/y.jpg", 5),
                                                    ("https://a.example/z.jpg", 6)]
    assert [(h.page_url, h.title) for h in page.hits] == \
        [("", ""), ("", "3"), ("https://p.example/z", "")]
    assert not page.has_more and len(srv.requests) == 1


def test_a_key_without_access_is_explained_not_called_a_quota():
    denied = {"error": {"code": 403, "message": "This project does not have the access to "
                        "Custom Search JSON API.", "errors": [{"message": "This project does "
                        "not have the access to Custom Search JSON API.", "domain": "global",
                        "reason": "forbidden"}], "status": "PERMISSION_DENIED"}}
    with FakeServer(google_handler(fake_images(5), key=KEY, cx=CX)) as srv:
        srv.fail_next(status=403, body=denied)
        with pytest.raises(EngineError) as info:
            _engine(srv).search("cat", label="cat", page=0, per_page=5)
    message = str(info.value)
    assert info.value.status == 403 and not info.value.retryable
    assert message.startswith("google: 403 PERMISSION_DENIED: this key's project has no access")
    assert "closed the API to new customers" in message and "not a quota" in message
    assert "duckduckgo, bing, wikimedia or openverse" in message


def test_a_dated_deprecation_warning_until_the_sunset(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="pixcrawler.engines.google"):
        GoogleEngine(api_key=KEY, cse_id=CX, today=TODAY)
    assert "closed to new customers" in caplog.text
    assert "ends on 2027-01-01, in 30 days" in caplog.text


@pytest.mark.parametrize("today", [SUNSET, date(2027, 6, 1)])
def test_refused_from_the_sunset_on_with_a_pointer_to_the_others(today: date):
    with pytest.raises(EngineUnavailable) as info:
        GoogleEngine(api_key=KEY, cse_id=CX, today=today)
    assert "ended on 2027-01-01" in str(info.value)
    assert "duckduckgo, bing, wikimedia or openverse" in str(info.value)
