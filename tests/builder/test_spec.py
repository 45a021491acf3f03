import json

import pytest

from builder.errors import SpecError
from builder.spec import load_spec, loads_spec, parse_spec

MINIMAL = {"name": "pets", "classes": {"cat": "cat photo", "dog": {"queries": ["dog"], "target": 5}},
           "sources": [{"engine": "sandbox", "url": "http://127.0.0.1:1"}]}


def test_minimal_spec_defaults():
    spec = parse_spec(MINIMAL)
    assert spec.labels == ["cat", "dog"]
    assert spec.queries_of("cat") == ["cat photo"]
    assert spec.target_of("cat") == 100 and spec.target_of("dog") == 5
    assert spec.output_uri() == "./datasets/pets"
    assert spec.download.allow_private_networks is False
    assert spec.validation.level == "medium"
    assert "PixCrawler" in spec.download.user_agent


def test_class_without_queries_searches_by_name():
    spec = parse_spec({**MINIMAL, "classes": {"red_fox": None}})
    assert spec.queries_of("red_fox") == ["red fox"]


def test_bad_level_names_field_value_and_allowed():
    with pytest.raises(SpecError) as e:
        parse_spec({**MINIMAL, "validation": {"level": "fastest"}})
    msg = str(e.value)
    assert "validation.level" in msg and "'fastest'" in msg
    assert "'fast'" in msg and "'medium'" in msg and "'slow'" in msg


def test_bad_engine_lists_engines():
    with pytest.raises(SpecError) as e:
        parse_spec({**MINIMAL, "sources": [{"engine": "altavista"}]})
    msg = str(e.value)
    assert "sources.0.engine" in msg and "altavista" in msg and "duckduckgo" in msg


def test_unknown_field_lists_valid_fields():
    with pytest.raises(SpecError) as e:
        parse_spec({**MINIMAL, "download": {"timeout": 3}})
    msg = str(e.value)
    assert "download.timeout" in msg and "unknown field" in msg and "timeout_s" in msg


def test_several_problems_reported_together():
    with pytest.raises(SpecError) as e:
        parse_spec({**MINIMAL, "target": 0, "output": {"splits": {"train": 0.5}}})
    paths = [p for p, _ in e.value.problems]
    assert "target" in paths and "output.splits" in paths


def test_urllist_needs_path_and_min_max_sides():
    with pytest.raises(SpecError, match="needs 'path'"):
        parse_spec({**MINIMAL, "sources": [{"engine": "urllist"}]})
    with pytest.raises(SpecError, match="min_side"):
        parse_spec({**MINIMAL, "validation": {"min_side": 500, "max_side": 100}})


def test_no_sources_is_an_error():
    with pytest.raises(SpecError, match="sources"):
        parse_spec({"name": "x", "classes": {"a": None}})


def test_load_yaml_and_json(tmp_path):
    y = tmp_path / "s.yaml"
    y.write_text("name: pets\nclasses:\n  cat: [cat, kitten]\nsources:\n"
                 "  - {engine: sandbox, url: 'http://127.0.0.1:1'}\n")
    assert load_spec(y).queries_of("cat") == ["cat", "kitten"]
    j = tmp_path / "s.json"
    j.write_text(json.dumps(MINIMAL))
    assert load_spec(j).name == "pets"
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "missing.yaml")
    with pytest.raises(SpecError, match="not valid YAML"):
        loads_spec("name: [unclosed")
    with pytest.raises(SpecError, match="mapping"):
        loads_spec("- a\n- b\n")


def test_bad_name_and_label():
    with pytest.raises(SpecError, match="name"):
        parse_spec({**MINIMAL, "name": "has space"})
    with pytest.raises(SpecError, match="bad class label"):
        parse_spec({**MINIMAL, "classes": {"../etc": None}})
