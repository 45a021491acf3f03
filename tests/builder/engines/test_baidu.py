"""Baidu engine against a fake of the acjson endpoint."""

from __future__ import annotations

import pytest

from builder.engines.baidu import BaiduEngine, decode_baidu_url, parse_acjson
from builder.errors import EngineError
from tests.builder.engines.fakes import (
    FakeServer,
    Response,
    baidu_handler,
    baidu_obfuscate,
    fake_images,
)


def _local(url: str, **kwargs) -> BaiduEngine:
    """The engine against a fake on 127.0.0.1, a private address the spec would allow
    with download.allow_private_networks."""
    return BaiduEngine(url, allow_private_networks=True, **kwargs)


def test_decode_reverses_the_obfuscation():
    url = "https://img.example.org/photos/cat-007.jpg?w=640&h=480"
    assert decode_baidu_url(baidu_obfuscate(url)) == url
    assert decode_baidu_url("ippr_z2C$qAzdH3FAzdH3Fooo_z&e3Bv54AzdH3F") == "http://www.com/"
    assert decode_baidu_url("https://plain.example/x.jpg") == "https://plain.example/x.jpg"


def test_maps_baidu_hosted_copies_by_default_despite_bad_escapes():
    images = fake_images(5)
    with FakeServer(baidu_handler(images)) as srv:
        page = _local(f"{srv.url}/search/acjson").search("猫", label="cat", page=0,
                                                         per_page=5)
    assert len(page.hits) == 5  # the trailing {} of data[] is not a hit
    hit = page.hits[2]
    assert hit.url == "https://img2.baidu.com/it/u=2,1&fm=253&fmt=auto?w=400"
    assert (hit.rank, hit.page_url, hit.title) == (2, images[2]["page_url"], "Cat number 2")
    assert page.hits[1].title == "Cat number 1 'tabby'"  # repaired \' escape
    q = srv.requests[0].query
    assert (q["word"], q["tn"], q["pn"], q["rn"]) == ("猫", "resultjson_com", "0", "5")


def test_original_option_uses_the_decoded_source_url():
    images = fake_images(3)
    with FakeServer(baidu_handler(images)) as srv:
        page = _local(f"{srv.url}/search/acjson", original=True).search(
            "cat", label="cat", page=0, per_page=3)
    assert [h.url for h in page.hits] == [img["url"] for img in images]


def test_pages_by_pn_until_list_num():
    images = fake_images(70)
    with FakeServer(baidu_handler(images)) as srv:
        engine = _local(f"{srv.url}/search/acjson", original=True)
        first = engine.search("cat", label="cat", page=0, per_page=40)
        second = engine.search("cat", label="cat", page=1, per_page=40)
    assert [len(first.hits), len(second.hits)] == [40, 30]
    assert [first.has_more, second.has_more] == [True, False]
    assert [h.url for h in first.hits + second.hits] == [img["url"] for img in images]
    assert [(r.query["pn"], r.query["rn"]) for r in srv.requests] == \
        [("0", "30"), ("30", "10"), ("40", "30")]


def test_empty_page_ends():
    with FakeServer(baidu_handler([])) as srv:
        page = _local(f"{srv.url}/search/acjson").search("x", label="x", page=0,
                                                         per_page=10)
    assert page.hits == [] and not page.has_more


def test_block_page_and_429_are_retryable():
    with FakeServer(baidu_handler(fake_images(3))) as srv:
        srv.fail_next(status=200, body={"antiFlag": 1, "message": "Forbid spider access",
                                        "bfe_log_id": "123"})
        srv.fail_next(status=429, headers={"Retry-After": "12"})
        engine = _local(f"{srv.url}/search/acjson")
        with pytest.raises(EngineError, match="Forbid spider access") as blocked:
            engine.search("cat", label="cat", page=0, per_page=5)
        with pytest.raises(EngineError) as limited:
            engine.search("cat", label="cat", page=0, per_page=5)
    assert blocked.value.retryable
    assert limited.value.retryable and limited.value.retry_after == 12.0


def test_decode_of_junk_is_empty():
    assert [decode_baidu_url(v) for v in (5, None, ["x"], "", {"a": 1})] == [""] * 5


def test_malformed_items_keep_the_good_hits_with_text_fields():
    """Numbers where Baidu sends strings, an infinite listNum: good items still come through."""
    body = (b'{"listNum": 1e999, "data": ['
            b'{"middleURL": "https://img0.baidu.com/x.jpg", "fromURL": 5, "fromPageTitle": 5,'
            b' "fromURLHost": ["h"], "objURL": 7, "replaceUrl": [{"FromURL": ["p"]}]},'
            b' {"middleURL": 7}, {"middleURL": {"a": 1}, "thumbURL": null}, "junk",'
            b' {"middleURL": 8, "thumbURL": "https://img1.baidu.com/y.jpg",'
            b' "fromPageTitleEnc": 12, "fromURLHost": "pages.example"}]}')
    with FakeServer(lambda req: Response(200, body)) as srv:
        engine = _local(f"{srv.url}/search/acjson")
        page = engine.search("cat", label="cat", page=0, per_page=5)
        original = _local(f"{srv.url}/search/acjson", original=True).search(
            "cat", label="cat", page=0, per_page=5)
    assert [h.url for h in page.hits] == ["https://img0.baidu.com/x.jpg",
                                          "https://img1.baidu.com/y.jpg"]
    x, y = page.hits
    assert (x.page_url, x.title) == ("", "5")
    assert (y.page_url, y.title) == ("http://pages.example/", "12")
    assert [h.url for h in original.hits] == [h.url for h in page.hits]


@pytest.mark.parametrize("raw,title", [
    (r"C:\\dir", "C:\\dir"),
    (r"a\\\'b\"c", "a\\'b\"c"),
    (r"it\'s \x", "it's x"),
])
def test_escape_repair_keeps_valid_escape_pairs(raw, title):
    r"""A valid ``\\`` is a pair, not a backslash before a bad escape; ``\'`` and ``\x`` lose
    their backslash."""
    body = '{"data":[{"middleURL":"http://a/1.jpg","fromPageTitle":"%s"}]}' % raw
    assert parse_acjson(body.encode())["data"][0]["fromPageTitle"] == title
