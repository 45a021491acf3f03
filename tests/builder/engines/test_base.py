"""The engine contract, enforced in ``SearchEngine``: a malformed answer is an EngineError."""

from __future__ import annotations

import pytest

from builder.engines import webjson
from builder.engines.base import MAX_TEXT_CHARS, SearchEngine, SearchHit, SearchPage
from builder.errors import EngineError, SourceError


class _Parsing(SearchEngine):
    """Parses ``answer`` the way a careless engine would."""

    name = "parsing"

    def __init__(self, answer: object):
        self.answer = answer

    def search(self, query: str, *, label: str, page: int, per_page: int) -> SearchPage:
        if isinstance(self.answer, Exception):
            raise self.answer
        body = self.answer
        return SearchPage([SearchHit(url=r["url"], title=r["title"].strip())
                           for r in body["results"]], has_more=int(body["more"]) > 0)


class _Child(_Parsing):
    name = "child"


@pytest.mark.parametrize("answer,problem", [
    ({"results": [{"title": "x"}], "more": 0}, "KeyError"),
    ({"results": [{"url": "http://a/x.jpg", "title": 5}], "more": 0}, "AttributeError"),
    ({"results": 5, "more": 0}, "TypeError"),
    ({"results": [], "more": "lots"}, "ValueError"),
    ({"results": [], "more": float("inf")}, "OverflowError"),
    ({"results": [{"url": 12345, "title": "x"}], "more": 0}, "TypeError"),
    ([], "TypeError"),
])
def test_malformed_answer_becomes_a_retryable_engine_error(answer, problem):
    with pytest.raises(EngineError) as info:
        _Parsing(answer).search("cat", label="cat", page=0, per_page=5)
    assert info.value.retryable
    assert str(info.value).startswith(f"parsing: malformed response: {problem}")


def test_subclasses_are_guarded_once_and_keep_their_name():
    with pytest.raises(EngineError, match=r"^child: malformed response: KeyError"):
        _Child({}).search("cat", label="cat", page=0, per_page=5)
    assert _Child.search is _Parsing.search
    assert _Parsing.search.__name__ == "search"


def test_engine_and_source_errors_pass_through_unchanged():
    err = EngineError("parsing: answered HTTP 403", status=403, retryable=False)
    with pytest.raises(EngineError) as info:
        _Parsing(err).search("cat", label="cat", page=0, per_page=5)
    assert info.value is err
    with pytest.raises(SourceError, match="no column"):
        _Parsing(SourceError("no column 'url'")).search("cat", label="cat", page=0, per_page=5)


def test_a_servers_escape_sequences_never_reach_an_error_message():
    """An engine that put a server's words in its error as they came (Baidu's ``message``)
    sent them to the terminal: a clear-screen or a terminal link in them took effect."""
    err = EngineError("baidu: \x1b[2Jcleared \x1b]8;;https://e\x07link\x1b]8;;\x07\n", status=200)
    with pytest.raises(EngineError) as info:
        _Parsing(err).search("cat", label="cat", page=0, per_page=5)
    assert info.value is err and str(err) == "baidu: ?[2Jcleared ?]8;;https://e?link?]8;;?"
    with pytest.raises(EngineError, match=r"malformed response: ValueError: \?\[2Jx$"):
        _Parsing(ValueError("\x1b[2Jx")).search("cat", label="cat", page=0, per_page=5)


def test_a_search_that_returns_something_else_is_an_engine_error():
    class Sloppy(SearchEngine):
        name = "sloppy"

        def search(self, query: str, *, label: str, page: int, per_page: int) -> SearchPage:
            return SearchPage(["http://a/x.jpg"])  # type: ignore[list-item]

    with pytest.raises(EngineError, match="sloppy: malformed response"):
        Sloppy().search("cat", label="cat", page=0, per_page=5)


def test_good_answer_passes():
    page = _Parsing({"results": [{"url": "http://a/x.jpg", "title": " t "}], "more": "1"}) \
        .search("cat", label="cat", page=0, per_page=5)
    assert page.hits == [SearchHit("http://a/x.jpg", title="t")] and page.has_more


def test_a_page_holds_at_most_per_page_hits():
    """An engine answered a page of 5 with 400,000 hits out of one 16 MiB answer; a unit
    sent again fetches every hit of its page."""
    answer = {"results": [{"url": f"http://a/{i}.jpg", "title": "t"} for i in range(1000)],
              "more": 1}
    page = _Parsing(answer).search("cat", label="cat", page=0, per_page=5)
    assert [h.url for h in page.hits] == [f"http://a/{i}.jpg" for i in range(5)]
    assert page.has_more


def test_a_hits_text_is_cut_to_max_text_chars():
    """Each hit's text goes into its image's output row: an engine's megabyte title
    must not."""
    hit = SearchHit("http://a/x.jpg", title="t" * 10**6, author="a" * 5000, license="l",
                    caption="c" * (MAX_TEXT_CHARS + 1), label="cat")
    assert (len(hit.title), len(hit.author), len(hit.caption)) == (MAX_TEXT_CHARS,) * 3
    assert hit.license == "l" and hit.label == "cat"
    page = "http://a/" + "p" * 9000
    assert SearchHit("http://a/x.jpg", page_url=page).page_url == ""
    assert SearchHit("http://a/x.jpg", page_url=page[:8000]).page_url == page[:8000]


@pytest.mark.parametrize("field,value", [("url", 12345), ("url", None), ("url", {"a": 1}),
                                         ("title", ["t"]), ("page_url", None),
                                         ("license", 5), ("author", b"x"), ("rank", "1")])
def test_search_hit_refuses_non_string_fields(field, value):
    kwargs = {"url": "http://a/x.jpg", field: value}
    with pytest.raises(TypeError, match=f"SearchHit.{field}"):
        SearchHit(**kwargs)


def test_as_int_takes_junk_including_infinity():
    assert webjson.as_int("12") == 12 and webjson.as_int(3.0) == 3
    for junk in (float("inf"), float("-inf"), float("nan"), "1e999", None, [1], {"a": 1}):
        assert webjson.as_int(junk, -1) == -1


def test_as_text_and_as_url():
    assert [webjson.as_text(v) for v in ("t", 5, 2.5, None, True, ["t"], {"a": 1})] == \
        ["t", "5", "2.5", "", "", "", ""]
    assert [webjson.as_url(v) for v in ("http://a/x", "  ", "", 5, None, {"a": 1})] == \
        ["http://a/x", "", "", "", "", ""]
    assert webjson.strip_html(5) == "5" and webjson.strip_html(None) == ""


def test_strip_html_keeps_a_lone_angle_bracket_and_stays_linear():
    """A tag ran from any ``<`` to the next ``>``, so "<" repeated with no ">" (a crafted
    answer) was scanned to its end once per ``<``: 160,000 of them took 15 s."""
    assert webjson.strip_html("a < b <i>x</i> &amp; y") == "a < b x & y"
    assert webjson.strip_html("<" * 200_000 + "<b>x") == "<" * 200_000 + " x"


def test_deeply_nested_json_is_a_retryable_engine_error():
    with pytest.raises(EngineError, match="not JSON") as info:
        webjson.loads(b"[" * 100_000 + b"]" * 100_000, engine="x")
    assert info.value.retryable
