"""glibc's allocator in a long-running coordinator: large freed blocks go back to the OS.

glibc serves a block of at least ``M_MMAP_THRESHOLD`` (128 KiB at start) with its own mapping,
returned to the OS when freed, and a smaller one from the heap, which shrinks only from its top.
Each time a mapped block is freed, glibc raises the threshold to that block's size (up to
32 MiB), so that a program which frees big blocks often gets them from the heap instead. The
in-process runner's process is such a program: its dedup index grows tables of megabytes and
frees the old ones, and after that every block below the last freed table's size comes from the
heap, which fragments and never shrinks. Over a 1M-URL list that was 20-35 MiB of the runner's
resident memory (bench/README.md, "Scale-out"). A fixed threshold turns that raising off.

Fixing it also fixes the trim threshold (free memory at the heap's top that glibc keeps rather
than hands back) at its start value, 128 KiB, which glibc otherwise raises with the mmap
threshold. At 128 KiB the runner gave back and faulted in again the heap under each unit's
temporaries: 300-410k page faults over a 20,000-photo job. ``TRIM_THRESHOLD`` keeps that.
"""

from __future__ import annotations

import ctypes
import os

MMAP_THRESHOLD = 1 << 20
"""Blocks of 1 MiB and more get their own mapping: index tables and their growth temporaries,
not the runner's many small objects (128 KiB, glibc's start value, saved 4 MiB more in the bench
and maps far more blocks)."""

TRIM_THRESHOLD = 16 << 20
"""The heap's free top glibc keeps: over the 20,000-photo job, 80-95k page faults instead of
300-410k and 0.7-0.8 s less of the runner's CPU (4.4 s against 4.5-5.6 s; 4 MiB still left
about 200k faults). Its cost, over a 1M-URL list of 404s: 12 MiB more peak RSS (231 against
219 MiB), no CPU saved."""

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_ENV = "MALLOC_MMAP_THRESHOLD_"
_TRIM_ENV = "MALLOC_TRIM_THRESHOLD_"


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD, trim: int = TRIM_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold, and its trim threshold at ``trim``, for this process (not
    the processes it starts). Returns whether the mmap threshold was set: not where the C
    library has no ``mallopt`` (macOS), nor where the environment sets it already
    (``MALLOC_MMAP_THRESHOLD_``, glibc's own variable, which wins: then neither threshold is
    touched here). ``MALLOC_TRIM_THRESHOLD_`` in the environment wins for the trim
    threshold."""
    if _ENV in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    if _TRIM_ENV not in os.environ:
        mallopt(_M_TRIM_THRESHOLD, trim)
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))
