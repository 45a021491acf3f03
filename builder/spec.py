"""The dataset spec: what a user asks for, validated at load time.

``load_spec(path)`` reads YAML or JSON; ``parse_spec(dict)`` validates a mapping. Any problem raises
``SpecError`` whose message names each bad field by its path, the bad value and what is allowed.
The full reference lives in README.md ("The dataset spec").

Classes come flat, hierarchical, or both::

    classes:                       # flat: label -> queries (or a mapping, or nothing)
      cat: [cat photo, kitten]
    categories:                    # nested, to any depth; only the leaves are classes
      mammals:
        target: 90                 # split over the children that set no target of their own
        dog: [dog photo]           # shorthand leaf: its queries (a string or a list)
        fox: {target: 40}          # a mapping: queries / target / urls, or children
        wolf:                      # no queries: searches "wolf"
      birds:
        eagle: {queries: eagle, urls: [https://example.org/eagle.jpg]}

In a category mapping ``queries``, ``target`` and ``urls`` are reserved; every other key is a
child category. A node with children is a parent: it may set ``target`` but not ``queries`` or
``urls``. The label of a leaf is its path (``mammals/dog``); validation flattens the tree into
``DatasetSpec.classes`` keyed by those paths (after the flat ``classes``, in YAML order), so the
rest of the system sees leaves only. Targets: a parent's target is the total of its subtree;
children that set their own target keep it, and what is left is split evenly over the others
(the remainder, one each, to the first ones in YAML order). A leaf with no target anywhere above
it gets the spec's default ``target``. A label defined twice, or a class that is also the parent
of another class (``a`` and ``a/b``), is an error.
"""

from __future__ import annotations

import json
import logging
import re
import string
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from builder.errors import SpecError
from builder.urls import without_secrets

log = logging.getLogger(__name__)

ENGINES = ("sandbox", "urllist", "duckduckgo", "bing", "wikimedia", "openverse", "google", "baidu")
EngineName = Literal["sandbox", "urllist", "duckduckgo", "bing", "wikimedia", "openverse",
                     "google", "baidu"]
ImageFormat = Literal["jpeg", "png", "webp", "gif", "bmp", "tiff"]
OutputFormat = Literal["parquet", "imagefolder", "webdataset"]
LabelFormat = Literal["json", "csv", "yaml", "txt"]
SOURCE_FIELD_READERS = {
    "url": ("sandbox",),
    "path": ("urllist",),
    "options.base_url": ("wikimedia", "openverse", "google", "baidu"),
    "options.proxy": ("duckduckgo", "bing"),
}
"""The source fields only some engines read, and those engines: a spec may set such a field
only where its engine reads it. ``url`` and ``options.base_url`` name the server an engine
asks for hits (``SourceSpec.endpoint``; the API policy and the per-service request budgets go
by it); duckduckgo and bing always ask their own services, through ``options.proxy`` if set."""
ENDPOINT_FIELDS = {engine: field for field in ("url", "options.base_url")
                   for engine in SOURCE_FIELD_READERS[field]}
"""Per engine, the source field that names the server it asks for hits, where it takes one."""
PUBLIC_ENDPOINTS = {
    "wikimedia": "https://commons.wikimedia.org/w/api.php",
    "openverse": "https://api.openverse.org/v1/images/",
    "google": "https://www.googleapis.com/customsearch/v1",
    "baidu": "https://image.baidu.com/search/acjson",
}
"""The API each engine with an ``options.base_url`` asks where the source sets none."""


def _source_field(src: dict[str, Any], field: str) -> Any:
    """A field of a source's mapping by its ``SOURCE_FIELD_READERS`` name."""
    if field.startswith("options."):
        options = src.get("options")
        return options.get(field[len("options."):]) if isinstance(options, dict) else None
    return src.get(field)


def _unread_fields(src: dict[str, Any]) -> list[str]:
    """The ``SOURCE_FIELD_READERS`` fields a source's mapping sets that its engine does not
    read."""
    return [field for field, readers in SOURCE_FIELD_READERS.items()
            if _source_field(src, field) not in (None, "") and src.get("engine") not in readers]


def host_key(host: str) -> str:
    """A host name as profiles, per-host limits and ``download.hosts`` compare it: lower
    case, without the trailing dot of a fully qualified name (``upload.wikimedia.org.`` is
    that host)."""
    return host.strip().lower().rstrip(".")


def _unused_field(engine: str, field: str) -> str:
    """Why ``field`` is refused on a source of ``engine``, and what to do."""
    own = ENDPOINT_FIELDS.get(engine)
    why = ("it searches through no proxy" if field == "options.proxy"
           else "it reads the file named by 'path'" if engine == "urllist"
           else f"it takes its server from {own!r}" if own
           else "it always asks its own service")
    return (f"engine {engine!r} does not use {field!r} ({why}); remove it, or use an engine "
            f"that does: {', '.join(SOURCE_FIELD_READERS[field])}")


class _Model(BaseModel):
    # allow_inf_nan=False: every float field is finite (an infinite timeout or a NaN split
    # fraction is a spec error, not a crash or a hang later).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ClassSpec(_Model):
    """One class: the queries that find it and how many accepted images it needs."""

    queries: list[str] = Field(default_factory=list)
    target: Optional[int] = Field(default=None, ge=1)
    urls: list[str] = Field(default_factory=list)

    @field_validator("queries", "urls", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [v]
        return v


CATEGORY_KEYS = ("queries", "target", "urls")
"""The reserved keys of a category mapping; any other key is a child category."""


class CategoryNode(BaseModel):
    """One node of the class hierarchy under ``categories`` (see the module docstring).

    Written as a mapping of ``queries`` / ``target`` / ``urls`` and child categories, or, for a
    leaf, as nothing (``dog:``) or its queries (``dog: dog photo`` / ``dog: [dog, puppy]``).
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    queries: list[str] = Field(default_factory=list)
    target: Optional[int] = Field(default=None, ge=1)
    urls: list[str] = Field(default_factory=list)
    __pydantic_extra__: dict[str, CategoryNode] = Field(init=False)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if v is None:
            return {}
        if isinstance(v, str):
            return {"queries": [v]}
        if isinstance(v, list):
            return {"queries": v}
        if isinstance(v, dict):
            return v
        if isinstance(v, CategoryNode):
            return v
        raise ValueError(f"a category is a mapping (of {', '.join(CATEGORY_KEYS)} and child "
                         f"categories), a query string, a list of queries, or empty; got {v!r}")

    @field_validator("queries", "urls", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [v]
        return v

    @property
    def children(self) -> dict[str, CategoryNode]:
        """The child categories, in YAML order (empty for a leaf)."""
        return dict(self.__pydantic_extra__ or {})


class _SpecProblems(ValueError):
    """Problems found by a model-level check, each with its field path relative to the model,
    so ``SpecError`` names the exact field (``categories.mammals.target``)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{path}: {msg}" for path, msg in problems))


def bad_name(name: str) -> bool:
    """A name that cannot be one directory or file name: empty, '.', '..', or holding '/' or
    a backslash. The spec refuses such split and category names; the writer checks again."""
    return not name or "/" in name or "\\" in name or name in (".", "..")


FLAT_SEPARATOR = "__"
"""What joins a label's levels into one ImageFolder folder name (output.imagefolder_labels)."""


def flat_label(label: str) -> str:
    """A label path as one folder name: its levels joined by ``FLAT_SEPARATOR``."""
    return FLAT_SEPARATOR.join(label.split("/"))


def bad_label_path(label: str) -> bool:
    """A label that cannot be a relative directory path: one of its '/'-separated parts is a
    ``bad_name`` (so an empty label, an empty part, '.', '..' or a backslash)."""
    return any(bad_name(part) for part in label.split("/"))


_CONTROL_CATEGORIES = ("Cc", "Cs", "Zl", "Zp")
"""Unicode categories never allowed in a label, category or split name: control characters
(newline, tab, NUL, ...), lone surrogates and line/paragraph separators. Names become directory
names and lines of ``classes.txt``, where these break the file or the path."""


def _control_chars(name: str) -> str:
    """The forbidden characters in ``name``, escaped and comma-separated ('' if none)."""
    found = dict.fromkeys(ch for ch in name if unicodedata.category(ch) in _CONTROL_CATEGORIES)
    return ", ".join(repr(ch) for ch in found)


def _key(name: str) -> str:
    """A name as one part of a field path: escaped (quoted) when it holds control or bidi
    characters, so the SpecError message stays one line per problem and reads as written."""
    return repr(name) if _control_chars(name) or _bidi_chars(name) else name


def _control_problem(kind: str, name: str) -> str:
    return (f"bad {kind} {name!r}: control characters and line breaks are not allowed "
            f"(found {_control_chars(name)}); names become directory and file names and "
            "lines of the label files (classes.txt)")


NAME_MAX_BYTES = 255
"""A label part, category or split name is at most this many bytes in UTF-8: each becomes one
directory name, and filesystems (ext4, XFS, APFS, NTFS) refuse longer names."""
LABEL_MAX_BYTES = 1024
"""A whole label (all its parts and '/') is at most this many bytes in UTF-8: it becomes a
directory path inside the dataset, which must stay well inside PATH_MAX (4096 on Linux)."""
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                          "\u2066\u2067\u2068\u2069")
"""Bidirectional control characters (ALM, LRM, RLM, LRE/RLE/PDF/LRO/RLO, LRI/RLI/FSI/PDI): they
make a name display as another ('cat' followed by an RLO shows later text reversed)."""
WINDOWS_DEVICE_NAMES = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{port}{n}" for port in ("COM", "LPT") for n in "0123456789\u00b9\u00b2\u00b3"])
"""Names Windows reserves for devices, in any case and with any extension (``nul.txt``): such
a folder cannot be created or unpacked there, so a dataset holding one is not portable."""


def _bidi_chars(name: str) -> str:
    """The bidi control characters in ``name``, escaped and comma-separated ('' if none)."""
    return ", ".join(repr(ch) for ch in dict.fromkeys(ch for ch in name if ch in BIDI_CONTROLS))


def name_rule_problem(kind: str, name: str) -> Optional[str]:
    """Why ``name`` (a label part, category or split name; already free of control
    characters, '/', '\\', '.' and '..') cannot be a portable directory name, or None. The
    message names the rule it breaks."""
    found = _bidi_chars(name)
    if found:
        return (f"bad {kind} {name!r}: bidirectional control characters are not allowed "
                f"(found {found}); they make a name display as another")
    if not name.strip():
        return (f"bad {kind} {name!r}: a name of only whitespace is not allowed; it is "
                "invisible as a folder name")
    if name != name.strip():
        return (f"bad {kind} {name!r}: names may not start or end with whitespace ("
                f"{name.strip()!r} and {name!r} would look the same)")
    if name.endswith("."):
        return (f"bad {kind} {name!r}: names may not end in '.' (Windows drops it, so "
                f"{name.rstrip('.')!r} and {name!r} would be one folder)")
    size = len(name.encode("utf-8"))
    if size > NAME_MAX_BYTES:
        return (f"bad {kind} {name[:20]!r}...: a name is at most {NAME_MAX_BYTES} bytes in "
                f"UTF-8 (this one is {size}); it becomes a folder name, and longer ones "
                "fail to write")
    device = name.split(".", 1)[0].rstrip(" ").upper()
    if device in WINDOWS_DEVICE_NAMES:
        return (f"bad {kind} {name!r}: {device} is a device name Windows reserves (CON, PRN, "
                "AUX, NUL, COM0-9, LPT0-9, CONIN$, CONOUT$, with or without an extension); "
                f"rename it, e.g. {name + '_'!r}")
    return None


def flatten_categories(categories: dict[str, CategoryNode]
                       ) -> tuple[dict[str, ClassSpec], dict[str, str], list[tuple[str, str]]]:
    """The leaves of a category tree as classes keyed by label path, with targets resolved.

    Returns ``(classes, where, problems)``: ``where`` maps each label to its field path in the
    spec (``categories.mammals.dog``) and ``problems`` lists ``(path, message)`` pairs. A leaf
    whose target comes from no node keeps ``target=None`` (the spec's default applies).
    """
    classes: dict[str, ClassSpec] = {}
    where: dict[str, str] = {}
    problems: list[tuple[str, str]] = []

    def shares(children: dict[str, CategoryNode], total: Optional[int], path: str,
               inherited: bool) -> dict[str, Optional[int]]:
        free = [name for name, node in children.items() if node.target is None]
        out: dict[str, Optional[int]] = {name: None for name in free}
        if total is None:
            return out
        fixed = sum(node.target or 0 for node in children.values())
        rest = total - fixed
        source = (f"its share {total} of a parent's target" if inherited
                  else f"target {total}")
        at = path if inherited else f"{path}.target"
        if free and rest < len(free):
            problems.append((at, f"{source} cannot be split: children that set their own "
                             f"target take {fixed}, leaving {max(rest, 0)} for "
                             f"{len(free)} ({', '.join(free)}) that need at least 1 each; "
                             "raise it or lower the children's targets"))
        elif not free and rest != 0:
            problems.append((at, f"{source} differs from the sum {fixed} of its children's "
                             "targets; make them agree (or leave a child's target unset so "
                             "it takes what is left)"))
        elif free:
            base, extra = divmod(rest, len(free))
            out = {name: base + (1 if i < extra else 0) for i, name in enumerate(free)}
        return out

    def walk(children: dict[str, CategoryNode], total: Optional[int], labels: tuple[str, ...],
             path: str, inherited: bool) -> None:
        given = shares(children, total, path, inherited)
        for name, node in children.items():
            at = f"{path}.{_key(name)}"
            if _control_chars(name):
                problems.append((at, _control_problem("category name", name)))
                continue
            if bad_name(name):
                problems.append((at, f"bad category name {name!r}: names are non-empty, "
                                 "without '/' or '\\', and not '.' or '..'"))
                continue
            rule = name_rule_problem("category name", name)
            if rule:
                problems.append((at, rule))
                continue
            own = node.target if node.target is not None else given.get(name)
            kids = node.children
            if kids:
                for key in ("queries", "urls"):
                    if getattr(node, key):
                        problems.append((f"{at}.{key}", f"only a leaf category (one without "
                                         f"children) has {key}; {name!r} has children "
                                         f"({', '.join(kids)}): move its {key} to them"))
                walk(kids, own, (*labels, name), at, node.target is None)
            else:
                label = "/".join((*labels, name))
                classes[label] = ClassSpec(queries=node.queries, target=own, urls=node.urls)
                where[label] = at

    walk(categories, None, (), "categories", False)
    return classes, where, problems


def upgrade_saved_spec(data: Any) -> tuple[Any, list[str]]:
    """A spec PixCrawler saved itself (a dataset's ``spec.yaml``, a journal's ``job.json``),
    maybe by an earlier version, as this version reads it; returns it (a copy where anything
    changed) and what changed. Earlier versions accepted, and this one refuses or spells
    otherwise:

    - a source field its engine does not read (``SOURCE_FIELD_READERS``): unset;
    - a ``download.hosts`` key in another case or with a trailing dot: as ``_host_names``
      spells it (the first of two that name one host is kept);
    - a ``download.contact`` of several words: its first word that is a contact, else unset.
    """
    if not isinstance(data, dict):
        return data, []
    changes: list[str] = []
    out = dict(data)
    sources = data.get("sources")
    if isinstance(sources, list):
        kept = []
        for i, src in enumerate(sources):
            if isinstance(src, dict):
                unread = _unread_fields(src)
                if unread:
                    src = dict(src)
                    for field in unread:
                        changes.append(f"sources.{i}.{field} left out (its engine never read it)")
                        if field.startswith("options."):
                            src["options"] = {k: v for k, v in src["options"].items()
                                              if k != field[len("options."):]}
                        else:
                            src[field] = None  # as a spec dump holds a field left unset
            kept.append(src)
        out["sources"] = kept
    download = data.get("download")
    if isinstance(download, dict):
        download = dict(download)
        hosts = download.get("hosts")
        if isinstance(hosts, dict):
            spelled: dict[Any, tuple[Any, Any]] = {}  # name -> (the key it came from, profile)
            for host, profile in hosts.items():
                name = host_key(host) if isinstance(host, str) else host
                if name != host:
                    changes.append(f"download.hosts.{host} read as {name}")
                earlier = spelled.get(name)
                if earlier is not None and earlier[0] == name:  # the plain spelling wins
                    changes.append(f"download.hosts.{host} dropped ({name} is given)")
                    continue
                if earlier is not None:
                    changes.append(f"download.hosts.{earlier[0]} dropped ({host} is given)")
                spelled[name] = (host, profile)
            download["hosts"] = {name: profile for name, (_, profile) in spelled.items()}
        contact = download.get("contact")
        if isinstance(contact, str) and len(contact) <= MAX_CONTACT_CHARS and \
                not CONTACT_RE.fullmatch(contact.strip()):
            words = [w for w in re.split(r"[\s;,()<>]+", contact) if CONTACT_RE.fullmatch(w)]
            download["contact"] = words[0] if words else None
            changes.append(f"download.contact read as {download['contact']!r}")
        out["download"] = download
    return (out, changes) if changes else (data, [])


def _number(low: float, *, above: bool = False, whole: bool = False,
            null: bool = False) -> Callable[[Any], bool]:
    """A check of an option's value: a number of at least ``low`` (``above``: more than it;
    ``whole``: a whole number, 3.0 as 3, as a saved spec may hold), or None where ``null``."""
    def valid(value: Any) -> bool:
        if value is None:
            return null
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if whole and not float(value).is_integer():
            return False
        return value > low if above else value >= low
    return valid


_LIMIT_OPTIONS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "rate": ("a number of requests a second above 0", _number(0, above=True)),
    "burst": ("a number of requests, 1 or more", _number(1)),
    "min_rate": ("a number above 0, or null", _number(0, above=True, null=True)),
    "cooldown_s": ("a number of seconds, 0 or more", _number(0)),
    "failure_threshold": ("a whole number, 1 or more", _number(1, whole=True)),
    "max_requests_per_job": ("a whole number, 0 or more, or null",
                             _number(0, whole=True, null=True)),
    "max_requests_per_day": ("a whole number, 0 or more, or null",
                             _number(0, whole=True, null=True)),
}
"""A source's rate-limit options (``builder.ratelimit.EngineLimits``) and what each must be:
a string or a negative number stopped the job when its limiter was made, or the API server
when its policy weighed the job's share of a budget."""


class SourceSpec(_Model):
    """One search source. ``engine`` picks the implementation; the rest are its options."""

    engine: EngineName
    url: Optional[str] = None
    path: Optional[str] = None
    url_column: str = "url"
    label_column: str = "label"
    caption_column: Optional[str] = Field(default=None, description="urllist: the column "
                                          "holding each image's caption (alt text)")
    path_inode: Optional[int] = Field(default=None, description="urllist: the inode of the "
                                      "file at path, which the job refuses to read if it finds "
                                      "another there; the HTTP API sets it to the file it checked")
    max_pages: int = Field(default=20, ge=1)
    per_page: int = Field(default=50, ge=1, le=500)
    region: str = "wt-wt"
    safesearch: Literal["on", "moderate", "off"] = "moderate"
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("options")
    @classmethod
    def _plain_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Options are free-form, but must survive the spec's JSON round trip: a non-finite
        number would silently become null (the default), a self-reference cannot be written."""
        problems = []
        for key, value in options.items():
            try:
                json.dumps(value, allow_nan=False)
            except ValueError as exc:
                problems.append(f"{key}: numbers must be finite" if "float" in str(exc)
                                else f"{key}: {exc}")
            except (TypeError, RecursionError) as exc:
                problems.append(f"{key}: not plain data ({type(exc).__name__})")
        if problems:
            raise ValueError("options " + "; ".join(sorted(problems)))
        return options

    @model_validator(mode="after")
    def _needs(self) -> "SourceSpec":
        if self.engine == "urllist" and not self.path:
            raise ValueError("engine 'urllist' needs 'path' (a txt/csv/jsonl/parquet file of URLs)")
        if self.engine == "sandbox" and not self.url:
            raise ValueError("engine 'sandbox' needs 'url' (the sandbox web's base URL)")
        data = {"engine": self.engine, "url": self.url, "path": self.path,
                "options": self.options}
        problems = [(field, _unused_field(self.engine, field)) for field in _unread_fields(data)]
        problems += [(f"options.{key}", f"must be a URL (a string), not {self.options[key]!r}")
                     for key in ("base_url", "proxy")
                     if not isinstance(self.options.get(key, ""), (str, type(None)))]
        problems += [(f"options.{key}", f"must be {what}, not {self.options[key]!r}")
                     for key, (what, valid) in _LIMIT_OPTIONS.items()
                     if key in self.options and not valid(self.options[key])]
        if not problems and self.options.get("min_rate") is not None:
            from builder.ratelimit import limits_for  # (it imports this module)

            rate = limits_for(self.engine, self.options).rate
            if self.options["min_rate"] > rate:
                problems.append(("options.min_rate", f"must be at most the rate, {rate:g} "
                                 f"requests a second here, not {self.options['min_rate']!r}"))
        if problems:
            raise _SpecProblems(problems)
        return self

    def endpoint(self) -> Optional[str]:
        """The server this source's engine asks for hits, where the source names one; None
        where the engine asks its own public service (its default, or always)."""
        field = ENDPOINT_FIELDS.get(self.engine)
        value = self.url if field == "url" else self.options.get("base_url") if field else None
        return value or None


def _serves_http(url: str) -> bool:
    """Whether ``url`` names a server an engine can ask: http or https, and a host (without
    one, its requests would all fail)."""
    from builder.ratelimit import endpoint_server  # (it imports this module)

    return url.split(":", 1)[0].lower() in ("http", "https") and \
        endpoint_server(url) is not None


class SearchSpec(_Model):
    """How the planner asks sources for candidates."""

    candidates_factor: float = Field(default=2.0, ge=1.0, le=100.0,
                                     description="candidates requested per missing image")
    expand: bool = Field(default=False, description="add generated queries per class")
    expand_n: int = Field(default=5, ge=1, le=50)
    llm_base_url: Optional[str] = Field(default=None, description="OpenAI-compatible endpoint; "
                                        "else PIXCRAWLER_LLM_BASE_URL / OPENAI_BASE_URL; the key "
                                        "comes from PIXCRAWLER_LLM_API_KEY / OPENAI_API_KEY")
    llm_model: Optional[str] = None


MAX_CONTACT_CHARS = 320
"""Longest ``download.contact``."""
CONTACT_RE = re.compile(r"[^@\s()<>;,]+@[^@\s()<>;,]+\.[A-Za-z]{2,}"
                        r"|https?://[^\s()<>;,]+\.[^\s()<>;,]+")
"""One email address or one http(s) URL, and nothing else (the whole contact matches): what a
User-Agent needs to name its operator. No space, ';' or ',': the contact goes inside the
User-Agent's comment, where more words would add product tokens (``Googlebot/2.1``)."""

MAX_TIMEOUT_S = 600.0
"""Upper bound of ``download.timeout_s``: ten minutes for one request."""
MAX_BACKOFF_S = 60.0
"""Upper bound of ``download.backoff_s`` (the base of an exponential backoff)."""
MAX_DELAY_S = 3600.0
"""Upper bound of ``download.per_host_delay_s`` and ``download.max_retry_after_s``."""
MAX_REDIRECTS = 30
"""Upper bound of ``download.max_redirects``: more hops than any real redirect chain (browsers
stop at 20), so a server cannot bounce the fetcher through a million per candidate."""
MAX_BYTES_IN_FLIGHT = 1 << 40
"""Upper bound of ``download.max_bytes_in_flight``: a TiB, so a budget that never binds can
still be written (10**12), and a runaway one (10**15) is an error."""
MAX_IMAGE_BYTES = 1 << 30
"""Upper bound of ``download.max_bytes``: a GiB. An accepted image is one value of a shard's
Arrow ``binary`` column, whose arrays hold at most 2 GiB; no photograph comes near."""
MAX_USER_AGENT_CHARS = 512
"""Longest ``download.user_agent``: real ones are under 200 characters, and checking a longer
one for a contact (``builder.profiles.has_contact``) takes time quadratic in its length."""


class HostProfileSpec(_Model):
    """Politeness rules for one host (``download.hosts``). A field left unset keeps the built-in
    profile's value (``builder.profiles``), else the download-wide default."""

    concurrency: Optional[int] = Field(default=None, ge=1, description="requests in flight")
    delay_s: Optional[float] = Field(default=None, ge=0, le=MAX_DELAY_S,
                                     description="minimum gap between request starts")
    max_bytes_per_s: Optional[float] = Field(default=None, gt=0,
                                             description="bandwidth cap on bodies, bytes/s")
    thumb_widths: Optional[list[int]] = Field(
        default=None, description="standard thumbnail widths: a thumbnail URL's width is raised "
        "to the next one (Wikimedia's /thumb/.../<width>px-<name> URLs)")

    @field_validator("thumb_widths")
    @classmethod
    def _widths(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is not None and (not v or any(w < 1 for w in v)):
            raise ValueError("thumb_widths lists one or more positive widths, e.g. [250, 500]")
        return sorted(set(v)) if v is not None else None


SignalUsage = Literal["train-genai", "train-ai"]


class SignalsSpec(_Model):
    """The machine-readable opt-out signals honoured besides robots.txt and X-Robots-Tag
    (``download.respect_robots`` / ``respect_optouts``). Each one on is checked, recorded in
    the image's rights ledger, and a refusal rejects the image (``opted_out``)."""

    tdmrep: bool = Field(default=True, description="TDMRep: /.well-known/tdmrep.json, the "
                         "tdm-reservation header (and the page meta tag with page_meta)")
    content_usage: bool = Field(default=True, description="IETF AI Preferences: the "
                                "Content-Usage header and robots.txt rule")
    content_signal: bool = Field(default=True, description="Cloudflare Content Signals in "
                                 "robots.txt (Content-Signal: ai-train=no)")
    xmp_datamining: bool = Field(default=True, description="IPTC plus:DataMining in the "
                                 "image's embedded XMP")
    ai_txt: bool = Field(default=True, description="/ai.txt (Spawning), robots.txt syntax")
    page_meta: bool = Field(default=False, description="also fetch each image's page (one more "
                            "request per image) for TDMRep and robots meta tags and the image's "
                            "alt text")
    usage: SignalUsage = Field(default="train-genai", description="what the dataset is for, "
                               "in AI Preferences terms: train-genai also honours "
                               "train-genai=n; train-ai honours train-ai=n only")


class DownloadSpec(_Model):
    timeout_s: float = Field(default=15.0, gt=0, le=MAX_TIMEOUT_S)
    deadline_s: float = Field(
        default=120.0, gt=0, le=MAX_DELAY_S,
        description="the most one image may take: its requests, redirects and retries and "
                    "the waits between them, not its waits for a turn on its host or a free "
                    "connection; past it the image is rejected as timeout (a server that "
                    "answers slowly, hop after hop, held connections for about 20 minutes)")
    max_bytes: int = Field(default=20_000_000, ge=1024, le=MAX_IMAGE_BYTES,
                           description="the most bytes one image may have; a body past it is "
                           "aborted (at most 1 GiB)")
    retries: int = Field(default=2, ge=0, le=10)
    backoff_s: float = Field(default=0.5, ge=0, le=MAX_BACKOFF_S)
    max_retry_after_s: float = Field(default=30.0, ge=0, le=MAX_DELAY_S)
    per_host_concurrency: int = Field(default=16, ge=1)
    per_host_delay_s: float = Field(default=0.0, ge=0, le=MAX_DELAY_S)
    concurrency: int = Field(default=128, ge=1, description="fetches in flight per downloader")
    max_redirects: int = Field(default=5, ge=0, le=MAX_REDIRECTS)
    user_agent: str = Field(
        default="PixCrawler/0.1 (+https://github.com/pixcrawler/pixcrawler)",
        description=f"the User-Agent sent, at most {MAX_USER_AGENT_CHARS} characters")
    respect_robots: bool = True
    respect_optouts: bool = True
    allow_private_networks: bool = False
    max_bytes_in_flight: int = Field(
        default=256_000_000, ge=65_536, le=MAX_BYTES_IN_FLIGHT,
        description="byte budget of the response bodies being read at once per downloader; a "
                    "body waits for room (the oldest body being read always proceeds)")
    contact: Optional[str] = Field(
        default=None, max_length=MAX_CONTACT_CHARS, description="the operator's email or URL, "
        "added to the User-Agent; needed to crawl the public web (Wikimedia and others require "
        "one)")
    hosts: dict[str, HostProfileSpec] = Field(
        default_factory=dict, description="per-host politeness profiles (a host name, or "
        "*.domain, in any case), over the built-in ones")
    signals: SignalsSpec = Field(default_factory=SignalsSpec)

    @field_validator("hosts")
    @classmethod
    def _host_names(cls, hosts: dict[str, HostProfileSpec]) -> dict[str, HostProfileSpec]:
        """Host names as the fetcher compares them (lower case, no trailing dot): a built-in
        profile is found however a spec spells its host."""
        out: dict[str, HostProfileSpec] = {}
        for host, profile in hosts.items():
            name = host_key(host)
            if name in out:
                raise ValueError(f"{host!r} names the host {name!r} again; give each host once")
            out[name] = profile
        return out

    @field_validator("user_agent")
    @classmethod
    def _user_agent(cls, v: str) -> str:
        if len(v) > MAX_USER_AGENT_CHARS:
            raise ValueError(f"a User-Agent has at most {MAX_USER_AGENT_CHARS} characters; "
                             f"this one has {len(v)}")
        if not v.isprintable() or not v.isascii():
            raise ValueError("a User-Agent is one line of printable ASCII (no control "
                             "characters such as a line break, which would start another "
                             "header)")
        return v

    @field_validator("contact")
    @classmethod
    def _contact(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        v = v.strip()
        if not CONTACT_RE.fullmatch(v):
            raise ValueError(f"{v!r} is not a contact: give one email (ops@example.org) or one "
                             "URL (https://example.org/crawler), without spaces, ';', ',' or "
                             "parentheses")
        return v

    @model_validator(mode="after")
    def _deadline_holds_a_request(self) -> "DownloadSpec":
        """An image's deadline is at least one request's timeout: left unset it is raised to
        it (a spec whose requests may take 300 s keeps them), set shorter it is refused."""
        if self.deadline_s >= self.timeout_s:
            return self
        if "deadline_s" not in self.model_fields_set:
            self.deadline_s = self.timeout_s
            self.model_fields_set.discard("deadline_s")  # still the default: a cap lowers it
            return self
        raise _SpecProblems([("deadline_s", (
            f"{self.deadline_s:g} s is shorter than timeout_s {self.timeout_s:g} s: an image "
            "would run out of time inside its first request; set deadline_s to at least "
            "timeout_s"))])


MAX_PROMPTS = 32
"""Most ``validation.clip_prompts``: each is one more text the CLIP check encodes per class."""
MAX_PROMPT_CHARS = 300
"""Longest CLIP prompt (CLIP reads 77 tokens)."""


class ValidationSpec(_Model):
    level: Literal["fast", "medium", "slow"] = "medium"
    min_side: int = Field(default=64, ge=1)
    max_side: int = Field(default=16384, ge=1)
    max_aspect_ratio: float = Field(default=4.0, ge=1.0)
    max_pixels: int = Field(default=89_478_485, ge=1, description="decompression-bomb limit")
    formats: list[ImageFormat] = Field(default_factory=lambda: ["jpeg", "png", "webp", "gif"])
    animated: Literal["first_frame", "reject"] = "first_frame"
    near_duplicate_threshold: int = Field(default=8, ge=0, le=32)
    nsfw_threshold: float = Field(default=0.8, ge=0.0, le=1.0)
    clip_threshold: float = Field(default=0.2, ge=-1.0, le=1.0)
    nsfw: bool = Field(default=True, description="slow level: run the NSFW check")
    nsfw_backend: Literal["opennsfw", "hf"] = "opennsfw"
    nsfw_model: Optional[str] = Field(default=None, description="hf: a model id or path; "
                                      "opennsfw: optionally an .onnx path")
    nsfw_labels: str = Field(default="nsfw|porn|sexy|hentai|explicit|unsafe",
                             description="hf: regex of the labels that count as NSFW")
    clip: bool = Field(default=True, description="slow level: run the CLIP checks")
    clip_model: str = "openai/clip-vit-base-patch32"
    clip_prompts: list[str] = Field(default_factory=lambda: ["a photo of a {}."])
    wrong_class: Literal["reject", "relabel", "ignore"] = "reject"
    keep_embedding: bool = Field(default=False, description="store the CLIP image embedding")
    embedding_dedup_threshold: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    fp16: bool = True

    @field_validator("clip_prompts")
    @classmethod
    def _prompts(cls, v: list[str]) -> list[str]:
        if not v or len(v) > MAX_PROMPTS:
            raise ValueError(f"give 1 to {MAX_PROMPTS} prompts, each with a '{{}}' where the "
                             "class name goes, e.g. 'a photo of a {}.'")
        for p in v:
            if len(p) > MAX_PROMPT_CHARS:
                raise ValueError(f"a prompt has at most {MAX_PROMPT_CHARS} characters "
                                 f"(one has {len(p)})")
            try:
                fields = [(name, spec, conversion) for _, name, spec, conversion
                          in string.Formatter().parse(p) if name is not None]
            except ValueError as exc:
                fields = [("", str(exc), None)]
            # Exactly one plain field: a width or an attribute in it ('{:>2000000000}',
            # '{.__class__}') would have str.format build gigabytes or reach into objects.
            if fields != [("", "", None)]:
                raise ValueError(f"prompt {p!r} takes the class name in one plain '{{}}' and no "
                                 "other braces (write '{{' for a literal brace)")
        return v

    @field_validator("nsfw_labels")
    @classmethod
    def _labels_regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"{v!r} is not a regular expression: {exc}") from None
        return v

    @model_validator(mode="after")
    def _sides(self) -> "ValidationSpec":
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) is above max_side ({self.max_side})")
        return self

    @model_validator(mode="after")
    def _slow_settings(self) -> "ValidationSpec":
        """Settings the slow level cannot run with, refused here rather than in its scorers
        (checked at level slow only: the other levels do not read them)."""
        if self.level != "slow":
            return self
        problems = []
        if not (self.nsfw or self.clip):
            problems.append(("level", "'slow' runs the NSFW check, the CLIP checks or both, but "
                             "nsfw and clip are both false: set nsfw: true or clip: true, or "
                             "use level 'medium'"))
        if self.nsfw and self.nsfw_backend == "hf" and not self.nsfw_model:
            problems.append(("nsfw_model", "nsfw_backend 'hf' needs nsfw_model: a Hugging Face "
                             "image-classification model id or a local directory written by "
                             "save_pretrained; or use nsfw_backend 'opennsfw', which needs none"))
        if self.clip and not self.clip_model.strip():
            problems.append(("clip_model", "is empty: give a Hugging Face model id (e.g. "
                             "openai/clip-vit-base-patch32) or a local directory written by "
                             "save_pretrained, or set clip: false"))
        if not self.clip:
            if self.keep_embedding:
                problems.append(("keep_embedding", "stores the CLIP embedding, but clip is "
                                 "false: set clip: true or keep_embedding: false"))
            if self.embedding_dedup_threshold is not None:
                problems.append(("embedding_dedup_threshold", "compares CLIP embeddings, but "
                                 "clip is false: set clip: true or embedding_dedup_threshold: "
                                 "null"))
        if problems:
            raise _SpecProblems(problems)
        return self


class ResizeSpec(_Model):
    max_side: int = Field(ge=8)
    mode: Literal["keep_ratio", "center_crop"] = "keep_ratio"
    resample: Literal["lanczos", "bicubic", "bilinear", "box"] = Field(
        default="lanczos",
        description="the filter of the last resizing step (builder.transform): lanczos is "
                    "the sharpest and dearest; box averages areas, reducing by whole factors "
                    "all the way (what img2dataset's default, OpenCV's INTER_AREA, does) and "
                    "costs a fraction of lanczos")


class EncodeSpec(_Model):
    format: Literal["jpeg", "webp"] = "jpeg"
    quality: int = Field(default=90, ge=1, le=100)


class OutputSpec(_Model):
    uri: Optional[str] = None
    formats: list[OutputFormat] = Field(default_factory=lambda: ["parquet", "imagefolder"])
    label_formats: list[LabelFormat] = Field(default_factory=lambda: ["json", "csv", "yaml",
                                                                        "txt"])
    splits: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.8, "validation": 0.1, "test": 0.1},
        description="split name -> fraction, deterministic by image id and the order the "
                    "splits are listed in (a resume must list them alike); 'val' is read as "
                    "'validation', the name Hugging Face datasets gives that split")
    shard_size: int = Field(default=1000, ge=1, description="images per Parquet/tar shard")
    imagefolder_labels: Literal["flat", "nested"] = Field(
        default="flat",
        description="how a hierarchical label names its ImageFolder folder: flat, one folder "
                    "named by the full label path joined with '__' (mammals__dog), so "
                    "torchvision's and Hugging Face's imagefolder read the full label and two "
                    "leaves of one name never merge; nested, one folder per level "
                    "(mammals/dog/)")
    image_label_files: list[LabelFormat] = Field(
        default_factory=list,
        description="formats of a label file written next to each ImageFolder image "
                    "(empty: none); needs 'imagefolder' in formats")
    resize: Optional[ResizeSpec] = None
    encode: Optional[EncodeSpec] = None
    overwrite: bool = False
    shared_filesystem: bool = Field(
        default=False, description="a local uri is on a filesystem every node of the cluster "
        "mounts (NFS, ...); a probe on every node checks it before the crawl")

    @field_validator("image_label_files")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _label_files_need_imagefolder(self) -> "OutputSpec":
        if self.image_label_files and "imagefolder" not in self.formats:
            raise _SpecProblems([("image_label_files", (
                "per-image label files are written next to the ImageFolder images, but "
                f"formats {list(self.formats)} has no 'imagefolder': add it to output.formats "
                "or set image_label_files: []"))])
        return self

    @field_validator("splits")
    @classmethod
    def _splits(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("needs at least one split, e.g. {train: 1.0}")
        if "val" in v:
            if "validation" in v:
                raise ValueError("'val' and 'validation' name one split; keep 'validation'")
            v = {("validation" if k == "val" else k): f for k, f in v.items()}
        problems = []
        for name in v:
            if _control_chars(name):
                problems.append((_key(name), _control_problem("split name", name)))
            elif bad_name(name):
                problems.append((name, f"bad split name {name!r}: split names are non-empty, "
                                 "without '/' or '\\', and not '.' or '..'"))
            else:
                rule = name_rule_problem("split name", name)
                if rule:
                    problems.append((_key(name), rule))
        if problems:
            raise _SpecProblems(problems)
        if any(f < 0 for f in v.values()):
            raise ValueError("split fractions must be >= 0")
        total = sum(v.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1.0, got {total:g}")
        return v


MIN_BATCH, MAX_BATCH = 64, 256
"""The range of the default batch size (``DatasetSpec.batch_size``)."""
LIST_GROWTH = 4
"""How far into a URL list, in multiples of the job's target, its slices grow, and by how
much (``DatasetSpec.list_growth``)."""


MAX_ACTORS = 100_000
"""Upper bound of the counts of workers, partitions, units and GPU actors: far beyond any
cluster, and small enough for Ray's float resource arithmetic (10**400 overflowed it)."""
MAX_CPUS = 1024.0
"""Upper bound of the CPUs or GPUs one actor asks for."""
MAX_RESOURCE = 1e9
"""Upper bound of a custom resource amount one worker asks for."""
MAX_BUFFERED_MB = 1 << 20
"""Upper bound of ``resources.max_buffered_mb`` and ``max_held_mb``: a TiB."""
MAX_GPU_BATCH = 65_536
"""Upper bound of ``resources.gpu_batch_size``."""
MAX_BATCH_SIZE = 65_536
"""Upper bound of ``resources.batch_size``: a unit holds its validated images until it is
decided, so one unit of ``batch_size`` candidates can hold ``batch_size`` x ``max_bytes``
(``max_held_mb`` bounds what the worker's other units add to it)."""


class ResourcesSpec(_Model):
    """Ray resources. ``None`` means: size from the cluster (see README, 'Resources')."""

    workers: Optional[int] = Field(
        default=None, ge=1, le=MAX_ACTORS,
        description="shard workers (each fetches, validates, dedups and "
        "writes its units); unset: one per worker_cpus of the cluster")
    worker_cpus: float = Field(default=1.0, gt=0, le=MAX_CPUS, description="CPUs per shard "
                               "worker")
    worker_resources: dict[str, Annotated[float, Field(ge=0, le=MAX_RESOURCE)]] = Field(
        default_factory=dict, description="custom Ray resources each shard worker asks for, "
        "to place workers on some nodes only (e.g. {crawl: 1} for nodes started with "
        "--resources '{\"crawl\": 8}')")
    dedup_partitions: Optional[int] = Field(
        default=None, ge=1, le=MAX_ACTORS,
        description="partitions (actors) of the dedup index; unset: one "
        "per 16 CPUs of the cluster")
    batch_size: Optional[int] = Field(
        default=None, ge=1, le=MAX_BATCH_SIZE, description="candidates per unit of work (a "
        "URL-list slice, a class's inline urls); unset: sized from the job "
        "(DatasetSpec.batch_size)")
    max_in_flight_batches: Optional[int] = Field(
        default=None, ge=1, le=MAX_ACTORS,
        description="units a worker runs at once; unset: enough to keep "
        "download.concurrency fetches in flight")
    max_buffered_mb: int = Field(
        default=512, ge=16, le=MAX_BUFFERED_MB,
        description="bytes a worker holds of accepted images, and of the "
        "decisions of their units (journaled once the images are written), before it writes "
        "a shard early (shards are otherwise output.shard_size rows)")
    max_held_mb: int = Field(
        default=512, ge=0, le=MAX_BUFFERED_MB,
        description="bytes of images a worker's running units hold until each is decided; "
        "past it a unit's next download waits, unless the unit is the worker's oldest "
        "(builder.held); 0: only the oldest unit downloads while any image is held")
    gpu_actors: int = Field(default=1, ge=1, le=MAX_ACTORS)
    gpus_per_actor: float = Field(default=0.0, ge=0, le=MAX_CPUS)
    gpu_actor_cpus: float = Field(default=0.5, gt=0, le=MAX_CPUS,
                                  description="CPUs per slow validator")
    gpu_batch_size: int = Field(default=128, ge=1, le=MAX_GPU_BATCH)
    on_no_gpu: Literal["cpu", "fail"] = "cpu"


def _names_only(items: list[Any], what: str, example: str) -> None:
    """Check that a list-form ``classes`` / ``categories`` holds only name strings (a mapping,
    number or null would otherwise become a label like ``"{'cat': ['a']}"``)."""
    problems = [(str(i), f"{what} in list form is a name string, got {item!r} "
                 f"({type(item).__name__}); to give it queries, a target or urls use the "
                 f"mapping form, e.g. {example}")
                for i, item in enumerate(items) if not isinstance(item, str)]
    if problems:
        raise _SpecProblems(problems)


class DatasetSpec(_Model):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    target: int = Field(default=100, ge=1, description="default target per class")
    classes: dict[str, ClassSpec] = Field(default_factory=dict)
    categories: dict[str, CategoryNode] = Field(default_factory=dict)
    sources: list[SourceSpec] = Field(default_factory=list)
    search: SearchSpec = Field(default_factory=SearchSpec)
    download: DownloadSpec = Field(default_factory=DownloadSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    _category_labels: list[str] = PrivateAttr(default_factory=list)
    """The labels in ``classes`` that came from ``categories`` (left out when dumping)."""

    @field_validator("categories", mode="before")
    @classmethod
    def _category_list(cls, v: Any) -> Any:
        if isinstance(v, list):
            _names_only(v, "a category", "categories: {mammals: {dog: [dog photo]}}")
            return {name: None for name in v}
        return v

    @field_validator("classes", mode="before")
    @classmethod
    def _classes(cls, v: Any) -> Any:
        if isinstance(v, dict):
            out = {}
            for label, body in v.items():
                if body is None:
                    body = {}
                elif isinstance(body, (str, list)):
                    body = {"queries": body}
                out[label] = body
            return out
        if isinstance(v, list):
            _names_only(v, "a class", "classes: {cat: [cat photo, kitten]}")
            return {label: {} for label in v}
        return v

    @model_validator(mode="after")
    def _check(self) -> "DatasetSpec":
        # Idempotent: validate_assignment runs this again on a validated spec, whose classes
        # already hold the leaves merged last time.
        for label in self._category_labels:
            self.classes.pop(label, None)
        self._category_labels = []
        problems: list[tuple[str, str]] = []
        where = {label: f"classes.{label}" for label in self.classes}
        for label in self.classes:
            if _control_chars(label):
                problems.append((f"classes.{_key(label)}",
                                 _control_problem("class label", label)))
            elif bad_label_path(label):
                problems.append((f"classes.{label}", f"bad class label {label!r}: labels are "
                                 "non-empty, '/'-separated names without empty, '.' or '..' "
                                 "parts"))
            else:
                problems += [(f"classes.{_key(label)}", rule) for rule in dict.fromkeys(
                    name_rule_problem("class label part", part) for part in label.split("/"))
                    if rule]
        leaves, leaf_where, tree_problems = flatten_categories(self.categories)
        problems += tree_problems
        problems += [(f"classes.{_key(label)}" if label in self.classes else leaf_where[label],
                      f"bad class label {label[:20]!r}...: a label is at most "
                      f"{LABEL_MAX_BYTES} bytes in UTF-8 (this one is "
                      f"{len(label.encode('utf-8'))}); it becomes a folder path")
                     for label in (*self.classes, *leaves)
                     if len(label.encode("utf-8")) > LABEL_MAX_BYTES]
        for label, body in leaves.items():
            if label in self.classes:
                problems.append((leaf_where[label], f"label {label!r} is also defined under "
                                 f"classes ({where[label]}); define each class once"))
                continue
            self.classes[label] = body
            where[label] = leaf_where[label]
            self._category_labels.append(label)
        parents: dict[str, str] = {}
        for label in self.classes:
            levels = self.levels_of(label)
            for i in range(1, len(levels)):
                parents.setdefault("/".join(levels[:i]), label)
        for label in self.classes:
            if label in parents:
                problems.append((where[label], f"{label!r} is a class and also the parent of "
                                 f"{parents[label]!r}: only leaves are classes; move {label!r} "
                                 f"to a child such as '{label}/other'"))
        if not problems:
            problems += self._folder_problems(where)
        if problems:
            raise _SpecProblems(problems)
        if not self.classes:
            raise _SpecProblems([("classes", "needs at least one class (under classes or "
                                  "categories)")])
        if not self.sources and not any(c.urls for c in self.classes.values()):
            raise _SpecProblems([("sources", "needs at least one source (or per-class 'urls')")])
        return self

    def _folder_problems(self, where: dict[str, str]) -> list[tuple[str, str]]:
        """Labels whose ImageFolder folder names collide (on a filesystem that ignores case or
        Unicode normalisation too, as macOS's and Windows' do: two classes' images would share
        a folder there) or, flat, are too long."""
        if "imagefolder" not in self.output.formats:
            return []
        flat = self.output.imagefolder_labels == "flat"
        problems, seen, folded = [], {}, {}
        for label in self.classes:
            folder = flat_label(label) if flat else label
            fold = unicodedata.normalize("NFC", folder).casefold()
            if fold in folded and folder not in seen:
                other = folded[fold]
                problems.append((where[label], (
                    f"labels {other!r} and {label!r} make ImageFolder folders that differ only "
                    "in case or Unicode form, one folder on macOS and Windows: rename one")))
            folded.setdefault(fold, label)
            if not flat:
                continue
            if len(folder.encode("utf-8")) > NAME_MAX_BYTES:
                problems.append((where[label], (
                    f"label {label[:20]!r}... makes a flat ImageFolder folder name of "
                    f"{len(folder.encode('utf-8'))} bytes (at most {NAME_MAX_BYTES}): shorten "
                    "it or set output.imagefolder_labels: nested")))
            elif folder in seen:
                problems.append((where[label], (
                    f"labels {seen[folder]!r} and {label!r} both make the ImageFolder folder "
                    f"{folder!r}: rename one or set output.imagefolder_labels: nested")))
            seen.setdefault(folder, label)
        return problems

    @field_serializer("classes")
    def _dump_classes(self, classes: dict[str, ClassSpec]) -> dict[str, ClassSpec]:
        """Dump the flat classes only: the leaves merged from ``categories`` are dumped there,
        so a dumped spec parses back to the same classes."""
        merged = set(self._category_labels)
        return {label: body for label, body in classes.items() if label not in merged}

    def target_of(self, label: str) -> int:
        return self.classes[label].target or self.target

    def queries_of(self, label: str) -> list[str]:
        """A class with no queries searches by its own name: the last level of its label, with
        '_' read as a space (``mammals/red_fox`` searches ``red fox``)."""
        return self.classes[label].queries or [self.levels_of(label)[-1].replace("_", " ")]

    def batch_size(self) -> int:
        """Candidates per batch: ``resources.batch_size``, else about 1/32 of the job's total
        target, between 64 and 256.

        Every batch costs a fixed amount (actor calls, one Arrow table, a ledger step), so a
        large job runs on larger batches: at 40,000 images, batches of 256 took 13% less CPU
        than batches of 64 (bench/README.md). A small job keeps small batches, so its first
        results, its progress and a cancel come sooner.
        """
        if self.resources.batch_size:
            return self.resources.batch_size
        return max(MIN_BATCH, min(MAX_BATCH, self.total_target() // 32))

    def total_target(self) -> int:
        return sum(self.target_of(label) for label in self.labels)

    def list_growth(self) -> tuple[int, int]:
        """Where a URL list's slices grow, and to what: ``(rows, rows per slice)``, ``(0, 0)``
        for never. Slices are ``LIST_GROWTH`` x ``batch_size()`` rows (at most ``MAX_BATCH``)
        past the list's first ``LIST_GROWTH`` x the job's total target rows, and never before
        32 grown slices' worth of rows.

        A job still reading past that point accepts fewer than one candidate in
        ``LIST_GROWTH``, so a grown slice holds no more images to accept than a first one
        does, and no grown slice is more than 1/32 of the rows read before it. Its fixed cost
        (the driver's actor call, a journal file, a ledger step, its share of the publish
        step) is spread over more candidates: on a 1M-line list with a target of 4,000
        (bench/README.md) the driver paid 9 us per candidate in the crawl with slices of 256,
        15 us with slices of 125. A list that fills its target before that point is cut as
        without growth; a ``resources.batch_size`` is kept throughout."""
        base = self.batch_size()
        grown = min(MAX_BATCH, LIST_GROWTH * base)
        if self.resources.batch_size or grown <= base:
            return 0, 0
        return max(LIST_GROWTH * self.total_target(), 32 * grown), grown

    @property
    def labels(self) -> list[str]:
        """The class labels (leaf paths for categories): flat classes first, then the
        categories' leaves, each in YAML order."""
        return list(self.classes)

    @staticmethod
    def levels_of(label: str) -> list[str]:
        """The hierarchy levels of a label: ``mammals/dog`` -> ``["mammals", "dog"]``."""
        return label.split("/")

    @property
    def depth(self) -> int:
        """The number of levels of the deepest class (1 for a flat spec)."""
        return max((len(self.levels_of(label)) for label in self.classes), default=0)

    def output_uri(self) -> str:
        return self.output.uri or f"./datasets/{self.name}"

    def public_dump(self) -> dict[str, Any]:
        """The spec's JSON form as it is written where others may read it (the dataset's
        spec.yaml and card, a job's journal): the servers it names with their credentials
        masked (``builder.urls.without_secrets``), so a proxy's password or an endpoint's key
        does not travel with the dataset."""
        data = self.model_dump(mode="json")
        for source in data.get("sources") or []:
            options = source.get("options") or {}
            for holder, key in ((source, "url"), (options, "base_url"), (options, "proxy")):
                if isinstance(holder.get(key), str):
                    holder[key] = without_secrets(holder[key])
            if "://" in (source.get("path") or ""):  # a URL list's URL (a file's path as it is)
                source["path"] = without_secrets(source["path"])
        search = data.get("search") or {}
        if isinstance(search.get("llm_base_url"), str):
            search["llm_base_url"] = without_secrets(search["llm_base_url"])
        _mask_class_urls(data.get("classes"))
        _mask_class_urls(data.get("categories"))
        return data


def _mask_class_urls(node: Any) -> None:
    """Mask the credentials in the ``urls`` of every class (or category, at any depth)
    under ``node``, in place: an image URL may carry a password or a token too."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "urls" and isinstance(value, list):
                node[key] = [without_secrets(u) if isinstance(u, str) else u for u in value]
            else:
                _mask_class_urls(value)


def _allowed_for(loc: tuple, err: dict) -> str:
    """The allowed values for a Literal field, read from the model, for the error message."""
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        return str(ctx["expected"])
    return ""


def _format_errors(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and
                                                              p.startswith("function-")))
        found = (err.get("ctx") or {}).get("error")
        if isinstance(found, _SpecProblems):
            problems += [(f"{path}.{sub}" if path else sub, msg) for sub, msg in found.problems]
            continue
        value = err.get("input")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
            parent = _model_at(err["loc"][:-1])
            if parent is not None:
                msg += "; valid fields: " + ", ".join(parent.model_fields)
        elif err["type"] in ("literal_error", "enum"):
            msg = f"{value!r} is not valid; allowed: {_allowed_for(err['loc'], err)}"
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        elif not isinstance(value, (dict, list)) and value is not None:
            msg = f"{msg} (got {value!r})"
        problems.append((path or "(top level)", msg))
    return problems


def _model_at(loc: tuple) -> Optional[type[BaseModel]]:
    """The model class at a location path in DatasetSpec, for listing its valid fields."""
    model: Any = DatasetSpec
    keyed = False  # the next part is a key of a mapping field (a class name, a host)
    for part in loc:
        if isinstance(part, int):
            continue
        if keyed:
            keyed = False
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        keyed = _is_mapping(ann)
        model = _unwrap(ann)
        if model is None and str(part) == "classes":
            model = ClassSpec
    if isinstance(model, type) and issubclass(model, BaseModel):
        return model
    return None


def _is_mapping(ann: Any) -> bool:
    if get_origin(ann) is dict:
        return True
    return get_origin(ann) is Union and any(_is_mapping(arg) for arg in get_args(ann))


def _unwrap(ann: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in get_args(ann):
        found = _unwrap(arg)
        if found is not None:
            return found
    return None


def parse_spec(data: Any, source: str = "spec", *, stored: bool = False) -> DatasetSpec:
    """Validate a mapping as a DatasetSpec, raising SpecError with every problem listed.
    ``stored``: a spec PixCrawler saved itself, maybe by an earlier version: what that
    version accepted and this one does not is read as ``upgrade_saved_spec`` says, with a
    warning, and a source's server that is no http(s) URL with a host (refused in a new
    spec, after the model's own checks) is kept."""
    if stored:
        data, changes = upgrade_saved_spec(data)
        if changes:
            log.warning("%s (saved by an earlier version): %s", source, "; ".join(changes))
    if not isinstance(data, dict):
        raise SpecError([("(top level)", f"a spec is a mapping, got {type(data).__name__}")],
                        source)
    try:
        spec = DatasetSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_format_errors(exc), source) from None
    problems = [(f"sources.{i}.{ENDPOINT_FIELDS[src.engine]}", "must be an http:// or "
                 f"https:// URL with a host name, not {without_secrets(url)[:120]!r}")
                for i, src in enumerate(spec.sources)
                if (url := src.endpoint()) is not None and not _serves_http(url)]
    if problems and not stored:
        raise SpecError(problems, source)
    for field, problem in problems:  # (one an earlier version saved still loads)
        log.warning("%s (saved by an earlier version): %s %s; that source's searches fail",
                    source, field, problem)
    return spec


def require_trusted_networks(spec: DatasetSpec, uri: str, command: str,
                             allowed: bool) -> None:
    """Refuse to let the spec a dataset holds open this machine's network to ``command``
    unless its user says so (``allowed``, ``--allow-private-networks``): a dataset from
    elsewhere (a shared bucket, a download) could name loopback, the LAN or a cloud's
    metadata service among its images' URLs and set ``download.allow_private_networks``,
    and the command would request them (``retry-failed`` writing what they answer into the
    dataset)."""
    if spec.download.allow_private_networks and not allowed:
        raise SpecError([("--allow-private-networks", f"{uri}'s spec sets "
                          "download.allow_private_networks, which lets its images' URLs name "
                          f"this machine's own network; {command} requests them only when "
                          "given --allow-private-networks (pass it for a dataset you trust)")])


def weaker_opt_outs(download: DownloadSpec) -> list[str]:
    """The settings of ``download`` that honour less than PixCrawler's defaults: robots.txt or
    the opt-out signals turned off, a narrower ``signals.usage``, a host faster than its
    built-in profile (a site's published robot policy)."""
    from builder.profiles import faster_than_published  # (it imports this module)

    out = [f"download.{name}: false" for name in ("respect_robots", "respect_optouts")
           if not getattr(download, name)]
    defaults = SignalsSpec()
    out += [f"download.signals.{name}: false" for name in SignalsSpec.model_fields
            if getattr(defaults, name) is True and getattr(download.signals, name) is False]
    if download.signals.usage != defaults.usage:
        out.append(f"download.signals.usage: {download.signals.usage}")
    out += [f"download.hosts.{host}.{name}: {mine:g} ({host}'s published policy: {theirs:g})"
            for host, profile in download.hosts.items()
            for name, mine, theirs in faster_than_published(host, profile)]
    return out


def require_trusted_opt_outs(spec: DatasetSpec, uri: str, command: str,
                             allowed: bool) -> None:
    """Refuse to let the spec a dataset holds honour fewer opt-outs in ``command`` than
    PixCrawler's defaults (``weaker_opt_outs``) unless its user says so (``allowed``,
    ``--allow-weaker-opt-outs``): a dataset from elsewhere could turn robots.txt off, and
    ``retry-failed`` would fetch what its sites refuse, ``recheck`` report nothing to remove."""
    weaker = weaker_opt_outs(spec.download)
    if weaker and not allowed:
        raise SpecError([("--allow-weaker-opt-outs", f"{uri}'s spec honours less than "
                          f"PixCrawler's defaults ({'; '.join(weaker)}); {command} keeps such "
                          "settings only when given --allow-weaker-opt-outs (pass it for a "
                          "dataset you trust, such as one you built so)")])


MAX_ALIAS_VALUES = 100_000
"""How many YAML nodes (keys, values, lists and mappings) a spec's aliases may add, in all,
to those it writes out. An alias
repeats its anchor's value without its text, so nested ones double a spec at each level: 552
bytes (a dataset's spec.yaml from elsewhere, read by ``retry-failed`` or ``recheck``) stood
for 131,070 classes and took 7.5 s and 395 MB to check, and each level more doubled that."""


def loads_spec(text: str, source: str = "spec", *, stored: bool = False) -> DatasetSpec:
    """Parse YAML (a superset of JSON) text as a spec (``stored``: see ``parse_spec``)."""
    loader: Optional[yaml.SafeLoader] = None
    try:
        loader = yaml.SafeLoader(text)  # (its reader refuses control characters already)
        node = loader.get_single_node()
        if node is not None:
            _check_aliases(node, source)
        data = loader.construct_document(node) if node is not None else None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: a number too long to convert
        raise SpecError([("(file)", f"not valid YAML/JSON: {exc}")], source) from None
    except RecursionError:
        raise SpecError([("(file)", "not valid YAML/JSON: nested too deeply")], source) from None
    finally:
        if loader is not None:
            loader.dispose()
    return parse_spec(data, source, stored=stored)


def _check_aliases(root: yaml.Node, source: str) -> None:
    """Refuse a document whose aliases add over ``MAX_ALIAS_VALUES`` values to those written
    out, or one whose alias stands inside its own anchor's value."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        children = _children(node)
        if done:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_nodes:
            raise SpecError([("(file)", "a YAML alias stands inside the value of its own "
                              "anchor, which would make the spec endless; write it out")], source)
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    repeated = sizes[id(root)] - len(sizes)
    if repeated > MAX_ALIAS_VALUES:
        raise SpecError([("(file)", f"its YAML aliases repeat {repeated:,} keys and values (at "
                          f"most {MAX_ALIAS_VALUES:,}): a spec of many classes is written out "
                          "in full (or its classes generated by a script)")], source)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def load_spec(path: Union[str, Path]) -> DatasetSpec:
    """Load a spec from a .yaml/.yml/.json file."""
    p = Path(path)
    if not p.is_file():
        raise SpecError([("(file)", f"no such file: {p}")], str(p))
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([("(file)", f"not UTF-8 text: {exc}; save the spec as UTF-8")],
                        str(p)) from None
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:  # JSONDecodeError, or a number too long to convert
            raise SpecError([("(file)", f"not valid JSON: {exc}")], str(p)) from None
        except RecursionError:
            raise SpecError([("(file)", "not valid JSON: nested too deeply")], str(p)) from None
        return parse_spec(data, str(p))
    return loads_spec(text, str(p))
