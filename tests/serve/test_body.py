"""Request bodies that once gave 500 or a spec far past max_spec_bytes: every one is a 4xx
with a JSON error naming "(body)" (no Ray, no HTTP: parse_body and parse_spec directly). Specs
that took seconds of CPU to refuse are refused before they are validated, on threads that
the replica's other requests do not wait for."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.errors import SpecError
from builder.spec import parse_spec
from serve import app
from serve.app import EXAMPLE_SPEC, ServeSettings, parse_body, policy_error
from serve.errors import ApiError
from serve.policy import ApiPolicy, PolicyRefused, apply_policy

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
    # a YAML 1.1 base-60 integer: read, then too long to write out (it was a 500)
    (YAML, "name: " + ":".join(["59"] * 3000) + "\n" + TAIL_YAML),
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
    # -P: the driver does not import from the folder it runs in, which others may write
    assert shlex.split(entrypoint)[1:4] == ["-P", "-m", "cluster.cli"]
    text = env[jobs.SPEC_ENV]
    assert text.isascii() and "\n" not in text and "\0" not in text
    monkeypatch.setenv(jobs.SPEC_ENV, text)
    spec = _spec_from_args(SimpleNamespace(spec=None, spec_env=jobs.SPEC_ENV))
    assert spec.model_dump(mode="json") == data
    assert spec.labels == ["café", "猫", "😺"] and "😺" in spec.description


def test_a_spec_too_long_for_the_environment_is_a_file_its_user_only_reads(monkeypatch,
                                                                          tmp_path):
    """Such a spec went to a 0644 file in a 0755 folder: another user of the machine could
    read the job's spec (a proxy's password, an LLM endpoint's)."""
    import stat
    from types import SimpleNamespace

    from serve import jobs

    monkeypatch.setattr(jobs.ray, "get_runtime_context",
                        lambda: SimpleNamespace(gcs_address="127.0.0.1:1"))
    monkeypatch.setattr(jobs, "_MAX_ENV_SPEC_CHARS", 10)
    (tmp_path / "jobs").mkdir(mode=0o755)  # an earlier version's
    (tmp_path / "jobs").chmod(0o755)
    data = parse_spec(EXAMPLE_SPEC).model_dump(mode="json")
    entrypoint, env = jobs.JobLauncher(tmp_path / "jobs").command("j-1", data)
    path = tmp_path / "jobs" / "j-1.json"
    assert str(path) in entrypoint and not env
    assert json.loads(path.read_text()) == data
    assert [stat.S_IMODE(p.stat().st_mode) for p in (path.parent, path)] == [0o700, 0o600]


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
        asyncio.run(read_body(Request(scope, receive), 1_000_000, 30.0))
    assert info.value.status == 413 and info.value.code == "spec_too_large"
    assert len(pulled) == 1_000_000 // len(chunk) + 1  # 16 of the 1000 chunks (65 MB)


def test_a_yaml_key_that_is_not_a_string_is_a_422():
    """A date (or a binary) as a mapping key could not be measured as JSON: it was a 500."""
    message = body_problem("name: x\n2020-01-01: y\n" + TAIL_YAML, YAML, 10_000)
    assert "every mapping key must be a string" in message


BASE = {"name": "x", "sources": [{"engine": "wikimedia"}]}


def many_classes(form: str, n: int) -> dict[str, Any]:
    """A spec of ``n`` classes written in one of the four ways a spec names classes."""
    names = [f"c{i}" for i in range(n)]
    if form == "classes list":
        return {**BASE, "classes": names}
    if form == "classes mapping":
        return {**BASE, "classes": {name: None for name in names}}
    if form == "categories list":
        return {**BASE, "categories": names}
    groups = {f"g{g}": {"target": 100, **{name: ["q"] for name in names[g::100]}}
              for g in range(100)}
    return {**BASE, "categories": groups}


FORMS = ["classes list", "classes mapping", "categories list", "categories tree"]


@pytest.mark.parametrize("form", FORMS)
def test_a_spec_over_max_classes_is_refused_before_it_is_validated(monkeypatch, form):
    """110,000 names in 1 MB of JSON took 3 s of CPU to validate before the policy refused
    them; they are counted first, and refused as the policy refuses them."""
    def must_not_run(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("the spec was validated")

    monkeypatch.setattr(app, "parse_spec", must_not_run)
    body = json.dumps(many_classes(form, 20_000)).encode()
    with pytest.raises(PolicyRefused) as info:
        app.read_spec(body, JSON, ServeSettings())
    (refusal,) = info.value.problems
    assert (refusal.field, refusal.setting, refusal.forbidden) == ("classes", "max_classes",
                                                                    False)
    assert refusal.message.startswith("20000 classes")
    error = policy_error(info.value)
    assert (error.status, error.code) == (422, "over_policy_limit")


@pytest.mark.parametrize("data", [
    *(many_classes(form, 30) for form in FORMS),
    {**BASE, "classes": ["a", "b", "a"], "categories": ["c", "c"]},
    {**BASE, "classes": {"cat": ["cat"], "big/cat": None},
     "categories": {"queries": {"dog": ["dog"], "target": 4},  # a top category named queries
                    "mammals": {"target": 9, "urls": [], "fox": {"target": 4}, "wolf": None,
                                "deep": {"er": {"est": "q"}}},
                    "leaf": {"queries": ["a"], "target": 3}}},
], ids=[*FORMS, "duplicates", "reserved keys"])
def test_classes_are_counted_as_validation_counts_them(data):
    count = len(parse_spec(data).labels)
    assert app.count_classes(data) == count
    app.check_size(data, count)  # at the limit: not refused
    policy = ApiPolicy(max_classes=count - 1).resolved("/srv/pix")
    with pytest.raises(PolicyRefused) as by_policy:
        apply_policy(policy, parse_spec(data), "o", "x-00000001", {"CPU": 8})
    with pytest.raises(PolicyRefused) as by_count:
        app.check_size(data, count - 1)
    assert by_count.value.problems == [p for p in by_policy.value.problems
                                       if p.setting == "max_classes"]


def nested(levels: int) -> dict[str, Any]:
    node: Any = ["q"]
    for i in reversed(range(levels)):
        node = {f"l{i}": node}
    return node


MAX_LEVELS = 32  # app.MAX_LABEL_LEVELS


@pytest.mark.parametrize("field, data", [
    ("classes", {**BASE, "classes": {"/".join(["a"] * (MAX_LEVELS + 1)): None}}),
    ("categories", {**BASE, "categories": nested(MAX_LEVELS + 1)}),
])
def test_a_label_of_too_many_levels_is_refused_before_it_is_validated(field, data):
    """The spec checks a label's parents in time square in its levels: 1,600 labels of 300
    levels took 2 s of CPU."""
    assert app.MAX_LABEL_LEVELS == MAX_LEVELS
    with pytest.raises(SpecError) as info:
        app.check_size(data, 1000)
    (path, message), = info.value.problems
    assert path == field and f"more than {MAX_LEVELS} levels" in message


def test_a_label_of_max_label_levels_is_read():
    flat = "/".join(["a"] * MAX_LEVELS)
    data = {**BASE, "classes": {flat: None}, "categories": nested(MAX_LEVELS),
            "output": {"imagefolder_labels": "nested"}}
    app.check_size(data, 2)
    assert max(len(label.split("/")) for label in parse_spec(data).labels) == MAX_LEVELS


def test_specs_are_read_on_threads_of_their_own(monkeypatch):
    """Reading specs on the default executor let a burst of submits hold every thread the
    replica's store reads and key checks (asyncio.to_thread) wait for."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    release, names = threading.Event(), []

    def slow_read(body: bytes, _content_type: str, _settings: ServeSettings) -> bytes:
        names.append(threading.current_thread().name)
        release.wait(10)
        return body

    monkeypatch.setattr(app, "read_spec", slow_read)

    async def burst() -> str:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(4))
        reader = app.SpecReader(ServeSettings())
        reads = [asyncio.ensure_future(reader.read(b"{}", JSON)) for _ in range(8)]
        await asyncio.sleep(0.2)
        try:
            other = await asyncio.wait_for(asyncio.to_thread(lambda: "store read"), 5)
        finally:
            release.set()
        assert await asyncio.gather(*reads) == [b"{}"] * 8
        reader.close()
        return other

    assert asyncio.run(burst()) == "store read"
    assert len(names) == 8 and len(set(names)) <= app.SPEC_THREADS
    assert all(name.startswith("pixcrawler-spec") for name in names)


def test_a_body_that_trickles_in_is_refused_at_its_deadline():
    """A body sent a byte at a time, slowly, held one of the replica's requests for as long
    as its sender liked: 200 of them shut every other key out."""
    import asyncio

    from starlette.requests import Request

    from serve.app import read_body

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"{", "more_body": True}

    scope = {"type": "http", "method": "POST", "path": "/v1/jobs", "query_string": b"",
             "headers": [(b"transfer-encoding", b"chunked")]}
    with pytest.raises(ApiError) as info:
        asyncio.run(read_body(Request(scope, receive), 1_000_000, 0.5))
    assert info.value.status == 408 and info.value.code == "spec_too_slow"
    assert "within 0.5 s" in info.value.message


def test_a_keys_third_submit_at_once_is_refused_while_another_keys_is_not():
    """Each submit holds one of the replica's requests while its spec comes and is read (a
    128 KiB YAML spec is a second of CPU): one key sending them faster than they are read
    filled all 200 and every other key waited. A key may have two in progress at once."""
    import asyncio
    from types import SimpleNamespace

    from serve.app import JobAPI, ServeSettings, submit_slots

    settings = ServeSettings()
    release = asyncio.Event()

    async def caller(request: Any) -> Any:
        return SimpleNamespace(owner=request)

    async def slow_submit(request: Any, principal: Any, hold: Any) -> str:
        await release.wait()
        return "answered"

    api = SimpleNamespace(settings=settings, _caller=caller, _submit=slow_submit,
                          submits=submit_slots(settings.max_submits_per_key))
    submit = JobAPI.func_or_class.submit

    async def go() -> None:
        pending = [asyncio.ensure_future(submit(api, "alice")) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(ApiError) as refused:
            await submit(api, "alice")
        assert refused.value.status == 429 and refused.value.code == "too_many_submits"
        assert "2 submits in progress" in refused.value.message
        bob = asyncio.ensure_future(submit(api, "bob"))
        await asyncio.sleep(0.05)
        assert api.submits.open == {"alice": 2, "bob": 1}
        release.set()
        assert await asyncio.gather(*pending, bob) == ["answered"] * 3
        assert api.submits.open == {}

    asyncio.run(go())


def test_a_submit_whose_client_went_away_keeps_its_slot_until_its_spec_is_read(monkeypatch):
    """A read cannot be stopped once it runs on its thread: a client that sent a spec and
    hung up at once had its slot freed while the read went on, and could queue reads without
    bound (each holding its body, the spec threads busy for every other key)."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from serve.app import JobAPI, SpecReader, submit_slots

    settings = ServeSettings()
    reading, go_on = threading.Event(), threading.Event()

    def slow_read(body: bytes, content_type: str, settings: Any) -> str:
        reading.set()
        go_on.wait(30)
        return "spec"

    monkeypatch.setattr(app, "read_spec", slow_read)
    reader = SpecReader(settings)

    async def caller(request: Any) -> Any:
        return SimpleNamespace(owner=request)

    async def read_then_answer(request: Any, principal: Any, hold: Any) -> Any:
        return await reader.read(b"name: x", "application/yaml", hold)

    api = SimpleNamespace(settings=settings, _caller=caller, _submit=read_then_answer,
                          submits=submit_slots(settings.max_submits_per_key))
    submit = JobAPI.func_or_class.submit

    async def go() -> None:
        gone = asyncio.ensure_future(submit(api, "alice"))
        await asyncio.to_thread(reading.wait, 10)
        gone.cancel()  # the client hung up
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert api.submits.open == {"alice": 1}  # its spec is still being read
        go_on.set()
        for _ in range(500):
            if not api.submits.open:
                break
            await asyncio.sleep(0.01)
        assert api.submits.open == {}
        assert await submit(api, "alice") == "spec"  # the next one reads as before
        assert api.submits.open == {}

    try:
        asyncio.run(go())
    finally:
        go_on.set()
        reader.close()
