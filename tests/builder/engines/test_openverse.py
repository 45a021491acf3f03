"""Openverse engine against a fake of its /v1/images/ API."""

from __future__ import annotations

import pytest

from builder.engines.openverse import OpenverseEngine, format_license
from builder.errors import EngineError
from tests.builder.engines.fakes import FakeServer, Response, fake_images, openverse_handler


def _local(url: str, **kwargs) -> OpenverseEngine:
    """The engine against a fake on 127.0.0.1, a private address the spec would allow
    with download.allow_private_networks."""
    return OpenverseEngine(url, allow_private_networks=True, **kwargs)


@pytest.fixture(autouse=True)
def _no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENVERSE_TOKEN", raising=False)


def test_maps_results_with_license_and_creator():
    images = fake_images(5)
    with FakeServer(openverse_handler(images)) as srv:
        page = _local(f"{srv.url}/v1/images/").search("cat", label="cat", page=0,
                                                      per_page=5)
    assert [h.url for h in page.hits] == [img["url"] for img in images]
    hit = page.hits[1]
    assert (hit.rank, hit.page_url, hit.title) == (1, images[1]["page_url"], "Cat number 1")
    assert hit.license == "CC BY 2.0" and hit.author == "Photographer 1"
    assert page.hits[2].license == "CC0 1.0"
    assert not page.has_more
    q = srv.requests[0].query
    assert (q["q"], q["page"], q["page_size"]) == ("cat", "1", "5")
    assert "authorization" not in srv.requests[0].headers


def test_pages_are_one_based_and_end_with_page_count():
    images = fake_images(25)
    with FakeServer(openverse_handler(images)) as srv:
        engine = _local(f"{srv.url}/v1/images/")
        pages = [engine.search("cat", label="cat", page=p, per_page=10) for p in range(3)]
    assert [len(p.hits) for p in pages] == [10, 10, 5]
    assert [p.has_more for p in pages] == [True, True, False]
    assert [r.query["page"] for r in srv.requests] == ["1", "2", "3"]
    assert [h.url for p in pages for h in p.hits] == [img["url"] for img in images]


def test_anonymous_pages_are_capped_at_20_and_mapped_onto_ours():
    images = fake_images(100)
    with FakeServer(openverse_handler(images)) as srv:
        page = _local(f"{srv.url}/v1/images/").search("cat", label="cat", page=1,
                                                      per_page=30)
    assert [h.rank for h in page.hits] == list(range(30, 60))
    assert [h.url for h in page.hits] == [img["url"] for img in images[30:60]]
    assert [(r.query["page"], r.query["page_size"]) for r in srv.requests] == \
        [("2", "20"), ("3", "20")]
    assert page.has_more


def test_token_is_sent_and_allows_big_pages():
    images = fake_images(60)
    with FakeServer(openverse_handler(images, token="tok-123")) as srv:
        page = _local(f"{srv.url}/v1/images/", token="tok-123").search("cat", label="cat",
                                                                       page=0, per_page=50)
    assert len(page.hits) == 50 and page.has_more
    assert srv.requests[0].headers["authorization"] == "Bearer tok-123"
    assert srv.requests[0].query["page_size"] == "50"


def test_bad_token_is_not_retryable():
    with FakeServer(openverse_handler(fake_images(3), token="right")) as srv:
        with pytest.raises(EngineError) as info:
            _local(f"{srv.url}/v1/images/", token="wrong").search(
                "cat", label="cat", page=0, per_page=5)
    assert info.value.status == 401 and not info.value.retryable


def test_throttled_is_retryable_with_retry_after():
    with FakeServer(openverse_handler(fake_images(3))) as srv:
        srv.fail_next(status=429, headers={"Retry-After": "56"},
                      body={"detail": "Request was throttled. Expected available in 56 seconds."})
        with pytest.raises(EngineError) as info:
            _local(f"{srv.url}/v1/images/").search("cat", label="cat", page=0,
                                                   per_page=5)
    assert info.value.retryable and info.value.status == 429 and info.value.retry_after == 56.0
    assert "throttled" in str(info.value)


def test_empty_result_and_safesearch_off_asks_for_mature():
    with FakeServer(openverse_handler([])) as srv:
        page = _local(f"{srv.url}/v1/images/", safesearch="off",
                      filters={"license_type": "commercial", "bogus": "x"}).search(
            "nothing", label="x", page=0, per_page=5)
    assert page.hits == [] and not page.has_more
    q = srv.requests[0].query
    assert q["mature"] == "true" and q["license_type"] == "commercial" and "bogus" not in q


def test_format_license():
    assert format_license("by-nc-sa", "3.0") == "CC BY-NC-SA 3.0"
    assert format_license("pdm", "1.0") == "Public Domain Mark 1.0"
    assert format_license("") == ""


def test_malformed_results_keep_the_good_hits_with_text_fields():
    """Wrong JSON types never crash: junk URLs are dropped, junk text becomes "", and an
    infinite ``page_count`` ends the paging."""
    body = (b'{"page_count": 1e999, "results": ['
            b'{"url": "https://a.example/x.jpg", "license": 5, "license_version": [1],'
            b' "title": ["t"], "creator": {"n": 1}, "foreign_landing_url": null},'
            b' {"url": {"a": 1}}, {"url": 12345}, {"url": null}, {"url": "  "}, "junk", 7,'
            b' {"url": "https://a.example/y.jpg", "title": 7, "license": "by",'
            b' "license_version": 2.0, "foreign_landing_url": 3}]}')
    with FakeServer(lambda req: Response(200, body)) as srv:
        page = _local(f"{srv.url}/v1/images/").search("cat", label="cat", page=0,
                                                      per_page=10)
    assert [(h.url, h.rank) for h in page.hits] == [("https://a.example/x.jpg", 0),
                                                    ("https://a.example/y.jpg", 7)]
    x, y = page.hits
    assert (x.title, x.license, x.author, x.page_url) == ("", "", "", "")
    assert (y.title, y.license, y.page_url) == ("7", "CC BY 2.0", "")
    assert not page.has_more


@pytest.mark.parametrize("body", [
    {"results": {"url": "https://a.example/x.jpg"}}, [1, 2], {"results": None}, b"[" * 50_000,
])
def test_answer_of_the_wrong_shape_is_a_retryable_engine_error(body):
    with FakeServer(lambda req: Response(200, body)) as srv:
        with pytest.raises(EngineError) as info:
            _local(f"{srv.url}/v1/images/").search("cat", label="cat", page=0,
                                                   per_page=5)
    assert info.value.retryable


def test_format_license_of_junk_is_empty():
    assert format_license(5, "1.0") == "" and format_license(None) == ""
    assert format_license(["by"]) == "" and format_license("by", None) == "CC BY"
