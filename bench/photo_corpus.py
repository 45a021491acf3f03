"""A throughput corpus of real photographs: N 512x384 JPEG crops, packed for loopback.

    .venv/bin/python bench/photo_corpus.py [--n 4000]       # build (or reuse) and summarise

The photographs are those of the near-duplicate corpus (``dedup_corpus.SOURCES``: Debian
wallpaper packages, fetched with ``apt-get download`` and unpacked with ``dpkg -x`` into
``~/.cache/pixcrawler/bench-dedup`` once), less the flat ones (``FLAT``: illustrations and
photos of mostly sky or blur, whose crops average under 18 KB). Image ``i`` is a crop of
source ``i % S``: a box of random width (a third to four fifths of the photo, at least
520 px) at a random position, scaled to 512x384 and saved as JPEG quality 85 (about 32 KiB on
average: what a crawl of real photos fetches, and dearer to decode than generated pictures).
A crop is drawn again while it overlaps an earlier crop of the same photo by more than
``MAX_IOU`` (intersection over union), where 200 draws find one: PixCrawler's dedup keeps 95%
of a corpus of 4,000 (148 crops a photo), but only 73% of 20,000 (741 crops a photo, too many
for the rule); more photos would make a larger corpus as distinct. Each source's crops come
from its own seeded generator: image ``i`` is the same in a corpus of any size, and every
build gives the same bytes.

The pack (``bench/out/photo_corpus_<n>.bin`` + ``.json`` byte offsets, as
``loopback.corpus_pack``) is what ``bench/loopback.py`` serves.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dedup_corpus import DEFAULT_CACHE, fetch_sources  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
SIZE = (512, 384)
QUALITY = 85
MAX_IOU = 0.35
MIN_WIDTH = 520
SEED = 2026
FLAT = {  # crops of these average under 18 KB at quality 85 (measured on a sample of each)
    "lomiri-wallpapers-16.04/Bridge_by_Sander_Klootwijk.jpg",
    "lomiri-wallpapers-16.04/free_by_Peter_Nerlich.jpg",
    "lomiri-wallpapers-16.04/greentock_by_Peter_Nerlich.jpg",
    "lomiri-wallpapers-16.04/umang_by_Abhishek_Mudgal.jpg",
    "lomiri-wallpapers-20.04/Fossa_by_Jasper_Roks.jpg",
    "lomiri-wallpapers-20.04/Painting-Colors_by__herobrine7gamer.jpg",
    "mate-backgrounds/mate/desktop/GreenTraditional.jpg",
    "mate-backgrounds/mate/nature/FreshFlower.jpg",
    "mate-backgrounds/mate/nature/Storm.jpg",
    "ukui-wallpapers/calla.png", "ukui-wallpapers/city.png", "ukui-wallpapers/desert.png",
    "ukui-wallpapers/goldfish.png", "ukui-wallpapers/rhythm.jpg",
}


def _iou(box: tuple[int, int, int, int], boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of ``box`` with each row of ``boxes`` (x0, y0, x1, y1)."""
    w = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])
    h = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])
    inter = np.clip(w, 0, None) * np.clip(h, 0, None)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / ((box[2] - box[0]) * (box[3] - box[1]) + areas - inter)


def crop_boxes(size: tuple[int, int], count: int, rnd: random.Random,
               tries: int = 200) -> list[tuple[int, int, int, int]]:
    """``count`` crop boxes of aspect 4:3 inside a photo of ``size``, each overlapping every
    earlier one by at most ``MAX_IOU`` where ``tries`` draws allow (else the least overlapping
    of the draws)."""
    width, height = size
    hi = max(MIN_WIDTH, min(width, height * 4 // 3) * 4 // 5)
    lo = min(hi, max(MIN_WIDTH, width // 3))
    boxes = np.zeros((count, 4), dtype=np.int64)
    for k in range(count):
        best, best_iou = None, 2.0
        for _ in range(tries):
            w = rnd.randint(lo, hi)
            h = w * 3 // 4
            x, y = rnd.randint(0, max(0, width - w)), rnd.randint(0, max(0, height - h))
            box = (x, y, x + w, y + h)
            worst = float(_iou(box, boxes[:k]).max()) if k else 0.0
            if worst < best_iou:
                best, best_iou = box, worst
            if worst <= MAX_IOU:
                break
        boxes[k] = best
    return [tuple(int(v) for v in b) for b in boxes]


def _source_crops(job: tuple[int, str, int]) -> tuple[int, list[bytes]]:
    """The first ``count`` crops of one source photo, JPEG-encoded."""
    index, path, count = job
    rnd = random.Random(SEED * 1000 + index)
    with Image.open(path) as img:
        photo = img.convert("RGB")
    out = []
    for box in crop_boxes(photo.size, count, rnd):
        crop = photo.resize(SIZE, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=QUALITY)
        out.append(buf.getvalue())
    return index, out


def photo_pack(n: int, cache: Path = DEFAULT_CACHE,
               processes: int | None = None) -> tuple[Path, list[int]]:
    """The pack of ``n`` photo crops (built on first use): (path, n + 1 byte offsets)."""
    OUT.mkdir(parents=True, exist_ok=True)
    pack = OUT / f"photo_corpus_{n}.bin"
    index = pack.with_suffix(".json")
    if pack.is_file() and index.is_file():
        offsets = json.loads(index.read_text())["offsets"]
        if len(offsets) == n + 1 and pack.stat().st_size == offsets[-1]:
            return pack, offsets
    sources = sorted((name, path) for name, path in fetch_sources(cache).items()
                     if name not in FLAT)
    per_source = [len(range(s, n, len(sources))) for s in range(len(sources))]
    print(f"cropping {n} photos from {len(sources)} wallpapers into {pack} (once) ...",
          flush=True)
    crops: dict[int, list[bytes]] = {}
    jobs = [(s, str(path), per_source[s]) for s, (_, path) in enumerate(sources)
            if per_source[s]]
    with mp.get_context("spawn").Pool(processes or os.cpu_count()) as pool:
        for s, images in pool.imap_unordered(_source_crops, jobs):
            crops[s] = images
    offsets = [0]
    tmp = pack.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for i in range(n):
            data = crops[i % len(sources)][i // len(sources)]
            f.write(data)
            offsets.append(offsets[-1] + len(data))
    tmp.replace(pack)
    index.write_text(json.dumps({"n": n, "offsets": offsets, "seed": SEED,
                                 "sources": [name for name, _ in sources]}))
    return pack, offsets


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = ap.parse_args()
    pack, offsets = photo_pack(args.n, args.cache)
    sizes = sorted(b - a for a, b in zip(offsets, offsets[1:]))
    print(f"{pack}: {args.n} JPEGs {SIZE[0]}x{SIZE[1]}, quality {QUALITY}; "
          f"mean {sum(sizes) / len(sizes) / 1024:.1f} KiB, median "
          f"{sizes[len(sizes) // 2] / 1024:.1f} KiB, min {sizes[0] / 1024:.1f}, "
          f"max {sizes[-1] / 1024:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
