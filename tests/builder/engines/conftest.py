"""Every test here runs with outbound connections blocked: only 127.0.0.1 is reachable."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.builder.engines.fakes import block_external_network


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple]]:
    attempts = block_external_network(monkeypatch)
    yield attempts
    assert not attempts, f"a test tried to leave the machine: {attempts}"
