"""Helpers for tests that need a process of their own."""

from __future__ import annotations

import subprocess
import sys
from typing import Optional


def run_python(code: str, *args: str, env: Optional[dict[str, str]] = None) -> str:
    """Run ``code`` in a fresh interpreter (what it does to its process stays there), with
    ``args`` as its ``sys.argv[1:]`` and ``env`` as its environment (default: this one's);
    fail the test with its stderr if it fails. Returns what it printed."""
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
