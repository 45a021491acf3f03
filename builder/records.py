"""The typed units of work that pass between stages, and the output schemas.

A ``Candidate`` is what a search source yields. A ``Record`` wraps one candidate on its way through
the pipeline: the fetcher fills ``data`` and the rights ledger (``rights``: every opt-out signal
checked, ``builder.rights``); validation fills the image facts; hashing fills the hashes; a stage
that rejects calls ``reject()``. A record is decided exactly once: accepted (it
reaches the writer) or rejected (it reaches the rejects manifest), so
``accepted + rejected == candidates`` by construction.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from collections.abc import Sequence
from typing import Any, Optional

import pyarrow as pa

from builder.reasons import Reason, Stage, stage_of
from builder.rights import RIGHTS_TYPE, Signal, rights_rows
from builder.text import well_formed


@dataclass(frozen=True)
class Candidate:
    """One image URL found by a source, with where it came from."""

    url: str
    label: str
    query: str = ""
    engine: str = ""
    rank: int = 0
    page_url: str = ""
    title: str = ""
    license: str = ""
    author: str = ""
    caption: str = ""

    def __post_init__(self) -> None:
        # Text from a page, a list or a search answer may hold lone surrogates (``builder.text``)
        if "".join((self.url, self.label, self.query, self.engine, self.page_url, self.title,
                    self.license, self.author, self.caption)).isascii():
            return
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str):
                object.__setattr__(self, f.name, well_formed(value))

    @cached_property
    def key(self) -> str:
        """A stable id for the candidate (label + URL); used for resume and accounting. Worked
        out once: a unit asks for it at each stage (a frozen candidate cannot change it)."""
        return candidate_key(self.label, self.url)


def candidate_key(label: str, url: str) -> str:
    """``Candidate.key`` of a candidate found under ``label`` at ``url``."""
    return hashlib.sha1(f"{label}\n{url}".encode()).hexdigest()[:16]


@dataclass
class Record:
    """A candidate in flight, with what the stages learned about it."""

    candidate: Candidate
    data: Optional[bytes] = None
    final_url: str = ""
    http_status: int = 0
    content_type: str = ""
    fetch_ms: float = 0.0
    format: str = ""
    width: int = 0
    height: int = 0
    orig_width: int = 0
    orig_height: int = 0
    sha256: str = ""
    phash: str = ""
    dhash: str = ""
    near_stored: tuple[tuple[int, int], ...] = ()
    """Stored near-duplicate signatures ``(a, b)`` (``builder.similarity``)."""
    near_probes: tuple[tuple[int, int], ...] = ()
    """Probe signatures, looked up against the kept images' stored ones."""
    colour: bool = True
    jpeg_quality: int = 0  # estimated from the quantisation tables; 0 if not a JPEG
    nsfw_score: Optional[float] = None
    clip_score: Optional[float] = None
    embedding: Optional[list[float]] = None
    split: str = ""
    rejected: bool = False
    stage: str = ""
    reason: str = ""
    detail: str = ""
    duplicate_of: str = ""
    downloaded_bytes: int = 0
    """Size of the downloaded bytes (kept when ``data`` is dropped or rewritten)."""
    relabelled_from: str = ""
    """The label it was found under, when the slow level moved it to another class."""
    held_on: str = ""
    """The id of an image still undecided (kept by the slow level, its quota not yet granted)
    whose near copy the slow level's embedding store found this one: the unit decides it
    again once that image is, with ``held_detail`` the detail should it be its duplicate."""
    held_detail: str = ""
    rights: tuple[Signal, ...] = ()
    caption: str = ""

    @property
    def id(self) -> str:
        """The content-hash id of an accepted image (first 16 hex of sha256 of its bytes)."""
        if self.sha256:
            return self.sha256[:16]
        if self.data is not None:
            return hashlib.sha256(self.data).hexdigest()[:16]
        return ""

    @property
    def label(self) -> str:
        return self.candidate.label

    @property
    def found_key(self) -> str:
        """The candidate's key under the label it was found under: what its claims in the
        index and the journal are made from, so a relabel (which replaces ``candidate``)
        does not move them."""
        if not self.relabelled_from:
            return self.candidate.key
        return candidate_key(self.relabelled_from, self.candidate.url)

    def reject(self, reason: Reason, detail: str = "", duplicate_of: str = "") -> "Record":
        """Mark this record rejected; its bytes are dropped (they never reach the output)."""
        self.rejected = True
        self.stage = stage_of(reason).value
        self.reason = reason.value
        self.detail = well_formed(detail[:500])
        self.duplicate_of = duplicate_of
        self.data = None
        return self

    @property
    def stage_enum(self) -> Optional[Stage]:
        return Stage(self.stage) if self.stage else None

    def dedup_signatures(self) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
        """(stored, probe) near-duplicate signatures: those the validator set
        (``builder.similarity``), else the whole image's (pHash, dHash)."""
        if self.near_stored:
            return self.near_stored, self.near_probes or self.near_stored
        own = ((int(self.phash or "0", 16), int(self.dhash or "0", 16)),)
        return own, own


def _row_fields(label: pa.Field, image: pa.Field, extra: tuple[pa.Field, ...] = ()
                ) -> list[pa.Field]:
    return [
        pa.field("id", pa.string(), nullable=False),
        label,
        *extra,
        pa.field("label_levels", pa.list_(pa.string())),
        pa.field("split", pa.string()),
        image,
        pa.field("format", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("orig_width", pa.int32()),
        pa.field("orig_height", pa.int32()),
        pa.field("bytes", pa.int64()),
        pa.field("sha256", pa.string()),
        pa.field("phash", pa.string()),
        pa.field("dhash", pa.string()),
        pa.field("url", pa.string()),
        pa.field("final_url", pa.string()),
        pa.field("page_url", pa.string()),
        pa.field("title", pa.string()),
        pa.field("query", pa.string()),
        pa.field("engine", pa.string()),
        pa.field("rank", pa.int32()),
        pa.field("license", pa.string()),
        pa.field("author", pa.string()),
        pa.field("nsfw_score", pa.float32()),
        pa.field("clip_score", pa.float32()),
        pa.field("embedding", pa.list_(pa.float32())),
        pa.field("caption", pa.string()),
        pa.field("rights", RIGHTS_TYPE),
    ]


IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
"""The ``image`` column of the shards: Hugging Face's ``Image`` storage, the stored bytes and
the image's file name (``{id}.{ext}``, as in the ImageFolder tree)."""

ROW_SCHEMA = pa.schema(_row_fields(pa.field("label", pa.string(), nullable=False),
                                   pa.field("image", pa.binary())))
"""Accepted rows as the stages hand them to the writer: ``label`` the label path, ``image`` the
bytes (``accepted_row``). The writer turns them into ``ACCEPTED_SCHEMA`` (``output_table``)."""

ACCEPTED_SCHEMA = pa.schema(_row_fields(
    pa.field("label", pa.int64()), pa.field("image", IMAGE_TYPE),
    (pa.field("label_name", pa.string(), nullable=False),)))
"""Schema of the Parquet shards: one row per accepted image. ``label`` is the class index (in
``classes.json``), ``label_name`` the label path, ``image`` {bytes, path}. Each shard's schema
metadata declares its Hugging Face features (``shard_schema``)."""

ACCEPTED_DOCS: dict[str, str] = {
    "id": "content-hash id: first 16 hex digits of sha256 of the stored image bytes' source",
    "label": "the class index: line number in classes.txt of the label (a ClassLabel for "
             "Hugging Face datasets)",
    "label_name": "the class label: its full path for a hierarchical spec (mammals/dog)",
    "label_levels": "the label's hierarchy levels, top first (['mammals', 'dog'])",
    "split": "train / validation / test (or as the spec names them), deterministic by id",
    "image": "{bytes, path}: the image bytes as stored (original, or resized / re-encoded per "
             "output options) and its file name {id}.{ext} (an Image for Hugging Face datasets)",
    "format": "format of the stored bytes: jpeg, png, webp, gif",
    "width": "width of the stored image in pixels",
    "height": "height of the stored image in pixels",
    "orig_width": "width of the downloaded image before any resizing",
    "orig_height": "height of the downloaded image before any resizing",
    "bytes": "size of the stored image bytes",
    "sha256": "sha256 of the downloaded bytes (hex)",
    "phash": "64-bit perceptual hash (DCT), 16 hex digits",
    "dhash": "64-bit difference hash, 16 hex digits",
    "url": "the candidate URL",
    "final_url": "the URL after redirects",
    "page_url": "the page the image was found on, where the engine gives it",
    "title": "the title the engine gave",
    "query": "the search query that found the image",
    "engine": "the source that found it",
    "rank": "its rank in the engine's results",
    "license": "license, where the engine gives it",
    "author": "author, where the engine gives it",
    "nsfw_score": "NSFW probability (slow level only, else null)",
    "clip_score": "CLIP similarity to the class prompts (slow level only, else null)",
    "embedding": "CLIP image embedding, L2-normalised (validation.keep_embedding, else null)",
    "caption": "the text the engine or page gives for the image (alt text, description, else "
               "its title)",
    "rights": "the rights ledger: each opt-out signal checked, as {signal, value, source, "
              "verdict} (allow / refuse / none), in the order checked",
}

_HF_DTYPES = {pa.string(): "string", pa.binary(): "binary", pa.int32(): "int32",
              pa.int64(): "int64", pa.float32(): "float32", pa.float64(): "float64",
              pa.bool_(): "bool"}


def _hf_feature(type_: pa.DataType) -> Any:
    """An Arrow type as a Hugging Face feature in its JSON form (a list is ``[feature]``, the
    form every ``datasets`` release reads)."""
    if pa.types.is_list(type_):
        return [_hf_feature(type_.value_type)]
    if pa.types.is_struct(type_):
        return {f.name: _hf_feature(f.type) for f in type_}
    return {"dtype": _HF_DTYPES[type_], "_type": "Value"}


def hf_features(labels: Sequence[str]) -> dict[str, Any]:
    """The Hugging Face ``datasets`` features of the shards (``Features.to_dict`` form):
    ``image`` an ``Image``, ``label`` a ``ClassLabel`` named by ``labels`` (the sorted label
    paths, as in classes.json), every other column typed as stored."""
    out: dict[str, Any] = {}
    for f in ACCEPTED_SCHEMA:
        if f.name == "image":
            out[f.name] = {"_type": "Image"}
        elif f.name == "label":
            out[f.name] = {"names": list(labels), "_type": "ClassLabel"}
        else:
            out[f.name] = _hf_feature(f.type)
    return out


def shard_schema(labels: Sequence[str]) -> pa.Schema:
    """``ACCEPTED_SCHEMA`` with its Hugging Face features in the schema metadata (key
    ``huggingface``, as ``datasets`` writes it), so ``load_dataset`` types the columns."""
    meta = {"info": {"features": hf_features(labels)}}
    return ACCEPTED_SCHEMA.with_metadata({"huggingface": json.dumps(meta, ensure_ascii=False)})


REJECT_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("label", pa.string()),
        pa.field("query", pa.string()),
        pa.field("engine", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("duplicate_of", pa.string()),
        pa.field("http_status", pa.int32()),
        pa.field("rights", RIGHTS_TYPE),
        pa.field("rank", pa.int32()),
        pa.field("page_url", pa.string()),
        pa.field("title", pa.string()),
        pa.field("license", pa.string()),
        pa.field("author", pa.string()),
        pa.field("caption", pa.string()),
    ]
)
"""Schema of ``rejects.parquet``: one row per rejected candidate. ``rights`` is the candidate's
ledger as far as it got (what a continuing run takes out of the published rights summary when
it decides the reject again); null in the rows of datasets written before it was kept. The
columns after it are the rest of the candidate, as its source found it, so that
``retry-failed`` decides the same candidate again (its page read for ``page_meta``, its
license and author kept); null in the rows of datasets written before they were kept."""

CANDIDATE_FIELDS = ("rank", "page_url", "title", "license", "author", "caption")
"""The candidate's own fields a reject row keeps besides its url, label, query and engine."""


def accepted_row(record: Record) -> dict[str, Any]:
    """The row of an accepted record, per ``ROW_SCHEMA``."""
    c = record.candidate
    return {
        "id": record.id,
        "label": c.label,
        "label_levels": c.label.split("/"),
        "split": record.split,
        "image": record.data,
        "format": record.format,
        "width": record.width,
        "height": record.height,
        "orig_width": record.orig_width or record.width,
        "orig_height": record.orig_height or record.height,
        "bytes": len(record.data or b""),
        "sha256": record.sha256,
        "phash": record.phash,
        "dhash": record.dhash,
        "url": c.url,
        "final_url": record.final_url or c.url,
        "page_url": c.page_url,
        "title": c.title,
        "query": c.query,
        "engine": c.engine,
        "rank": c.rank,
        "license": c.license,
        "author": c.author,
        "nsfw_score": record.nsfw_score,
        "clip_score": record.clip_score,
        "embedding": record.embedding,
        "caption": record.caption or c.caption or c.title,
        "rights": rights_rows(record.rights),
    }


def with_columns(table: pa.Table, schema: pa.Schema, names: Sequence[str]) -> pa.Table:
    """``table``'s columns ``names``, in that order; one it lacks (a file written before the
    column was added) comes as nulls of its type in ``schema``. Parquet readers asked for a
    column a file lacks leave it out, so a read followed by this reads old files too."""
    if table.column_names == list(names):
        return table
    have = set(table.column_names)
    fields = [table.schema.field(n) if n in have else schema.field(n) for n in names]
    return pa.table([table[n] if n in have else pa.nulls(table.num_rows, schema.field(n).type)
                     for n in names], schema=pa.schema(fields))


def reject_row(record: Record, rejected: bool = True) -> dict[str, Any]:
    """The rejects-manifest row of a rejected record, per ``REJECT_SCHEMA``; with ``rejected``
    false (an accepted record's decision, in the journal) its ``rights`` and the candidate's
    other fields are null: they are in its shard's row."""
    c = record.candidate
    row = {
        "key": c.key,
        "url": c.url,
        "label": c.label,
        "query": c.query,
        "engine": c.engine,
        "stage": record.stage,
        "reason": record.reason,
        "detail": record.detail,
        "duplicate_of": record.duplicate_of,
        "http_status": record.http_status,
        "rights": rights_rows(record.rights) if rejected else None,
    }
    if rejected:
        row.update((name, getattr(c, name)) for name in CANDIDATE_FIELDS)
    return row


def candidate_dict(candidate: Candidate) -> dict[str, Any]:
    return asdict(candidate)
