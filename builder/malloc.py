"""glibc's allocator in a long-running coordinator: large freed blocks go back to the OS.

glibc serves a block of at least ``M_MMAP_THRESHOLD`` (128 KiB at start) with its own mapping,
returned to the OS when freed, and a smaller one from the heap, which shrinks only from its top.
Each time a mapped block is freed, glibc raises the threshold to that block's size (up to
32 MiB), so that a program which frees big blocks often gets them from the heap instead. The
in-process runner's process is such a program: its dedup index grows tables of megabytes and
frees the old ones, and after that every block below the last freed table's size comes from the
heap, which fragments and never shrinks. Over a 1M-URL list that was 20-35 MiB of the runner's
resident memory (bench/README.md, "Scale-out"). A fixed threshold turns that raising off.
"""

from __future__ import annotations

import ctypes
import os

MMAP_THRESHOLD = 1 << 20
"""Blocks of 1 MiB and more get their own mapping: index tables and their growth temporaries,
not the runner's many small objects (128 KiB, glibc's start value, saved 4 MiB more in the bench
and maps far more blocks)."""

_M_MMAP_THRESHOLD = -3
_ENV = "MALLOC_MMAP_THRESHOLD_"


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold for this process (not the processes it starts). Returns
    whether it was set: not where the C library has no ``mallopt`` (macOS), nor where the
    environment sets the threshold already (``MALLOC_MMAP_THRESHOLD_``, glibc's own
    variable, which wins)."""
    if _ENV in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))
