"""Helpers for tests that need a process of their own."""

from __future__ import annotations

import subprocess
import sys


def run_python(code: str) -> None:
    """Run ``code`` in a fresh interpreter (what it does to its process stays there); fail the
    test with its stderr if it fails."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
