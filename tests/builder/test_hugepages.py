"""numpy asks for no transparent huge pages in every process that imports the package first
(``builder.NUMPY_HUGEPAGE_ENV``), the Ray actors' modules included: numpy reads the setting
when it loads."""

from __future__ import annotations

import os
import sys

import pytest

from tests.processes import run_python

HUGEPAGES = ("import numpy; core = getattr(numpy, '_core', None) or numpy.core; "
             "print(core.multiarray._get_madvise_hugepage())")  # numpy.core before 2.0


def hugepages(code: str, **env: str) -> bool:
    """Whether numpy, in a fresh interpreter running ``code``, asks for huge pages."""
    environ = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    environ.update(env)
    return {"True": True, "False": False}[run_python(f"{code}; {HUGEPAGES}",
                                                     env=environ).strip()]


@pytest.mark.parametrize("module", ["cluster.cli", "builder.worker_procs", "actors.dedup",
                                    "actors.worker"])
def test_numpy_asks_for_no_huge_pages_wherever_the_package_runs(module):
    """The command line and the in-process runner's index, its worker processes, and the Ray
    actors' modules, which import numpy before they import anything of builder."""
    assert hugepages(f"import {module}") is False


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="numpy asks for huge pages on Linux only")
def test_without_the_package_numpy_asks_for_them():
    """The setting is what changes numpy, not something else in these processes."""
    assert hugepages("import os") is True


def test_a_users_own_setting_is_kept():
    assert hugepages("import builder", NUMPY_MADVISE_HUGEPAGE="1") is True
