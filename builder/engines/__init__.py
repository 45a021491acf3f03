"""Search engines behind one interface (``base.SearchEngine``); ``make_engine`` builds one.

URL lists are not engines: workers read them in slices (``builder.listsource``)."""

from __future__ import annotations

from typing import Callable

from builder.engines.base import SearchEngine, SearchHit, SearchPage
from builder.errors import SourceError
from builder.spec import DatasetSpec, SourceSpec

EngineFactory = Callable[[SourceSpec, DatasetSpec], SearchEngine]
_REGISTRY: dict[str, EngineFactory] = {}


def register(name: str) -> Callable[[EngineFactory], EngineFactory]:
    """Register an engine's factory under ``name`` (one of ``builder.spec.ENGINES``)."""
    def deco(factory: EngineFactory) -> EngineFactory:
        _REGISTRY[name] = factory
        return factory
    return deco


@register("sandbox")
def _sandbox(src: SourceSpec, spec: DatasetSpec) -> SearchEngine:
    from builder.engines.sandbox import SandboxEngine

    return SandboxEngine(src.url or "", timeout_s=spec.download.timeout_s,
                         allow_private_networks=spec.download.allow_private_networks)


def make_engine(src: SourceSpec, spec: DatasetSpec) -> SearchEngine:
    """Build the engine a source names; raises SourceError if it is unknown or unusable here."""
    factory = _REGISTRY.get(src.engine)
    if factory is None:
        raise SourceError(f"engine {src.engine!r} is not available in this build "
                          f"(available: {', '.join(sorted(_REGISTRY))})")
    return factory(src, spec)


__all__ = ["SearchEngine", "SearchHit", "SearchPage", "make_engine", "register"]
from builder.engines import registry_web  # noqa: E402,F401  (registers web engines)
