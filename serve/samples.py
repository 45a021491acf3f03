"""Thumbnails of a finished job's accepted images, for the page's gallery.

They are read from the dataset's Parquet shards (``data/*.parquet``: ``id``, ``label_name``,
``split``, ``image.bytes``), else from its ``imagefolder/{split}/{label}/`` files, and answered
as small JPEG ``data:`` URLs so the page needs no second request per image. A finished dataset
does not change, so answers are kept in a small LRU.
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

THUMB_SIDE = 160
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def thumbnail(data: bytes, side: int = THUMB_SIDE) -> Optional[str]:
    """A JPEG data URL at most ``side`` pixels on its longer side; None if not an image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
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
        shards = [p for p in list_files(fs, f"{root}/data") if p.endswith(".parquet")]
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
    """An LRU of sample answers by (job, label, limit)."""

    def __init__(self, size: int = 64):
        self.size = size
        self._items: OrderedDict[tuple, list[dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, uri: str, label: Optional[str], limit: int) -> list[dict[str, Any]]:
        key = (uri, label, limit)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        samples = read_samples(uri, label, limit)
        with self._lock:
            self._items[key] = samples
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return samples

