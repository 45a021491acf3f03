"""Search engines behind one interface (``base.SearchEngine``); ``make_engine`` builds one.

URL lists are not engines: workers read them in slices (``builder.listsource``)."""

from __future__ import annotations

from typing import Callable, Optional

from builder.engines.base import SearchEngine, SearchHit, SearchPage
from builder.errors import SourceError
from builder.spec import DatasetSpec, SourceSpec

EngineFactory = Callable[[SourceSpec, DatasetSpec], SearchEngine]
_REGISTRY: dict[str, EngineFactory] = {}
_ENDPOINTS: dict[str, str] = {}
"""Per engine, the source field naming the server it asks for hits (``url``, or the option
``base_url``); engines without one always ask their own public service."""


def register(name: str, endpoint: Optional[str] = None
             ) -> Callable[[EngineFactory], EngineFactory]:
    """Register an engine's factory; ``endpoint``: the source field ("url" or "base_url")
    that names the server it asks, where the source may name one."""
    def deco(factory: EngineFactory) -> EngineFactory:
        _REGISTRY[name] = factory
        if endpoint is not None:
            _ENDPOINTS[name] = endpoint
        return factory
    return deco


def endpoint_of(src: SourceSpec) -> Optional[str]:
    """The server the source's engine asks for hits, where the source names it; None where
    the engine asks its own public service (its default, or always)."""
    field = _ENDPOINTS.get(src.engine)
    value = src.url if field == "url" else src.options.get("base_url") if field else None
    return value if isinstance(value, str) and value else None


@register("sandbox", endpoint="url")
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


__all__ = ["SearchEngine", "SearchHit", "SearchPage", "endpoint_of", "make_engine", "register"]
from builder.engines import registry_web  # noqa: E402,F401  (registers web engines)
