"""Thumbnails of a finished job's accepted images, for the page's gallery.

They are read from the dataset's Parquet shards (``data/*.parquet``: ``id``, ``label_name``,
``split``, ``image.bytes``), else from its ``imagefolder/{split}/{folder}/`` files, else from
its WebDataset shards (``webdataset/*.tar``), and answered as small JPEG ``data:`` URLs so the
page needs no second request per image.

Only the job's own dataset is shown: the dataset's marker (``_SUCCESS`` / ``_PARTIAL``) must
name the job, so a later job that overwrote the same output, or a job cancelled before it
wrote, shows no one else's images (``NoDataset``). Answers are kept in a small LRU by job,
the marker's fingerprint and label whatever the ``limit`` (a larger one than read so far reads
up to ``MAX_SAMPLES`` once); a dataset published again has another fingerprint.

They are made in the API's replica, so what one costs is bounded: at most ``READS_AT_ONCE``
reads at a time per replica, on threads of their own (never the event loop's default
executor, which the replica's other requests use); a request waits at most ``QUEUE_S`` for
a read to start (``SamplesBusy`` after that), and requests for the same answer share one
read. A label's images are found from the labels alone (Parquet's ``label_name`` column, the
ImageFolder folder names, WebDataset's ``.json`` members) and only theirs are read; an image
over ``MAX_THUMB_PIXELS`` that only a full decode could shrink is left out (a JPEG is decoded
at a reduced scale).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import tarfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, NamedTuple, Optional, Sequence, TypeVar

import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from builder.errors import StorageError
from builder.storage import list_files, open_fs, storage_errors
from builder.writers import flat_label, parquet_shards, read_marker
from serve.cache import ReadCache

THUMB_SIDE = 160
MAX_SAMPLES = 200
"""The most thumbnails one answer holds (the route's ``limit``)."""
MAX_THUMB_PIXELS = 8_000_000
"""The largest image (in pixels) decoded whole for its thumbnail: a PNG, WebP or GIF has no
reduced-scale decode, and one of 8 Mpx takes about 0.1 s of CPU and 24 MB in the replica (a
25 Mpx one about 0.3 s), up to ``MAX_SAMPLES`` per answer. Larger ones are left out. A JPEG is
decoded at up to 1/8 scale first, so only what that leaves counts."""
READS_AT_ONCE = 2
"""Sample reads one replica runs at a time (each decodes up to ``MAX_SAMPLES`` images)."""
QUEUE_S = 10.0
"""How long a request waits for one of the ``READS_AT_ONCE`` reads before it is refused."""
BUSY_RETRY_S = 5
"""The ``Retry-After`` of a request refused with ``SamplesBusy``."""
MARKER_FRESH_S = 1.0
"""A dataset's marker read for one request is reused this long by the next ones."""
TAR_SCAN_SAMPLES = 5_000
"""The most WebDataset samples one read looks at: a tar holds the label after the image, so
finding a rare label's images means reading every sample's ``.json`` before it."""
_MARKER_THREADS = 2
"""Threads beside the reads' own for marker reads, so a cached answer never waits on a read."""
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")

T = TypeVar("T")


class NoDataset(Exception):
    """The job's output holds no dataset of its own (the message says what is there)."""


class SamplesBusy(Exception):
    """Every sample read of the replica stayed taken for ``QUEUE_S``."""


class Marker(NamedTuple):
    """What identifies one publication of a dataset: the job its marker names, and a hash of
    the marker (its creation time and file list change with every publication)."""

    job_id: Optional[str]
    fingerprint: str


class Found(NamedTuple):
    """The thumbnails one read found; ``note`` says why there may be fewer than asked for."""

    samples: list[dict[str, Any]]
    note: Optional[str] = None


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


def dataset_marker(uri: str) -> Optional[Marker]:
    """The marker of the dataset at ``uri``, or None when it has none (not written yet, or
    being replaced)."""
    content = read_marker(uri)
    if content is None:
        return None
    text = json.dumps(content, sort_keys=True, default=str).encode("utf-8")
    job_id = content.get("job_id")
    return Marker(job_id if isinstance(job_id, str) else None,
                  hashlib.sha256(text).hexdigest())


def own_marker(marker: Optional[Marker], job_id: str, uri: str) -> Marker:
    """``marker`` if it is ``job_id``'s, else ``NoDataset`` saying what is at ``uri``."""
    if marker is None:
        raise NoDataset(f"there is no dataset at {uri} (no _SUCCESS or _PARTIAL marker)")
    if marker.job_id != job_id:
        raise NoDataset(f"{uri} holds the dataset of job {marker.job_id or '(unknown)'}, "
                        "written there after or instead of this job's")
    return marker


def read_samples(uri: str, label: Optional[str], limit: int,
                 labels: Sequence[str] = ()) -> Found:
    """Up to ``limit`` accepted images of ``label`` (any label if None) as thumbnails.
    ``labels``: the job's labels, which name the ImageFolder folders they are written to."""
    fs, root = open_fs(uri)
    with storage_errors(uri, "read samples from"):
        shards = parquet_shards(fs, root)
        if shards:
            return Found(_from_parquet(fs, shards, label, limit))
        base = f"{root}/imagefolder"
        fs.invalidate_cache(base)
        if fs.exists(base):
            return Found(_from_imagefolder(fs, base, label, limit, labels))
        tars = [p for p in list_files(fs, f"{root}/webdataset") if p.endswith(".tar")]
        return _from_webdataset(fs, tars, label, limit)


def _sample(row: dict[str, Any], data: Optional[bytes]) -> Optional[dict[str, Any]]:
    thumb = thumbnail(data or b"")
    if thumb is None:
        return None
    return {"id": row.get("id"), "label": row.get("label"), "split": row.get("split"),
            "thumbnail": thumb}


def _from_parquet(fs: Any, shards: list[str], label: Optional[str],
                  limit: int) -> list[dict[str, Any]]:
    """Per row group, the labels first; the images only of a group that has matching rows,
    in batches, and only the matching rows are decoded."""
    out: list[dict[str, Any]] = []
    for path in shards:
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            names = set(parquet.schema_arrow.names)
            if "image" not in names:
                continue
            meta_columns = [c for c in ("id", "label_name", "split") if c in names]
            for group in range(parquet.num_row_groups):
                rows = parquet.read_row_group(group, columns=meta_columns).to_pylist()
                for row in rows:
                    row["label"] = row.pop("label_name", None)
                wanted = [i for i, row in enumerate(rows)
                          if label is None or row["label"] == label]
                if not wanted:
                    continue
                start, last = 0, wanted[-1]
                for batch in parquet.iter_batches(batch_size=64, row_groups=[group],
                                                  columns=["image"]):
                    end = start + batch.num_rows
                    images = batch.column("image")
                    for i in (i for i in wanted if start <= i < end):
                        image = images[i - start].as_py() or {}
                        found = _sample(rows[i], image.get("bytes"))
                        if found:
                            out.append(found)
                            if len(out) >= limit:
                                return out
                    if end > last:
                        break
                    start = end
    return out


def _label_files(fs: Any, base: str, label: str) -> list[str]:
    """The files under ``label``'s folders only: flat and nested, in every split."""
    fs.invalidate_cache(base)
    splits = [e["name"].rstrip("/") for e in fs.ls(base, detail=True)
              if e.get("type") == "directory"]
    folders = dict.fromkeys((flat_label(label), label))
    return sorted({p for split in splits for folder in folders
                   for p in list_files(fs, f"{split}/{folder}")})


def _from_imagefolder(fs: Any, base: str, label: Optional[str], limit: int,
                      labels: Sequence[str]) -> list[dict[str, Any]]:
    """A folder (relative to its split) is a label itself (nested layout, or a one-level
    label), else the label whose flat folder name it is (``mammals__dog``: ``mammals/dog``)."""
    by_folder = {flat_label(name): name for name in labels} | {name: name for name in labels}
    out: list[dict[str, Any]] = []
    paths = list_files(fs, base) if label is None else _label_files(fs, base, label)
    for path in paths:
        if not path.lower().endswith(_IMAGE_SUFFIXES):
            continue
        rel = path[len(base):].strip("/").split("/")
        if len(rel) < 3:
            continue
        split, name = rel[0], rel[-1]
        folder = "/".join(rel[1:-1])
        file_label = by_folder.get(folder, folder)
        if label is not None and file_label != label:
            continue
        found = _sample({"id": name.rsplit(".", 1)[0], "label": file_label, "split": split},
                        fs.cat_file(path))
        if found:
            out.append(found)
            if len(out) >= limit:
                break
    return out


def _from_webdataset(fs: Any, tars: list[str], label: Optional[str], limit: int) -> Found:
    """Samples of the WebDataset shards: each sample's ``.json`` (the row: id, label, split)
    says whether its ``.jpg`` is read; at most ``TAR_SCAN_SAMPLES`` samples are looked at."""
    out: list[dict[str, Any]] = []
    scanned = 0
    for path in tars:
        try:
            with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                images: dict[str, tarfile.TarInfo] = {}
                for member in tar:
                    key, _, ext = member.name.rpartition(".")
                    if not member.isfile() or ext not in ("jpg", "json"):
                        continue
                    if ext == "jpg":
                        images[key] = member
                        continue
                    scanned += 1
                    row = _tar_json(tar, member)
                    image = images.pop(key, None)
                    if image is not None and (label is None or row.get("label") == label):
                        found = _sample(row, _tar_bytes(tar, image))
                        if found:
                            out.append(found)
                            if len(out) >= limit:
                                return Found(out)
                    if scanned >= TAR_SCAN_SAMPLES:
                        return Found(out, f"only the first {TAR_SCAN_SAMPLES} images of the "
                                     "WebDataset shards were searched for thumbnails")
        except tarfile.TarError as exc:
            raise StorageError(f"cannot read the WebDataset shard {path}: {exc}") from exc
    return Found(out)


def _tar_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    data = tar.extractfile(member)
    return data.read() if data is not None else b""


def _tar_json(tar: tarfile.TarFile, member: tarfile.TarInfo) -> dict[str, Any]:
    try:
        row = json.loads(_tar_bytes(tar, member))
    except ValueError:
        return {}
    return row if isinstance(row, dict) else {}


def _read_unchanged(uri: str, fingerprint: str, label: Optional[str], limit: int,
                    labels: Sequence[str]) -> Found:
    """``read_samples``, then a check that the dataset is still the one of ``fingerprint``:
    an overwrite removes the marker before the files, so an unchanged marker after the read
    means every file read was that dataset's."""
    found = read_samples(uri, label, limit, labels)
    after = dataset_marker(uri)
    if after is None or after.fingerprint != fingerprint:
        raise NoDataset(f"the dataset at {uri} changed while its thumbnails were read; "
                        "ask again")
    return found


class _Entry(NamedTuple):
    samples: list[dict[str, Any]]
    whole: bool
    """No larger limit would find more."""
    note: Optional[str]


class SampleCache:
    """Sample answers of one replica: an LRU by (job, marker fingerprint, label), reads
    shared by the requests that ask for one at the same time, at most ``reads_at_once`` of
    them at a time on threads of their own. Use from one event loop."""

    def __init__(self, size: int = 64, reads_at_once: int = READS_AT_ONCE,
                 queue_s: float = QUEUE_S):
        self.size = size
        self.queue_s = queue_s
        self._items: OrderedDict[tuple, _Entry] = OrderedDict()
        self._loads: dict[tuple, asyncio.Task] = {}
        self._slots = asyncio.Semaphore(reads_at_once)
        self._pool = ThreadPoolExecutor(reads_at_once + _MARKER_THREADS,
                                        thread_name_prefix="pixcrawler-samples")
        self._markers: ReadCache[Optional[Marker]] = ReadCache(MARKER_FRESH_S)

    async def get(self, job_id: str, uri: str, label: Optional[str], limit: int,
                  labels: Sequence[str] = ()) -> Found:
        """Up to ``limit`` thumbnails of ``job_id``'s dataset at ``uri``. Raises
        ``NoDataset`` when ``uri`` holds no dataset of that job, ``SamplesBusy`` when no
        read could start within ``queue_s``, ``StorageError`` when it cannot be read."""
        marker = await self._marker(uri)
        if marker is None or marker.job_id != job_id:
            # Refused on a fresh read only: the one kept may be from before a publication.
            self._markers.forget(uri)
            marker = await self._marker(uri)
        marker = own_marker(marker, job_id, uri)
        key = (job_id, marker.fingerprint, label)
        while True:
            cached = self._items.get(key)
            if cached is not None:
                self._items.move_to_end(key)
                if cached.whole or len(cached.samples) >= limit:
                    return Found(cached.samples[:limit], cached.note)
            task = self._loads.get(key)
            if task is None:
                want = limit if cached is None else MAX_SAMPLES
                task = asyncio.get_running_loop().create_task(
                    self._load(key, uri, label, want, tuple(labels)))
                self._loads[key] = task
            # shield: a request that goes away does not cancel the read others wait on.
            entry = await asyncio.shield(task)
            if entry.whole or len(entry.samples) >= limit:
                return Found(entry.samples[:limit], entry.note)

    async def _marker(self, uri: str) -> Optional[Marker]:
        return await self._markers.get(uri, lambda: self._run(dataset_marker, uri))

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _load(self, key: tuple, uri: str, label: Optional[str], want: int,
                    labels: tuple[str, ...]) -> _Entry:
        try:
            try:
                await asyncio.wait_for(self._slots.acquire(), self.queue_s)
            except asyncio.TimeoutError:
                raise SamplesBusy(f"this replica is making thumbnails for other requests "
                                  f"(waited {self.queue_s:g} s)") from None
            try:
                found = await self._run(_read_unchanged, uri, key[1], label, want, labels)
            finally:
                self._slots.release()
            entry = _Entry(found.samples, len(found.samples) < want or want == MAX_SAMPLES,
                           found.note)
            self._items[key] = entry
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return entry
        finally:
            self._loads.pop(key, None)
