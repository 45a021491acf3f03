from collections import Counter

from builder.reasons import Reason
from builder.splits import assign_split
from builder.urls import UrlDedup, check_url, normalise_url


def test_normalise_url_canonical_forms():
    a = normalise_url("HTTP://Example.COM:80/a%20b.jpg?b=2&a=1&utm_source=x#frag")
    b = normalise_url("http://example.com/a b.jpg?a=1&b=2")
    assert a == b == "http://example.com/a%20b.jpg?a=1&b=2"
    assert normalise_url("https://x.org:8443/p") == "https://x.org:8443/p"
    assert normalise_url("not a url") is None
    assert normalise_url("http://[::1") is None


def test_check_url_reasons():
    assert check_url("ftp://x.org/a.jpg")[1] == Reason.UNSUPPORTED_SCHEME
    assert check_url("http://")[1] == Reason.INVALID_URL
    assert check_url("https://x.org/a.jpg")[1] is None


def test_check_url_judges_the_scheme_before_the_host():
    for url in ("data:image/png;base64,AAAA", "file:///etc/passwd", "javascript:alert(1)",
                "mailto:a@b.org"):
        assert check_url(url)[1] == Reason.UNSUPPORTED_SCHEME, url
    for url in ("http:///x", "https://", "not a url", "http://[::1"):
        assert check_url(url)[1] == Reason.INVALID_URL, url


def test_normalise_url_keeps_escaped_reserved_characters_distinct():
    for escaped, raw in (("/a%2Fb.jpg", "/a/b.jpg"), ("/a%3Fb.jpg", "/a?b.jpg"),
                         ("/a%23b.jpg", "/a#b.jpg")):
        assert normalise_url("http://x.org" + escaped) != normalise_url("http://x.org" + raw)
    assert normalise_url("http://x.org/a%2fb") == "http://x.org/a%2Fb"
    assert normalise_url("http://x.org/%7Euser/%41.jpg") == "http://x.org/~user/A.jpg"
    assert normalise_url("http://x.org/caf%c3%a9") == normalise_url("http://x.org/café")
    assert normalise_url("http://x.org/50%") == "http://x.org/50%25"
    assert check_url("http://x.org/\udc80")[1] == Reason.INVALID_URL


def test_a_url_past_the_length_limit_is_invalid_before_it_is_parsed():
    from builder.urls import MAX_URL_CHARS

    path = "/" + "a" * (MAX_URL_CHARS - len("https://x.org/"))
    assert check_url(f"https://x.org{path}")[1] is None
    norm, reason, detail = check_url(f"https://x.org{path}b")
    assert (norm, reason) == (None, Reason.INVALID_URL)
    assert f"a URL of {MAX_URL_CHARS + 1:,} characters" in detail and len(detail) < 300
    assert check_url("data:image/png;base64," + "A" * MAX_URL_CHARS)[1] \
        == Reason.UNSUPPORTED_SCHEME


def test_url_dedup_first_wins():
    d = UrlDedup()
    assert d.first_seen("http://a/1", "k1") is None
    assert d.first_seen("http://a/1", "k2") == "k1"
    assert len(d) == 1


def test_splits_deterministic_and_proportional():
    splits = {"train": 0.8, "val": 0.1, "test": 0.1}
    ids = [f"{i:016x}" for i in range(5000)]
    got = [assign_split(i, splits) for i in ids]
    assert got == [assign_split(i, splits) for i in ids]
    c = Counter(got)
    assert 3800 < c["train"] < 4200 and 400 < c["val"] < 600 and 400 < c["test"] < 600
    assert {assign_split(i, {"train": 1.0}) for i in ids[:50]} == {"train"}
    assert {assign_split(i, {"train": 0.0, "all": 1.0}) for i in ids[:50]} == {"all"}
