"""A successful run says nothing that reads as a failure: no WARNING or ERROR line, nothing
like a traceback, from PixCrawler or from Ray, on an embedded Ray started for the command."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from builder.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
ALARMING = re.compile(r"\b(WARNING|ERROR|CRITICAL|Traceback)\b|^\s+File \"|PoolPlan\(|"
                      r"Progress bars disabled|max_restarts", re.MULTILINE)


@pytest.fixture
def ray_env():
    ray_tmp = tempfile.mkdtemp(prefix="pxq", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    yield env
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["--ray", "--local"])
def test_a_successful_demo_prints_no_warning_or_error(ray_env, tmp_path, runner):
    """Its output named relative to the folder it runs in: an embedded Ray's workers write
    it there too (they keep the folder Ray started in)."""
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "demo", "--target", "8",
                          runner, "--output", "demo"], env=ray_env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dataset complete" in out.stdout
    assert (tmp_path / "demo" / "_SUCCESS").is_file()
    assert ALARMING.findall(out.stderr) == [], out.stderr[-3000:]


def _interruptible() -> None:
    """In the child, before exec: SIGINT as in a terminal's foreground. A test run started in
    the background of a script (`cmd &` without job control) ignores SIGINT, and a Python
    started with it ignored keeps ignoring it: Ctrl-C would never reach the command."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_stopping_serve_with_ctrl_c_prints_no_traceback(ray_env, tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--no-auth",
                             "--port", str(port), "--store",
                             f"sqlite:///{tmp_path / 'store.db'}"],
                            env=ray_env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_interruptible)
    deadline = time.time() + 180
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C to stop" in line:
            break
    assert any("Ctrl-C to stop" in line for line in lines), (lines, proc.poll())
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C on a terminal: the whole process group
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err[-3000:]
    assert ALARMING.findall(err) == [], err[-3000:]
