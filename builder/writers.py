"""Dataset writers: accepted rows in, a published dataset out, on any fsspec URI.

Layout of a published dataset at ``URI`` (a local directory, ``s3://bucket/prefix``, ...)::

    URI/data/{split}-{shard:05d}.parquet      Parquet shards of ``output.shard_size`` rows (a
                                              worker's last shard of a split may be short),
                                              schema builder.records.ACCEPTED_SCHEMA with the
                                              Hugging Face features in its metadata
                                              (``shard_schema``): ``image`` {bytes, path} an
                                              Image, ``label`` a ClassLabel of classes.json,
                                              ``label_name`` the label path
    URI/imagefolder/{split}/{folder}/{id}.{ext}  the images as files; the folder of label 'a/b'
                                              is 'a__b' (output.imagefolder_labels: flat), or
                                              nests as a/b/ (nested)
    URI/imagefolder/{split}/{folder}/{id}.{fmt}  with output.image_label_files: one label file
                                              per image next to it (see "Per-image label files")
    URI/webdataset/{split}-{shard:05d}.tar    WebDataset shards (the same rows as the Parquet
                                              shard of that name): {id}.jpg (an RGB JPEG, see
                                              ``_write_tar``), {id}.json (the row without the
                                              image), {id}.cls (class index)
    URI/labels.json|csv|yaml|txt              one entry per image: id, path (relative to URI: the
                                              imagefolder file if written, else the Parquet shard,
                                              else the tar), label, label_index, split, then
                                              level_0 .. level_{depth-1} (the label's levels,
                                              "" past its own depth); txt holds "path<TAB>label"
                                              lines. Only output.label_formats. In shard order.
    URI/classes.json, URI/classes.txt         the class-index map: sorted full label paths ->
                                              0..n-1 (classes.txt: one label per line, line i
                                              is class i); stable whatever order images arrive
    URI/rejects.parquet, URI/rejects.csv      one row per rejected candidate (REJECT_SCHEMA)
    URI/stats.json                            the job's figures ("partial": true when partial)
    URI/README.md                             the dataset card (builder/card.py)
    URI/spec.yaml                             the spec the dataset was built from
    URI/_SUCCESS                              written LAST: JSON with job id, created time,
                                              counts and the file list with sizes (the
                                              ImageFolder files are counted there and listed
                                              in labels.*)

Per-image label files (``output.image_label_files``, a subset of txt / json / csv / yaml): for
each image ``{id}.{ext}`` in the ImageFolder tree, ``{id}.{fmt}`` beside it says:

    json, yaml   a mapping: id, label (full path), levels (list, top first), class_index (in
                 classes.json), split, url, page_url, license, author ("" where the source gave
                 none), width, height, image (the image's file name)
    csv          a header and one row: id, label, level_0 .. level_{depth-1}, class_index, split,
                 url, page_url, license, author, width, height, image
    txt          one line: label<TAB>class_index<TAB>url<TAB>license (tabs and line breaks
                 inside a value become spaces)

**Writing without copying.** Shards are written straight to their final names while the job
runs (``ShardWriter``), each file atomically (a rename on local disks; an object store publishes
an object only once its upload completes): nothing is staged and copied at the end. A job's
output is complete iff ``_SUCCESS`` exists, and ``_SUCCESS`` is written last, after the
manifests, with a local disk flushed before it and after (``storage.flush_to_disk``); a
cancelled or failed job ends with ``_PARTIAL`` (JSON: reason, counts, files) instead, and its
card says PARTIAL at the top. Before a shard writes, its files are recorded in
the journal (an *intent*); a shard whose commit never came (a worker lost mid-write) has its
files removed when the job finishes or resumes, so nothing unaccounted for is left behind.

**Starting over a dataset.** ``DatasetPublisher.prepare`` runs before the crawl: it refuses a
complete dataset unless ``output.overwrite`` (then the old dataset is removed at once: its
markers first, so it never looks complete again, then its files: the dataset-level files
(``DATASET_FILES``, whatever the marker listed) and the ``data/``, ``imagefolder/`` and
``webdataset/`` trees, never other files). A ``_PARTIAL`` dataset, or shard files with no
marker, are refused the same way (continue it with ``--resume``, or overwrite
it). A publish removes the label manifests of formats it was not asked for, an earlier
dataset's, so that its marker vouches only for its own. A continued partial dataset
and ``retry-failed`` keep the old files and add to them (``merge``); the dataset loses its
marker while the new run writes. Two jobs writing into one URI at the same time is not
supported.

``ShardWriter`` holds only configuration, so it pickles to workers; shard numbers come from the
job's quota ledger, so names are unique across workers. Which rows make a shard is the worker's
choice (``builder.worker.ShardAssembler``); within a shard they are ordered by a hash of their
ids, and the same rows always give byte-identical files.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from typing import Any, Optional, Union

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import yaml

from builder import card as card_mod
from builder.errors import OutputExistsError, StorageError
from builder.journal import JOURNAL, SHARD_SCHEMA, resumable_jobs
from builder.records import (ACCEPTED_SCHEMA, REJECT_SCHEMA, ROW_SCHEMA, shard_schema,
                             with_columns)
from builder.spec import OutputSpec, bad_label_path, bad_name, flat_label
from builder.spreadsheet import as_text, as_text_columns
from builder.transform import rgb_jpeg
from builder.storage import (
    atomic_open,
    atomic_write,
    delete_files,
    delete_tree,
    ensure_writable,
    flush_to_disk,
    is_local_uri,
    list_files,
    open_fs,
    prune_empty_dirs,
    storage_errors,
)

SUCCESS = "_SUCCESS"
PARTIAL = "_PARTIAL"
LAYOUT_DIRS = ("data", "imagefolder", "webdataset")
LABEL_FILES = frozenset(f"labels.{fmt}" for fmt in ("json", "csv", "yaml", "txt"))
DATASET_FILES = frozenset({
    *LABEL_FILES, "classes.json", "classes.txt",
    "rejects.parquet", "rejects.csv", "stats.json", "README.md", "spec.yaml"})
"""The dataset-level files a publish writes: with the shard trees, all a marker lists, and all
an overwrite removes (a folder's other files are not the dataset's)."""

ROW_GROUP_SIZE = 100
"""Rows per Parquet row group: images are large, so small groups keep readers' memory low."""

_NAMES = ACCEPTED_SCHEMA.names


def _leaf_paths(name: str, type_: pa.DataType) -> list[str]:
    """The Parquet leaf columns of a field: per-column options name leaves, so a list's is
    ``name.list.element`` and a list of structs' ``name.list.element.<field>`` each."""
    if pa.types.is_list(type_):
        return _leaf_paths(f"{name}.list.element", type_.value_type)
    if pa.types.is_struct(type_):
        return [p for f in type_ for p in _leaf_paths(f"{name}.{f.name}", f.type)]
    return [name]


_COLUMN_PATHS = {f.name: _leaf_paths(f.name, f.type) for f in ACCEPTED_SCHEMA}
"""Parquet leaf column paths per field."""
_PARQUET_OPTIONS: dict[str, Any] = {
    "row_group_size": ROW_GROUP_SIZE,
    # Images are already compressed: recompressing them costs CPU and saves nothing.
    "compression": {p: ("none" if n == "image" else "zstd") for n in _NAMES
                    for p in _COLUMN_PATHS[n]},
    # The rights ledger repeats a few strings per origin: dictionary-encoded it costs a few
    # bytes an image.
    "use_dictionary": [p for n in ("label_name", "label_levels", "split", "format", "query",
                                   "engine", "license", "author", "rights")
                       for p in _COLUMN_PATHS[n]],
    "write_statistics": [p for n in _NAMES if n not in ("image", "rights")
                         for p in _COLUMN_PATHS[n]],
}
_REJECT_PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd",
                                           "use_dictionary": ["label", "stage", "reason",
                                                              "engine", "query"]}

_EXTENSIONS = {"jpeg": "jpg", "jpg": "jpg", "png": "png", "webp": "webp", "gif": "gif",
               "bmp": "bmp", "tiff": "tif", "tif": "tif"}
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"),
          (b"GIF89a", "gif"), (b"BM", "bmp"), (b"II*\x00", "tif"), (b"MM\x00*", "tif"))
JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""What a job id is made of (``fullmatch``: it names files and journal folders)."""
_LABEL_COLUMNS = ("id", "path", "label", "label_index", "split")
_IMAGE_LABEL_KEYS = ("id", "label", "levels", "class_index", "split", "url", "page_url",
                     "license", "author", "width", "height", "image")
_MANIFEST_KEYS = ("id", "label", "split", "path", "format", "width", "height", "bytes", "sha256",
                  "url", "license", "author", "shard")

Rows = Union[list[dict[str, Any]], pa.Table, dict[str, Any]]
"""Accepted rows: dicts per ROW_SCHEMA, an Arrow table, or a dict of columns (a pandas
DataFrame works too)."""


def extension_of(fmt: str, data: Optional[bytes] = None) -> str:
    """The file extension for an image format name, or sniffed from the bytes when unknown."""
    ext = _EXTENSIONS.get((fmt or "").lower())
    if ext:
        return ext
    head = (data or b"")[:16]
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    for magic, magic_ext in _MAGIC:
        if head.startswith(magic):
            return magic_ext
    return "bin"


def check_label_path(label: str) -> list[str]:
    """The path components of a label; ``ValueError`` for one that would escape the tree."""
    if bad_label_path(label):
        raise ValueError(f"label {label!r} cannot be a directory path: labels are non-empty, "
                         "'/'-separated names without empty, '.' or '..' parts")
    return label.split("/")


def class_index(labels: Sequence[str]) -> dict[str, int]:
    """The stable class-index map: sorted distinct labels -> 0..n-1."""
    return {label: i for i, label in enumerate(sorted(set(labels)))}


def depth_of(labels: Sequence[str]) -> int:
    """The number of levels of the deepest label (0 for none)."""
    return max((len(label.split("/")) for label in labels), default=0)


def level_columns(label: str, depth: int) -> dict[str, str]:
    """``level_0`` .. ``level_{depth-1}`` of a label; levels past its own depth are ""."""
    levels = label.split("/")
    return {f"level_{i}": levels[i] if i < len(levels) else "" for i in range(depth)}


def image_label_info(row: dict[str, Any], image_name: str,
                     class_idx: Optional[int]) -> dict[str, Any]:
    """What a per-image label file says about one accepted row (keys ``_IMAGE_LABEL_KEYS``)."""
    info = {
        "id": row["id"], "label": row["label"], "levels": row["label"].split("/"),
        "class_index": class_idx, "split": row["split"],
        **{k: row.get(k) or "" for k in ("url", "page_url", "license", "author")},
        "width": row.get("width"), "height": row.get("height"), "image": image_name,
    }
    return {k: info[k] for k in _IMAGE_LABEL_KEYS}


def _one_line(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def render_image_label(fmt: str, info: dict[str, Any], depth: int) -> bytes:
    """One per-image label file (see the module docstring for the formats); ``depth`` fixes
    the CSV's level columns so every file of a dataset has the same header."""
    if fmt == "json":
        return _json_bytes(info)
    if fmt == "yaml":
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        return yaml.dump(info, Dumper=dumper, sort_keys=False, allow_unicode=True,
                         default_flow_style=False).encode("utf-8")
    if fmt == "csv":
        row = {k: info[k] for k in ("id", "label")}
        row.update(level_columns(info["label"], max(depth, len(info["levels"]))))
        row.update({k: info[k] for k in _IMAGE_LABEL_KEYS if k not in ("id", "label", "levels")})
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(row), lineterminator="\n")
        writer.writeheader()
        writer.writerow({k: "" if v is None else as_text(v) if k in IMAGE_LABEL_WEB_KEYS else v
                         for k, v in row.items()})
        return text.getvalue().encode("utf-8")
    if fmt == "txt":
        fields = (info["label"], info["class_index"], as_text(info["url"]),
                  as_text(info["license"]))
        return ("\t".join(_one_line(v) for v in fields) + "\n").encode("utf-8")
    raise ValueError(f"unknown label format {fmt!r}; valid: json, csv, yaml, txt")


def to_row_table(rows: Rows) -> pa.Table:
    """Rows as a table of ``ROW_SCHEMA``: a list of dicts, an Arrow table, a pandas
    DataFrame or a dict of columns (Ray Data's "numpy" batches).

    Missing columns become nulls, extra columns are dropped, types are cast to the schema.
    """
    if isinstance(rows, pa.Table):
        table = rows
    elif isinstance(rows, dict):
        table = pa.table({name: pa.array(list(col)) for name, col in rows.items()})
    elif hasattr(rows, "to_dict") and hasattr(rows, "columns"):
        table = pa.Table.from_pandas(rows, preserve_index=False)
    else:
        return pa.Table.from_pylist(list(rows), schema=ROW_SCHEMA)
    columns = []
    for f in ROW_SCHEMA:
        if f.name in table.column_names:
            columns.append(table[f.name].cast(f.type))
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=ROW_SCHEMA)


def output_table(rows: pa.Table, labels: Sequence[str]) -> pa.Table:
    """Rows (``ROW_SCHEMA``) as shard rows (``shard_schema(labels)``): ``label`` the index of
    the label path in ``labels`` (sorted, as classes.json), ``label_name`` the path, ``image``
    {bytes, path: the image's file name}."""
    index = pc.index_in(rows["label"], value_set=pa.array(list(labels), pa.string()))
    if index.null_count:
        missing = sorted(set(pc.filter(rows["label"], pc.is_null(index)).to_pylist()))
        raise ValueError(f"labels {missing} are not among the dataset's labels {list(labels)}")
    formats = rows["format"].to_pylist()
    unknown = [i for i, fmt in enumerate(formats) if (fmt or "").lower() not in _EXTENSIONS]
    sniffed = dict(zip(unknown, rows["image"].take(unknown).to_pylist())) if unknown else {}
    names = [f"{i}.{extension_of(fmt, sniffed.get(n))}" for n, (i, fmt) in enumerate(zip(
        rows["id"].to_pylist(), formats))]
    image = pa.StructArray.from_arrays(
        [rows["image"].combine_chunks(), pa.array(names, pa.string())],
        fields=list(ACCEPTED_SCHEMA.field("image").type))
    columns = {"label": index.cast(pa.int64()), "label_name": rows["label"], "image": image}
    schema = shard_schema(labels)
    return pa.Table.from_arrays(
        [columns[f.name] if f.name in columns else rows[f.name] for f in schema], schema=schema)


def rows_of_output(table: pa.Table) -> pa.Table:
    """Shard rows read back (``ACCEPTED_SCHEMA``) as rows (``ROW_SCHEMA``), to write again."""
    image = table["image"].combine_chunks()
    columns = {"label": table["label_name"], "image": image.field("bytes")}
    return pa.Table.from_arrays(
        [columns[f.name] if f.name in columns else table[f.name] for f in ROW_SCHEMA],
        schema=ROW_SCHEMA)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n").encode("utf-8")


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _safe_relative(path: Any) -> Optional[str]:
    """A marker's file path if it stays inside the dataset and outside staging, else None."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
        return None
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or parts[0] == "_journal":
        return None
    return path


def image_rel(row: dict[str, Any], nested: bool = False) -> str:
    """Where an image lives in the ImageFolder tree: imagefolder/{split}/{folder}/{id}.{ext},
    the folder the label with its levels joined by '__' (``nested``: a folder per level)."""
    ext = extension_of(row["format"], row.get("image"))
    parts = check_label_path(row["label"])
    folders = parts if nested else [flat_label(row["label"])]
    return "imagefolder/" + "/".join([row["split"], *folders, f"{row['id']}.{ext}"])


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}"


def shard_order(ids: Sequence[str]) -> list[int]:
    """The order of rows within a shard: by a hash of the id, so classes mix and the same rows
    always come out in the same order."""
    keys = [hashlib.blake2b(i.encode(), digest_size=8).digest() for i in ids]
    return sorted(range(len(ids)), key=keys.__getitem__)


class ShardWriter:
    """Writes one split's shard (Parquet / ImageFolder / WebDataset) to its final names, with
    an intent before and a commit in the journal after. Holds only configuration."""

    def __init__(self, output: OutputSpec, uri: str, labels: Sequence[str],
                 storage_options: Optional[dict[str, Any]] = None):
        if is_local_uri(uri):
            uri = open_fs(uri)[1]
        self.output = output
        self.uri = uri.rstrip("/") if not uri.endswith("://") else uri
        self.storage_options = dict(storage_options or {})
        self.labels = sorted(set(labels))
        self.index = class_index(self.labels)
        self.depth = depth_of(self.labels)

    def _fs(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return open_fs(self.uri, self.storage_options)

    def write(self, rows: Rows, split: str, number: int, journal: Any,
              extra: Optional[dict[str, list]] = None) -> pa.Table:
        """Write shard ``{split}-{number:05d}`` of ``rows`` (all of split ``split``) and commit
        it in ``journal``; returns the committed shard rows (``journal.SHARD_SCHEMA``).
        ``extra``: per-row ``uid``, ``claim``, ``sig_a``, ``sig_b`` for the journal."""
        table = to_row_table(rows)
        if table.num_rows == 0:
            raise ValueError("a shard needs at least one row")
        self._check_rows(table, split)
        order = shard_order(table["id"].to_pylist())
        if order != list(range(len(order))):  # workers hand shards over in this order
            table = table.combine_chunks().take(order)
            extra = {k: [v[i] for i in order] for k, v in (extra or {}).items()}
        extra = extra or {}
        levels = pa.array([label.split("/") for label in table["label"].to_pylist()],
                          ROW_SCHEMA.field("label_levels").type)
        table = table.set_column(ROW_SCHEMA.get_field_index("label_levels"),
                                 ROW_SCHEMA.field("label_levels"), levels).combine_chunks()
        name = shard_name(split, number)
        formats = set(self.output.formats)
        fs, root = self._fs()
        # Python rows carry the image bytes only for the formats that write files per image,
        # and the rights ledger only for WebDataset's {id}.json (nothing else reads it here).
        rows_py = table.drop_columns(["image"] if "webdataset" in formats
                                     else ["image", "rights"]).to_pylist()
        if formats & {"imagefolder", "webdataset"}:
            for r, image in zip(rows_py, table["image"].to_pylist()):
                r["image"] = image
        nested = self.output.imagefolder_labels == "nested"
        image_rels = ([image_rel(r, nested) for r in rows_py] if "imagefolder" in formats
                      else [])
        files: dict[str, bytes] = {}
        if "imagefolder" in formats:
            files = {rel: r["image"] or b"" for rel, r in zip(image_rels, rows_py)}
            files.update(self._image_label_files(image_rels, rows_py))
        written = [f"data/{name}.parquet"] * ("parquet" in formats)
        written += [f"webdataset/{name}.tar"] * ("webdataset" in formats) + list(files)
        with storage_errors(self.uri, f"write shard {name} to"):
            journal.write_shard_intent(name, written)
            if "parquet" in formats:
                with atomic_open(fs, f"{root}/data/{name}.parquet") as f:
                    pq.write_table(output_table(table, self.labels), f, **_PARQUET_OPTIONS)
            if "webdataset" in formats:
                with atomic_open(fs, f"{root}/webdataset/{name}.tar") as f:
                    self._write_tar(f, rows_py)
            self._put_files(fs, root, files)
        entries = [manifest_entry(r, name, formats, nested) for r in rows_py]
        shard_rows = pa.Table.from_pylist([
            {**{k: e[k] for k in ("id", "label", "split", "path", "format", "width", "height",
                                  "bytes", "sha256", "url", "license", "author")},
             "uid": (extra.get("uid") or [""] * len(entries))[i],
             "claim": (extra.get("claim") or [0] * len(entries))[i],
             "sig_a": (extra.get("sig_a") or [[]] * len(entries))[i],
             "sig_b": (extra.get("sig_b") or [[]] * len(entries))[i]}
            for i, e in enumerate(entries)], schema=SHARD_SCHEMA)
        shard_rows = shard_rows.set_column(SHARD_SCHEMA.get_field_index("rights"),
                                           SHARD_SCHEMA.field("rights"), table["rights"])
        journal.write_shard(name, shard_rows)
        return shard_rows

    def _put_files(self, fs: fsspec.AbstractFileSystem, root: str,
                   files: dict[str, bytes]) -> None:
        if not files:
            return
        if is_local_uri(self.uri):
            for rel, data in files.items():
                atomic_write(fs, f"{root}/{rel}", data)
        else:
            fs.pipe({f"{root}/{rel}": data for rel, data in files.items()})

    def _check_rows(self, table: pa.Table, split: str) -> None:
        for column in ("id", "label", "split"):
            values = table[column]
            if values.null_count or pc.any(pc.equal(values, "")).as_py():
                raise ValueError(f"every accepted row needs a non-empty {column!r}")
        if set(table["split"].to_pylist()) != {split}:
            raise ValueError(f"shard of split {split!r} holds rows of splits "
                             f"{sorted(set(table['split'].to_pylist()))}")
        if bad_name(split):
            raise ValueError(f"bad split name {split!r}")
        for label in set(table["label"].to_pylist()):
            check_label_path(label)
            if label not in self.index:
                raise ValueError(f"label {label!r} is not one of the writer's labels "
                                 f"{self.labels}")

    def _image_label_files(self, image_rels: list[str],
                           rows: list[dict[str, Any]]) -> dict[str, bytes]:
        """The per-image label files of these rows (``output.image_label_files``), by path."""
        files = {}
        for rel, r in zip(image_rels, rows):
            stem, name = rel.rsplit(".", 1)[0], rel.rsplit("/", 1)[-1]
            info = image_label_info(r, name, self.index.get(r["label"]))
            for fmt in self.output.image_label_files:
                files[f"{stem}.{fmt}"] = render_image_label(fmt, info, self.depth)
        return files

    def _write_tar(self, f: Any, rows: list[dict[str, Any]]) -> None:
        """Every image under the one key ``jpg``: an RGB JPEG as stored, any other image as
        an RGB JPEG encoded from it (``transform.rgb_jpeg``), so readers that pick samples by
        key (``to_tuple("jpg", "cls")``) or stack decoded images (Ray Data) take them all."""
        with tarfile.open(fileobj=f, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for r in rows:
                key = r["id"]
                _tar_member(tar, f"{key}.jpg", rgb_jpeg(r["image"] or b"", r["format"]))
                _tar_member(tar, f"{key}.cls", str(self.index[r["label"]]).encode())
                meta = {k: v for k, v in r.items() if k != "image"}
                _tar_member(tar, f"{key}.json",
                            json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"))


def manifest_entry(row: dict[str, Any], name: str, formats: set[str],
                   nested: bool = False) -> dict[str, Any]:
    """The manifest entry of a row written in shard ``name``: the path points into the
    ImageFolder tree if written (``nested``: its label folders nest), else the Parquet shard,
    else the tar."""
    if "imagefolder" in formats:
        path = image_rel(row, nested)
    elif "parquet" in formats:
        path = f"data/{name}.parquet"
    else:
        path = f"webdataset/{name}.tar"
    entry = {k: row.get(k) for k in _MANIFEST_KEYS if k not in ("path", "shard")}
    entry.update(path=path, shard=name)
    return entry


# -- manifests, streamed -------------------------------------------------------------------


class LabelManifests:
    """``labels.{json,csv,yaml,txt}`` written entry by entry (memory stays flat), plus
    ``classes.json`` / ``classes.txt``. Use as a context manager; ``add`` each entry."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, formats: Sequence[str],
                 labels: Sequence[str]):
        self.fs = fs
        self.root = root
        self.formats = list(formats)
        self.index = class_index(labels)
        self.depth = depth_of(list(self.index))
        self.columns = [*_LABEL_COLUMNS, *level_columns("", self.depth)]
        self.count = 0
        self._files: dict[str, Any] = {}
        self._ctx: list[Any] = []

    def __enter__(self) -> "LabelManifests":
        for fmt in self.formats:
            ctx = atomic_open(self.fs, f"{self.root}/labels.{fmt}")
            self._ctx.append(ctx)
            self._files[fmt] = ctx.__enter__()
        if "csv" in self._files:
            self._write("csv", ",".join(self.columns) + "\n")
        if "json" in self._files:
            self._write("json", "[")
        return self

    def _write(self, fmt: str, text: str) -> None:
        self._files[fmt].write(text.encode("utf-8"))

    def add(self, row: dict[str, Any]) -> None:
        label = row["label"]
        entry = {"id": row["id"], "path": row["path"], "label": label,
                 "label_index": self.index[label], "split": row["split"],
                 **level_columns(label, self.depth)}
        first = self.count == 0
        self.count += 1
        for fmt in self._files:
            if fmt == "json":
                self._write(fmt, ("\n  " if first else ",\n  ")
                            + json.dumps(entry, ensure_ascii=False))
            elif fmt == "csv":
                text = io.StringIO()
                csv.DictWriter(text, fieldnames=self.columns,
                               lineterminator="\n").writerow(entry)
                self._write(fmt, text.getvalue())
            elif fmt == "yaml":
                self._write(fmt, f"- {_yaml_flow(entry)}\n")
            elif fmt == "txt":
                self._write(fmt, f"{entry['path']}\t{entry['label']}\n")

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            if "json" in self._files:
                self._write("json", "\n]\n" if self.count else "]\n")
            if "yaml" in self._files and not self.count:
                self._write("yaml", "[]\n")
        for ctx in reversed(self._ctx):
            ctx.__exit__(exc_type, exc, tb)
        if exc_type is None:
            atomic_write(self.fs, f"{self.root}/classes.json", _json_bytes(self.index))
            atomic_write(self.fs, f"{self.root}/classes.txt",
                         "".join(f"{label}\n" for label in self.index).encode("utf-8"))


def _csv_rows(table: pa.Table) -> bytes:
    """The table's rows as CSV, values quoted only where they hold a comma, a quote or a line
    break (``\n`` or ``\r``), a null an empty value, each row ended by ``\n``. Arrow writes a
    batch none of whose values needs quoting (nearly every batch: it refuses one that does,
    having no such minimal quoting, but lets a bare ``\r`` through), Python's ``csv`` the
    others. Python quotes a value for the characters of its row ending, so it is given
    ``\r\n`` (a bare ``\r`` ends a row for CSV readers) and each row's is cut to ``\n``."""
    if not _has_carriage_return(table):
        buf = io.BytesIO()
        try:
            pa_csv.write_csv(table, buf, pa_csv.WriteOptions(
                include_header=False, quoting_style="none", eol="\n"))
            return buf.getvalue()
        except pa.ArrowInvalid:
            pass
    text, row = io.StringIO(), io.StringIO()
    out = csv.writer(row, lineterminator="\r\n")
    for values in zip(*(table[name].to_pylist() for name in table.column_names)):
        row.seek(0)
        row.truncate()
        out.writerow(values)
        text.write(row.getvalue()[:-2])
        text.write("\n")
    return text.getvalue().encode("utf-8")


def _has_carriage_return(table: pa.Table) -> bool:
    return any((pa.types.is_string(column.type) or pa.types.is_large_string(column.type))
               and pc.any(pc.match_substring(column, "\r")).as_py()
               for column in table.columns)


REJECT_CSV_COLUMNS = [name for name in REJECT_SCHEMA.names if name != "rights"]
"""``rejects.csv``'s columns: the ledger (a list of structs) is in ``rejects.parquet`` only."""
REJECT_WEB_COLUMNS = ("url", "query", "detail", "duplicate_of", "page_url", "title", "license",
                      "author", "caption")
"""``rejects.csv``'s columns of text from outside (an LLM's query, a server's error), written
for spreadsheets (``builder.spreadsheet``)."""
IMAGE_LABEL_WEB_KEYS = ("url", "page_url", "license", "author")
"""A per-image CSV label file's values from the candidate's source, written for spreadsheets."""


def write_rejects(fs: fsspec.AbstractFileSystem, root: str, tables: Iterable[pa.Table]) -> int:
    """``rejects.parquet`` and ``rejects.csv`` from tables of rejected rows (REJECT_SCHEMA
    columns), streamed; returns the number of rows."""
    n = 0
    with atomic_open(fs, f"{root}/rejects.parquet") as fp, \
            atomic_open(fs, f"{root}/rejects.csv") as fc:
        writer = pq.ParquetWriter(fp, REJECT_SCHEMA, **_REJECT_PARQUET_OPTIONS)
        try:
            fc.write((",".join(REJECT_CSV_COLUMNS) + "\n").encode())
            for table in tables:
                if not table.num_rows:
                    continue
                table = with_columns(table, REJECT_SCHEMA, REJECT_SCHEMA.names).cast(
                    REJECT_SCHEMA)
                writer.write_table(table)
                fc.write(_csv_rows(as_text_columns(table.select(REJECT_CSV_COLUMNS),
                                                   REJECT_WEB_COLUMNS)))
                n += table.num_rows
        finally:
            writer.close()
    return n


# -- publishing ----------------------------------------------------------------------------


def _markers(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[tuple[str, dict]]:
    """(name, content) of the ``_SUCCESS`` then ``_PARTIAL`` marker at ``root``, where there;
    content that is not a JSON object reads as {}. Read fresh (no cached listing)."""
    for name in (SUCCESS, PARTIAL):
        path = f"{root}/{name}"
        fs.invalidate_cache(path)
        if fs.exists(path):
            try:
                content = json.loads(fs.cat_file(path))
            except ValueError:
                content = {}
            yield name, content if isinstance(content, dict) else {}


class DatasetPublisher:
    """The dataset-level files of a job at ``uri``: checks and clears the location before the
    crawl (``check``, ``prepare``) and writes manifests, rejects, stats, card, spec and the
    marker at the end (``publish``). See the module docstring."""

    def __init__(self, output: OutputSpec, uri: str, job_id: str,
                 storage_options: Optional[dict[str, Any]] = None,
                 labels: Sequence[str] = ()):
        if not JOB_ID_RE.fullmatch(job_id or ""):
            raise ValueError(f"job_id {job_id!r} must be letters, digits, '.', '_' or '-'")
        if is_local_uri(uri):
            uri = open_fs(uri)[1]
        self.output = output
        self.uri = uri.rstrip("/") if not uri.endswith("://") else uri
        self.job_id = job_id
        self.storage_options = dict(storage_options or {})
        self.labels = sorted(set(labels))

    def _fs(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return open_fs(self.uri, self.storage_options)

    def check(self, merge: bool = False, advice: Optional[str] = None) -> None:
        """Fail before any download: ``OutputExistsError`` if a dataset, complete or partial,
        is there (and neither overwrite nor merge), ``StorageError`` if the location cannot be
        written. ``advice`` replaces what the error tells a ``build`` user to do (a command
        with other flags, such as ``recheck --write``, says its own)."""
        fs, root = self._fs()
        with storage_errors(self.uri, "check"):
            markers = dict(_markers(fs, root))
        found, told = "", ""
        if SUCCESS in markers and not self.output.overwrite and not merge:
            old = markers[SUCCESS]
            found = (f"{self.uri} already holds a complete dataset (job "
                     f"{old.get('job_id', '?')}, created {old.get('created', '?')})")
            told = ("Set output.overwrite: true (or pass --overwrite) to replace it, or choose "
                    "another output.uri (--output).")
        elif PARTIAL in markers and not self.output.overwrite and not merge:
            old = markers[PARTIAL]
            found = (f"{self.uri} holds a partial dataset (job {old.get('job_id', '?')}, "
                     f"{old.get('reason') or 'partial'}, created {old.get('created', '?')})")
            told = ("Continue it with --resume, or set output.overwrite: true (--overwrite) to "
                    "replace it, or choose another output.uri (--output).")
        elif not markers and not merge and not self.output.overwrite:
            # no marker: an interrupted job's files, which a new dataset would publish as its own
            with storage_errors(self.uri, "check"):
                jobs = resumable_jobs(self.uri, self.storage_options)
                stray = not jobs and any(list_files(fs, f"{root}/{d}") for d in LAYOUT_DIRS)
            if jobs:
                found = f"{self.uri} holds the files of an interrupted job ({', '.join(jobs)})"
                told = ("Continue it with --resume, or set output.overwrite: true (--overwrite) "
                        "to start over there, or choose another output.uri (--output).")
            elif stray:
                found = (f"{self.uri} holds dataset files ({', '.join(LAYOUT_DIRS)}) but no "
                         "marker of a dataset")
                told = ("Set output.overwrite: true (--overwrite) to replace them, or choose "
                        "another output.uri (--output).")
        if not found and not markers and not merge:
            found, told = self._plain_folder_files(fs, root)
            if found:  # no flag replaces them: the caller's advice would name one
                raise OutputExistsError(f"{found}. {told}")
        if found:
            raise OutputExistsError(f"{found}. {advice or told}")
        ensure_writable(self.uri, self.storage_options)

    def _plain_folder_files(self, fs: fsspec.AbstractFileSystem, root: str
                            ) -> tuple[str, str]:
        """(found, told) where a folder that holds no dataset (no marker, shard files or
        journal) has files a publish would write over, such as its own README.md; else
        ("", ""). They are not a dataset's, so ``--overwrite`` does not replace them either
        (``_remove_old``)."""
        with storage_errors(self.uri, "check"):
            if any(list_files(fs, f"{root}/{d}") for d in LAYOUT_DIRS) or \
                    fs.exists(f"{root}/{JOURNAL}"):
                return "", ""
            own = sorted(path.rsplit("/", 1)[-1] for path in top_files(fs, root, DATASET_FILES))
        if not own:
            return "", ""
        return (f"{self.uri} holds {', '.join(own)}, which the dataset would write over, and no "
                "dataset (no marker, shard files or journal)",
                "Choose another output.uri (--output), such as a new folder inside it, or move "
                "those files away.")

    def prepare(self, merge: bool = False) -> None:
        """Clear the way for this job's shards: the old markers go (the dataset is no longer
        complete), and unless ``merge``, the old dataset's files."""
        fs, root = self._fs()
        with storage_errors(self.uri, "prepare"):
            markers = dict(_markers(fs, root))
            if markers:
                delete_files(fs, [f"{root}/{m}" for m in markers])
            if not merge and (markers or self.output.overwrite):
                self._remove_old(fs, root, bool(markers))
            if not merge and self.output.overwrite:  # interrupted jobs there: starting over
                for job in resumable_jobs(self.uri, self.storage_options):
                    delete_tree(fs, f"{root}/{JOURNAL}/{job}")

    @staticmethod
    def next_numbers(fs: fsspec.AbstractFileSystem, root: str,
                     subs: Sequence[str] = ("data", "webdataset")) -> dict[str, int]:
        """Per split, the number after the last shard file in the dataset."""
        out: dict[str, int] = {}
        for sub, suffix in (("data", ".parquet"), ("webdataset", ".tar")):
            if sub not in subs:
                continue
            for path in list_files(fs, f"{root}/{sub}"):
                m = re.match(r"^(?P<split>.+)-(?P<n>\d{5,})" + re.escape(suffix) + "$",
                             path.rsplit("/", 1)[-1])
                if m:
                    out[m["split"]] = max(out.get(m["split"], 0), int(m["n"]) + 1)
        return out

    @staticmethod
    def _remove_old(fs: fsspec.AbstractFileSystem, root: str, marked: bool) -> None:
        """Remove the dataset at ``root``: its shard trees and, where the folder holds a
        dataset (``marked``, or shard files or a journal there: a publish that failed half
        way left files no marker lists), its dataset-level files. A plain folder's own
        README.md or spec.yaml are not a dataset's."""
        old: set[str] = set()
        for d in LAYOUT_DIRS:
            old.update(list_files(fs, f"{root}/{d}"))
        if marked or old or fs.exists(f"{root}/{JOURNAL}"):
            old.update(top_files(fs, root, DATASET_FILES))
        delete_files(fs, old)
        for d in LAYOUT_DIRS:
            prune_empty_dirs(fs, f"{root}/{d}")

    def remove_files(self, rels: Iterable[str]) -> int:
        """Remove dataset files (relative paths; a shard's files that never committed)."""
        fs, root = self._fs()
        paths = [f"{root}/{rel}" for rel in {r for r in rels if _safe_relative(r)}]
        with storage_errors(self.uri, "clean up"):
            for p in paths:
                fs.invalidate_cache(p)
            found = [p for p in paths if fs.exists(p)]
            delete_files(fs, found)
        return len(found)

    def publish(self, *, manifest_rows: Iterable[dict[str, Any]],
                reject_tables: Iterable[pa.Table], stats: dict[str, Any],
                spec_name: str, description: str, spec_yaml: str,
                partial_reason: Optional[str] = None) -> str:
        """Write the dataset-level files, then the marker, last; returns the URI.

        ``manifest_rows``: every image's manifest entry (``id, label, split, path, license``),
        streamed; ``reject_tables``: the rejected candidates, streamed."""
        wrong = unbalanced(stats)
        if wrong:
            raise StorageError(f"{wrong}; not marking {self.uri} as published")
        fs, root = self._fs()
        with storage_errors(self.uri, "publish to"):
            counts = {"images": 0}
            licenses: Counter[str] = Counter()
            with LabelManifests(fs, root, self.output.label_formats, self.labels) as labels:
                for row in manifest_rows:
                    labels.add(row)
                    licenses[row.get("license") or ""] += 1
            counts["images"] = labels.count
            rejected = write_rejects(fs, root, reject_tables)
            if rejected != stats.get("rejected", rejected):  # before stats.json is replaced
                raise StorageError(f"the rejects manifest holds {rejected} rows but the job "
                                   f"counted {stats.get('rejected')} rejections; not marking "
                                   f"{self.uri} as published")
            if labels.count != stats.get("accepted", labels.count):
                raise StorageError(f"the label manifest holds {labels.count} images but the "
                                   f"job counted {stats.get('accepted')} accepted; not marking "
                                   f"{self.uri} as published")
            if partial_reason is not None:
                stats = {**stats, "partial": True, "partial_reason": partial_reason}
            atomic_write(fs, f"{root}/stats.json", _json_bytes(stats))
            order = list(self.output.splits)
            parquet_splits = sorted(self.next_numbers(fs, root, ("data",)),
                                    key=lambda s: (order.index(s) if s in order else len(order),
                                                   s))
            text = card_mod.render_card(
                spec_name, description, stats, spec_yaml, parquet_splits=parquet_splits,
                formats=self.output.formats, label_formats=self.output.label_formats,
                partial_reason=partial_reason, labels=self.labels,
                image_label_files=self.output.image_label_files, licenses=licenses,
                nested=self.output.imagefolder_labels == "nested")
            atomic_write(fs, f"{root}/README.md", text.encode("utf-8"))
            atomic_write(fs, f"{root}/spec.yaml", spec_yaml.encode("utf-8"))
            # Manifests in formats this job was not asked for are an earlier dataset's (one
            # whose publish failed, or a recheck's): the marker must not vouch for them.
            asked = {f"labels.{fmt}" for fmt in self.output.label_formats}
            delete_files(fs, top_files(fs, root, LABEL_FILES - asked))
            files = self._listed_files(fs, root)
            marker = SUCCESS if partial_reason is None else PARTIAL
            content: dict[str, Any] = {
                "job_id": self.job_id, "created": _now(),
                "status": "complete" if marker == SUCCESS else "partial"}
            if partial_reason is not None:
                content["reason"] = partial_reason
            content["counts"] = {
                "files": len(files), "bytes": sum(size for _, size in files),
                "imagefolder_files": counts["images"] * (1 + len(self.output.image_label_files))
                if "imagefolder" in self.output.formats else 0,
                **{k: stats[k] for k in ("candidates", "accepted", "rejected") if k in stats},
                "classes": len(stats.get("classes") or {})}
            content["files"] = [{"path": rel, "size": size} for rel, size in files]
            flush_to_disk(fs, root)  # what the marker vouches for, on disk before it
            atomic_write(fs, f"{root}/{marker}", _json_bytes(content))
            try:
                flush_to_disk(fs, root)  # and the marker, before the job says it published
            except OSError:
                with contextlib.suppress(OSError):  # no marker the job does not stand by
                    fs.rm_file(f"{root}/{marker}")
                raise
        return self.uri

    def _listed_files(self, fs: fsspec.AbstractFileSystem, root: str
                      ) -> list[tuple[str, int]]:
        """Every file of the dataset but the ImageFolder tree (counted in the marker, listed
        in labels.*), with its size: ``DATASET_FILES`` and the shard trees. Other files in
        the folder are not the dataset's, and an overwrite would delete what a marker lists."""
        out = []
        fs.invalidate_cache(root)
        for entry in fs.ls(root, detail=True):
            top = entry["name"].rstrip("/")[len(root) + 1:]
            if entry["type"] != "directory" and top in DATASET_FILES:
                out.append((top, int(entry.get("size") or 0)))
            elif entry["type"] == "directory" and top in ("data", "webdataset"):
                for path, info in fs.find(entry["name"], withdirs=False, detail=True).items():
                    out.append((path[len(root) + 1:], int(info.get("size") or 0)))
        return sorted(out)


def top_files(fs: fsspec.AbstractFileSystem, root: str, names: Iterable[str]) -> list[str]:
    """The files directly under ``root`` named in ``names`` (one listing, no lookup each)."""
    wanted = set(names)
    fs.invalidate_cache(root)
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return []
    return [entry["name"].rstrip("/") for entry in entries if entry["type"] != "directory"
            and entry["name"].rstrip("/")[len(root) + 1:] in wanted]


def unbalanced(stats: dict[str, Any]) -> str:
    """Where ``stats`` count a candidate other than once, as accepted or as rejected
    (accepted + rejected != candidates, overall or for a class); '' where they balance."""
    parts = [("the job", stats), *((f"class {label!r}", c) for label, c in
                                   (stats.get("classes") or {}).items())]
    for name, c in parts:
        if "candidates" in c and c.get("accepted", 0) + c.get("rejected", 0) != c["candidates"]:
            return (f"{name} counted {c.get('accepted', 0)} accepted + {c.get('rejected', 0)} "
                    f"rejected but {c['candidates']} candidates")
    return ""


# Characters YAML 1.1 treats as line breaks or will not read raw (C1 controls, surrogates,
# BOM, non-characters); JSON leaves them raw with ensure_ascii=False.
_YAML_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff\ufeff\ufffe\uffff]")


def _yaml_flow(entry: dict[str, Any]) -> str:
    """One manifest entry as a YAML flow mapping of double-quoted strings and integers.

    JSON's form of a flat mapping is YAML too, once the characters YAML reads differently are
    escaped, and writing it costs a twentieth of libyaml's block style (3 s for 40,000 entries):
    the manifest is written at the end of the job, while nothing else runs.
    """
    text = json.dumps(entry, ensure_ascii=False)
    return _YAML_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def read_marker(uri: str, storage_options: Optional[dict[str, Any]] = None
                ) -> Optional[dict[str, Any]]:
    """The ``_SUCCESS`` (else ``_PARTIAL``) content of the dataset at ``uri``, or None."""
    fs, root = open_fs(uri, storage_options)
    with storage_errors(uri, "read"):
        for name, content in _markers(fs, root):
            return {"marker": name, **content}
    return None


def is_complete(uri: str, storage_options: Optional[dict[str, Any]] = None) -> bool:
    """Whether ``uri`` holds a complete dataset (its ``_SUCCESS`` exists)."""
    fs, root = open_fs(uri, storage_options)
    path = f"{root}/{SUCCESS}"
    with storage_errors(uri, "check"):
        fs.invalidate_cache(path)
        return bool(fs.exists(path))


def parquet_shards(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """The Parquet shards of the dataset at ``root``, in name order (found by listing: a glob
    would read ``[``, ``?`` and ``*`` in ``root`` as patterns)."""
    return [p for p in list_files(fs, f"{root.rstrip('/')}/data") if p.endswith(".parquet")]


def read_dataset(uri: str, storage_options: Optional[dict[str, Any]] = None) -> pa.Table:
    """All Parquet shards of the dataset at ``uri`` as one table (shards in name order)."""
    fs, root = open_fs(uri, storage_options)
    with storage_errors(uri, "read"):
        paths = parquet_shards(fs, root)
        if not paths:
            if read_marker(uri, storage_options) is None:
                raise StorageError(f"no dataset at {uri}: no _SUCCESS, no _PARTIAL and no "
                                   "Parquet shards under data/. Check the URI (and that the "
                                   "job published).")
            return ACCEPTED_SCHEMA.empty_table()
        tables = []
        for path in paths:
            with fs.open(path, "rb") as f:
                tables.append(pq.read_table(f, schema=ACCEPTED_SCHEMA))
    return pa.concat_tables(tables)
