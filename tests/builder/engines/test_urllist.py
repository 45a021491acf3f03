"""URL list files: what they yield, and the SourceError a malformed one gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.engines.urllist import UrlListEngine, read_url_list
from builder.errors import SourceError


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_formats_yield_label_url_pairs(tmp_path: Path) -> None:
    jsonl = write(tmp_path, "a.jsonl", '{"url": "http://a/1.jpg", "label": "cat"}\n\n'
                                       '{"url": null, "label": "cat"}\n')
    assert read_url_list(jsonl) == [("cat", "http://a/1.jpg"), ("cat", "")]
    csv_path = write(tmp_path, "a.csv", "label,url\ncat,http://a/2.jpg\n")
    assert read_url_list(csv_path) == [("cat", "http://a/2.jpg")]
    txt = write(tmp_path, "a.txt", "# comment\ndog\thttp://a/3.jpg\nhttp://a/4.jpg\n")
    assert read_url_list(txt, default_label="cat") == [("dog", "http://a/3.jpg"),
                                                       ("cat", "http://a/4.jpg")]


@pytest.mark.parametrize("line,kind", [("5", "int"), ("[1, 2]", "list"),
                                       ('"http://a/x.jpg"', "str"), ("null", "NoneType")])
def test_a_jsonl_line_that_is_not_an_object_names_file_and_line(tmp_path: Path, line: str,
                                                                kind: str) -> None:
    path = write(tmp_path, "urls.jsonl", f'{{"url": "http://a/x.jpg", "label": "cat"}}\n\n{line}\n')
    with pytest.raises(SourceError, match=rf"urls\.jsonl:3: expected a JSON object .* got {kind}"):
        UrlListEngine(path, labels=["cat"])


@pytest.mark.parametrize("value", ['["http://a/x.jpg"]', '{"href": "http://a/x.jpg"}', "42",
                                   "true"])
def test_a_url_that_is_not_a_string_is_refused(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, "urls.jsonl", f'{{"url": "http://a/1.jpg"}}\n{{"url": {value}}}\n')
    with pytest.raises(SourceError, match=r"urls\.jsonl:2: 'url' must be a string URL"):
        UrlListEngine(path, labels=["cat"])


def test_missing_column_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "urls.csv", "label,link\ncat,http://a/1.jpg\n")
    with pytest.raises(SourceError, match=r"urls\.csv:2: no column 'url'"):
        read_url_list(path)


def test_caption_column_becomes_the_hits_caption(tmp_path: Path) -> None:
    path = write(tmp_path, "c.jsonl", '{"url": "http://a/1.jpg", "alt": "a cat asleep"}\n'
                                      '{"url": "http://a/2.jpg", "alt": 7}\n'
                                      '{"url": "http://a/3.jpg"}\n')
    engine = UrlListEngine(path, labels=["cat"], caption_column="alt")
    page = engine.search("", label="cat", page=0, per_page=10)
    assert [h.caption for h in page.hits] == ["a cat asleep", "", ""]
    assert page.hits[0].to_candidate("cat", "", "urllist").caption == "a cat asleep"
    plain = UrlListEngine(path, labels=["cat"]).search("", label="cat", page=0, per_page=10)
    assert [h.caption for h in plain.hits] == ["", "", ""]
