"""The near-duplicate evaluation corpus: tiles of real photographs and transformed copies.

    .venv/bin/python bench/dedup_corpus.py [--cache DIR]     # build (or reuse) and summarise

Sources are the photographs and artwork of four Debian packages (wallpapers under CC-BY,
CC-BY-SA and GPL-2+; ``SOURCES`` lists them), fetched with ``apt-get download`` and unpacked
with ``dpkg -x`` into the cache (default ``~/.cache/pixcrawler/bench-dedup``, outside the repo).
Each source is scaled to 2048 px wide and cut into non-overlapping 512x384 tiles: every tile is a
distinct image, and neighbouring tiles of one photo are the hardest negatives. Tiles with almost
no detail (grey standard deviation under 12: a patch of clear sky) are left out: they are not
pictures anyone would tell apart. A seeded subset of tiles gets one copy per transform in
``TRANSFORMS``. ukui's ``the-mouse.jpg`` is left out: it is mirror-symmetric, so its left
and right tiles are horizontal flips of each other, which a flip-robust dedup must merge.
Sources are split in two by name (``dev``, ``test``): parameters are chosen on
``dev`` and reported on both. Everything is deterministic (fixed seeds); the corpus is written
once to ``<cache>/corpus-v1/`` with ``manifest.json`` and reused.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

PACKAGES = {
    "lomiri-wallpapers-16.04": "CC-BY-4.0 / CC-BY-SA-4.0 (per file, debian/copyright)",
    "lomiri-wallpapers-20.04": "CC-BY-SA-4.0 / CC-BY-4.0 (per file, debian/copyright)",
    "mate-backgrounds": "GPL-2+",
    "ukui-wallpapers": "CC-BY-SA-3.0",
}
SOURCES = {
    "lomiri-wallpapers-16.04": [
        "Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg", "Picture_0B_by_freespace.jpg",
        "Picture_1A_by_freespace.jpg", "Wine_by_Jakkub_Mede.jpg",
        "aitzgorri_by_Aitzol_Berasategi.jpg", "analogpattern_by_Peter_Nerlich.jpg",
        "free_by_Peter_Nerlich.jpg", "friends_by_Aitzol_Berasategi.jpg",
        "greentock_by_Peter_Nerlich.jpg", "life_by_Aitzol_Berasategi.jpg",
        "picosdeeuropa_by_Aitzol_Berasategi.jpg", "seeding_by_Clements_Engelhardt.jpg",
        "sunset_by_Aitzol_Berasategi.jpg", "umang_by_Abhishek_Mudgal.jpg"],
    "lomiri-wallpapers-20.04": [
        "Fossa_by_Jasper_Roks.jpg", "Infinite-Sea_by_Aury88.jpg", "Kleiber_by_Lukas_Baubkus.jpg",
        "Painting-Colors_by__herobrine7gamer.jpg"],
    "mate-backgrounds": [
        "mate/nature/Aqua.jpg", "mate/nature/Blinds.jpg", "mate/nature/Dune.jpg",
        "mate/nature/FreshFlower.jpg", "mate/nature/Garden.jpg", "mate/nature/GreenMeadow.jpg",
        "mate/nature/LadyBird.jpg", "mate/nature/RainDrops.jpg", "mate/nature/Storm.jpg",
        "mate/nature/TwoWings.jpg", "mate/nature/Wood.jpg", "mate/nature/YellowFlower.jpg",
        "mate/abstract/Elephants.jpg", "mate/desktop/GreenTraditional.jpg"],
    "ukui-wallpapers": [
        "2004default.jpg", "firstgeneration.jpg", "rhythm.jpg", "string.jpg", "calla.png",
        "city.png", "desert.png", "goldfish.png"],
}
TRANSFORMS = ["resize50", "resize25", "jpeg_q40", "png", "grayscale", "blur", "bright+20",
              "bright-20", "watermark", "crop5", "crop10", "rotate", "flip"]
GROUPS = {  # the goal per family of transforms
    "0.97": ["resize50", "resize25", "jpeg_q40", "png", "grayscale", "blur", "bright+20",
             "bright-20", "watermark"],
    "0.90": ["crop5", "crop10", "flip"],
    "0.80": ["rotate"],
}
GOAL = {t: float(g) for g, ts in GROUPS.items() for t in ts}
TILE = (512, 384)
WIDTH = 2048
MIN_STD = 12.0
VERSION = "corpus-v1"
DEFAULT_CACHE = Path.home() / ".cache" / "pixcrawler" / "bench-dedup"


@dataclass(frozen=True)
class Item:
    name: str         # file name under <corpus>/files
    group: str        # the distinct image (tile) this file shows
    transform: str    # "original" or one of TRANSFORMS
    split: str        # dev | test (by source photo)
    source: str       # package/file of the photo


def fetch_sources(cache: Path) -> dict[str, Path]:
    """apt-get download + dpkg -x the packages once; the path of each source photo."""
    debs, root = cache / "debs", cache / "root"
    debs.mkdir(parents=True, exist_ok=True)
    for pkg in PACKAGES:
        if not list(debs.glob(f"{pkg}_*.deb")):
            subprocess.run(["apt-get", "download", pkg], cwd=debs, check=True,
                           stdout=subprocess.DEVNULL)
        marker = root / f".{pkg}"
        if not marker.exists():
            deb = sorted(debs.glob(f"{pkg}_*.deb"))[-1]
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
            marker.write_text(deb.name)
    out = {}
    for pkg, files in SOURCES.items():
        for f in files:
            path = root / "usr/share/backgrounds" / f
            if not path.exists():
                raise FileNotFoundError(f"{path}: not in {pkg}; is the package version changed?")
            out[f"{pkg}/{f}"] = path
    return out


def split_of(source: str) -> str:
    return "dev" if int(hashlib.sha1(source.encode()).hexdigest(), 16) % 2 == 0 else "test"


def tiles(path: Path) -> list[tuple[int, int, Image.Image]]:
    with Image.open(path) as img:
        img = img.convert("RGB")
        h = round(img.height * WIDTH / img.width)
        img = img.resize((WIDTH, h), Image.Resampling.LANCZOS)
    out = []
    for row in range(h // TILE[1]):
        for col in range(WIDTH // TILE[0]):
            box = (col * TILE[0], row * TILE[1], (col + 1) * TILE[0], (row + 1) * TILE[1])
            tile = img.crop(box)
            if float(np.asarray(tile.convert("L"), dtype=np.float32).std()) >= MIN_STD:
                out.append((row, col, tile))
    return out


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _crop(img: Image.Image, frac: float) -> Image.Image:
    w, h = img.size
    return img.crop((round(w * frac), round(h * frac), round(w * (1 - frac)),
                     round(h * (1 - frac))))


def _rotate(img: Image.Image, degrees: float) -> Image.Image:
    """Rotate, then crop the largest centred rectangle of the same aspect with no border."""
    w, h = img.size
    rad = np.radians(abs(degrees))
    c, s = np.cos(rad), np.sin(rad)
    scale = min(w / (w * c + h * s), h / (w * s + h * c))
    turned = img.rotate(degrees, Image.Resampling.BICUBIC)
    cw, ch = int(w * scale) - 2, int(h * scale) - 2
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return turned.crop((x0, y0, x0 + cw, y0 + ch))


def _watermark(img: Image.Image, rnd: random.Random) -> Image.Image:
    out = img.copy()
    w, h = out.size
    draw = ImageDraw.Draw(out, "RGBA")
    text = rnd.choice(["(c) stockphotos", "PREVIEW", "@shared_pics", "sample"])
    x0, y0 = w - 20 - 8 * len(text), h - 30
    draw.rectangle((x0 - 6, y0 - 4, w - 14, h - 14), fill=(255, 255, 255, 110))
    draw.text((x0, y0), text, fill=(20, 20, 20, 200))
    return out


def transform(img: Image.Image, name: str, rnd: random.Random) -> bytes:
    """Encoded bytes of one transformed copy of ``img`` (an RGB tile)."""
    w, h = img.size
    if name == "resize50":
        return jpeg(img.resize((w // 2, h // 2), Image.Resampling.LANCZOS), 85)
    if name == "resize25":
        return jpeg(img.resize((w // 4, h // 4), Image.Resampling.LANCZOS), 85)
    if name == "jpeg_q40":
        return jpeg(img, 40)
    if name == "png":
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return buf.getvalue()
    if name == "grayscale":
        return jpeg(img.convert("L"), 85)
    if name == "blur":
        return jpeg(img.filter(ImageFilter.GaussianBlur(2)), 85)
    if name in ("bright+20", "bright-20"):
        return jpeg(ImageEnhance.Brightness(img).enhance(1.2 if "+" in name else 0.8), 85)
    if name == "watermark":
        return jpeg(_watermark(img, rnd), 85)
    if name == "crop5":
        return jpeg(_crop(img, 0.05), 85)
    if name == "crop10":
        return jpeg(_crop(img, 0.10), 85)
    if name == "rotate":
        return jpeg(_rotate(img, rnd.uniform(2, 5) * rnd.choice([-1, 1])), 85)
    if name == "flip":
        return jpeg(ImageOps.mirror(img), 85)
    raise ValueError(f"unknown transform {name!r}; known: {', '.join(TRANSFORMS)}")


def build(cache: Path = DEFAULT_CACHE, copies_fraction: float = 0.5,
          seed: int = 17) -> tuple[Path, list[Item]]:
    """The corpus folder and its items (built on the first call, then read back)."""
    folder = cache / VERSION
    manifest = folder / "manifest.json"
    if manifest.exists():
        return folder, [Item(**d) for d in json.loads(manifest.read_text())["items"]]
    sources = fetch_sources(cache)
    files = folder / "files"
    files.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    items: list[Item] = []
    for source, path in sorted(sources.items()):
        split = split_of(source)
        stem = Path(source).stem.split("_by_")[0][:16]
        for row, col, tile in tiles(path):
            group = f"{stem}-r{row}c{col}"
            name = f"{group}.jpg"
            (files / name).write_bytes(jpeg(tile))
            items.append(Item(name, group, "original", split, source))
            if rnd.random() >= copies_fraction:
                continue
            for t in TRANSFORMS:
                data = transform(tile, t, rnd)
                ext = "png" if data[:4] == b"\x89PNG" else "jpg"
                name = f"{group}.{t}.{ext}"
                (files / name).write_bytes(data)
                items.append(Item(name, group, t, split, source))
    manifest.write_text(json.dumps({"seed": seed, "packages": PACKAGES,
                                    "items": [asdict(i) for i in items]}, indent=0))
    return folder, items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = ap.parse_args()
    folder, items = build(args.cache)
    groups = {i.group for i in items}
    copied = {i.group for i in items if i.transform != "original"}
    print(f"corpus: {folder}")
    print(f"{len(items)} files; {len(groups)} distinct images (tiles) from "
          f"{len({i.source for i in items})} photos; {len(copied)} with "
          f"{len(TRANSFORMS)} copies each")
    for split in ("dev", "test"):
        n = sum(1 for i in items if i.split == split and i.transform == "original")
        print(f"  {split}: {n} tiles")


if __name__ == "__main__":
    sys.exit(main())
