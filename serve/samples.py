"""Thumbnails of a finished job's accepted images, for the page's gallery.

They are read from the dataset's Parquet shards (``data/*.parquet``: ``id``, ``label_name``,
``split``, ``image.bytes``), else from its ``imagefolder/{split}/{label}/`` files, and answered
as small JPEG ``data:`` URLs so the page needs no second request per image. A finished dataset
does not change, so answers are kept in a small LRU, by job and label whatever the ``limit``
(a larger one than read so far reads up to ``MAX_SAMPLES`` once). They are made in the API's
replica, so what one costs is bounded: at most ``READS_AT_ONCE`` reads at a time per replica,
and an image over ``MAX_THUMB_PIXELS`` that only a full decode could shrink is left out (a JPEG
is decoded at a reduced scale).
"""

from __future__ import annotations

import base64
import io
import threading
from collections import OrderedDict
from typing import Any, Optional

import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from builder.storage import list_files, open_fs, storage_errors
from builder.writers import parquet_shards

THUMB_SIDE = 160
MAX_SAMPLES = 200
"""The most thumbnails one answer holds (the route's ``limit``)."""
MAX_THUMB_PIXELS = 25_000_000
"""Larger images are left out unless a reduced-scale decode (JPEG) makes them small."""
READS_AT_ONCE = 2
"""Sample reads one replica runs at a time (each decodes up to ``MAX_SAMPLES`` images)."""
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def thumbnail(data: bytes, side: int = THUMB_SIDE) -> Optional[str]:
    """A JPEG data URL at most ``side`` pixels on its longer side; None if not an image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (side, side))  # JPEG: a reduced decode; other formats: no-op
            if img.width * img.height > MAX_THUMB_PIXELS:
                return None
            img.thumbnail((side, side))
            out = io.BytesIO()
            img.convert("RGB").save(out, "JPEG", quality=75)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def read_samples(uri: str, label: Optional[str], limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` accepted images of ``label`` (any label if None) as thumbnails."""
    fs, root = open_fs(uri)
    with storage_errors(uri, "read samples from"):
        shards = parquet_shards(fs, root)
        if shards:
            return _from_parquet(fs, shards, label, limit)
        return _from_imagefolder(fs, f"{root}/imagefolder", label, limit)


def _from_parquet(fs: Any, shards: list[str], label: Optional[str],
                  limit: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in shards:
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            names = set(parquet.schema_arrow.names)
            columns = [c for c in ("id", "label_name", "split", "image") if c in names]
            for batch in parquet.iter_batches(batch_size=64, columns=columns):
                for row in batch.to_pylist():
                    row["label"] = row.pop("label_name", None)
                    if label is not None and row["label"] != label:
                        continue
                    thumb = thumbnail((row.get("image") or {}).get("bytes") or b"")
                    if thumb:
                        out.append({"id": row.get("id"), "label": row.get("label"),
                                    "split": row.get("split"), "thumbnail": thumb})
                    if len(out) >= limit:
                        return out
    return out


def _from_imagefolder(fs: Any, base: str, label: Optional[str],
                      limit: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in list_files(fs, base):
        if not path.lower().endswith(_IMAGE_SUFFIXES):
            continue
        rel = path[len(base):].strip("/").split("/")
        split, file_label, name = rel[0], "/".join(rel[1:-1]), rel[-1]
        if label is not None and file_label != label:
            continue
        thumb = thumbnail(fs.cat_file(path))
        if thumb:
            out.append({"id": name.rsplit(".", 1)[0], "label": file_label, "split": split,
                        "thumbnail": thumb})
        if len(out) >= limit:
            break
    return out


class SampleCache:
    """An LRU of sample answers by (job, label); ``READS_AT_ONCE`` reads at a time."""

    def __init__(self, size: int = 64):
        self.size = size
        self._items: OrderedDict[tuple, tuple[list[dict[str, Any]], bool]] = OrderedDict()
        self._lock = threading.Lock()
        self._reads = threading.Semaphore(READS_AT_ONCE)

    def get(self, uri: str, label: Optional[str], limit: int) -> list[dict[str, Any]]:
        key = (uri, label)
        with self._lock:
            cached = self._items.get(key)
            if cached is not None:
                self._items.move_to_end(key)
                samples, whole = cached
                if whole or len(samples) >= limit:
                    return samples[:limit]
        want = limit if cached is None else MAX_SAMPLES
        with self._reads:
            samples = read_samples(uri, label, want)
        with self._lock:
            self._items[key] = (samples, len(samples) < want or want == MAX_SAMPLES)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return samples[:limit]
