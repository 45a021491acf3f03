"""ClipModel with a tiny CLIP saved locally, and model resolution without a hub."""

from __future__ import annotations

import time

import numpy as np
import pytest

from builder.errors import ModelLoadError
from builder.models import ClipModel, resolve_model_dir
from builder.models.preprocess import clip_pixels
from builder.ports import free_port

from .images import TINY_IMAGE_SIZE, noise, plain

pytestmark = pytest.mark.ml


@pytest.fixture(scope="module")
def clip(tiny_clip_dir) -> ClipModel:
    model = ClipModel(model_id=str(tiny_clip_dir), device="cpu", batch_size=3)
    model.load()
    return model


def test_image_embeddings_are_unit_vectors_of_the_projection_size(clip: ClipModel) -> None:
    images = [noise(i) for i in range(7)]  # 7 over batches of 3: chunking is exercised
    emb = clip.encode_images(images)
    assert emb.shape == (7, 16) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert clip.embedding_dim == 16
    assert clip.encode_images(np.zeros((0, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE),
                                       dtype=np.float32)).shape == (0, 16)


def test_image_embeddings_are_deterministic_and_content_dependent(clip: ClipModel) -> None:
    images = [noise(1), noise(2), plain((200, 30, 30))]
    first = clip.encode_images(images)
    again = clip.encode_images(clip.preprocess(images))
    assert np.allclose(first, again, atol=1e-6)
    one_by_one = np.concatenate([clip.encode_images([im]) for im in images])
    assert np.allclose(first, one_by_one, atol=1e-5)
    assert not np.allclose(first[0], first[1], atol=1e-3)


def test_preprocess_uses_the_models_own_size_and_matches_its_processor(clip: ClipModel) -> None:
    images = [noise(3, (90, 50)), noise(4, (40, 70))]
    pixels = clip.preprocess(images)
    assert pixels.shape == (2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    assert np.array_equal(pixels, clip_pixels(images, size=TINY_IMAGE_SIZE))
    ref = clip.processor()(images=images, return_tensors="np")["pixel_values"]
    assert np.abs(pixels - ref).max() < 1e-5


def test_text_embeddings_are_unit_vectors_and_cached(clip: ClipModel) -> None:
    texts = ["a photo of a cat.", "a photo of a dog.", "a photo of a cat."]
    emb = clip.encode_texts(texts)
    assert emb.shape == (3, 16)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(emb[0], emb[2])
    assert not np.allclose(emb[0], emb[1], atol=1e-4)
    cached = len(clip._text_cache)
    assert np.array_equal(clip.encode_texts(["a photo of a dog."])[0], emb[1])
    assert len(clip._text_cache) == cached
    alone = ClipModel(model_id=clip.model_id)
    alone.load()
    assert np.allclose(alone.encode_texts(["a photo of a dog."])[0], emb[1], atol=1e-5)


def test_encoding_before_load_is_an_error(tiny_clip_dir) -> None:
    with pytest.raises(RuntimeError, match="load"):
        ClipModel(model_id=str(tiny_clip_dir)).encode_texts(["x"])



@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """An empty Hugging Face cache, so that nothing cached on this machine can satisfy a load."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_hub_id_offline_fails_at_once_saying_it_must_be_local(
        empty_hf_cache, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="must be available locally") as info:
        ClipModel(model_id="openai/clip-vit-base-patch32").load()
    assert "HF_HOME" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)
    with pytest.raises(ModelLoadError, match="must be available locally"):
        ClipModel().processor()
    assert time.monotonic() - started < 5


def test_a_hub_id_with_an_unreachable_hub_fails_at_once(
        empty_hf_cache, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="cannot be reached") as info:
        resolve_model_dir("openai/clip-vit-base-patch32")
    assert "must be available locally" in str(info.value)
    assert time.monotonic() - started < 10


def test_a_missing_local_directory_is_a_model_load_error(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        ClipModel(model_id=str(tmp_path / "no-such-model")).load()


def test_a_directory_that_is_not_a_clip_model_is_a_model_load_error(make_vit_dir) -> None:
    with pytest.raises(ModelLoadError):
        ClipModel(model_id=str(make_vit_dir())).load()


def test_device_is_validated_at_construction() -> None:
    with pytest.raises(ValueError, match="'cpu', 'cuda', 'cuda:N'"):
        ClipModel(device="mps")


def test_a_hub_id_found_in_the_hf_cache_loads_offline(
        tiny_clip_dir, empty_hf_cache, monkeypatch: pytest.MonkeyPatch) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hf_cache / "models--tiny-org--tiny-clip"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in tiny_clip_dir.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_dir("tiny-org/tiny-clip") == str(snapshot)
    cached = ClipModel(model_id="tiny-org/tiny-clip")
    cached.load()
    local = ClipModel(model_id=str(tiny_clip_dir))
    local.load()
    images = [noise(9)]
    assert np.allclose(cached.encode_images(images), local.encode_images(images), atol=1e-6)


def test_a_hub_id_is_never_read_from_a_folder_of_that_name_here(
        tiny_clip_dir, empty_hf_cache, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default CLIP id was loaded from ``./openai/clip-vit-base-patch32`` where such a
    folder existed: anyone who can write where the command runs (``/tmp``) could choose the
    model that decides what the dataset keeps. A local model is named as a path."""
    import shutil

    planted = tmp_path / "openai" / "clip-vit-base-patch32"
    shutil.copytree(tiny_clip_dir, planted)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache") as info:
        resolve_model_dir("openai/clip-vit-base-patch32")
    assert "'./openai/clip-vit-base-patch32'" in str(info.value)
    assert resolve_model_dir("./openai/clip-vit-base-patch32") == str(planted)
