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
read. A key's reads run one at a time (``READS_PER_KEY``), so one key asking for class
after class of large images (a read goes on when its request goes away) leaves the other
reads to other keys. A label's images are found from the labels alone (Parquet's
``label_name`` column, the ImageFolder folder names, WebDataset's ``.json`` members) and only theirs are read; an image
over ``MAX_THUMB_PIXELS`` that only a full decode could shrink is left out (a JPEG is decoded
at a reduced scale), and so is one of over ``THUMB_MAX_BYTES``.

A Parquet row group holds its images in one data page (100 of up to ``download.max_bytes``
each): a reader of Parquet, even one of small batches, holds the whole page. So the images of
a shard stored as PixCrawler writes them (uncompressed, PLAIN) are found from the page's
header and definition levels and read one at a time, each image's length before its bytes: a
read holds at most one image of ``THUMB_MAX_BYTES``. Another shard's row group is read whole
only when its images take at most ``CHUNK_READ_BYTES``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import tarfile
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import (Any, AsyncIterator, Callable, Iterator, NamedTuple, Optional, Sequence,
                    TypeVar)

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
THUMB_MAX_BYTES = 8_000_000
"""The largest stored image (in bytes) read for its thumbnail; a larger one is left out, as
an image that cannot be decoded is. A read holds one image at a time, so this bounds what a
Parquet read holds (``READS_AT_ONCE`` times this per replica) where a row group of 100 images
of up to ``download.max_bytes`` (20 MB) could hold 2 GB. 8 MB keeps the JPEG of a phone or
camera photo (3 to 8 MB at 12 to 24 Mpx) and a PNG drawing or screenshot; a PNG photo near
``MAX_THUMB_PIXELS`` may be left out."""
TAR_JSON_MAX_BYTES = 1 << 20
"""The most of a WebDataset sample's ``.json`` read (a row of metadata: a few hundred bytes)."""
CHUNK_READ_BYTES = 64_000_000
"""The most a row group's images may take to be read whole, for a shard whose images cannot
be read one at a time (compressed or dictionary-encoded: not as PixCrawler writes them); a
larger row group's images are left out."""
READS_AT_ONCE = 2
"""Sample reads one replica runs at a time (each decodes up to ``MAX_SAMPLES`` images)."""
READS_PER_KEY = 1
"""How many of a replica's reads one API key's requests may hold at once (with auth on)."""
QUEUE_S = 10.0
"""How long a request waits for one of the ``READS_AT_ONCE`` reads (and its key's, with auth
on) before it is refused."""
MIN_WAIT_S = 0.01
"""The least wait for a read once the key's own came (a read free by then is taken)."""
BUSY_RETRY_S = 5
"""The ``Retry-After`` of a request refused with ``SamplesBusy``."""
MARKER_FRESH_S = 1.0
"""A dataset's marker read for one request is reused this long by the next ones."""
TAR_SCAN_SAMPLES = 5_000
"""The most WebDataset samples one read looks at: a tar holds the label after the image, so
finding a rare label's images means reading every sample's ``.json`` before it."""
_MARKER_THREADS = 2
"""Threads beside the reads' own for marker reads, so a cached answer never waits on a read."""
_HEADER_BYTES = 65_536
"""The most a Parquet page header may take (its statistics are all that can make it long)."""
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
    and only the matching rows' (``_group_images``)."""
    out: list[dict[str, Any]] = []
    for path in shards:
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f, pre_buffer=False)
            schema = parquet.schema
            leaf = next((i for i in range(len(schema))
                         if schema.column(i).path == "image.bytes"), None)
            if leaf is None:
                continue
            names = set(parquet.schema_arrow.names)
            meta_columns = [c for c in ("id", "label_name", "split") if c in names]
            for group in range(parquet.num_row_groups):
                rows = parquet.read_row_group(group, columns=meta_columns).to_pylist()
                for row in rows:
                    row["label"] = row.pop("label_name", None)
                wanted = [i for i, row in enumerate(rows)
                          if label is None or row["label"] == label]
                if not wanted:
                    continue
                for i, data in _group_images(f, parquet, group, leaf, wanted):
                    found = _sample(rows[i], data)
                    if found:
                        out.append(found)
                        if len(out) >= limit:
                            return out
    return out


def _group_images(f: Any, parquet: pq.ParquetFile, group: int, leaf: int,
                  wanted: list[int]) -> Iterator[tuple[int, bytes]]:
    """(row, image bytes) of the ``wanted`` rows (ascending) of row group ``group`` whose
    image is at most ``THUMB_MAX_BYTES``. ``leaf``: the index of the ``image.bytes`` column."""
    chunk = parquet.metadata.row_group(group).column(leaf)
    column = parquet.schema.column(leaf)
    try:
        pages = _plain_pages(f, chunk, column.max_definition_level,
                             column.max_repetition_level, wanted[-1] + 1)
    except _NotPlain:
        yield from _whole_group_images(parquet, group, chunk, wanted)
        return
    yield from _plain_images(f, pages, column.max_definition_level, set(wanted))


def _whole_group_images(parquet: pq.ParquetFile, group: int,
                        chunk: pq.ColumnChunkMetaData,
                        wanted: list[int]) -> Iterator[tuple[int, bytes]]:
    """``_group_images`` of a group read whole, if its images take at most
    ``CHUNK_READ_BYTES`` (a dictionary page's image may be in every row)."""
    rows = parquet.metadata.row_group(group).num_rows
    size = chunk.total_uncompressed_size * (rows if chunk.has_dictionary_page else 1)
    if size > CHUNK_READ_BYTES:
        return
    images = parquet.read_row_group(group, columns=["image"]).column("image")
    if len(images) != rows:
        raise ValueError(f"row group {group} holds {len(images)} images for {rows} rows")
    for i in wanted:
        data = (images[i].as_py() or {}).get("bytes")
        if data is not None and len(data) <= THUMB_MAX_BYTES:
            yield i, data


class _NotPlain(Exception):
    """An image column chunk whose images cannot be read one at a time: compressed,
    dictionary-encoded, or not laid out as this module reads Parquet."""


class _Short(_NotPlain):
    """Thrift data ended before the structure it holds."""


class _Page(NamedTuple):
    """A data page of an image column: a definition level per row, then PLAIN values (a
    4-byte little-endian length, then the bytes) for the rows at the highest level."""

    levels: list[int]
    values_at: int
    """The file offset of its first value."""
    end: int


class _Compact:
    """Thrift's compact protocol read from ``data``, as much as Parquet's page headers need:
    structs as {field id: value}, integers and booleans; other values are passed over."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _Short("Thrift data too short")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def varint(self) -> int:
        out = shift = 0
        while shift < 64:
            byte = self.take(1)[0]
            out |= (byte & 0x7F) << shift
            if byte < 0x80:
                return out
            shift += 7
        raise _NotPlain("a Thrift varint is too long")

    def zigzag(self) -> int:
        value = self.varint()
        return (value >> 1) ^ -(value & 1)

    def struct(self, depth: int = 0) -> dict[int, Any]:
        if depth > 8:
            raise _NotPlain("Thrift structs nested too deep")
        fields: dict[int, Any] = {}
        field = 0
        while True:
            byte = self.take(1)[0]
            if byte == 0:
                return fields
            kind = byte & 0x0F
            field = field + (byte >> 4) if byte >> 4 else self.zigzag()
            fields[field] = kind == 1 if kind in (1, 2) else self.value(kind, depth)

    def value(self, kind: int, depth: int) -> Any:
        """A value of Thrift compact type ``kind``: a boolean in a list is a byte."""
        if kind in (1, 2, 3):
            return self.take(1)[0]
        if kind in (4, 5, 6):
            return self.zigzag()
        if kind == 7:
            self.take(8)
        elif kind == 8:
            self.take(self.varint())
        elif kind in (9, 10):
            head = self.take(1)[0]
            size = self.varint() if head >> 4 == 15 else head >> 4
            for _ in range(size):
                self.value(head & 0x0F, depth + 1)
        elif kind == 11:
            size = self.varint()
            types = self.take(1)[0] if size else 0
            for _ in range(size):
                self.value(types >> 4, depth + 1)
                self.value(types & 0x0F, depth + 1)
        elif kind == 12:
            return self.struct(depth + 1)
        else:
            raise _NotPlain(f"unknown Thrift type {kind}")
        return None


def _count(struct: Any, field: int) -> int:
    """A non-negative integer field of a Thrift struct."""
    value = struct.get(field) if isinstance(struct, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _NotPlain(f"Parquet page header field {field} is not a count")
    return value


def _page_header(f: Any, at: int, end: int) -> tuple[dict[int, Any], int]:
    """The page header at offset ``at`` (of at most ``_HEADER_BYTES``, before ``end``) and
    the offset of the page's body."""
    size = 1024
    while True:
        f.seek(at)
        data = f.read(min(size, end - at))
        header = _Compact(data)
        try:
            return header.struct(), at + header.pos
        except _Short:
            if size >= _HEADER_BYTES or len(data) < size:
                raise
            size = _HEADER_BYTES


def _levels(data: bytes, max_level: int, count: int) -> list[int]:
    """``count`` definition levels from Parquet's RLE / bit-packed hybrid encoding."""
    width = max_level.bit_length()
    if not width:
        return [0] * count
    runs = _Compact(data)
    out: list[int] = []
    while len(out) < count:
        head = runs.varint()
        if head & 1:  # bit-packed: groups of 8 values
            n = (head >> 1) * 8
            bits = int.from_bytes(runs.take((head >> 1) * width), "little")
            out += [(bits >> (k * width)) & ((1 << width) - 1)
                    for k in range(min(n, count - len(out)))]
        else:
            n = head >> 1
            out += [int.from_bytes(runs.take((width + 7) // 8), "little")] * min(
                n, count - len(out))
        if not n:
            raise _NotPlain("an empty run of definition levels")
    return out


def _plain_pages(f: Any, chunk: pq.ColumnChunkMetaData, max_def: int, max_rep: int,
                 rows: int) -> list[_Page]:
    """The data pages of an image column chunk that hold its first ``rows`` rows, from their
    headers and definition levels alone; ``_NotPlain`` unless each image can be read alone."""
    if chunk.compression != "UNCOMPRESSED" or chunk.has_dictionary_page or max_rep:
        raise _NotPlain("the images are compressed, dictionary-encoded or repeated")
    at = chunk.data_page_offset
    end = at + chunk.total_compressed_size
    pages: list[_Page] = []
    seen = 0
    while seen < rows:
        if at >= end:
            raise _NotPlain("the column chunk has fewer values than rows")
        header, body = _page_header(f, at, end)
        page_end = body + _count(header, 3)
        kind = header.get(1)
        if page_end > end:
            raise _NotPlain("a page runs past its column chunk")
        if kind == 1:  # an index page
            at = page_end
            continue
        if kind == 0:
            info = header.get(5)
            count, encoding = _count(info, 1), _count(info, 2)
            levels_at = body + 4 * bool(max_def)
            if max_def and _count(info, 3) != 3:  # not RLE
                raise _NotPlain("the definition levels are not RLE-encoded")
            f.seek(body)
            length = int.from_bytes(f.read(4), "little") if max_def else 0
        elif kind == 3:
            info = header.get(8)
            count, encoding = _count(info, 1), _count(info, 4)
            levels_at, length = body + _count(info, 6), _count(info, 5)
        else:
            raise _NotPlain(f"a page of type {kind}")
        if seen + count > chunk.num_values:
            raise _NotPlain("a page holds more values than its column chunk")
        if encoding != 0 or levels_at + length > page_end or length > 2 * count + 16:
            raise _NotPlain("the images are not PLAIN-encoded")
        f.seek(levels_at)
        pages.append(_Page(_levels(f.read(length), max_def, count), levels_at + length,
                           page_end))
        seen += count
        at = page_end
    return pages


def _read(f: Any, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"a Parquet page ends {n - len(data)} bytes early")
    return data


def _plain_images(f: Any, pages: list[_Page], max_def: int,
                  wanted: set[int]) -> Iterator[tuple[int, bytes]]:
    """(row, image bytes) of the ``wanted`` rows in ``pages``, each image read alone after its
    length; one over ``THUMB_MAX_BYTES`` is passed over unread."""
    last = max(wanted)
    row = 0
    for page in pages:
        at = page.values_at
        for level in page.levels:
            if row > last:
                return
            if level == max_def:
                f.seek(at)
                size = int.from_bytes(_read(f, 4), "little")
                at += 4 + size
                if at > page.end:
                    raise ValueError("a Parquet image runs past its page")
                if row in wanted and size <= THUMB_MAX_BYTES:
                    f.seek(at - size)
                    yield row, _read(f, size)
            row += 1


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
        if fs.size(path) > THUMB_MAX_BYTES:
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
                        if member.size <= THUMB_MAX_BYTES:
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
    if member.size > TAR_JSON_MAX_BYTES:
        return {}
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
                 queue_s: float = QUEUE_S, reads_per_key: int = READS_PER_KEY):
        self.size = size
        self.queue_s = queue_s
        self._items: OrderedDict[tuple, _Entry] = OrderedDict()
        self._loads: dict[tuple, asyncio.Task] = {}
        self._slots = asyncio.Semaphore(reads_at_once)
        self.reads_per_key = reads_per_key
        self._key_slots: dict[str, asyncio.Semaphore] = {}
        self._key_waiting: Counter[str] = Counter()
        self._pool = ThreadPoolExecutor(reads_at_once + _MARKER_THREADS,
                                        thread_name_prefix="pixcrawler-samples")
        self._markers: ReadCache[Optional[Marker]] = ReadCache(MARKER_FRESH_S)

    async def get(self, job_id: str, uri: str, label: Optional[str], limit: int,
                  labels: Sequence[str] = (), owner: Optional[str] = None) -> Found:
        """Up to ``limit`` thumbnails of ``job_id``'s dataset at ``uri``, for the API key
        ``owner`` (None: no key, auth off). Raises ``NoDataset`` when ``uri`` holds no
        dataset of that job, ``SamplesBusy`` when no read could start within ``queue_s``,
        ``StorageError`` when it cannot be read."""
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
                    self._load(key, uri, label, want, tuple(labels), owner))
                self._loads[key] = task
            # shield: a request that goes away does not cancel the read others wait on.
            entry = await asyncio.shield(task)
            if entry.whole or len(entry.samples) >= limit:
                return Found(entry.samples[:limit], entry.note)

    @contextlib.asynccontextmanager
    async def _key_slot(self, owner: Optional[str]) -> AsyncIterator[None]:
        """One of ``owner``'s ``reads_per_key`` (waited for at most ``queue_s``); nothing
        for no key."""
        if owner is None:
            yield
            return
        slot = self._key_slots.setdefault(owner, asyncio.Semaphore(self.reads_per_key))
        self._key_waiting[owner] += 1
        try:
            try:
                await asyncio.wait_for(slot.acquire(), self.queue_s)
            except asyncio.TimeoutError:
                raise SamplesBusy(f"this API key's earlier thumbnail reads are still running "
                                  f"(waited {self.queue_s:g} s)") from None
            try:
                yield
            finally:
                slot.release()
        finally:
            self._key_waiting[owner] -= 1
            if not self._key_waiting[owner]:
                del self._key_waiting[owner], self._key_slots[owner]

    async def _marker(self, uri: str) -> Optional[Marker]:
        return await self._markers.get(uri, lambda: self._run(dataset_marker, uri))

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _load(self, key: tuple, uri: str, label: Optional[str], want: int,
                    labels: tuple[str, ...], owner: Optional[str]) -> _Entry:
        try:
            deadline = asyncio.get_running_loop().time() + self.queue_s  # (both waits in all)
            async with self._key_slot(owner):
                left = deadline - asyncio.get_running_loop().time()
                try:
                    await asyncio.wait_for(self._slots.acquire(), max(left, MIN_WAIT_S))
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
