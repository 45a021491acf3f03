"""Request bodies that once gave 500 or a spec far past max_spec_bytes: every one is a 4xx
with a JSON error naming "(body)" (no Ray, no HTTP: parse_body and parse_spec directly)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.errors import SpecError
from builder.spec import parse_spec
from serve.app import EXAMPLE_SPEC, parse_body
from serve.errors import ApiError

JSON = "application/json"
YAML = "application/yaml"
TAIL_YAML = "classes: {a: [b]}\nsources: [{engine: duckduckgo}]\n"


def body_problem(body: str, media: str, max_bytes: int | None = None) -> str:
    """The one "(body)" problem parse_body finds in ``body``."""
    with pytest.raises(SpecError) as info:
        parse_body(body.encode(), media, max_bytes)
    (field, message), = info.value.problems
    assert field == "(body)"
    return message


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("media, body", [
    (JSON, '{"name": "x", "target": ' + "1" * 5000 + "}"),
    (YAML, "name: x\ntarget: " + "1" * 5000 + "\n" + TAIL_YAML),
])
def test_a_number_too_long_to_convert_is_a_422(media, body):
    assert "4300 digits" in body_problem(body, media)


@pytest.mark.parametrize("media, body", [
    (JSON, '{"name": "x", "options": ' + nested(200_000) + "}"),
    (YAML, "name: x\noptions: " + nested(5000) + "\n" + TAIL_YAML),
])
def test_nesting_too_deep_to_read_is_a_422(media, body):
    assert "nested too deeply" in body_problem(body, media)


def laughs(levels: int) -> str:
    """The "billion laughs": each level is ten aliases of the one before."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]"
              for i in range(1, levels)]
    return "name: x\n" + TAIL_YAML.replace("duckduckgo}", "duckduckgo, options: {" +
                                           ", ".join(lines) + "}}")


@pytest.mark.parametrize("body", [
    laughs(6),  # 417 bytes that would expand to megabytes
    "name: x\nclasses: {a: [b]}\nsources: [{engine: duckduckgo, options: &o {k: *o}}]\n",
    "name: x\nbase: &b {engine: duckduckgo}\nsources: [*b]\nclasses: {a: [b]}\n",
    "name: &n x\n" + TAIL_YAML,  # an anchor alone is refused as well
])
def test_yaml_anchors_and_aliases_are_refused(body):
    message = body_problem(body, YAML)
    assert "anchors and aliases" in message and "not supported" in message
    assert "line " in message


def test_plain_yaml_still_parses():
    data = parse_body(f"name: x\n{TAIL_YAML}".encode(), f"{YAML}; charset=utf-8", 10_000)
    assert data == {"name": "x", "classes": {"a": ["b"]},
                    "sources": [{"engine": "duckduckgo"}]}


def test_the_data_written_out_as_json_must_fit_max_spec_bytes():
    body = json.dumps({**EXAMPLE_SPEC, "description": "x" * 3000}).encode()
    assert parse_body(body, JSON, len(body) + 10)["description"] == "x" * 3000
    with pytest.raises(ApiError) as info:
        parse_body(body, JSON, 2048)
    assert info.value.status == 413 and info.value.code == "spec_too_large"
    assert "2048" in info.value.message


def test_yaml_has_its_own_smaller_limit_and_json_does_not():
    """YAML is read in pure Python (1 MB took 6-16 s of the replica's CPU); JSON in C."""
    data = {**EXAMPLE_SPEC, "description": "x" * 5000}
    body = yaml.safe_dump(data).encode()
    with pytest.raises(ApiError) as info:
        parse_body(body, YAML, 1_000_000, 4096)
    assert info.value.status == 413 and "as JSON" in info.value.message
    assert parse_body(body, YAML, 1_000_000, len(body)) == data
    assert parse_body(json.dumps(data).encode(), JSON, 1_000_000, 4096) == data


def test_a_value_that_cannot_be_written_as_json_is_a_spec_error():
    """A self-reference (a YAML anchor loop) in free-form options is refused when the spec is
    parsed, with its field path, before the store would have to write it."""
    looped: dict[str, Any] = {}
    looped["k"] = looped
    with pytest.raises(SpecError) as info:
        parse_spec({**EXAMPLE_SPEC, "sources": [{"engine": "duckduckgo",
                                                 "options": {"v": looped}}]})
    path, message = info.value.problems[0]
    assert path == "sources.0.options" and "Circular reference" in message
    assert parse_spec(EXAMPLE_SPEC).model_dump(mode="json")["name"] == "pets"


@pytest.mark.parametrize("media, body", [
    (JSON, '{"name": "x", "description": "half a cat \\ud83d"}'),
    (YAML, 'name: x\ndescription: "half a cat \\ude3a"\n' + TAIL_YAML),
])
def test_a_lone_surrogate_is_a_422(media, body):
    """No character, and no file or environment string can hold it: the job would fail
    when it writes the spec out, after all its downloads."""
    assert "lone surrogate" in body_problem(body, media, 10_000)


def test_the_spec_reaches_the_ray_job_unchanged(monkeypatch):
    """What the launcher gives the job (``--spec-env``) reads back, through the job's own
    reader, as the very spec the API accepted: an emoji in any field, labels in any script,
    C1 controls and U+FFFE (which YAML refuses unescaped), words YAML would read as booleans."""
    from types import SimpleNamespace

    from cluster.cli import _spec_from_args
    from serve import jobs

    monkeypatch.setattr(jobs.ray, "get_runtime_context",
                        lambda: SimpleNamespace(gcs_address="127.0.0.1:1"))
    data = parse_spec({
        **EXAMPLE_SPEC,
        "description": "Cats 😺 and cafés \x80\x85\ufffe \u2028 \"quoted\" \\ back\tslash \0",
        "classes": {"café": ["café crème"], "猫": ["猫 写真"], "😺": ["yes", "on", "null"]},
        "validation": {"clip_prompts": ["a photo of a {} 😺."]},
    }).model_dump(mode="json")
    entrypoint, env = jobs.JobLauncher(Path("/nonexistent")).command("j-1", data)
    assert "--spec-env" in entrypoint and set(env) == {jobs.SPEC_ENV}
    text = env[jobs.SPEC_ENV]
    assert text.isascii() and "\n" not in text and "\0" not in text
    monkeypatch.setenv(jobs.SPEC_ENV, text)
    spec = _spec_from_args(SimpleNamespace(spec=None, spec_env=jobs.SPEC_ENV))
    assert spec.model_dump(mode="json") == data
    assert spec.labels == ["café", "猫", "😺"] and "😺" in spec.description


def test_a_chunked_body_is_refused_once_past_the_limit_not_read_whole():
    """A chunked upload declares no length: it is read only up to max_spec_bytes + 1."""
    import asyncio

    from starlette.requests import Request

    from serve.app import read_body

    chunk, pulled = b"x" * 65536, []

    async def receive() -> dict[str, Any]:
        pulled.append(1)
        return {"type": "http.request", "body": chunk, "more_body": len(pulled) < 1000}

    scope = {"type": "http", "method": "POST", "path": "/v1/jobs", "query_string": b"",
             "headers": [(b"transfer-encoding", b"chunked")]}
    with pytest.raises(ApiError) as info:
        asyncio.run(read_body(Request(scope, receive), 1_000_000))
    assert info.value.status == 413 and info.value.code == "spec_too_large"
    assert len(pulled) == 1_000_000 // len(chunk) + 1  # 16 of the 1000 chunks (65 MB)


def test_a_yaml_key_that_is_not_a_string_is_a_422():
    """A date (or a binary) as a mapping key could not be measured as JSON: it was a 500."""
    message = body_problem("name: x\n2020-01-01: y\n" + TAIL_YAML, YAML, 10_000)
    assert "every mapping key must be a string" in message
