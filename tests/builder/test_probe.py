"""``pixcrawler check --engines``: each source probed once, offline against the sandbox web."""

from __future__ import annotations

from datetime import date

import pytest

from builder.engines.probe import (DOWN, ENDED, NEEDS_KEY, UNAVAILABLE, WORKS,
                                   probe_sources, probe_table)
from builder.ports import free_port
from builder.sandbox import SandboxWeb
from builder.spec import parse_spec
from cluster.cli import main


@pytest.fixture(scope="module")
def web():
    with SandboxWeb(images_per_class=8) as sandbox:
        yield sandbox


@pytest.fixture(autouse=True)
def _no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GOOGLE_API_KEY", "GOOGLE_CSE_KEY", "GOOGLE_CSE_ID", "OPENVERSE_TOKEN",
                 "OPENVERSE_CLIENT_ID", "OPENVERSE_CLIENT_SECRET"):
        monkeypatch.delenv(name, raising=False)


def spec_of(web: SandboxWeb, tmp_path, sources: list[dict]) -> dict:
    return {"name": "probe", "classes": {"cat": ["cat photo"]}, "sources": sources,
            "download": {"allow_private_networks": True, "contact": "ops@example.org"},
            "output": {"uri": str(tmp_path / "out")}}


def test_probe_reports_each_source(web: SandboxWeb, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    openverse = web.base_url + "/api/openverse/v1/images/"
    sources = [
        {"engine": "sandbox", "url": web.base_url},
        {"engine": "sandbox", "url": dead},                     # a source that is down
        {"engine": "openverse", "options": {"base_url": openverse}},
        {"engine": "google"},                                   # no key
        {"engine": "urllist", "path": str(tmp_path / "missing.csv")},
    ]
    spec = parse_spec(spec_of(web, tmp_path, sources))
    results = probe_sources(spec, today=date(2026, 12, 2))
    assert [r.status for r in results] == [WORKS, DOWN, WORKS, NEEDS_KEY, UNAVAILABLE]
    assert results[0].hits == 5 and results[2].hits == 5
    assert "GOOGLE_API_KEY" in results[3].detail and results[3].sunset == date(2027, 1, 1)
    assert "URL list not found" in results[4].detail
    table = probe_table(results)
    assert "needs key" in table and table.count("\n") == len(results)
    # one search request per working source, no more
    assert web.hits(web.base_url + "/search") == 1


def test_google_with_a_new_key_is_blocked_and_explained(web: SandboxWeb, tmp_path, monkeypatch):
    """The sandbox answers as Google's API does for a key made after it closed. The server's
    own key goes only to Google's API, so the probe names that; a key given with the sandbox's
    address reaches it, and its 403 is explained as what it is."""
    from builder.engines.google import GoogleEngine
    from builder.errors import EngineError

    monkeypatch.setenv("GOOGLE_API_KEY", "AIza-new")
    monkeypatch.setenv("GOOGLE_CSE_ID", "cx")
    api = web.base_url + "/api/google/customsearch/v1"
    spec = parse_spec(spec_of(web, tmp_path, [{"engine": "google",
                                               "options": {"base_url": api}}]))
    [result] = probe_sources(spec, today=date(2026, 12, 2))
    if date.today() >= date(2027, 1, 1):  # the engine itself refuses from the sunset on
        assert result.status == ENDED
        return
    assert result.status == UNAVAILABLE and "sent only there" in result.detail
    assert result.sunset == date(2027, 1, 1)
    engine = GoogleEngine(api, api_key="AIza-new", cse_id="cx", allow_private_networks=True,
                          today=date(2026, 12, 2))
    with pytest.raises(EngineError) as info:
        engine.search("cat", label="cat", page=0, per_page=5)
    assert info.value.status == 403 and not info.value.retryable
    assert "PERMISSION_DENIED" in str(info.value) and "not a quota" in str(info.value)


def test_google_after_the_sunset_has_ended(web: SandboxWeb, tmp_path):
    spec = parse_spec(spec_of(web, tmp_path, [{"engine": "google"}]))
    [result] = probe_sources(spec, today=date(2027, 1, 2))
    assert result.status == ENDED and "2027-01-01" in result.detail


def test_bing_without_its_ddgs_backend_is_unavailable(web: SandboxWeb, tmp_path, monkeypatch):
    from ddgs.engines import ENGINES

    monkeypatch.setitem(ENGINES, "images", {k: v for k, v in ENGINES["images"].items()
                                            if k != "bing"})
    spec = parse_spec(spec_of(web, tmp_path, [{"engine": "bing"}]))
    [result] = probe_sources(spec)
    assert result.status == UNAVAILABLE and "ddgs>=9.13" in result.detail


def test_check_engines_cli(web: SandboxWeb, tmp_path, capsys):
    import yaml

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_of(web, tmp_path, [
        {"engine": "sandbox", "url": web.base_url}])))
    assert main(["check", str(path), "--engines"]) == 0
    out = capsys.readouterr().out
    assert "works" in out and "5 hits for 'cat photo'" in out
    dead = f"http://127.0.0.1:{free_port()}"
    path.write_text(yaml.safe_dump(spec_of(web, tmp_path, [{"engine": "sandbox", "url": dead}])))
    assert main(["check", str(path), "--engines"]) == 1
    assert "down" in capsys.readouterr().out
