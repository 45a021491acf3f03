"""Keyword expansion through the real openai client against a local OpenAI-compatible fake."""

from __future__ import annotations

import json
import logging

import pytest

from builder.expand import KeywordExpander, offline_expand, parse_queries
from tests.builder.engines.fakes import FakeServer, Request, Response, block_external_network, \
    closed_port

ENV = ("PIXCRAWLER_LLM_BASE_URL", "OPENAI_BASE_URL", "PIXCRAWLER_LLM_API_KEY", "OPENAI_API_KEY",
       "PIXCRAWLER_LLM_MODEL")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    attempts = block_external_network(monkeypatch)
    yield
    assert not attempts, f"a test tried to leave the machine: {attempts}"


def chat_server(content: str, status: int = 200) -> FakeServer:
    """An OpenAI-compatible /v1/chat/completions that always answers ``content``."""

    def handle(req: Request) -> Response:
        if req.method != "POST" or req.path != "/v1/chat/completions":
            return Response(404, {"error": {"message": "not found"}})
        if status != 200:
            return Response(status, {"error": {"message": "model overloaded",
                                               "type": "server_error"}})
        body = req.json()
        return Response(200, {
            "id": "chatcmpl-test", "object": "chat.completion", "created": 1_700_000_000,
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 40, "completion_tokens": 30, "total_tokens": 70},
        })

    return FakeServer(handle)


ANSWER = json.dumps({"queries": ["tabby cat", "Kitten  playing", "cat", "siamese cat",
                                 "house cat on sofa", "TABBY CAT", "maine coon", "cat in garden"]})


def test_expands_through_the_openai_client(tmp_path):
    with chat_server(ANSWER) as srv:
        exp = KeywordExpander(base_url=f"{srv.url}/v1", api_key="sk-local", model="tiny-llm",
                              n=5, cache_dir=str(tmp_path))
        out = exp.expand("cat", ["cat", "kitten playing"])
    assert out == ["tabby cat", "siamese cat", "house cat on sofa", "maine coon",
                   "cat in garden"]
    assert exp.source == "llm"
    (req,) = srv.requests
    body = req.json()
    assert body["model"] == "tiny-llm"
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "cat" in body["messages"][1]["content"] and "5" in body["messages"][1]["content"]
    assert body["response_format"] == {"type": "json_object"}
    assert req.headers["authorization"] == "Bearer sk-local"


def test_code_fenced_answer_and_short_answer_topped_up_offline(tmp_path):
    fenced = '```json\n{"queries": ["red fox", "fox cub"]}\n```'
    with chat_server(fenced) as srv:
        exp = KeywordExpander(base_url=f"{srv.url}/v1", n=4, cache_dir=str(tmp_path))
        out = exp.expand("fox", ["fox"])
    assert out[:2] == ["red fox", "fox cub"]
    assert out[2:] == offline_expand("fox", ["fox"], 2)
    assert exp.source == "llm"
    assert srv.requests[0].headers["authorization"] == "Bearer not-needed"


def test_cached_in_memory_and_on_disk(tmp_path):
    with chat_server(ANSWER) as srv:
        exp = KeywordExpander(base_url=f"{srv.url}/v1", model="m1", cache_dir=str(tmp_path))
        first = exp.expand("cat", ["cat"])
        second = exp.expand("cat", ["cat"])
        assert first == second and len(srv.requests) == 1
        exp.expand("dog", ["dog"])
        assert len(srv.requests) == 2
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 2
    # The server is gone now: a fresh expander answers from the disk cache.
    fresh = KeywordExpander(base_url=f"http://127.0.0.1:{closed_port()}/v1", model="m1",
                            cache_dir=str(tmp_path))
    assert fresh.expand("cat", ["cat"]) == first and fresh.source == "llm"
    other_model = KeywordExpander(base_url=f"http://127.0.0.1:{closed_port()}/v1",
                                  model="m2", cache_dir=str(tmp_path))
    assert other_model.expand("cat", ["cat"]) == offline_expand("cat", ["cat"], 5)
    assert other_model.source == "offline"


def test_endpoint_down_falls_back_offline_and_warns_once(tmp_path, caplog):
    exp = KeywordExpander(base_url=f"http://127.0.0.1:{closed_port()}/v1", api_key="k",
                          n=3, cache_dir=str(tmp_path), timeout_s=2)
    with caplog.at_level(logging.WARNING, logger="builder.expand"):
        a = exp.expand("dog", ["dog"])
        b = exp.expand("horse", ["horse", "pony"])
    assert exp.source == "offline"
    assert a == offline_expand("dog", ["dog"], 3) and len(b) == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "APIConnectionError" in warnings[0].getMessage()
    assert not list(tmp_path.glob("*.json"))  # offline answers are not cached


@pytest.mark.parametrize("content,status", [
    ("Sure! Here are some queries: tabby, siamese", 200),
    ('{"queries": "tabby cat"}', 200),
    ('{"result": ["tabby cat"]}', 200),
    ("", 500),
])
def test_garbage_or_http_error_falls_back_offline(tmp_path, content, status):
    with chat_server(content, status=status) as srv:
        exp = KeywordExpander(base_url=f"{srv.url}/v1", n=4, cache_dir=str(tmp_path))
        out = exp.expand("cat", ["cat"])
    assert out == offline_expand("cat", ["cat"], 4) and exp.source == "offline"
    assert len(srv.requests) == 1  # no client-side retries


def test_not_configured_goes_offline_without_any_request(tmp_path):
    exp = KeywordExpander(cache_dir=str(tmp_path))
    assert not exp.configured
    assert exp.expand("golden_retriever", []) == offline_expand("golden_retriever", [], 5)
    assert exp.source == "offline"


def test_config_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path):
    with chat_server(ANSWER) as srv:
        monkeypatch.setenv("PIXCRAWLER_LLM_BASE_URL", f"{srv.url}/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
        monkeypatch.setenv("PIXCRAWLER_LLM_MODEL", "env-model")
        exp = KeywordExpander(cache_dir=str(tmp_path))
        exp.expand("cat", ["cat"])
    assert exp.model == "env-model"
    assert srv.requests[0].json()["model"] == "env-model"
    assert srv.requests[0].headers["authorization"] == "Bearer sk-env"


def test_offline_expand_is_deterministic_distinct_and_excludes_originals():
    out = offline_expand("polar_bear", ["Polar Bear photo", "ice bear"], 6)
    assert out == offline_expand("polar_bear", ["Polar Bear photo", "ice bear"], 6)
    assert len(out) == 6
    assert out[0] == "polar bear close-up"  # "polar bear photo" was already a query
    assert "a polar bear in the wild" in out
    assert len({q.casefold() for q in out}) == 6
    assert offline_expand("cat", [], 0) == []
    many = offline_expand("cat", ["kitty"], 25)
    assert len(many) == 25 and "kitty photo" in many


@pytest.mark.parametrize("content", ['{"queries": ["a", ' + "[" * 50_000 + "]" * 50_000 + "]}",
                                     '{"queries": ["\\ud800 cat", "tabby cat"]}'],
                         ids=["nested past the recursion limit", "a lone surrogate"])
def test_an_llm_answer_python_cannot_hold_is_not_a_failed_job(tmp_path, content):
    """Expansion never fails a job: an answer nested past Python's recursion limit is a
    malformed answer (the queries are expanded offline), and a lone surrogate spelled in JSON
    is made well-formed before the answer is cached and written to stats."""
    with chat_server(content) as srv:
        exp = KeywordExpander(base_url=f"{srv.url}/v1", api_key="sk-local", model="tiny-llm",
                              n=2, cache_dir=str(tmp_path))
        out = exp.expand("cat", ["cat"])
    assert len(out) == 2
    json.dumps(out, ensure_ascii=False).encode("utf-8")
    if "ud800" in content:
        assert out == ["\ufffd cat", "tabby cat"] and exp.source == "llm"


def test_parse_queries_shapes():
    assert parse_queries('["a", "b"]') == ["a", "b"]
    assert parse_queries('Here you go: {"queries": ["a"]} enjoy') == ["a"]
    assert parse_queries('```\n{"queries": ["x"]}\n```') == ["x"]
    with pytest.raises(ValueError):
        parse_queries("nope")


def test_a_spec_endpoint_never_receives_the_operators_key(tmp_path, monkeypatch, caplog):
    """The issue's key leak: a capture server named in a spec's search.llm_base_url received
    ``Authorization: Bearer <the server's OPENAI_API_KEY>``. Now it is not called at all, and
    the job expands its queries offline with the reason in the log."""
    from builder.pipeline import expand_queries
    from builder.spec import parse_spec

    monkeypatch.setenv("HOME", str(tmp_path))  # the pipeline's expander caches under ~/.cache
    monkeypatch.setenv("OPENAI_API_KEY", "sk-operator-secret")
    with chat_server(ANSWER) as capture:
        spec = parse_spec({"name": "t", "classes": {"cat": None},
                           "sources": [{"engine": "sandbox", "url": "http://127.0.0.1:1"}],
                           "search": {"expand": True, "expand_n": 3,
                                      "llm_base_url": f"{capture.url}/v1"}})
        with caplog.at_level(logging.WARNING, logger="builder.expand"):
            extra, record = expand_queries(spec)
        exp = KeywordExpander(base_url=f"{capture.url}/v1/", n=3, cache_dir=str(tmp_path))
        assert exp.expand("dog", ["dog"]) == offline_expand("dog", ["dog"], 3)
    assert capture.requests == []
    assert extra == {"cat": offline_expand("cat", [], 3)} and record["source"] == \
        {"cat": "offline"}
    assert "is not the operator's LLM endpoint (https://api.openai.com/v1)" in caplog.text
    assert "sk-operator-secret" not in caplog.text


def test_the_operators_key_goes_to_the_operators_endpoint_however_spelled(tmp_path,
                                                                         monkeypatch):
    with chat_server(ANSWER) as operator, chat_server(ANSWER) as other:
        monkeypatch.setenv("PIXCRAWLER_LLM_BASE_URL", f"{operator.url}/v1")
        monkeypatch.setenv("PIXCRAWLER_LLM_API_KEY", "sk-operator")
        spelled = operator.url.replace("http://", "HTTP://") + "/v1/"
        KeywordExpander(base_url=spelled, cache_dir=str(tmp_path / "a")).expand("cat", ["cat"])
        withheld = KeywordExpander(base_url=f"{other.url}/v1", cache_dir=str(tmp_path / "b"))
        assert withheld.expand("cat", ["cat"]) == offline_expand("cat", ["cat"], 5)
        own_key = KeywordExpander(base_url=f"{other.url}/v1", api_key="sk-other",
                                  cache_dir=str(tmp_path / "c"))
        own_key.expand("cat", ["cat"])
    assert [r.headers["authorization"] for r in operator.requests] == ["Bearer sk-operator"]
    assert [r.headers["authorization"] for r in other.requests] == ["Bearer sk-other"]
    monkeypatch.delenv("PIXCRAWLER_LLM_BASE_URL")
    openai = KeywordExpander(base_url="https://API.openai.com:443/v1/", cache_dir=str(tmp_path))
    assert openai.api_key == "sk-operator" and not openai.withheld
