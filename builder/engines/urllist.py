"""URL lists: txt (one URL a line, or ``label<TAB>url``), csv, jsonl or parquet with columns
(url, label and, with ``caption_column``, a caption per image)."""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from pathlib import Path

from builder.engines.base import SearchEngine, SearchHit, SearchPage
from builder.errors import SourceError


def read_url_list(path: str, *, url_column: str = "url", label_column: str = "label",
                  default_label: str = "") -> list[tuple[str, str]]:
    """Read ``(label, url)`` pairs from a list file; the format is chosen by its extension."""
    return [(label, url) for label, url, _ in read_url_rows(
        path, url_column=url_column, label_column=label_column, default_label=default_label)]


def read_url_rows(path: str, *, url_column: str = "url", label_column: str = "label",
                  default_label: str = "", caption_column: str | None = None
                  ) -> list[tuple[str, str, str]]:
    """Read ``(label, url, caption)`` rows from a list file (caption '' without
    ``caption_column``, or where the row has none)."""
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"URL list not found: {p} (sources[].path must name an existing file)")
    suffix = p.suffix.lower()
    rows: list[tuple[str, dict]] = []  # (where, row): "file:line" or "file: row n" for errors
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = [(f"{p}: row {n}", row) for n, row in enumerate(pq.read_table(p).to_pylist())]
    elif suffix in (".jsonl", ".ndjson"):
        with p.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise SourceError(f"{p}:{n}: not valid JSON ({exc})") from None
                    if not isinstance(row, dict):
                        raise SourceError(f"{p}:{n}: expected a JSON object with a "
                                          f"{url_column!r} key, got {type(row).__name__} "
                                          f"{line.strip()[:80]}")
                    rows.append((f"{p}:{n}", row))
    elif suffix in (".csv", ".tsv"):
        text = p.read_text(encoding="utf-8")
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        rows = [(f"{p}:{reader.line_num}", row) for row in reader]
    else:
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "\t" in line:
                label, url = line.split("\t", 1)
                rows.append((f"{p}:{n}", {label_column: label.strip(), url_column: url.strip()}))
            else:
                rows.append((f"{p}:{n}", {url_column: line}))
    out = []
    for where, row in rows:
        if url_column not in row:
            raise SourceError(f"{where}: no column {url_column!r} "
                              f"(columns: {', '.join(map(str, row))}); set sources[].url_column")
        url = row[url_column]
        if url is None:
            url = ""
        if not isinstance(url, str):
            raise SourceError(f"{where}: {url_column!r} must be a string URL, got "
                              f"{type(url).__name__} {str(url)[:80]}")
        label = str(row.get(label_column) or default_label)
        caption = row.get(caption_column) if caption_column else None
        out.append((label, url, caption if isinstance(caption, str) else ""))
    return out


class UrlListEngine(SearchEngine):
    """Candidates straight from a list file; labels from its label column."""

    name = "urllist"
    query_based = False

    def __init__(self, path: str, *, url_column: str = "url", label_column: str = "label",
                 labels: list[str] | None = None, caption_column: str | None = None):
        rows = read_url_rows(path, url_column=url_column, label_column=label_column,
                             default_label=labels[0] if labels and len(labels) == 1 else "",
                             caption_column=caption_column)
        self._by_label: dict[str, list[str]] = defaultdict(list)
        self._captions: dict[str, str] = {}
        for label, url, caption in rows:
            self._by_label[label].append(url)
            if caption:
                self._captions[url] = caption
        if labels is not None:
            unknown = sorted(set(self._by_label) - set(labels))
            if unknown:
                raise SourceError(f"{path}: labels {unknown} are not classes of the spec "
                                  f"(classes: {', '.join(labels)})")

    def search(self, query: str, *, label: str, page: int, per_page: int) -> SearchPage:
        urls = self._by_label.get(label, [])
        start = page * per_page
        chunk = urls[start:start + per_page]
        hits = [SearchHit(url=u, rank=start + i, caption=self._captions.get(u, ""))
                for i, u in enumerate(chunk)]
        return SearchPage(hits=hits, has_more=start + per_page < len(urls))


class InlineUrlsEngine(UrlListEngine):
    """The per-class ``urls`` of a spec, as a source."""

    name = "inline"

    def __init__(self, urls_by_label: dict[str, list[str]]):
        self._by_label = defaultdict(list, {k: list(v) for k, v in urls_by_label.items()})
        self._captions = {}
