"""The dataset card: README.md at the root of a published dataset.

Markdown with YAML front matter in the shape Hugging Face dataset cards use, so the Hub (and
``datasets.load_dataset(URI)``) finds the Parquet splits from ``configs``. The body says what was
asked for and what came out: per-class counts and shortfalls, the class hierarchy (when labels
nest, as an indented tree with the counts summed over each subtree), rejects by reason, the
opt-out signals honoured and what they said (``stats['rights']``), the schema, the meaning of each
reason code and the spec that produced the dataset. ``stats`` keys
are read with ``.get``: a card renders from whatever stats the pipeline had.
"""

from __future__ import annotations

import html
import re
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Optional

import yaml

from builder.reasons import REASON_STAGE, Reason, reasons_markdown
from builder.records import ACCEPTED_DOCS, ACCEPTED_SCHEMA, REJECT_SCHEMA
from builder.rights import SIGNAL_DOCS

PARTIAL_MARKER = "> **PARTIAL DATASET**"


def _cell(value: Any) -> str:
    """A value made safe for a Markdown table cell: nothing in it ends the cell or the row,
    and no HTML tag or link in a source's text (a licence name is its uploader's: an
    ``<img>`` there was a tracking pixel in the card) is more than text."""
    text = "" if value is None else str(value)
    text = html.escape(text.replace("\\", "\\\\"), quote=False)
    for char in "|[]":
        text = text.replace(char, "\\" + char)
    return text.replace("\r", " ").replace("\n", " ")


def _size_category(n: int) -> str:
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
              (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")]
    for bound, name in bounds:
        if n < bound:
            return name
    return "n>10M"


HF_LICENSES = frozenset({
    "apache-2.0", "mit", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0",
    "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0",
    "cc-by-nd-4.0", "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0",
    "cc-by-nc-sa-4.0", "odc-by", "odbl", "pddl", "gfdl", "unlicense", "wtfpl", "bsd",
    "bsd-2-clause", "bsd-3-clause", "gpl-3.0", "lgpl-3.0", "agpl-3.0", "mpl-2.0"})
"""Licence identifiers a Hugging Face dataset card's ``license`` field takes (the ones an image
licence may map to; the Hub lists more)."""
_CC0 = ("cc0", "cc0-1.0", "cc-zero", "cc-0", "cc-cc0", "cc-cc0-1.0")


def hf_license(text: str) -> Optional[str]:
    """The Hugging Face card identifier of an image licence as an engine gives it (``CC BY-SA
    4.0``, ``CC-BY-4.0``, ``cc0``...), or None if it is none of ``HF_LICENSES``."""
    key = re.sub(r"[\s_]+", "-", text.strip().lower()).strip("-")
    key = re.sub(r"-+", "-", key)
    if key in _CC0:
        return "cc0-1.0"
    return key if key in HF_LICENSES else None


def license_ids(licenses: Mapping[str, int]) -> list[str]:
    """The card's ``license`` identifiers for the licences seen (licence text -> images):
    each one mapped, ``other`` for any that maps to none, ``unknown`` for images without."""
    ids: set[str] = set()
    for text, n in licenses.items():
        if n:
            ids.add((hf_license(text) or "other") if text.strip() else "unknown")
    return sorted(ids) or ["unknown"]


def front_matter(spec_name: str, stats: Mapping[str, Any], parquet_splits: Iterable[str],
                 licenses: Optional[Mapping[str, int]] = None) -> str:
    """The YAML header: name, task, size, the licences seen (``license_ids``) and a
    ``configs`` entry mapping splits to shards."""
    ids = license_ids(licenses or {})
    meta: dict[str, Any] = {
        "pretty_name": spec_name,
        "task_categories": ["image-classification"],
        "size_categories": [_size_category(int(stats.get("accepted") or 0))],
        "license": ids[0] if len(ids) == 1 else ids,
        "tags": ["pixcrawler", "web-images"],
    }
    splits = list(parquet_splits)
    if splits:
        meta["configs"] = [{
            "config_name": "default",
            "data_files": [{"split": s, "path": f"data/{s}-*.parquet"} for s in splits],
        }]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _class_table(stats: Mapping[str, Any]) -> str:
    classes = stats.get("classes") or {}
    if not classes:
        return "_No per-class figures were recorded._"
    lines = ["| class | target | candidates | accepted | shortfall | rejected |",
             "|---|---:|---:|---:|---:|---:|"]
    for label in sorted(classes):
        c = classes[label] or {}
        lines.append("| " + " | ".join(_cell(v) for v in (
            label, c.get("target", ""), c.get("candidates", ""), c.get("accepted", ""),
            c.get("shortfall", ""), c.get("rejected", ""))) + " |")
    return "\n".join(lines)


def _code(text: str) -> str:
    return "`" + text.replace("`", "'") + "`"


def _sum(values: list[Any]) -> Optional[int]:
    """The sum of a subtree's figures, or None unless every leaf has one."""
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return None
    return sum(values)


def hierarchy_markdown(labels: Iterable[str], stats: Mapping[str, Any]) -> str:
    """The class hierarchy as an indented Markdown list, one item per node; each item says
    how many images were accepted of the target, summed over its subtree, when stats have
    those figures for every leaf below it."""
    classes = stats.get("classes") or {}
    leaves = sorted(set(labels) | set(classes))
    tree: dict[str, Any] = {}
    for label in leaves:
        node = tree
        for part in label.split("/"):
            node = node.setdefault(part, {})
    lines: list[str] = []

    def walk(node: dict[str, Any], prefix: tuple[str, ...], indent: int) -> list[str]:
        below: list[str] = []
        for name, children in node.items():
            path = (*prefix, name)
            at = len(lines)
            lines.append("")
            subtree = walk(children, path, indent + 1) if children else ["/".join(path)]
            below += subtree
            figures = [classes.get(leaf) or {} for leaf in subtree]
            accepted = _sum([f.get("accepted") for f in figures])
            target = _sum([f.get("target") for f in figures])
            text = f"{'  ' * indent}- {_code(name)}"
            if children:
                text += f" ({len(subtree)} class{'es' if len(subtree) != 1 else ''})"
            if accepted is not None:
                text += f": {accepted} accepted" + (f" of {target}" if target is not None
                                                    else "")
            lines[at] = text
        return below

    walk(tree, (), 0)
    return "\n".join(lines)


def _reason_table(stats: Mapping[str, Any]) -> str:
    by_reason = stats.get("rejected_by_reason") or {}
    if not by_reason:
        return "_No candidate was rejected._"
    lines = ["| stage | reason | rejected |", "|---|---|---:|"]
    for reason, n in sorted(by_reason.items(), key=lambda kv: (-int(kv[1] or 0), kv[0])):
        try:
            stage = REASON_STAGE[Reason(reason)].value
        except ValueError:
            stage = ""
        lines.append(f"| {_cell(stage)} | `{_cell(reason)}` | {_cell(n)} |")
    return "\n".join(lines)


def rights_markdown(stats: Mapping[str, Any]) -> str:
    """The rights section: the signals honoured and, per signal, how many candidates had it
    checked, carried a value, were allowed and were refused by it."""
    rights = stats.get("rights") or {}
    honoured = list(rights.get("honoured") or [])
    signals = rights.get("signals") or {}
    if not honoured and not signals:
        return "_No opt-out signal was recorded._"
    lines = []
    if honoured:
        lines.append("Signals checked and honoured: " + ", ".join(_code(h) for h in honoured)
                     + ". A refusal rejects the image (`opted_out`, or `robots_disallowed` "
                     "for robots.txt rules), with the signal and where it was read in the "
                     "reject's detail.\n")
    lines.append(f"Candidates with a ledger: {_cell(rights.get('checked', 0))}; refused by a "
                 f"signal: {_cell(rights.get('refused', 0))}.\n")
    lines += ["| signal | what it is | checked | found | allowed | refused |",
              "|---|---|---:|---:|---:|---:|"]
    for name in sorted(signals, key=lambda n: (list(SIGNAL_DOCS).index(n)
                                               if n in SIGNAL_DOCS else len(SIGNAL_DOCS), n)):
        c = signals[name] or {}
        lines.append("| " + " | ".join([_code(name), _cell(SIGNAL_DOCS.get(name, ""))] + [
            _cell(c.get(k, 0)) for k in ("checked", "present", "allowed", "refused")]) + " |")
    if rights.get("earlier_ledgers"):
        lines.append(f"\nThese counts also hold the earlier ledgers of "
                     f"{_cell(rights['earlier_ledgers'])} rejects decided again by a later run: "
                     "the dataset's rejects did not record them, so they could not be taken "
                     "out.")
    lines.append("\nEach image's `rights` column lists every signal checked for it: its value, "
                 "where it was read (robots.txt group, header, well-known file, embedded XMP) "
                 "and the verdict; so does each reject's, in `rejects.parquet`. Consent can "
                 "change after a build: `pixcrawler recheck <uri>` "
                 "checks the signals again and lists the images to remove.")
    return "\n".join(lines)


def _schema_table() -> str:
    lines = ["| column | type | meaning |", "|---|---|---|"]
    for f in ACCEPTED_SCHEMA:
        lines.append(f"| `{f.name}` | {f.type} | {_cell(ACCEPTED_DOCS.get(f.name, ''))} |")
    return "\n".join(lines)


def _date(value: Any) -> Any:
    """A time as stats.json holds it (seconds since the epoch) as an ISO 8601 UTC date."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, timezone.utc).isoformat(timespec="seconds")
    return value


def _license_table(licenses: Mapping[str, int]) -> str:
    if not licenses:
        return "_No image was accepted._"
    lines = ["| licence (as the source gave it) | card id | images |", "|---|---|---:|"]
    for text, n in sorted(licenses.items(), key=lambda kv: (-kv[1], kv[0])):
        card_id = (hf_license(text) or "other") if text.strip() else "unknown"
        lines.append(f"| {_cell(text) or '_(none given)_'} | `{card_id}` | {n} |")
    return "\n".join(lines)


def _summary(stats: Mapping[str, Any]) -> str:
    rows = [("job", stats.get("job_id")), ("started", _date(stats.get("started"))),
            ("finished", _date(stats.get("finished"))),
            ("duration (s)", stats.get("duration_s")),
            ("candidates", stats.get("candidates")), ("accepted", stats.get("accepted")),
            ("rejected", stats.get("rejected"))]
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in rows if v is not None]
    return "\n".join(lines)


def _layout(formats: Iterable[str], label_formats: Iterable[str],
            image_label_files: Iterable[str] = (), nested: bool = False) -> str:
    formats = set(formats)
    label_formats = list(label_formats)
    image_label_files = list(image_label_files)
    lines = []
    if "parquet" in formats:
        lines.append("- `data/{split}-{shard:05d}.parquet`: Parquet shards, one row per image, "
                     "the image in column `image` (schema below); their schema declares the "
                     "Hugging Face features (`image` an Image, `label` a ClassLabel)")
    if "imagefolder" in formats and nested:
        lines.append("- `imagefolder/{split}/{label}/{id}.{ext}`: the images as files "
                     "(a label with '/' nests, so the tree mirrors the class hierarchy)")
    elif "imagefolder" in formats:
        lines.append("- `imagefolder/{split}/{label}/{id}.{ext}`: the images as files, one "
                     "folder per class (a hierarchical label's levels joined by `__`: "
                     "`mammals__dog`)")
    if image_label_files and "imagefolder" in formats:
        names = ", ".join(f"`{{id}}.{fmt}`" for fmt in image_label_files)
        lines.append(f"- {names} next to each image: its label file (json / yaml: id, label, "
                     "levels, class_index, split, url, page_url, license, author, width, "
                     "height, image; csv: the same as one row with level_0.. columns; txt: "
                     "`label<TAB>class_index<TAB>url<TAB>license`)")
    if "webdataset" in formats:
        lines.append("- `webdataset/{split}-{shard:05d}.tar`: WebDataset shards: `{id}.jpg` "
                     "(an RGB JPEG: the stored image, or one encoded from it), `{id}.json` (the "
                     "row without the image), `{id}.cls` (class index)")
    structured = [f"`labels.{fmt}`" for fmt in label_formats if fmt != "txt"]
    if structured:
        lines.append(f"- {', '.join(structured)}: one entry per image: id, path (relative to "
                     "the dataset root), label, label_index, split, and the label's levels "
                     "as level_0, level_1, ...")
    if "txt" in label_formats:
        lines.append("- `labels.txt`: one line per image: `path<TAB>label`")
    lines += ["- `classes.json`, `classes.txt`: the class-index map (sorted full label paths "
              "-> 0..n-1; line i of classes.txt is class i)",
              "- `rejects.parquet`, `rejects.csv`: one row per rejected candidate: "
              + ", ".join(REJECT_SCHEMA.names),
              "- `stats.json`: the figures above, machine-readable",
              "- `_SUCCESS` (complete) or `_PARTIAL` (incomplete): written last, with the "
              "file list"]
    return "\n".join(lines)


def render_card(spec_name: str, description: str, stats: Mapping[str, Any], spec_yaml: str, *,
                parquet_splits: Iterable[str] = (), formats: Iterable[str] = ("parquet",),
                label_formats: Iterable[str] = (), partial_reason: Optional[str] = None,
                labels: Iterable[str] = (), image_label_files: Iterable[str] = (),
                licenses: Optional[Mapping[str, int]] = None, nested: bool = False) -> str:
    """The README.md text of a dataset.

    ``parquet_splits`` are the splits that have Parquet shards (for ``configs``);
    ``partial_reason`` (or ``stats['partial']``) puts a PARTIAL notice at the top. ``labels``
    (with those in ``stats['classes']``) give the class hierarchy, shown when a label nests.
    ``licenses``: images per licence text ("" for none given); ``nested``: the ImageFolder
    tree nests hierarchical labels (output.imagefolder_labels).
    """
    partial = partial_reason is not None or bool(stats.get("partial"))
    parts = [front_matter(spec_name, stats, parquet_splits, licenses)]
    if partial:
        why = partial_reason or stats.get("partial_reason") or "the job did not finish"
        parts.append(partial_notice(str(why)))
    parts.append(f"# {spec_name}\n")
    if description:
        parts.append(description.strip() + "\n")
    parts.append("Built by PixCrawler from web image search results. Images keep their "
                 "original licenses: see the `license`, `author`, `url` and `page_url` columns "
                 "before reuse.\n")
    parts.append("## Summary\n\n" + _summary(stats) + "\n")
    parts.append("## Classes\n\n" + _class_table(stats) + "\n")
    labels = list(labels)
    if any("/" in label for label in [*labels, *(stats.get("classes") or {})]):
        parts.append("## Class hierarchy\n\n" + hierarchy_markdown(labels, stats) + "\n")
    parts.append("## Rejected candidates by reason\n\n" + _reason_table(stats) + "\n")
    parts.append("## Licences\n\n" + _license_table(licenses or {}) + "\n")
    parts.append("## Rights and opt-outs\n\n" + rights_markdown(stats) + "\n")
    parts.append("## Files\n\n" + _layout(formats, label_formats, image_label_files, nested)
                 + "\n")
    parts.append("## Schema of the Parquet shards\n\n" + _schema_table() + "\n")
    parts.append("## Reason codes\n\n" + reasons_markdown() + "\n")
    spec_text = spec_yaml.strip() or "# (not recorded)"
    fence = "~~~~" if "```" in spec_text else "```"
    parts.append(f"## The spec that produced this dataset\n\n{fence}yaml\n{spec_text}\n{fence}\n")
    return "\n".join(parts)


def partial_notice(reason: str) -> str:
    return (f"{PARTIAL_MARKER}: this dataset is incomplete ({_cell(reason)}). Classes may be "
            "short of their targets; see the shortfall column.\n")


def mark_partial(card_text: str, reason: str) -> str:
    """A rendered card with the PARTIAL notice put at the top of its body (after the front
    matter); unchanged if it already has one."""
    if PARTIAL_MARKER in card_text:
        return card_text
    if card_text.startswith("---\n"):
        end = card_text.find("\n---\n", 4)
        if end != -1:
            cut = end + len("\n---\n")
            return card_text[:cut] + "\n" + partial_notice(reason) + "\n" + card_text[cut:]
    return partial_notice(reason) + "\n" + card_text


def empty_cause(stats: dict[str, Any]) -> str:
    """Why a job accepted nothing, and what to try."""
    errors = stats.get("search_errors") or []
    if not stats.get("candidates"):
        if errors:
            return (f"Every search failed ({errors[-1].get('engine')}: "
                    f"{str(errors[-1].get('error'))[:200]}): check the network, the engines' "
                    "keys, or add another source.")
        return "The sources gave no candidates: check the queries, the URL lists and sources."
    top = sorted((stats.get("rejected_by_reason") or {}).items(), key=lambda kv: -kv[1])[:3]
    reasons = ", ".join(f"{k} {v}" for k, v in top)
    return (f"All {stats['candidates']} candidates were rejected ({reasons}): see rejects.csv "
            "for each one's reason; check download and validation settings.")


def empty_failure(stats: dict[str, Any]) -> str:
    """The error of a job that accepted nothing, as the API and the progress actor show it."""
    return f"no image was accepted: {empty_cause(stats)}"
