"""How ``connect`` starts or joins Ray (``ray.init`` recorded, not run: no Ray here)."""

from __future__ import annotations

from typing import Any

import pytest

from cluster import connect as connect_module
from cluster.connect import EMBEDDED_SYSTEM_CONFIG, SAME_PRIORITY_ENV, WORKER_NICENESS_ENV


class StopAfterInit(Exception):
    pass


@pytest.fixture
def init_calls(monkeypatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def fake_init(**kwargs: Any) -> None:
        calls.append(kwargs)
        raise StopAfterInit

    monkeypatch.setattr(connect_module.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(connect_module.ray, "init", fake_init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_embedded_workers_run_at_the_commands_priority(init_calls):
    """Ray would start them 15 nice levels below the command that does the work."""
    with pytest.raises(StopAfterInit):
        connect_module.connect(None, num_cpus=2)
    (kwargs,) = init_calls
    assert kwargs["runtime_env"] == SAME_PRIORITY_ENV
    assert SAME_PRIORITY_ENV["env_vars"][WORKER_NICENESS_ENV] == "0"
    assert kwargs["_system_config"] == EMBEDDED_SYSTEM_CONFIG
    assert kwargs["dashboard_host"] == "127.0.0.1"


def test_a_cluster_keeps_rays_priorities_unless_asked(init_calls):
    with pytest.raises(StopAfterInit):
        connect_module.connect("ray://head:10001")
    with pytest.raises(StopAfterInit):
        connect_module.connect("auto", runtime_env={"env_vars": {"X": "1"}})
    assert "runtime_env" not in init_calls[0]
    assert init_calls[1]["runtime_env"] == {"env_vars": {"X": "1"}}
