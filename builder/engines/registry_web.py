"""Registers the web search engines with ``builder.engines.register``.

Each factory reads the source's own settings (``region``, ``safesearch``) and its ``options``:
``base_url`` (the API endpoint; tests point it at a fake on 127.0.0.1), ``timeout_s`` (default: the
spec's download timeout) and the engine's filters. The User-Agent is the spec's download one, with
``download.contact``, and ``download.allow_private_networks`` decides, as for the image fetcher,
whether the engine may reach private and loopback addresses. Engines with missing credentials
raise ``EngineUnavailable`` from their constructor.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from builder.engines import register
from builder.engines.base import SearchEngine
from builder.errors import SourceError
from builder.profiles import user_agent
from builder.spec import DatasetSpec, SourceSpec


def _number(src: SourceSpec, key: str, default: Optional[float], low: float, high: float,
            integer: bool = False) -> Optional[float]:
    """``options[key]`` as a finite number in [low, high] (options are free-form in the spec,
    so they are checked here, when the engine is built, before any download)."""
    value = src.options.get(key)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    whole = number.is_integer() if math.isfinite(number) else False
    if isinstance(value, bool) or not math.isfinite(number) or not low <= number <= high \
            or (integer and not whole):
        kind = "a whole number" if integer else "a number"
        raise SourceError(f"{src.engine}: options.{key} must be {kind} from {low:g} to "
                          f"{high:g}, not {value!r}")
    return int(number) if integer else number


def _common(src: SourceSpec, spec: DatasetSpec) -> dict[str, Any]:
    return {"timeout_s": _number(src, "timeout_s", spec.download.timeout_s, 0.1, 600),
            "user_agent": user_agent(spec.download),
            "allow_private_networks": spec.download.allow_private_networks}


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
                           thumb_width=_number(src, "thumb_width", None, 16, 10_000,
                                               integer=True),
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
