"""Tiny models built from small configs in the test and saved with save_pretrained.

The models are loaded back through the same code users run (``ClipModel(model_id=<dir>)``,
``NsfwModel(backend="hf", model_id=<dir>)``), so the loading path is tested, not bypassed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from .images import TINY_IMAGE_SIZE


def _byte_level_vocab() -> dict[str, int]:
    """A CLIP BPE vocabulary of single byte-level characters (no merges): tiny but complete."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in bytes_to_unicode().values():
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    return vocab


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIP (2-layer text and vision towers, 32-px images) with tokenizer and processor."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    vocab = _byte_level_vocab()
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, vocab_size=1000, max_position_embeddings=77,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=TINY_IMAGE_SIZE, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    directory = tmp_path_factory.mktemp("tiny-clip")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def make_vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Build a tiny ViT image classifier with labels; ``bias`` pins its output logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    def make(labels: tuple[str, ...] = ("normal", "nsfw"),
             bias: tuple[float, ...] | None = None) -> Path:
        config = transformers.ViTConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=TINY_IMAGE_SIZE, patch_size=8, num_labels=len(labels),
            id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
        torch.manual_seed(0)
        model = transformers.ViTForImageClassification(config).eval()
        if bias is not None:
            with torch.no_grad():
                model.classifier.weight.zero_()
                model.classifier.bias.copy_(torch.tensor(bias))
        processor = transformers.ViTImageProcessorPil(
            size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
        directory = tmp_path_factory.mktemp("tiny-vit")
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
        return directory

    return make
