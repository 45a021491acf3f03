"""pyarrow's allocator commits its arenas on demand in every process that imports the package
(``builder.ARROW_ALLOCATOR_ENV``): mimalloc reads the option once, when pyarrow loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

MAKE_A_BUFFER = "import pyarrow as pa; pa.array([b'x' * 100_000])"


def mimalloc_options(code: str, **env: str) -> dict[str, str]:
    """The options pyarrow's mimalloc started with in a fresh interpreter running ``code``
    (mimalloc prints them at start when MIMALLOC_VERBOSE=1)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MIMALLOC_")}
    environ.update(env, MIMALLOC_VERBOSE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=environ, timeout=120)
    assert proc.returncode == 0, proc.stderr
    options = {}
    for line in proc.stderr.splitlines():
        if line.startswith("option '"):
            name, _, value = line[len("option '"):].partition("': ")
            options[name] = value.strip()
    if not options:
        pytest.fail(f"pyarrow's allocator printed no mimalloc options: {proc.stderr[-2000:]}")
    return options


@pytest.mark.parametrize("module", ["builder.worker_procs", "cluster.cli", "actors.worker"])
def test_the_arenas_are_committed_on_demand_wherever_the_package_runs(module):
    """The runner's worker processes, the command line (the in-process runner's services and
    the publish step) and the Ray actors' modules: each imports pyarrow after the setting."""
    options = mimalloc_options(f"import {module}; {MAKE_A_BUFFER}")
    assert options["arena_eager_commit"] == "0"


def test_without_the_package_the_allocator_keeps_its_default():
    """The setting is what changes the allocator, not something else in these processes."""
    assert mimalloc_options(MAKE_A_BUFFER)["arena_eager_commit"] != "0"


def test_a_users_own_setting_is_kept():
    options = mimalloc_options(f"import builder.worker_procs; {MAKE_A_BUFFER}",
                               MIMALLOC_ARENA_EAGER_COMMIT="1")
    assert options["arena_eager_commit"] == "1"
