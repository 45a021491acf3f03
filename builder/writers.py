"""Dataset writers: accepted rows in, a published dataset out, on any fsspec URI.

Layout of a published dataset at ``URI`` (a local directory, ``s3://bucket/prefix``, ...)::

    URI/data/{split}-{shard:05d}.parquet      Parquet shards, one file per split per shard index,
                                              schema builder.records.ACCEPTED_SCHEMA, image bytes
                                              in column ``image``; Hugging Face split naming, so
                                              load_dataset("parquet", data_dir=URI/data) finds
                                              the splits (train / val -> validation / test)
    URI/imagefolder/{split}/{label}/{id}.{ext}  the images as files; a label 'a/b' nests (a/b/),
                                              so the tree mirrors the class hierarchy
    URI/imagefolder/{split}/{label}/{id}.{fmt}  with output.image_label_files: one label file
                                              per image next to it (see "Per-image label files")
    URI/webdataset/{split}-{shard:05d}.tar    WebDataset shards: {id}.{ext}, {id}.json (the row
                                              without the image), {id}.cls (class index; when the
                                              writer was given the labels)
    URI/labels.json|csv|yaml|txt              one entry per image: id, path (relative to URI: the
                                              imagefolder file if written, else the Parquet shard,
                                              else the tar), label, label_index, split, then
                                              level_0 .. level_{depth-1} (the label's levels,
                                              "" past its own depth); txt holds "path<TAB>label"
                                              lines. Only output.label_formats.
    URI/classes.json, URI/classes.txt         the class-index map: sorted full label paths ->
                                              0..n-1 (classes.txt: one label per line, line i
                                              is class i); stable whatever order images arrive
    URI/rejects.parquet, URI/rejects.csv      one row per rejected candidate (REJECT_SCHEMA)
    URI/stats.json                            the job's figures ("partial": true when partial)
    URI/README.md                             the dataset card (builder/card.py)
    URI/_SUCCESS                              written LAST: JSON with job id, created time, the
                                              file list with sizes, counts

Per-image label files (``output.image_label_files``, a subset of txt / json / csv / yaml): for
each image ``{id}.{ext}`` in the ImageFolder tree, ``{id}.{fmt}`` beside it says:

    json, yaml   a mapping: id, label (full path), levels (list, top first), class_index (in
                 classes.json; null when the writer was given no labels), split, url, page_url,
                 license, author ("" where the source gave none), width, height, image (the
                 image's file name)
    csv          a header and one row: id, label, level_0 .. level_{depth-1}, class_index, split,
                 url, page_url, license, author, width, height, image
    txt          one line: label<TAB>class_index<TAB>url<TAB>license (tabs and line breaks
                 inside a value become spaces)

A dataset is complete iff ``_SUCCESS`` exists. A partial dataset (a cancelled or failed job) has
``_PARTIAL`` (JSON: reason, counts, files) instead, and its card says PARTIAL at the top.

Staging and publishing: every file is first written under ``URI/_staging/{job_id}/`` with the same
relative layout. ``publish()`` then (1) refuses if ``URI`` already holds a complete dataset, unless
``output.overwrite``; (2) writes ``URI/_PUBLISHING`` (the incoming file list); (3) removes the old
markers, then the old dataset's files: those its marker lists plus the ``data/``, ``imagefolder/``
and ``webdataset/`` trees, never other files; (4) moves the staged files into place (a rename
locally, copy+delete on object stores); (5) writes ``_SUCCESS``; (6) removes ``_PUBLISHING`` and
the staging directory. A crash at any point leaves no ``_SUCCESS``. Calling ``publish()`` again
on the same job finishes an interrupted publish (files already moved are kept); another job's
publish into the same URI cleans what the crashed one left (``_PUBLISHING`` says so). An
existing ``_PARTIAL`` dataset is replaced without ``overwrite``: it was never complete.
Two jobs publishing into one URI at the same time is not supported.

``DatasetWriter`` holds only configuration, so it pickles to Ray Data workers; ``write_shard``
writes only that shard's files, so shards write in parallel, and a retried shard rewrites the
same names. Everything is deterministic: rows are sorted by id within a shard, tar members carry
fixed metadata, and the same rows give byte-identical Parquet and tar files.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Optional, Union

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from builder import card as card_mod
from builder.errors import OutputExistsError, StorageError
from builder.records import ACCEPTED_SCHEMA, REJECT_SCHEMA
from builder.spec import OutputSpec, bad_label_path, bad_name
from builder.storage import (
    ensure_parent,
    ensure_writable,
    is_local_uri,
    join,
    list_files,
    move_files,
    open_fs,
    prune_empty_dirs,
    storage_errors,
)

SUCCESS = "_SUCCESS"
PARTIAL = "_PARTIAL"
PUBLISHING = "_PUBLISHING"
STAGING = "_staging"
LAYOUT_DIRS = ("data", "imagefolder", "webdataset")

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
    "use_dictionary": [p for n in ("label", "label_levels", "split", "format", "query",
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
_JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHARD_NAME_RE = re.compile(r"^(?P<split>.+)-(?P<shard>\d{5})\.parquet$")
_LABEL_COLUMNS = ("id", "path", "label", "label_index", "split")
_IMAGE_LABEL_KEYS = ("id", "label", "levels", "class_index", "split", "url", "page_url",
                     "license", "author", "width", "height", "image")
_MANIFEST_KEYS = ("id", "label", "split", "path", "format", "width", "height", "bytes", "sha256",
                  "url", "license", "author", "shard")

Rows = Union[list[dict[str, Any]], pa.Table, dict[str, Any]]
"""Accepted rows: dicts per ACCEPTED_SCHEMA, an Arrow table, or a dict of columns (a pandas
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
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
        return text.getvalue().encode("utf-8")
    if fmt == "txt":
        fields = (info["label"], info["class_index"], info["url"], info["license"])
        return ("\t".join(_one_line(v) for v in fields) + "\n").encode("utf-8")
    raise ValueError(f"unknown label format {fmt!r}; valid: json, csv, yaml, txt")


def to_accepted_table(rows: Rows) -> pa.Table:
    """Rows as a table of ``ACCEPTED_SCHEMA``: a list of dicts, an Arrow table, a pandas
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
        return pa.Table.from_pylist(list(rows), schema=ACCEPTED_SCHEMA)
    columns = []
    for f in ACCEPTED_SCHEMA:
        if f.name in table.column_names:
            columns.append(table[f.name].cast(f.type))
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=ACCEPTED_SCHEMA)


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
    if any(p in ("", ".", "..") for p in parts) or parts[0] == STAGING:
        return None
    return path


def image_rel(row: dict[str, Any]) -> str:
    """Where an image lives in the ImageFolder tree: imagefolder/{split}/{label}/{id}.{ext}."""
    ext = extension_of(row["format"], row.get("image"))
    return "imagefolder/" + "/".join([row["split"], *check_label_path(row["label"]),
                                      f"{row['id']}.{ext}"])


def manifest_row(row: dict[str, Any], shard: int, formats: set[str]) -> dict[str, Any]:
    """The manifest entry of an output row written in ``shard``: the path points into the
    ImageFolder tree if written, else the Parquet shard, else the tar."""
    name = f"{row['split']}-{shard:05d}"
    if "imagefolder" in formats:
        path = image_rel(row)
    elif "parquet" in formats:
        path = f"data/{name}.parquet"
    else:
        path = f"webdataset/{name}.tar"
    entry = {k: row.get(k) for k in _MANIFEST_KEYS if k not in ("path", "shard")}
    entry.update(path=path, shard=shard)
    return entry


class DatasetWriter:
    """Writes one job's dataset into staging, then publishes it (see the module docstring).

    ``labels`` (all the job's class labels) lets WebDataset shards carry ``{id}.cls``; pass the
    same labels to ``write_manifests``.
    """

    def __init__(self, output: OutputSpec, uri: str, job_id: str,
                 storage_options: Optional[dict[str, Any]] = None,
                 labels: Optional[Sequence[str]] = None):
        if not _JOB_ID_RE.match(job_id or ""):
            raise ValueError(f"job_id {job_id!r} must be letters, digits, '.', '_' or '-'")
        if is_local_uri(uri):
            uri = open_fs(uri)[1]
        self.output = output
        self.uri = uri.rstrip("/") if not uri.endswith("://") else uri
        self.job_id = job_id
        self.storage_options = dict(storage_options or {})
        self.labels = sorted(set(labels)) if labels is not None else None
        self.depth = depth_of(self.labels) if self.labels is not None else None
        self._card_inputs: Optional[dict[str, str]] = None

    # -- locations ------------------------------------------------------------------------

    @property
    def staging_uri(self) -> str:
        return join(self.uri, STAGING, self.job_id)

    def _fs(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """The filesystem and the dataset's root path in it (fsspec caches the instance)."""
        return open_fs(self.uri, self.storage_options)

    def _staged(self, fs_root: str, *parts: str) -> str:
        return "/".join([fs_root, STAGING, self.job_id, *parts])

    def _put(self, fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
        ensure_parent(fs, path)
        fs.pipe_file(path, data)

    # -- checks ---------------------------------------------------------------------------

    def check_output(self) -> None:
        """Fail early: ``OutputExistsError`` if a complete dataset is there and overwrite is off;
        ``StorageError`` if the location cannot be written."""
        fs, root = self._fs()
        with storage_errors(self.uri, "check"):
            self._refuse_existing(self._read_markers(fs, root))
        ensure_writable(self.staging_uri, self.storage_options)

    def _refuse_existing(self, markers: dict[str, dict[str, Any]]) -> None:
        if SUCCESS in markers and not self.output.overwrite:
            old = markers[SUCCESS]
            raise OutputExistsError(
                f"{self.uri} already holds a complete dataset (job {old.get('job_id', '?')}, "
                f"created {old.get('created', '?')}). Set output.overwrite: true to replace it, "
                "or choose another output.uri.")

    # -- shards ---------------------------------------------------------------------------

    def write_shard(self, rows: Rows, shard_index: int) -> list[dict[str, Any]]:
        """Write shard ``shard_index`` (Parquet / ImageFolder / WebDataset per split) to staging.

        Returns one manifest row per image, without the image bytes.
        """
        if shard_index < 0:
            raise ValueError(f"shard_index must be >= 0, got {shard_index}")
        table = to_accepted_table(rows)
        if table.num_rows == 0:
            return []
        self._check_rows(table)
        levels = pa.array([label.split("/") for label in table["label"].to_pylist()],
                          ACCEPTED_SCHEMA.field("label_levels").type)
        table = table.set_column(ACCEPTED_SCHEMA.get_field_index("label_levels"),
                                 ACCEPTED_SCHEMA.field("label_levels"), levels)
        table = table.sort_by([("split", "ascending"), ("id", "ascending"),
                               ("label", "ascending")]).combine_chunks()
        formats = set(self.output.formats)
        fs, root = self._fs()
        manifest: list[dict[str, Any]] = []
        with storage_errors(self.staging_uri, f"write shard {shard_index} to"):
            for split in sorted(set(table["split"].to_pylist())):
                part = table.filter(pc.equal(table["split"], split))
                manifest += self._write_split(fs, root, part, split, shard_index, formats)
        return manifest

    def _check_rows(self, table: pa.Table) -> None:
        for column in ("id", "label", "split"):
            values = table[column]
            if values.null_count or pc.any(pc.equal(values, "")).as_py():
                raise ValueError(f"every accepted row needs a non-empty {column!r}")
        for label in set(table["label"].to_pylist()):
            check_label_path(label)
            if self.labels is not None and label not in self.labels:
                raise ValueError(f"label {label!r} is not one of the writer's labels "
                                 f"{self.labels}")
        for split in set(table["split"].to_pylist()):
            if bad_name(split):
                raise ValueError(f"bad split name {split!r}")

    def _write_split(self, fs: fsspec.AbstractFileSystem, root: str, table: pa.Table,
                     split: str, shard: int, formats: set[str]) -> list[dict[str, Any]]:
        name = f"{split}-{shard:05d}"
        parquet_rel = f"data/{name}.parquet"
        tar_rel = f"webdataset/{name}.tar"
        # Python rows carry the image bytes only for the formats that write files per image,
        # and the rights ledger only for WebDataset's {id}.json (nothing else reads it here).
        rows = table.drop_columns(["image"] if "webdataset" in formats
                                  else ["image", "rights"]).to_pylist()
        if formats & {"imagefolder", "webdataset"}:
            for r, image in zip(rows, table["image"].to_pylist()):
                r["image"] = image
        image_rels = [image_rel(r) for r in rows] if "imagefolder" in formats else []
        if "parquet" in formats:
            path = self._staged(root, parquet_rel)
            ensure_parent(fs, path)
            with fs.open(path, "wb") as f:
                pq.write_table(table, f, **_PARQUET_OPTIONS)
        if "imagefolder" in formats:
            files = {self._staged(root, rel): r["image"] or b"" for rel, r in zip(image_rels, rows)}
            for path in files:
                ensure_parent(fs, path)
            files.update(self._image_label_files(root, image_rels, rows))
            fs.pipe(files)
        if "webdataset" in formats:
            self._write_tar(fs, self._staged(root, tar_rel), rows)
        return [manifest_row(r, shard, formats) for r in rows]

    def _image_label_files(self, root: str, image_rels: list[str],
                           rows: list[dict[str, Any]]) -> dict[str, bytes]:
        """The per-image label files of these rows (``output.image_label_files``), by path."""
        fmts = self.output.image_label_files
        if not fmts:
            return {}
        index = class_index(self.labels) if self.labels is not None else {}
        depth = self.depth if self.depth is not None else depth_of([r["label"] for r in rows])
        files = {}
        for rel, r in zip(image_rels, rows):
            stem, name = rel.rsplit(".", 1)[0], rel.rsplit("/", 1)[-1]
            info = image_label_info(r, name, index.get(r["label"]))
            for fmt in fmts:
                files[self._staged(root, f"{stem}.{fmt}")] = render_image_label(fmt, info, depth)
        return files

    def _write_tar(self, fs: fsspec.AbstractFileSystem, path: str,
                   rows: list[dict[str, Any]]) -> None:
        index = class_index(self.labels) if self.labels is not None else None
        ensure_parent(fs, path)
        with fs.open(path, "wb") as f, tarfile.open(fileobj=f, mode="w|",
                                                    format=tarfile.USTAR_FORMAT) as tar:
            for r in rows:
                key = r["id"]
                image = r["image"] or b""
                _tar_member(tar, f"{key}.{extension_of(r['format'], image)}", image)
                if index is not None:
                    _tar_member(tar, f"{key}.cls", str(index[r["label"]]).encode())
                meta = {k: v for k, v in r.items() if k != "image"}
                _tar_member(tar, f"{key}.json",
                            json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"))

    # -- manifests, rejects, stats, card ---------------------------------------------------

    def write_manifests(self, manifest_rows: list[dict[str, Any]], labels: Sequence[str]) -> None:
        """``labels.*`` (per ``output.label_formats``) and ``classes.json`` / ``classes.txt``."""
        index = class_index([*labels, *(r["label"] for r in manifest_rows)])
        if self.labels is not None and list(index) != self.labels:
            raise ValueError(f"write_manifests labels {list(index)} differ from the writer's "
                             f"labels {self.labels}, which numbered the WebDataset .cls files")
        depth = depth_of(list(index))
        entries = [
            {"id": r["id"], "path": r["path"], "label": r["label"],
             "label_index": index[r["label"]], "split": r["split"],
             **level_columns(r["label"], depth)}
            for r in sorted(manifest_rows, key=lambda r: (r["split"], r["label"], r["id"]))
        ]
        columns = [*_LABEL_COLUMNS, *level_columns("", depth)]
        files: dict[str, bytes] = {
            "classes.json": _json_bytes(index),
            "classes.txt": "".join(f"{label}\n" for label in index).encode("utf-8"),
        }
        for fmt in self.output.label_formats:
            files[f"labels.{fmt}"] = _render_labels(fmt, entries, columns)
        fs, root = self._fs()
        with storage_errors(self.staging_uri, "write manifests to"):
            for rel, data in files.items():
                self._put(fs, self._staged(root, rel), data)

    def write_rejects(self, reject_rows: list[dict[str, Any]]) -> None:
        """``rejects.parquet`` and ``rejects.csv``: one row per rejected candidate."""
        table = pa.Table.from_pylist(list(reject_rows), schema=REJECT_SCHEMA)
        if table.num_rows:
            table = table.sort_by([("key", "ascending"), ("stage", "ascending"),
                                   ("reason", "ascending")])
        buf = io.BytesIO()
        pq.write_table(table, buf, **_REJECT_PARQUET_OPTIONS)
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(REJECT_SCHEMA.names)
        for row in table.to_pylist():
            writer.writerow(["" if row[n] is None else row[n] for n in REJECT_SCHEMA.names])
        fs, root = self._fs()
        with storage_errors(self.staging_uri, "write rejects to"):
            self._put(fs, self._staged(root, "rejects.parquet"), buf.getvalue())
            self._put(fs, self._staged(root, "rejects.csv"), text.getvalue().encode("utf-8"))

    def write_stats(self, stats: dict[str, Any]) -> None:
        """``stats.json``, as given."""
        fs, root = self._fs()
        with storage_errors(self.staging_uri, "write stats to"):
            self._put(fs, self._staged(root, "stats.json"), _json_bytes(stats))

    def write_card(self, spec_name: str, description: str, stats: dict[str, Any],
                   spec_yaml: str) -> None:
        """``README.md``, the dataset card; call after the shards are written (it lists the
        splits that have Parquet shards)."""
        self._card_inputs = {"spec_name": spec_name, "description": description,
                             "spec_yaml": spec_yaml}
        fs, root = self._fs()
        with storage_errors(self.staging_uri, "write the dataset card to"):
            self._write_card(fs, root, stats, None)

    def _write_card(self, fs: fsspec.AbstractFileSystem, root: str, stats: dict[str, Any],
                    partial_reason: Optional[str]) -> None:
        inputs = self._card_inputs or {"spec_name": str(stats.get("name") or self.job_id),
                                       "description": "", "spec_yaml": ""}
        text = card_mod.render_card(
            inputs["spec_name"], inputs["description"], stats, inputs["spec_yaml"],
            parquet_splits=self._parquet_splits(fs, root), formats=self.output.formats,
            label_formats=self.output.label_formats, partial_reason=partial_reason,
            labels=self.labels or (), image_label_files=self.output.image_label_files)
        self._put(fs, self._staged(root, "README.md"), text.encode("utf-8"))

    def _parquet_splits(self, fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
        found = set()
        for path in list_files(fs, self._staged(root, "data")):
            m = _SHARD_NAME_RE.match(path.rsplit("/", 1)[-1])
            if m:
                found.add(m.group("split"))
        order = list(self.output.splits)
        return sorted(found, key=lambda s: (order.index(s) if s in order else len(order), s))

    # -- publishing -----------------------------------------------------------------------

    def publish(self, overwrite: Optional[bool] = None, merge: bool = False) -> str:
        """Move the staged dataset into place and write ``_SUCCESS`` last; returns the URI.

        ``OutputExistsError`` if a complete dataset is there and overwrite is off (default:
        ``output.overwrite``); staging is then kept, so call ``abort()`` or publish again.
        ``merge=True`` adds the staged files to the dataset already there (a resumed partial
        dataset, or ``retry-failed``): nothing old is removed except files the staging
        replaces, and the marker lists the union.
        """
        return self._publish(SUCCESS, None, overwrite, merge)

    def publish_partial(self, reason: str, merge: bool = False) -> str:
        """Publish what was staged as a partial dataset: ``_PARTIAL`` instead of ``_SUCCESS``,
        ``"partial": true`` in stats.json and a PARTIAL notice on the card."""
        fs, root = self._fs()
        with storage_errors(self.staging_uri, "mark partial in"):
            stats_path = self._staged(root, "stats.json")
            fs.invalidate_cache(stats_path)
            stats = json.loads(fs.cat_file(stats_path)) if fs.exists(stats_path) else {
                "job_id": self.job_id}
            stats["partial"] = True
            stats["partial_reason"] = reason
            self._put(fs, stats_path, _json_bytes(stats))
            card_path = self._staged(root, "README.md")
            if self._card_inputs is None and fs.exists(card_path):
                text = fs.cat_file(card_path).decode("utf-8")
                self._put(fs, card_path, card_mod.mark_partial(text, reason).encode("utf-8"))
            else:
                self._write_card(fs, root, stats, reason)
        return self._publish(PARTIAL, reason, None, merge)

    def abort(self) -> None:
        """Remove this job's staging directory; the published location is untouched."""
        fs, root = self._fs()
        staging = self._staged(root)
        with storage_errors(self.staging_uri, "remove"):
            fs.invalidate_cache(staging)
            if fs.exists(staging):
                fs.rm(staging, recursive=True)
            prune_empty_dirs(fs, "/".join([root, STAGING]))

    def _read_markers(self, fs: fsspec.AbstractFileSystem, root: str) -> dict[str, dict]:
        markers = {}
        for name in (SUCCESS, PARTIAL, PUBLISHING):
            path = f"{root}/{name}"
            fs.invalidate_cache(path)
            if fs.exists(path):
                try:
                    content = json.loads(fs.cat_file(path))
                except ValueError:
                    content = {}
                markers[name] = content if isinstance(content, dict) else {}
        return markers

    def _publish(self, marker: str, reason: Optional[str], overwrite: Optional[bool],
                 merge: bool = False) -> str:
        fs, root = self._fs()
        staging = self._staged(root)
        with storage_errors(self.uri, "publish to"):
            fs.invalidate_cache(staging)
            staged = (fs.find(staging, withdirs=False, detail=True)
                      if fs.exists(staging) else {})
            sizes = {path[len(staging) + 1:]: int(info.get("size") or 0)
                     for path, info in staged.items()}
            markers = self._read_markers(fs, root)
            if overwrite is None:
                overwrite = self.output.overwrite
            if not overwrite and not merge:
                self._refuse_existing(markers)
            kept: dict[str, int] = {}
            if merge:
                for content in (markers.get(SUCCESS), markers.get(PARTIAL)):
                    for entry in (content or {}).get("files") or []:
                        rel = _safe_relative(entry.get("path") if isinstance(entry, dict)
                                             else entry)
                        if rel and rel not in (SUCCESS, PARTIAL, PUBLISHING):
                            kept[rel] = int(entry.get("size") or 0) if isinstance(
                                entry, dict) else 0
            # Our own interrupted publish: what it listed and staging no longer holds is in place.
            ours = markers.get(PUBLISHING, {})
            placed = [rel for rel in (ours.get("files") or [])
                      if ours.get("job_id") == self.job_id and _safe_relative(rel)
                      and rel not in sizes]
            self._put(fs, f"{root}/{PUBLISHING}",
                      _json_bytes({"job_id": self.job_id, "started": _now(),
                                   "files": sorted([*sizes, *placed])}))
            old_markers = [f"{root}/{m}" for m in (SUCCESS, PARTIAL) if m in markers]
            if old_markers:
                fs.rm(old_markers)
            if not merge:
                self._remove_old(fs, root, markers, keep={f"{root}/{rel}" for rel in placed})
            stats: dict[str, Any] = {}
            if "stats.json" in sizes or "stats.json" in placed:
                where = staging if "stats.json" in sizes else root
                stats = json.loads(fs.cat_file(f"{where}/stats.json"))
            move_files(fs, [(f"{staging}/{rel}", f"{root}/{rel}") for rel in sorted(sizes)])
            for rel in placed:
                path = f"{root}/{rel}"
                fs.invalidate_cache(path)
                if fs.exists(path):
                    sizes[rel] = int(fs.size(path))
            for rel, size in kept.items():
                sizes.setdefault(rel, size)
            files = sorted(sizes.items())
            content: dict[str, Any] = {
                "job_id": self.job_id, "created": _now(),
                "status": "complete" if marker == SUCCESS else "partial"}
            if reason is not None:
                content["reason"] = reason
            content["counts"] = {
                "files": len(files), "bytes": sum(size for _, size in files),
                **{k: stats[k] for k in ("candidates", "accepted", "rejected") if k in stats},
                "classes": len(stats.get("classes") or {})}
            content["files"] = [{"path": rel, "size": size} for rel, size in files]
            self._put(fs, f"{root}/{marker}", _json_bytes(content))
            fs.rm(f"{root}/{PUBLISHING}")
            fs.invalidate_cache(staging)
            if fs.exists(staging):
                fs.rm(staging, recursive=True)
            prune_empty_dirs(fs, staging)
            prune_empty_dirs(fs, f"{root}/{STAGING}")
        return self.uri

    def _remove_old(self, fs: fsspec.AbstractFileSystem, root: str,
                    markers: dict[str, dict[str, Any]], keep: set[str]) -> None:
        """Remove a previous dataset's files: those its markers list, plus the layout trees,
        except ``keep`` (files this job's interrupted publish already put in place)."""
        if not markers:
            return
        listed: set[str] = set()
        for content in markers.values():
            for entry in content.get("files") or []:
                rel = _safe_relative(entry.get("path") if isinstance(entry, dict) else entry)
                # Files under the layout trees are found by listing them below.
                if rel and rel.split("/")[0] not in LAYOUT_DIRS \
                        and rel not in (SUCCESS, PARTIAL, PUBLISHING):
                    listed.add(f"{root}/{rel}")
        old = {p for p in listed if fs.exists(p)}
        for d in LAYOUT_DIRS:
            old.update(list_files(fs, f"{root}/{d}"))
        old -= keep
        if old:
            fs.rm(sorted(old))
        for d in LAYOUT_DIRS:
            prune_empty_dirs(fs, f"{root}/{d}")


def _render_labels(fmt: str, entries: list[dict[str, Any]], columns: Sequence[str]) -> bytes:
    if fmt == "json":
        body = ",\n".join("  " + json.dumps(e, ensure_ascii=False) for e in entries)
        return ("[\n" + body + "\n]\n" if entries else "[]\n").encode("utf-8")
    if fmt == "csv":
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(entries)
        return text.getvalue().encode("utf-8")
    if fmt == "yaml":
        if not entries:
            return b"[]\n"
        return "".join(f"- {_yaml_flow(e)}\n" for e in entries).encode("utf-8")
    if fmt == "txt":
        return "".join(f"{e['path']}\t{e['label']}\n" for e in entries).encode("utf-8")
    raise ValueError(f"unknown label format {fmt!r}; valid: json, csv, yaml, txt")


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
        for name in (SUCCESS, PARTIAL):
            path = f"{root}/{name}"
            fs.invalidate_cache(path)
            if fs.exists(path):
                try:
                    content = json.loads(fs.cat_file(path))
                except ValueError:
                    content = {}
                return {"marker": name, **(content if isinstance(content, dict) else {})}
    return None


def is_complete(uri: str, storage_options: Optional[dict[str, Any]] = None) -> bool:
    """Whether ``uri`` holds a complete dataset (its ``_SUCCESS`` exists)."""
    fs, root = open_fs(uri, storage_options)
    path = f"{root}/{SUCCESS}"
    with storage_errors(uri, "check"):
        fs.invalidate_cache(path)
        return bool(fs.exists(path))


def read_dataset(uri: str, storage_options: Optional[dict[str, Any]] = None) -> pa.Table:
    """All Parquet shards of the dataset at ``uri`` as one table (shards in name order)."""
    fs, root = open_fs(uri, storage_options)
    with storage_errors(uri, "read"):
        paths = [p for p in list_files(fs, f"{root}/data") if p.endswith(".parquet")]
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
