"""CLIP image and text embeddings (transformers), L2-normalised, for semantic validation.

Any Hugging Face model with ``get_image_features`` / ``get_text_features`` works (CLIP and its
relatives); the default is ``openai/clip-vit-base-patch32``. Images are preprocessed on CPU by
``preprocess`` (``builder.models.preprocess.clip_pixels`` with the model's own size, crop, mean and
std; other resize schemes go through the model's Pillow image processor) and encoded on the
configured device, fp16 on CUDA when ``fp16`` is set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import numpy as np
from PIL import Image

from builder.errors import ModelLoadError
from builder.models import (LOAD_LOCK, check_device, import_failure, load_image_processor,
                            resolve_model_dir, torch_device)
from builder.models.preprocess import clip_pixels

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"

Images = Union[Sequence[Image.Image], np.ndarray]


def _features(out: Any) -> Any:
    """The embedding tensor from get_*_features, which returns a tensor or an output object."""
    if hasattr(out, "pooler_output") and not hasattr(out, "dim"):
        return out.pooler_output
    return out


def _size_field(size: Any, key: str) -> Any:
    """A field of an image processor's size (a SizeDict in transformers 5, a dict before)."""
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


class ClipModel:
    """CLIP embeddings. Build cheaply, ``load()`` once per actor, then encode batches."""

    def __init__(self, model_id: str = DEFAULT_CLIP_MODEL, device: str = "cpu", fp16: bool = True,
                 batch_size: int = 128) -> None:
        if not model_id:
            raise ValueError("clip model_id is empty; give a Hugging Face model id or a local "
                             "directory written by save_pretrained")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_id = model_id
        self.device = check_device(device)
        self.fp16 = fp16
        self.batch_size = batch_size
        self._model: Any = None
        self._tokenizer: Any = None
        self._processor: Any = None
        self._torch_device: Any = None
        self._dtype: Any = None
        self._max_text_len = 77
        self._text_cache: dict[str, np.ndarray] = {}

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load model and tokenizer onto the configured device (once, whichever thread asks
        first; later calls do nothing)."""
        if self.loaded:
            return
        with LOAD_LOCK:
            if not self.loaded:
                self._load()

    def _load(self) -> None:
        try:
            import torch
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            raise import_failure(exc, "CLIP validation", ("torch", "transformers")) from exc
        directory = resolve_model_dir(self.model_id)
        device = torch_device(self.device)
        try:
            model = AutoModel.from_pretrained(directory)
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"{self.model_id!r} does not load as a CLIP model with its "
                                 f"tokenizer: {exc}") from exc
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise ModelLoadError(f"{self.model_id!r} is a {type(model).__name__}, which has no "
                                 "get_image_features/get_text_features; give a CLIP-style model")
        text_config = getattr(model.config, "text_config", None)
        self._max_text_len = int(getattr(text_config, "max_position_embeddings", 77) or 77)
        self._dtype = torch.float16 if self.fp16 and device.type == "cuda" else torch.float32
        model = model.to(device=device, dtype=self._dtype).eval()
        self._tokenizer = tokenizer
        self._torch_device = device
        self.processor()
        self._model = model  # last: it marks the wrapper loaded for threads that do not lock

    def processor(self) -> Any:
        """The model's Pillow image processor (its size, crop, mean, std drive ``preprocess``)."""
        if self._processor is None:
            with LOAD_LOCK:
                if self._processor is None:
                    self._processor = load_image_processor(self.model_id, "CLIP validation")
        return self._processor

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Model input pixels for RGB images: float32 [N, 3, H, W] (CPU only; no ``load()``)."""
        proc = self.processor()
        shortest = _size_field(getattr(proc, "size", None), "shortest_edge")
        crop_h = _size_field(getattr(proc, "crop_size", None), "height")
        crop_w = _size_field(getattr(proc, "crop_size", None), "width")
        if shortest and crop_h and crop_h == crop_w and getattr(proc, "do_center_crop", False) \
                and getattr(proc, "do_resize", True) and getattr(proc, "do_normalize", True) \
                and int(getattr(proc, "resample", Image.Resampling.BICUBIC)) == Image.BICUBIC:
            return clip_pixels(images, size=int(shortest), crop=int(crop_h),
                               mean=proc.image_mean, std=proc.image_std)
        if not images:
            return np.zeros((0, 3, 1, 1), dtype=np.float32)
        pixels = proc(images=list(images), return_tensors="np")["pixel_values"]
        return np.asarray(pixels, dtype=np.float32)

    def _require_loaded(self) -> None:
        if not self.loaded:
            raise RuntimeError("ClipModel.load() must be called before encoding")

    @property
    def embedding_dim(self) -> int:
        self._require_loaded()
        return int(getattr(self._model.config, "projection_dim", 0) or
                   self.encode_texts(["a"]).shape[1])

    def encode_images(self, pixels: Images) -> np.ndarray:
        """L2-normalised image embeddings, float32 [N, D], for pixels or PIL images."""
        self._require_loaded()
        import torch

        if not isinstance(pixels, np.ndarray):
            pixels = self.preprocess(pixels)
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(pixels), self.batch_size):
                chunk = np.ascontiguousarray(pixels[start:start + self.batch_size],
                                             dtype=np.float32)
                x = torch.from_numpy(chunk).to(self._torch_device, dtype=self._dtype)
                emb = _features(self._model.get_image_features(pixel_values=x)).float()
                chunks.append(torch.nn.functional.normalize(emb, dim=-1).cpu().numpy())
        if not chunks:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings, float32 [M, D]; each distinct text is encoded once."""
        self._require_loaded()
        import torch

        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        if missing:
            enc = self._tokenizer(missing, padding=True, truncation=True,
                                  max_length=self._max_text_len, return_tensors="pt")
            enc = {k: v.to(self._torch_device) for k, v in enc.items()}
            with torch.inference_mode():
                emb = _features(self._model.get_text_features(**enc)).float()
                emb = torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()
            for text, vector in zip(missing, emb):
                self._text_cache[text] = vector.astype(np.float32)
        if not texts:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        return np.stack([self._text_cache[t] for t in texts])
