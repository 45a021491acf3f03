"""numpy's matrix products run on one thread in every process that imports the package first
(``builder.NUMPY_THREAD_ENV``): OpenBLAS reads the setting when numpy loads."""

from __future__ import annotations

import os
import sys

import pytest

from tests.processes import run_python

# A product big enough for OpenBLAS to use its threads; then the process's thread count.
PRODUCT = ("import numpy as np; a = np.ones((600, 600)); a @ a; import os; "
           "print(len(os.listdir('/proc/self/task')))")

needs_threads = pytest.mark.skipif(
    not sys.platform.startswith("linux") or (os.cpu_count() or 1) < 2,
    reason="counts threads in /proc; OpenBLAS starts none of its own on one core")


def run(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "GOTO_NUM_THREADS")}
    environ.update(env)
    return run_python(code, env=environ).strip()


@needs_threads
@pytest.mark.parametrize("module", ["builder.worker_procs", "cluster.cli"])
def test_numpy_keeps_to_one_thread_where_the_package_runs(module):
    """The runner's worker processes (the hashing) and the command line (the runner, the slow
    level's scorers in this process): the same threads as with the setting made by hand."""
    code = f"import {module}; {PRODUCT}"
    assert run(code) == run(code, OPENBLAS_NUM_THREADS="1")


@needs_threads
def test_without_the_package_openblas_starts_its_threads():
    """The setting is what keeps the count down, not something else in these processes."""
    assert int(run(PRODUCT)) > int(run(PRODUCT, OPENBLAS_NUM_THREADS="1"))


def test_a_users_own_setting_is_kept():
    code = "import builder, os; print(os.environ['OPENBLAS_NUM_THREADS'])"
    assert run(code) == "1"
    assert run(code, OPENBLAS_NUM_THREADS="3") == "3"
