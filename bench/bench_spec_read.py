"""What a large spec sent to the job API costs the replica before it is refused.

    .venv/bin/python bench/bench_spec_read.py [--classes 105000] [--runs 3]

Builds a JSON spec of ``--classes`` class names (105,000 six-character names are about 1 MB,
the API's ``max_spec_bytes``) and times, in this process, CPU seconds per spec:

- **validated**: ``parse_body`` then ``parse_spec``, the whole validation; what the API did
  with every spec before ``serve.app.check_size`` (the policy's ``max_classes`` was checked on
  the validated spec);
- **pre-checked**: ``serve.app.read_spec``, what the API does now: the classes are counted on
  the parsed JSON and a spec over the policy's ``max_classes`` (1000 by default) is refused
  before validation.

The spec is otherwise valid: validated, it passes (the policy would then refuse it); pre-checked,
it is refused. The outcome is printed with the times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

from builder.errors import SpecError
from builder.spec import parse_spec
from serve.app import ServeSettings, parse_body, read_spec
from serve.errors import ApiError
from serve.policy import PolicyRefused

CONTENT_TYPE = "application/json"


def timed(read: Callable[[], object], runs: int) -> tuple[list[float], str]:
    """CPU seconds of each of ``runs`` calls, and the outcome's name."""
    times, outcome = [], ""
    for _ in range(runs):
        start = time.process_time()
        try:
            read()
            outcome = "valid"
        except (SpecError, PolicyRefused, ApiError) as exc:
            outcome = type(exc).__name__
        times.append(time.process_time() - start)
    return times, outcome


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=105_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    body = json.dumps({"name": "big", "classes": [f"c{i:05d}" for i in range(args.classes)],
                       "sources": [{"engine": "wikimedia"}]}, separators=(",", ":")).encode()
    settings = ServeSettings()
    print(f"spec: {len(body):,} bytes of JSON, {args.classes:,} classes; policy max_classes "
          f"{settings.policy.max_classes}")
    cases = {
        "validated": lambda: parse_spec(parse_body(body, CONTENT_TYPE, settings.max_spec_bytes,
                                                   settings.max_yaml_spec_bytes),
                                        "request body"),
        "pre-checked": lambda: read_spec(body, CONTENT_TYPE, settings),
    }
    medians = {}
    for name, read in cases.items():
        times, outcome = timed(read, args.runs)
        medians[name] = statistics.median(times)
        print(f"{name:>12}: {outcome}, CPU s per spec " +
              " / ".join(f"{t:.3f}" for t in sorted(times)) + f" (median {medians[name]:.3f})")
    print(f"ratio validated / pre-checked: {medians['validated'] / medians['pre-checked']:.0f}x")


if __name__ == "__main__":
    main()
