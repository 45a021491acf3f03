"""Registers the web search engines with ``builder.engines.register``.

Each factory reads the source's own settings (``region``, ``safesearch``) and its ``options``:
``base_url`` (the API endpoint; tests point it at a fake on 127.0.0.1), ``timeout_s`` (default: the
spec's download timeout) and the engine's filters. The User-Agent is the spec's download one.
Engines with missing credentials raise ``EngineUnavailable`` from their constructor.
"""

from __future__ import annotations

from typing import Any

from builder.engines import register
from builder.engines.base import SearchEngine
from builder.spec import DatasetSpec, SourceSpec


def _common(src: SourceSpec, spec: DatasetSpec) -> dict[str, Any]:
    return {"timeout_s": float(src.options.get("timeout_s", spec.download.timeout_s)),
            "user_agent": spec.download.user_agent}


def _pick(options: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: options[k] for k in keys if options.get(k)}


@register("duckduckgo")
def _duckduckgo(src: SourceSpec, spec: DatasetSpec) -> SearchEngine:
    from builder.engines.ddg import FILTER_OPTIONS, DdgsImagesEngine

    return DdgsImagesEngine(region=src.region, safesearch=src.safesearch,
                            filters=_pick(src.options, FILTER_OPTIONS),
                            timeout_s=_common(src, spec)["timeout_s"],
                            proxy=src.options.get("proxy"))


@register("bing")
def _bing(src: SourceSpec, spec: DatasetSpec) -> SearchEngine:
    from builder.engines.ddg import BingImagesEngine

    return BingImagesEngine(region=src.region, safesearch=src.safesearch,
                            timeout_s=_common(src, spec)["timeout_s"],
                            proxy=src.options.get("proxy"))


@register("wikimedia")
def _wikimedia(src: SourceSpec, spec: DatasetSpec) -> SearchEngine:
    from builder.engines.wikimedia import COMMONS_API, WikimediaEngine

    return WikimediaEngine(src.options.get("base_url") or COMMONS_API,
                           filetype=src.options.get("filetype", "bitmap"),
                           thumb_width=int(src.options["thumb_width"])
                           if src.options.get("thumb_width") else None,
                           **_common(src, spec))


@register("openverse")
def _openverse(src: SourceSpec, spec: DatasetSpec) -> SearchEngine:
    from builder.engines.openverse import FILTER_OPTIONS, OPENVERSE_API, OpenverseEngine

    return OpenverseEngine(src.options.get("base_url") or OPENVERSE_API,
                           safesearch=src.safesearch, filters=_pick(src.options, FILTER_OPTIONS),
                           **_common(src, spec))


@register("google")
def _google(src: SourceSpec, spec: DatasetSpec) -> SearchEngine:
    from builder.engines.google import FILTER_OPTIONS, GOOGLE_API, GoogleEngine

    return GoogleEngine(src.options.get("base_url") or GOOGLE_API, region=src.region,
                        safesearch=src.safesearch, filters=_pick(src.options, FILTER_OPTIONS),
                        **_common(src, spec))


@register("baidu")
def _baidu(src: SourceSpec, spec: DatasetSpec) -> SearchEngine:
    from builder.engines.baidu import BAIDU_API, BaiduEngine

    return BaiduEngine(src.options.get("base_url") or BAIDU_API,
                       original=bool(src.options.get("original", False)), **_common(src, spec))
