"""The wrappers on CUDA in fp16 (skipped where torch sees no GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from builder.models import ClipModel, NsfwModel
from builder.slow import SlowValidator

from .images import jpeg_bytes, noise, plain, record

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.ml,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_clip_on_cuda_fp16_matches_cpu(tiny_clip_dir) -> None:
    gpu = ClipModel(model_id=str(tiny_clip_dir), device="cuda", fp16=True)
    cpu = ClipModel(model_id=str(tiny_clip_dir), device="cpu")
    gpu.load()
    cpu.load()
    assert next(gpu._model.parameters()).dtype == torch.float16
    assert next(gpu._model.parameters()).device.type == "cuda"
    images = [noise(i) for i in range(4)] + [plain((200, 10, 10))]
    on_gpu, on_cpu = gpu.encode_images(images), cpu.encode_images(images)
    assert on_gpu.dtype == np.float32
    assert np.allclose(np.linalg.norm(on_gpu, axis=1), 1.0, atol=1e-3)
    assert np.allclose(on_gpu, on_cpu, atol=2e-2)
    texts = ["a photo of a cat.", "a photo of a dog."]
    assert np.allclose(gpu.encode_texts(texts), cpu.encode_texts(texts), atol=2e-2)


def test_hf_nsfw_on_cuda_fp16(make_vit_dir) -> None:
    model = NsfwModel(backend="hf", model_id=str(make_vit_dir(bias=(-4.0, 4.0))), device="cuda")
    model.load()
    assert next(model._model.parameters()).dtype == torch.float16
    scores = model([noise(1), plain((0, 0, 0))])
    assert np.allclose(scores, 1.0 / (1.0 + np.exp(-8.0)), atol=1e-3)


def test_opennsfw_on_cuda_matches_cpu() -> None:
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (the CUDA execution provider)")
    gpu, cpu = NsfwModel(device="cuda"), NsfwModel(device="cpu")
    gpu.load()
    cpu.load()
    images = [noise(i, (300, 200)) for i in range(3)] + [plain((224, 172, 140))]
    assert np.allclose(gpu(images), cpu(images), atol=1e-3)


def test_slow_validator_on_cuda(tiny_clip_dir) -> None:
    validator = SlowValidator(["cat"], nsfw=None,
                              clip=ClipModel(model_id=str(tiny_clip_dir), device="cuda"),
                              clip_threshold=-1.0, keep_embedding=True)
    records = validator([record(jpeg_bytes(plain((10, 20, 30))), "cat")])
    assert not records[0].rejected and len(records[0].embedding) == 16
