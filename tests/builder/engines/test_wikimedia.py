"""Wikimedia Commons engine against a fake of the MediaWiki API."""

from __future__ import annotations

import pytest

from builder.engines.wikimedia import WikimediaEngine
from builder.errors import EngineError
from tests.builder.engines.fakes import FakeServer, Response, fake_images, wikimedia_handler


def _local(url: str, **kwargs) -> WikimediaEngine:
    """The engine against a fake on 127.0.0.1, a private address the spec would allow
    with download.allow_private_networks."""
    return WikimediaEngine(url, allow_private_networks=True, **kwargs)


def test_maps_url_page_title_license_and_author_in_search_order():
    images = fake_images(8)
    with FakeServer(wikimedia_handler(images)) as srv:
        page = _local(f"{srv.url}/w/api.php").search("cat", label="cat", page=0,
                                                       per_page=5)
    assert [h.url for h in page.hits] == [img["url"] for img in images[:5]]
    first = page.hits[0]
    assert first.rank == 0
    assert first.page_url == "https://commons.wikimedia.org/wiki/File:cat-000.jpg"
    assert first.title == "Cat number 0"
    assert first.license == "CC BY-SA 4.0"
    assert first.author == "Photographer 0"  # HTML link stripped
    assert first.caption == "A Cat number 0 asleep"  # the description, as text
    assert page.has_more
    q = srv.requests[0].query
    assert q["generator"] == "search" and q["gsrnamespace"] == "6"
    assert q["gsrsearch"] == "cat filetype:bitmap"
    assert q["prop"] == "imageinfo" and "extmetadata" in q["iiprop"]
    assert (q["gsrlimit"], q["gsroffset"]) == ("5", "0")
    assert "PixCrawler" in srv.requests[0].headers["user-agent"]


def test_pages_by_offset_until_no_continue():
    images = fake_images(12)
    with FakeServer(wikimedia_handler(images)) as srv:
        engine = _local(f"{srv.url}/w/api.php")
        pages = [engine.search("cat", label="cat", page=p, per_page=5) for p in range(3)]
    assert [len(p.hits) for p in pages] == [5, 5, 2]
    assert [p.has_more for p in pages] == [True, True, False]
    assert [h.rank for h in pages[2].hits] == [10, 11]
    assert [h.url for p in pages for h in p.hits] == [img["url"] for img in images]
    assert [r.query["gsroffset"] for r in srv.requests] == ["0", "5", "10"]


def test_large_pages_are_fetched_in_api_sized_chunks():
    images = fake_images(120)
    with FakeServer(wikimedia_handler(images)) as srv:
        page = _local(f"{srv.url}/w/api.php").search("cat", label="cat", page=0,
                                                       per_page=110)
    assert len(page.hits) == 110 and page.has_more
    assert [(r.query["gsroffset"], r.query["gsrlimit"]) for r in srv.requests] == \
        [("0", "50"), ("50", "50"), ("100", "10")]


def test_non_raster_files_are_dropped_and_empty_search_ends():
    images = fake_images(4)
    with FakeServer(wikimedia_handler(images, mimes={1: "application/pdf",
                                                     2: "image/svg+xml"})) as srv:
        engine = _local(f"{srv.url}/w/api.php")
        page = engine.search("cat", label="cat", page=0, per_page=10)
        empty = engine.search("cat", label="cat", page=5, per_page=10)
    assert [h.url for h in page.hits] == [images[0]["url"], images[3]["url"]]
    assert [h.rank for h in page.hits] == [0, 3]
    assert not page.has_more
    assert empty.hits == [] and not empty.has_more


def test_429_is_retryable_with_retry_after():
    with FakeServer(wikimedia_handler(fake_images(3))) as srv:
        srv.fail_next(status=429, headers={"Retry-After": "7"}, body=b"Too many requests")
        with pytest.raises(EngineError) as info:
            _local(f"{srv.url}/w/api.php").search("cat", label="cat", page=0,
                                                   per_page=5)
    assert info.value.retryable and info.value.status == 429 and info.value.retry_after == 7.0


def test_api_error_object_maps_to_engine_error():
    with FakeServer(wikimedia_handler(fake_images(3))) as srv:
        srv.fail_next(status=200, body={"error": {"code": "ratelimited",
                                                  "info": "You've exceeded your rate limit."}})
        srv.fail_next(status=200, body={"error": {"code": "badvalue", "info": "Bad gsrsearch"}})
        engine = _local(f"{srv.url}/w/api.php")
        with pytest.raises(EngineError) as limited:
            engine.search("cat", label="cat", page=0, per_page=5)
        with pytest.raises(EngineError) as bad:
            engine.search("cat", label="cat", page=0, per_page=5)
    assert limited.value.retryable and limited.value.status == 429
    assert not bad.value.retryable and "badvalue" in str(bad.value)


def test_html_error_page_and_5xx_are_retryable():
    with FakeServer(wikimedia_handler(fake_images(3))) as srv:
        srv.fail_next(status=200, body=b"<html>Wikimedia Error</html>", content_type="text/html")
        srv.fail_next(status=503, body=b"upstream down")
        engine = _local(f"{srv.url}/w/api.php")
        for _ in range(2):
            with pytest.raises(EngineError) as info:
                engine.search("cat", label="cat", page=0, per_page=5)
            assert info.value.retryable


def test_malformed_pages_keep_the_good_hits_with_text_fields():
    """An infinite index or offset, a list as MIME type, a number as URL, a null landing page
    or odd metadata values: the good files still come through, with text fields."""
    body = (b'{"continue": {"gsroffset": 1e999}, "query": {"pages": ['
            b'{"index": 1e999, "title": 5, "imageinfo": [{"mime": "image/jpeg",'
            b' "url": "https://a.example/x.jpg", "descriptionurl": null,'
            b' "extmetadata": {"ObjectName": {"value": ["t"]}, "Artist": {"value": 5},'
            b' "LicenseShortName": {"value": {"a": 1}}}}]},'
            b' {"index": 2, "imageinfo": [{"mime": ["image/jpeg"],'
            b' "url": "https://a.example/m.jpg"}]},'
            b' {"index": 3, "imageinfo": [{"mime": "image/png", "url": 12345}]},'
            b' {"index": 4, "imageinfo": [{"mime": {"a": 1},'
            b' "url": "https://a.example/d.jpg"}]},'
            b' {"index": 5, "imageinfo": "x"}, {"index": "six", "imageinfo": [null]},'
            b' {"index": 7, "title": "File:Cat.png", "imageinfo": [{"mime": "image/png",'
            b' "url": "https://a.example/y.png", "thumburl": 9, "extmetadata": []}]}]}}')
    with FakeServer(lambda req: Response(200, body)) as srv:
        page = _local(f"{srv.url}/w/api.php").search("cat", label="cat", page=0,
                                                       per_page=10)
    assert sorted(h.url for h in page.hits) == ["https://a.example/x.jpg",
                                                "https://a.example/y.png"]
    by_url = {h.url: h for h in page.hits}
    x, y = by_url["https://a.example/x.jpg"], by_url["https://a.example/y.png"]
    assert (x.page_url, x.title, x.author, x.license) == ("", "5", "5", "")
    assert y.title == "Cat"
    assert not page.has_more  # an offset of 1e999 is no continuation
