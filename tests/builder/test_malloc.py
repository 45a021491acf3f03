"""glibc's mmap and trim thresholds, fixed in the in-process runner's process (builder.malloc)."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

from tests.processes import run_python

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

# What both probes start with: glibc's allocator and its statistics (mallinfo2), through ctypes.
LIBC = textwrap.dedent("""
    import ctypes, sys
    from builder.malloc import fix_mmap_threshold

    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks "
                    "keepcost".split()]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Info
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
""")

# In a fresh interpreter: free a 16 MiB block (glibc maps it), then take 2 MiB, and say whether
# glibc mapped the 2 MiB block too (mallinfo2's count of mapped blocks went up).
PROBE = LIBC + textwrap.dedent("""
    fixed = fix_mmap_threshold() if sys.argv[1] == "fix" else False
    libc.free(libc.malloc(16 << 20))
    before = libc.mallinfo2().hblks
    block = libc.malloc(2 << 20)
    print(fixed, libc.mallinfo2().hblks > before)
    libc.free(block)
""")


def probe(how: str, env: dict[str, str], code: str = PROBE) -> str:
    return run_python(code, how, env=env).strip()


def test_a_fixed_threshold_maps_big_blocks_after_a_bigger_one_was_freed():
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    # glibc's default: freeing the 16 MiB block raised the threshold, so 2 MiB is heap
    assert probe("keep", env) == "False False"
    assert probe("fix", env) == "True True"


def test_the_environment_setting_wins():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
    assert probe("fix", env) == "False False"


# In a fresh interpreter: free 8 MiB of heap blocks (each under any mmap threshold), and say
# whether the heap kept them (its arena is still 8 MiB or more) or gave them back. The list of
# blocks is made whole first: grown as the blocks were taken, its array could land above them
# (where the heap had no hole below, as with every module's bytecode cached), and the heap can
# only give back its top.
TRIM_PROBE = LIBC + textwrap.dedent("""
    if sys.argv[1] == "fix":
        fix_mmap_threshold()
    blocks = [0] * 128
    for n in range(128):
        blocks[n] = libc.malloc(64 << 10)
    for block in reversed(blocks):
        libc.free(block)
    print(libc.mallinfo2().arena >= 8 << 20)
""")


def test_a_fixed_threshold_keeps_the_freed_top_of_the_heap():
    """Fixing the mmap threshold leaves glibc's trim threshold at 128 KiB unless it is set
    too: each unit's temporaries were given back and faulted in again."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    assert probe("keep", env, TRIM_PROBE) == "False"  # glibc's default trims
    assert probe("fix", env, TRIM_PROBE) == "True"
    own = {**env, "MALLOC_TRIM_THRESHOLD_": str(128 << 10)}
    assert probe("fix", own, TRIM_PROBE) == "False"  # the user's setting wins
