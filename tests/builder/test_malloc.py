"""glibc's mmap threshold, fixed in the in-process runner's process (builder.malloc)."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

from tests.processes import run_python

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

# In a fresh interpreter: free a 16 MiB block (glibc maps it), then take 2 MiB, and say whether
# glibc mapped the 2 MiB block too (mallinfo2's count of mapped blocks went up).
PROBE = textwrap.dedent("""
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
    fixed = fix_mmap_threshold() if sys.argv[1] == "fix" else False
    libc.free(libc.malloc(16 << 20))
    before = libc.mallinfo2().hblks
    block = libc.malloc(2 << 20)
    print(fixed, libc.mallinfo2().hblks > before)
    libc.free(block)
""")


def probe(how: str, env: dict[str, str]) -> str:
    return run_python(PROBE, how, env=env).strip()


def test_a_fixed_threshold_maps_big_blocks_after_a_bigger_one_was_freed():
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    # glibc's default: freeing the 16 MiB block raised the threshold, so 2 MiB is heap
    assert probe("keep", env) == "False False"
    assert probe("fix", env) == "True True"


def test_the_environment_setting_wins():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
    assert probe("fix", env) == "False False"
