"""Job metrics exported through ray.util.metrics, so they show on the Ray dashboard.

Names are prefixed ``pixcrawler_``; every metric carries a ``job`` tag. Each process creates its
metric objects once (Ray registers them per process). Prometheus sees them as Ray exports them
(``exported_series``): with Ray's ``ray_`` prefix, a counter with ``_total`` appended, a
histogram as ``_bucket``/``_sum``/``_count``. The Grafana dashboard
(``cluster/grafana/pixcrawler.json``) and the README use those names.

Ray encodes tag values as ASCII and raises ``UnicodeEncodeError`` on anything else, so a class
label such as ``café`` or ``猫`` would fail the job. Every tag value goes through ``tag_value``:
printable ASCII stays as it is, and every other character, and the backslash itself, is written
as a Python/JSON-style escape (``café`` -> ``caf\\u00e9``, ``😺`` -> ``\\U0001f63a``, ``a\\b`` ->
``a\\\\b``). The mapping is one-to-one and ``codecs.decode(value, "unicode_escape")`` gives
the label back.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Union

from ray.util.metrics import Counter, Gauge, Histogram


def tag_value(text: str) -> str:
    """``text`` as an ASCII tag value, readable and reversible (see the module docstring)."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def ascii_tags(tags: Optional[dict[str, str]]) -> Optional[dict[str, str]]:
    return None if tags is None else {key: tag_value(value) for key, value in tags.items()}


Number = Union[int, float]


class AsciiCounter(Counter):
    """A Counter whose tag values go through ``tag_value``."""

    def inc(self, value: Number = 1.0, tags: Optional[dict[str, str]] = None) -> None:
        super().inc(value, tags=ascii_tags(tags))


class AsciiGauge(Gauge):
    """A Gauge whose tag values go through ``tag_value``."""

    def set(self, value: Optional[Number], tags: Optional[dict[str, str]] = None) -> None:
        super().set(value, tags=ascii_tags(tags))


class AsciiHistogram(Histogram):
    """A Histogram whose tag values go through ``tag_value``."""

    def observe(self, value: Number, tags: Optional[dict[str, str]] = None) -> None:
        super().observe(value, tags=ascii_tags(tags))


@lru_cache(maxsize=1)
def counters() -> dict[str, Counter]:
    return {
        "candidates": AsciiCounter("pixcrawler_candidates", "candidates taken up",
                                   tag_keys=("job", "label")),
        "accepted": AsciiCounter("pixcrawler_accepted", "images accepted",
                                 tag_keys=("job", "label")),
        "rejected": AsciiCounter("pixcrawler_rejected", "candidates rejected",
                                 tag_keys=("job", "stage", "reason")),
        "bytes": AsciiCounter("pixcrawler_bytes_downloaded", "bytes of accepted images",
                              tag_keys=("job",)),
    }


@lru_cache(maxsize=1)
def queue_depth() -> Gauge:
    return AsciiGauge("pixcrawler_queue_depth", "batches in flight / candidates buffered",
                      tag_keys=("job", "queue"))


@lru_cache(maxsize=1)
def stage_latency() -> Histogram:
    return AsciiHistogram("pixcrawler_stage_latency_s", "seconds per batch in a stage",
                          boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60],
                          tag_keys=("job", "stage"))


RAY_PREFIX = "ray_"
"""What Ray's metrics agent puts before every application metric's name."""


def exported_series() -> dict[str, tuple[str, ...]]:
    """Each Prometheus series name the job's metrics are exported as, with its tag keys."""
    metrics: list[Union[Counter, Gauge, Histogram]] = [*counters().values(), queue_depth(),
                                                       stage_latency()]
    out: dict[str, tuple[str, ...]] = {}
    for metric in metrics:
        name, tags = RAY_PREFIX + metric.info["name"], tuple(metric.info["tag_keys"])
        if isinstance(metric, Counter):
            out[f"{name}_total"] = tags
        elif isinstance(metric, Histogram):
            out[f"{name}_bucket"] = (*tags, "le")
            out[f"{name}_sum"] = out[f"{name}_count"] = tags
        else:
            out[name] = tags
    return out
