"""Validation in worker processes gives the caller's records what validation in this process
would, on the same objects."""

from __future__ import annotations

import copy
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

from builder import validate_pool
from builder.reasons import Reason
from builder.records import Candidate, Record
from builder.spec import ResizeSpec, ValidationSpec
from builder.transform import ImageTransformer
from builder.validate import ImageValidator
from builder.validate_pool import ProcessValidator
from builder.worker_start import ForkedWorker
from tests.images import encode, jpeg, picture

REPO = Path(__file__).resolve().parents[2]


def batch() -> list[Record]:
    bodies = [jpeg(1, (640, 480)), encode(picture(2), "PNG"), jpeg(3)[:900], b"not an image",
              jpeg(1, (640, 480))]
    return [Record(Candidate(f"http://x/{i}", "cat"), data=body) for i, body in enumerate(bodies)]


def test_processes_validate_as_this_process_does_onto_the_same_records():
    cfg = ValidationSpec(level="medium")
    here = ImageValidator(cfg)(batch())
    records = batch()
    candidates = [r.candidate for r in records]
    pool = ProcessValidator(cfg, 2)
    try:
        out = pool(records)
    finally:
        pool.close()
    assert out is records and [r.candidate for r in records] == candidates
    assert all(a.candidate is b for a, b in zip(records, candidates))  # the same objects
    assert [vars(r) for r in records] == [vars(r) for r in here]
    assert [r.rejected for r in records] == [False, False, True, True, False]
    assert records[0].phash and records[0].sha256 == records[4].sha256


PLANTED_POOL = """
import os
from builder.records import Candidate, Record
from builder.spec import ValidationSpec
from builder.validate_pool import ProcessValidator
from tests.images import jpeg

if __name__ == "__main__":
    records = [Record(Candidate(url="http://127.0.0.1:1/a.jpg", label="cat"), data=jpeg(1))]
    pool = ProcessValidator(ValidationSpec(level="medium"), 2)
    try:
        pool(records)
    finally:
        pool.close()
    print(bool(records[0].sha256), "PYTHONSAFEPATH" in os.environ)
"""


def test_pool_processes_started_in_a_folder_others_write_import_the_standard_library(
        tmp_path):
    """A spawned child runs ``python -c``, which put the current folder first on its import
    path: a ``multiprocessing/`` package planted where the command runs (``/tmp``) ran as
    the user of ``pixcrawler``, in the pool's processes and in multiprocessing's resource
    tracker. A fresh interpreter runs it, from a script as the ``pixcrawler`` command does:
    this one's tracker runs already, and ``-P`` would pass to the children."""
    work, script = tmp_path / "work", tmp_path / "script" / "run.py"
    (work / "multiprocessing").mkdir(parents=True)
    script.parent.mkdir()
    script.write_text(PLANTED_POOL)
    marker = tmp_path / "planted-code-ran"
    (work / "multiprocessing" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, str(script)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]  # validated; the variable not left set
    assert not marker.exists(), done.stderr


def test_a_record_rejected_before_is_left_as_it_was():
    records = batch()[:1]
    records[0].reject(Reason.TIMEOUT, "gave up")
    before = copy.deepcopy(vars(records[0]))
    pool = ProcessValidator(ValidationSpec(level="medium"), 1)
    try:
        pool(records)
    finally:
        pool.close()
    assert vars(records[0]) == before


def kill(pool: ProcessValidator) -> None:
    """SIGKILL the pool's processes (as the OOM killer would) and wait till the pool knows."""
    for pid in list(pool.pool._processes):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not pool.pool._broken:
        assert time.monotonic() < deadline, "the pool did not notice its process died"
        time.sleep(0.05)


def _validate_or_die(records: list[Record]) -> list[Record]:
    """Run in the pool's process: dies, as a decoder's segfault would, on the bytes b"die"."""
    if any(r.data == b"die" for r in records):
        os._exit(1)
    return validate_pool._validate(records)


def test_a_killed_pool_process_is_replaced_and_the_next_batches_decided():
    before = set(multiprocessing.active_children())
    cfg = ValidationSpec(level="medium")
    here = [vars(r) for r in ImageValidator(cfg)(batch())]
    pool = ProcessValidator(cfg, 2)
    try:
        assert [vars(r) for r in pool(batch())] == here
        kill(pool)
        for _ in range(2):
            assert [vars(r) for r in pool(batch())] == here
    finally:
        pool.close()
    assert set(multiprocessing.active_children()) == before


def test_a_record_that_kills_its_validator_is_rejected_and_the_rest_decided(monkeypatch):
    monkeypatch.setattr(validate_pool, "_validate", _validate_or_die)
    before = set(multiprocessing.active_children())
    cfg = ValidationSpec(level="medium")
    here = [vars(r) for r in ImageValidator(cfg)(batch())]
    records = batch()
    records.insert(2, Record(Candidate("http://x/die", "cat"), data=b"die"))
    pool = ProcessValidator(cfg, 2)
    try:
        out = pool(records)
        assert [vars(r) for r in pool(batch())] == here  # the shared pool works again
    finally:
        pool.close()
    assert set(multiprocessing.active_children()) == before
    crashed = out.pop(2)
    assert crashed.rejected and crashed.data is None
    assert (crashed.stage, crashed.reason) == ("validate", Reason.VALIDATOR_CRASHED.value)
    assert "died" in crashed.detail
    assert [vars(r) for r in out] == here


def test_a_pool_broken_after_close_is_not_rebuilt():
    before = set(multiprocessing.active_children())
    pool = ProcessValidator(ValidationSpec(level="medium"), 1)
    try:
        pool(batch()[:1])
        kill(pool)
    finally:
        pool.close()
    broken = pool.pool
    with pytest.raises(BrokenProcessPool):
        pool(batch())
    assert pool.pool is broken
    assert set(multiprocessing.active_children()) == before


def test_a_pool_process_leaves_when_the_process_that_started_it_is_killed():
    """The isolating validator is there for processes killed outright; its own pool process
    waited on its call queue for ever once its parent was SIGKILLed, reparented to init."""
    import subprocess
    import sys

    code = ("from builder.spec import ValidationSpec\n"
            "from builder.validate_pool import ProcessValidator\n"
            "from tests.builder.test_validate_pool import batch\n"
            "pool = ProcessValidator(ValidationSpec(level='medium'), 1)\n"
            "pool(batch())\n"
            "print(*pool.pool._processes, flush=True)\n"
            "import time; time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        (child,) = map(int, parent.stdout.readline().split())
        os.kill(child, 0)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    orphan = ForkedWorker()  # not this process's child: gone, or a zombie init has not reaped
    orphan.pid = child
    deadline = time.monotonic() + 10
    while orphan.poll() is None:
        if time.monotonic() > deadline:
            orphan.kill()
            pytest.fail("the pool process outlived the process that started it")
        time.sleep(0.05)


class _DyingTransformer(ImageTransformer):
    """Run in the pool's process: dies, as a decoder's crash on a full-size decode would, on
    the image of ``http://x/die``."""

    def apply(self, record: Record) -> Record:
        if record.candidate.url == "http://x/die":
            os._exit(1)
        return super().apply(record)


def test_a_transform_that_kills_its_process_keeps_the_image_and_the_rest_are_transformed():
    """An isolated unit's images are resized in the validator's processes: one whose resize
    kills the process keeps its bytes as they came (it is accepted and counted already), and
    every other image is resized as in this process."""
    cfg = ValidationSpec(level="medium")
    transformer = _DyingTransformer(ResizeSpec(max_side=64))

    def validated() -> list[Record]:
        records = batch()
        records.insert(1, Record(Candidate("http://x/die", "cat"), data=jpeg(5, (640, 480))))
        return ImageValidator(cfg)(records)

    here = [ImageTransformer(ResizeSpec(max_side=64)).apply(r) if not r.rejected else r
            for r in validated()]
    records = validated()
    before = set(multiprocessing.active_children())
    pool = ProcessValidator(cfg, 1)
    try:
        out = pool.transform(transformer, records)
    finally:
        pool.close()
    assert set(multiprocessing.active_children()) == before
    assert out is records
    dying = records.pop(1)
    assert not dying.rejected and dying.data == jpeg(5, (640, 480))
    assert (dying.width, dying.height) == (640, 480)
    here.pop(1)
    assert [(r.data, r.format, r.width, r.height) for r in records] == \
        [(r.data, r.format, r.width, r.height) for r in here]
    assert max(records[0].width, records[0].height) == 64
