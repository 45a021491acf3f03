"""URL lists read in slices, so no process ever loads a whole list.

A list file (txt, csv, tsv, jsonl or parquet; a local path or any fsspec URI) is cut into
slices when a job is planned, from its size and a sample of its first rows; a worker reads only
its slice. Text files are cut by byte ranges, as input splits are: a slice holds the lines that
*start* inside its range, so every line belongs to exactly one slice whatever the cut. Parquet
files are cut by row groups and row ranges inside them.

Formats (chosen by the file's extension):

* ``.txt`` (anything else): one URL a line, or ``label<TAB>url``; blank lines and lines
  starting with ``#`` are skipped;
* ``.csv`` / ``.tsv``: a header line naming the columns (``sources[].url_column``,
  ``label_column``); one record a line (quoted line breaks are not supported);
* ``.jsonl`` / ``.ndjson``: one JSON object a line;
* ``.parquet``: columns by name.

Compressed lists (``.gz``, ``.bz2``, ``.zst``, ``.zip``, ``.xz``) are refused at planning: a
compressed stream cannot be cut by byte ranges, so decompress it first.

A row without a usable URL is still a candidate: the URL checks reject it with a reason naming
the row. A row whose label is not a class of the spec is skipped and counted
(``skipped_rows``); the job's summary reports it.
"""

from __future__ import annotations

import bisect
import csv
import functools
import hashlib
import io
import json
import math
import os
import statistics
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Optional

from builder.errors import SourceError

try:
    from botocore.exceptions import BotoCoreError, ClientError

    _REMOTE_ERRORS: tuple[type[BaseException], ...] = (BotoCoreError, ClientError)
except ImportError:  # botocore comes with s3fs, which only s3:// lists need
    _REMOTE_ERRORS = ()

_READ_ERRORS: tuple[type[BaseException], ...] = (OSError, *_REMOTE_ERRORS)
"""What reading a list file can raise: the file system's errors and, for s3://, botocore's
(missing credentials, a refused request)."""

_COMPRESSED = (".gz", ".bz2", ".zst", ".zip", ".xz")

SAMPLE_BYTES = 65536
"""Bytes read at planning to estimate the line length (and check the format)."""

MAX_LINE_BYTES = 1 << 20
"""The longest line a text list may hold. A longer one is a bad row (its candidate is rejected
as ``invalid_url``), read past in pieces, so one line without an end never fills memory."""

PARQUET_BATCH_ROWS = 8192
"""Rows a parquet list is decoded by: a reader holds one such batch of a row group, never the
whole group (which a writer may have made as large as the file)."""

PARQUET_BUFFER_BYTES = 1 << 20
"""Bytes a parquet list is read from storage by, for the same reason."""


@dataclass(frozen=True)
class ListRow:
    label: str
    url: str
    where: str
    """The row's place in the file, for messages (``path:byte`` or ``path: row n``)."""
    caption: str = ""


@dataclass(frozen=True)
class SlicePlan:
    """How a list file is cut: ``count`` slices; text files by ``slice_bytes`` from
    ``data_start``, parquet by ``slice_rows`` within each row group.

    Slices may grow along the file: past its first ``grow_after`` rows (for text, the base
    slices that cover them), slices hold ``grown_rows`` rows (text: ``grown_bytes``). The cut
    is a pure function of the file and these numbers, so a resumed job cuts it the same way."""

    path: str
    kind: str
    count: int
    size: int = 0
    data_start: int = 0
    slice_bytes: int = 0
    header: tuple[str, ...] = ()
    row_groups: tuple[int, ...] = ()
    slice_rows: int = 0
    grow_after: int = 0
    grown_rows: int = 0
    grown_bytes: int = 0
    inode: int = 0
    """The list file's inode when the HTTP API checked it (``SourceSpec.path_inode``; 0:
    none): each read refuses another file at ``path`` (``open_list``)."""

    def _base_slices(self) -> int:
        """Text: the slices of ``slice_bytes`` before the grown ones."""
        return math.ceil(self.grow_after / self.slice_rows) if self.grown_rows else self.count

    def _group_cuts(self, rows: int, first: int) -> tuple[int, int, int]:
        """Parquet, a row group of ``rows`` rows starting at row ``first`` of the file: its
        base slices, the rows they cover, and its grown slices."""
        if not self.grown_rows:
            return math.ceil(rows / self.slice_rows), rows, 0
        base = math.ceil(min(rows, max(0, self.grow_after - first)) / self.slice_rows)
        covered = min(rows, base * self.slice_rows)
        return base, covered, math.ceil((rows - covered) / self.grown_rows)

    def bounds(self, index: int) -> tuple[int, int, int]:
        """(row group or -1, start, stop) of slice ``index``."""
        if self.kind != "parquet":
            base = self._base_slices()
            if index < base:
                start = self.data_start + index * self.slice_bytes
                return -1, start, min(self.size, start + self.slice_bytes)
            start = self.data_start + base * self.slice_bytes + (index - base) * self.grown_bytes
            return -1, start, min(self.size, start + self.grown_bytes)
        starts, cuts = self._cuts
        group = bisect.bisect_right(starts, index) - 1
        if group >= 0:
            rows = self.row_groups[group]
            base, covered, grown = cuts[group]
            at = index - starts[group]
            if at < base:
                start = at * self.slice_rows
                return group, start, min(rows, start + self.slice_rows)
            if at < base + grown:
                start = covered + (at - base) * self.grown_rows
                return group, start, min(rows, start + self.grown_rows)
        raise IndexError(f"slice {index} is past the end of {self.path}")

    @functools.cached_property
    def _cuts(self) -> tuple[list[int], list[tuple[int, int, int]]]:
        """Parquet: each row group's first slice and its cuts (``_group_cuts``), worked out
        once: ``bounds`` walked every row group before the slice's at each call, which a list
        of 10M rows in groups of 1,000 made 6.7 ms a slice near its end."""
        starts, cuts, first, at = [], [], 0, 0
        for rows in self.row_groups:
            cut = self._group_cuts(rows, first) if rows else (0, 0, 0)
            starts.append(at)
            cuts.append(cut)
            at, first = at + cut[0] + cut[2], first + rows
        return starts, cuts

    def rows(self, index: int) -> int:
        """The rows slice ``index`` is cut for (text: as estimated from the sampled lines)."""
        if self.kind == "parquet":
            _, start, stop = self.bounds(index)
            return stop - start
        return self.grown_rows if self.grown_rows and index >= self._base_slices() \
            else self.slice_rows


def _kind(path: str) -> str:
    lower = path.lower()
    if lower.endswith(_COMPRESSED):
        raise SourceError(f"{path}: compressed URL lists are not supported (they cannot be read "
                          "in slices); decompress it and point sources[].path at the result")
    for suffix, kind in ((".parquet", "parquet"), (".jsonl", "jsonl"), (".ndjson", "jsonl"),
                         (".csv", "csv"), (".tsv", "tsv")):
        if lower.endswith(suffix):
            return kind
    return "txt"


def _open(path: str, storage_options: Optional[dict[str, Any]]) -> Any:
    from builder.storage import open_fs

    fs, fs_path = open_fs(path, storage_options)
    try:
        info = fs.info(fs_path)
    except FileNotFoundError:
        raise SourceError(f"URL list not found: {path} (sources[].path must name an existing "
                          "file, readable from every node of the cluster)") from None
    except _READ_ERRORS as exc:
        raise _read_error(path, exc) from None
    if info.get("type") == "directory":
        raise SourceError(f"{path} is a directory; sources[].path must name one URL list file")
    if info.get("size") is None:
        raise SourceError(f"{path}: its server gives no size for it, and a URL list is cut "
                          "into slices by its size; copy it to a local file or an object store")
    return fs, fs_path, info["size"]


def open_list(fs: Any, fs_path: str, path: str, inode: int = 0, **kwargs: Any) -> Any:
    """``fs.open`` of a list file for reading, refused where ``inode`` (not 0) is not the
    opened file's: the HTTP API checked that file, in a folder the key's user may write
    (``url_list_dirs``), and a link put in its place since would have the job read any file
    the server can (another key's list, the server's secrets) into its rejects."""
    f = fs.open(fs_path, "rb", **kwargs)
    if inode:
        try:
            found = os.fstat(f.fileno()).st_ino
        except (AttributeError, OSError, io.UnsupportedOperation):
            found = -1
        if found != inode:
            f.close()
            raise SourceError(f"{path} is not the file this server checked when the job was "
                              "submitted: it was replaced since (by another file, or a link to "
                              "one). Submit the job again to have the file there now read (a "
                              "spec run from a file: drop its sources[].path_inode)")
    return f


IDENTITY_BYTES = 65536
"""What ``list_identity`` hashes of a list's head and of its tail."""


def list_identity(path: str, storage_options: Optional[dict[str, Any]] = None,
                  inode: int = 0) -> str:
    """What a resumed job compares to know its list is the one its first run cut: the file's
    size and a hash of its first and last ``IDENTITY_BYTES`` (a Parquet list's footer is in
    them). A copy of the file is the same list; rows added, removed or edited near either
    end are another."""
    fs, fs_path, size = _open(path, storage_options)
    digest = hashlib.sha256(str(size).encode())
    try:  # read in blocks of its own size: an object store's would read ahead 50 MiB, and
        # fsspec's file refuses a server that ignores the range (cat_file took the whole body)
        with open_list(fs, fs_path, path, inode, block_size=IDENTITY_BYTES,
                       cache_type="none") as f:
            digest.update(f.read(IDENTITY_BYTES))
            if size > IDENTITY_BYTES:
                f.seek(max(IDENTITY_BYTES, size - IDENTITY_BYTES))
                digest.update(f.read(IDENTITY_BYTES))
    except (*_READ_ERRORS, ValueError) as exc:
        raise _read_error(path, exc) from None
    return f"{size}:{digest.hexdigest()[:32]}"


def _read_error(path: str, exc: BaseException, where: str = "") -> SourceError:
    detail = " ".join(str(exc).split())
    return SourceError(f"cannot read the URL list {path}{where}: {type(exc).__name__}: {detail}. "
                       "Check the file is complete (not damaged or still being written) and "
                       "readable from every node of the cluster (for s3:// or another remote "
                       "store: its credentials and storage_options)")


def _columns(path: str, names: list[str], used: tuple[Optional[str], ...]) -> None:
    """Refuse a list whose URL column (``used[0]``) is missing or whose used columns are named
    twice."""
    if used[0] not in names:
        raise SourceError(f"{path}: no column {used[0]!r} (columns: {', '.join(names)}); "
                          "set sources[].url_column")
    twice = [c for c in dict.fromkeys(used) if c is not None and names.count(c) > 1]
    if twice:
        raise SourceError(f"{path}: column(s) {', '.join(map(repr, twice))} appear more than "
                          "once; rename or drop the duplicates")


def plan_slices(path: str, slice_rows: int, *, url_column: str = "url",
                label_column: str = "label",
                storage_options: Optional[dict[str, Any]] = None,
                grow_after: int = 0, grown_rows: int = 0, legacy: bool = False,
                inode: int = 0) -> SlicePlan:
    """Cut a list file into slices of about ``slice_rows`` rows, reading only its head (and,
    for parquet, its footer); past its first ``grow_after`` rows, of ``grown_rows`` (when it is
    larger). Raises ``SourceError`` for a file that cannot be read or parsed (missing,
    a directory, compressed, not of its extension's format) or a missing or duplicate column.
    ``legacy``: cut as versions before the journal recorded cuts did (``_line_bytes``), for a
    resume of a job one of them started. ``inode``: ``SlicePlan.inode``."""
    if slice_rows < 1:
        raise ValueError(f"slice_rows must be >= 1, got {slice_rows}")
    if grown_rows <= slice_rows:
        grow_after = grown_rows = 0
    kind = _kind(path)
    fs, fs_path, size = _open(path, storage_options)
    used = (url_column, label_column)
    try:
        if kind == "parquet":
            groups = _parquet_groups(path, fs, fs_path, used, inode)
            plan = SlicePlan(path, kind, 0, size=size, row_groups=groups,
                             slice_rows=slice_rows, grow_after=grow_after, grown_rows=grown_rows,
                             inode=inode)
            count, first = 0, 0
            for rows in groups:
                base, _, grown = plan._group_cuts(rows, first) if rows else (0, 0, 0)
                count, first = count + base + grown, first + rows
            return replace(plan, count=count)
        with open_list(fs, fs_path, path, inode) as f:
            head = f.read(SAMPLE_BYTES)
    except _READ_ERRORS as exc:
        raise _read_error(path, exc) from None
    header: tuple[str, ...] = ()
    data_start = 0
    if kind in ("csv", "tsv"):
        first_line, _, _ = head.partition(b"\n")
        data_start = len(first_line) + 1 if b"\n" in head else len(head)
        header = _header(path, first_line, kind)
        _columns(path, list(header), used)
    if b"\r" in head and b"\n" not in head:
        raise SourceError(f"{path}: its lines end with a lone \\r (as old Mac files do); end "
                          "them with \\n or \\r\\n")
    avg = _line_bytes(head[data_start:], whole=len(head) >= size or legacy)
    slice_bytes = max(16, avg * slice_rows)
    data = max(0, size - data_start)
    count = math.ceil(data / slice_bytes) if data else 0
    grown_bytes = max(16, avg * grown_rows) if grown_rows else 0
    base = math.ceil(grow_after / slice_rows)
    if grown_rows and data > base * slice_bytes:
        count = base + math.ceil((data - base * slice_bytes) / grown_bytes)
    return SlicePlan(path, kind, count, size=size, data_start=data_start,
                     slice_bytes=slice_bytes, header=header, slice_rows=slice_rows,
                     grow_after=grow_after, grown_rows=grown_rows, grown_bytes=grown_bytes,
                     inode=inode)


def _line_bytes(sample: bytes, whole: bool) -> int:
    """The typical line length of a list's sampled head: the median of its whole lines, so one
    long line (a comment, a data: URL) does not make every slice hold a hundred times the rows
    it is cut for. ``whole``: the sample is the whole file. A sample with no whole line (a
    first line longer than it) says nothing of the others: they are taken as short as a URL
    gets (``SHORT_LINE_BYTES``), so a slice holds at most its rows (a 70 KB first line made
    every slice hold thousands). ``whole`` set for a sample that is not keeps the partial
    line, as the versions before this one did (``plan_slices``' ``legacy``)."""
    lines = sample.split(b"\n")
    if len(lines) > 1 or not whole:
        lines.pop()  # the sample ends in the middle of this one, or it is empty
    if not lines:
        return SHORT_LINE_BYTES
    return max(1, int(statistics.median(len(line) + 1 for line in lines)))


SHORT_LINE_BYTES = 16
"""The line length taken for a list whose sampled head holds no whole line."""


def _parquet_groups(path: str, fs: Any, fs_path: str, used: tuple[Optional[str], ...],
                    inode: int = 0) -> tuple[int, ...]:
    """The row counts of a parquet list's row groups, once its columns are checked against the
    top-level names the reader selects by."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with open_list(fs, fs_path, path, inode) as f:
            pf = pq.ParquetFile(f)
            names, meta = pf.schema_arrow.names, pf.metadata
    except pa.ArrowException as exc:
        raise SourceError(f"{path} is not a readable Parquet file ({exc}); write it again with "
                          "a Parquet writer, or give it the extension of its real format "
                          "(.txt, .csv, .tsv, .jsonl)") from None
    _columns(path, names, used)
    return tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))


def _header(path: str, line: bytes, kind: str) -> tuple[str, ...]:
    """The column names of a csv/tsv list's first line."""
    try:
        text = line.decode("utf-8-sig").rstrip("\r")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: the header line is not UTF-8 ({exc}); save the list as "
                          "UTF-8") from None
    try:
        return tuple(next(csv.reader([text], delimiter="\t" if kind == "tsv" else ",")))
    except csv.Error as exc:
        raise SourceError(f"{path}: the header line is not a {kind} row ({exc}); end lines with "
                          "\\n or \\r\\n (not a lone \\r, as old Mac files do)") from None


class ListReader:
    """Reads slices of one list file (a worker holds one per list source). For parquet it keeps
    a cursor in the last two row groups it read, since a worker's slices of a group come in
    order: the next one continues where the last ended instead of decoding the group again.
    Close it to release the open files."""

    def __init__(self, plan: SlicePlan, *, url_column: str = "url", label_column: str = "label",
                 caption_column: Optional[str] = None, default_label: str = "",
                 storage_options: Optional[dict[str, Any]] = None):
        self.plan = plan
        self.url_column = url_column
        self.label_column = label_column
        self.caption_column = caption_column
        self.default_label = default_label
        self.storage_options = storage_options
        self._cursors: OrderedDict[int, _GroupCursor] = OrderedDict()
        self._lock = threading.Lock()
        """Slices are read in threads; a cursor is one file position."""

    def read(self, index: int) -> list[ListRow]:
        """The rows of slice ``index``; raises ``SourceError`` when the file cannot be read."""
        group, start, stop = self.plan.bounds(index)
        try:
            if self.plan.kind == "parquet":
                with self._lock:
                    return self._read_parquet(group, start, stop)
            return self._read_text(start, stop)
        except self._errors() as exc:
            raise _read_error(self.plan.path, exc, f" (slice {index})") from None

    def close(self) -> None:
        with self._lock:
            while self._cursors:
                self._cursors.popitem()[1].close()

    def _errors(self) -> tuple[type[BaseException], ...]:
        if self.plan.kind != "parquet":
            return _READ_ERRORS
        import pyarrow as pa

        return (*_READ_ERRORS, pa.ArrowException)

    def _read_text(self, start: int, stop: int) -> list[ListRow]:
        from builder.storage import open_fs

        plan = self.plan
        fs, fs_path = open_fs(plan.path, self.storage_options)
        rows: list[ListRow] = []
        with open_list(fs, fs_path, plan.path, plan.inode) as f:
            if start > plan.data_start:
                f.seek(start - 1)
                # The line that started before this slice belongs to the last one; when it
                # runs past this slice's end, no line starts here.
                if not _past_line(f, stop - start):
                    return rows
            else:
                f.seek(start)
            pos = f.tell()
            while pos < stop:
                line, length = _line(f)
                if not length:
                    break
                where = f"{plan.path}:byte {pos}"
                pos += length
                if len(line) < length:
                    rows.append(ListRow(self.default_label, "", f"{where} (a line of "
                                        f"{length:,} bytes; at most {MAX_LINE_BYTES:,})"))
                    continue
                row = self._parse(line, where)
                if row is not None:
                    rows.append(row)
        return rows

    def _parse(self, raw: bytes, where: str) -> Optional[ListRow]:
        text = raw.decode("utf-8", errors="replace").rstrip("\r\n").removeprefix("\ufeff")
        kind = self.plan.kind
        if kind == "txt":
            line = text.strip()
            if not line or line.startswith("#"):
                return None
            if "\t" in line:
                label, url = line.split("\t", 1)
                return ListRow(label.strip() or self.default_label, url.strip(), where)
            return ListRow(self.default_label, line, where)
        if not text.strip():
            return None
        if kind == "jsonl":
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError) as exc:  # ValueError: also a 5,000-digit int
                return ListRow(self.default_label, "", f"{where} (not valid JSON: {exc})")
            if not isinstance(obj, dict):
                return ListRow(self.default_label, "",
                               f"{where} (a JSON {type(obj).__name__}, not an object)")
            return self._row(obj, where)
        try:
            values = next(csv.reader([text], delimiter="\t" if kind == "tsv" else ","), [])
        except csv.Error as exc:  # e.g. a field longer than csv.field_size_limit()
            return ListRow(self.default_label, "", f"{where} (not a {kind} row: {exc})")
        return self._row(dict(zip(self.plan.header, values)), where)

    def _row(self, obj: dict[str, Any], where: str) -> ListRow:
        url = obj.get(self.url_column)
        if url is None:
            url, where = "", f"{where} (no {self.url_column!r})"
        elif not isinstance(url, str):
            url, where = "", f"{where} ({self.url_column!r} is a {type(url).__name__})"
        label = obj.get(self.label_column)
        caption = obj.get(self.caption_column)
        return ListRow(str(label) if label not in (None, "") else self.default_label, url, where,
                       caption if isinstance(caption, str) else "")

    def _read_parquet(self, group: int, start: int, stop: int) -> list[ListRow]:
        cursor = self._cursors.get(group)
        if cursor is None or not cursor.reaches(start):
            if cursor is not None:
                cursor.close()
            cursor = self._cursors[group] = self._open_group(group)
            while len(self._cursors) > 2:
                self._cursors.popitem(last=False)[1].close()
        self._cursors.move_to_end(group)
        urls, labels, captions = cursor.rows(start, stop)
        return [self._row({self.url_column: url,
                           self.label_column: labels[i] if labels else None,
                           self.caption_column: captions[i] if captions else None},
                          f"{self.plan.path}: row group {group} row {start + i}")
                for i, url in enumerate(urls)]

    def _open_group(self, group: int) -> _GroupCursor:
        import pyarrow.parquet as pq

        from builder.storage import open_fs

        fs, fs_path = open_fs(self.plan.path, self.storage_options)
        f = open_list(fs, fs_path, self.plan.path, self.plan.inode)
        try:
            pf = pq.ParquetFile(f, buffer_size=PARQUET_BUFFER_BYTES)
            names = pf.schema_arrow.names
            used = (self.url_column, self.label_column, self.caption_column)
            _columns(self.plan.path, names, used)
            batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group],
                                      columns=[c for c in used if c in names], use_threads=False)
        except BaseException:
            f.close()
            raise
        return _GroupCursor(f, batches, (self.url_column, self.label_column,
                                         self.caption_column))


def head_rows(path: str, rows: int, *, url_column: str = "url",
              label_column: str = "label") -> list[ListRow]:
    """The rows of a list's first slice of about ``rows`` rows (the list is never read whole);
    raises ``SourceError`` as ``plan_slices`` and ``ListReader.read`` do."""
    plan = plan_slices(path, rows, url_column=url_column, label_column=label_column)
    if not plan.count:
        return []
    reader = ListReader(plan, url_column=url_column, label_column=label_column)
    try:
        return reader.read(0)
    finally:
        reader.close()


def _line(f: Any) -> tuple[bytes, int]:
    """The next line of ``f`` (at most ``MAX_LINE_BYTES`` of it) and its whole length; a longer
    line is read past in pieces, never held whole."""
    line = f.readline(MAX_LINE_BYTES + 1)
    length = len(line)
    if length <= MAX_LINE_BYTES or line.endswith(b"\n"):
        return line, length
    while not line.endswith(b"\n"):
        line = f.readline(MAX_LINE_BYTES)
        if not line:
            break
        length += len(line)
    return b"", length


def _past_line(f: Any, limit: int) -> bool:
    """Read ``f`` past the end of the line it is in, reading at most ``limit`` bytes: whether
    that line ended within them. Bounding it keeps each slice's cost its own size, however
    many slices one long line spans."""
    while limit > 0:
        piece = f.readline(min(limit, MAX_LINE_BYTES))
        if not piece:
            return False
        if piece.endswith(b"\n"):
            return True
        limit -= len(piece)
    return False


def _python_values(column: Any) -> list[Any]:
    """A column's values as Python objects. Dates, times and durations come as Arrow's text
    of them: as Python objects, one outside Python's range (a year past 9999) raised
    ``OverflowError`` and stopped the job; as text, each is one row's bad URL or label."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_temporal(column.type):
        column = pc.cast(column, pa.string())
    try:
        return column.to_pylist()
    except (OverflowError, ValueError):  # such a value inside a list or struct: that row's
        return [_python_value(value) for value in column]  # text says so


def _python_value(value: Any) -> Any:
    try:
        return value.as_py()
    except (OverflowError, ValueError) as exc:
        return f"unreadable value: {exc}"


class _GroupCursor:
    """One parquet row group read forward a batch at a time: it holds the open file and the
    batch the last slice ended in."""

    def __init__(self, file: Any, batches: Any, columns: tuple[Optional[str], ...]):
        self._file = file
        self._batches = batches
        self._columns = columns
        self._batch: Any = None
        self._first = 0
        """The row of the group that ``_batch`` starts at (or, with none, the next batch)."""

    def reaches(self, start: int) -> bool:
        return start >= self._first

    def rows(self, start: int, stop: int) -> tuple[list[Any], list[Any], list[Any]]:
        """The used columns' values of rows ``start`` to ``stop`` of the group; ``start`` must
        be one this cursor ``reaches``. A column the file lacks gives an empty list."""
        out: tuple[list[Any], ...] = ([], [], [])
        row = start
        while row < stop:
            if self._batch is None or row >= self._first + self._batch.num_rows:
                if self._batch is not None:
                    self._first += self._batch.num_rows
                self._batch = next(self._batches, None)
                if self._batch is None:
                    raise OSError(f"row group ended at row {self._first}, before row {stop}")
                continue
            take = self._batch.slice(row - self._first, stop - row)
            names = take.schema.names
            for values, name in zip(out, self._columns):
                if name in names:
                    values.extend(_python_values(take.column(name)))
            row += take.num_rows
        return out[0], out[1], out[2]

    def close(self) -> None:
        self._batch = None
        self._file.close()
