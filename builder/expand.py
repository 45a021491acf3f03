"""Keyword expansion: more search queries for a class, from an LLM or from offline templates.

``KeywordExpander.expand(label, queries)`` asks an OpenAI-compatible chat endpoint (OpenAI, or a
local server: vLLM, Ollama, llama.cpp) for synonyms, sub-types and visual contexts of the class,
as JSON ``{"queries": [...]}``. Answers are cached in memory and on disk, keyed by everything
the answer depends on (``KeywordExpander.cache_key``); the disk cache is shared by every job on
the machine, so a key must never match an answer written for other inputs. When no endpoint is
configured, or the call fails in any way (connection, timeout, HTTP error, an answer that is not
the JSON asked for), the expander falls back to ``offline_expand`` and logs one warning: a job
never fails because the LLM is down.

Configuration, first found wins: constructor arguments, then env ``PIXCRAWLER_LLM_BASE_URL`` /
``OPENAI_BASE_URL``, ``PIXCRAWLER_LLM_API_KEY`` / ``OPENAI_API_KEY``, ``PIXCRAWLER_LLM_MODEL``.
An endpoint is "configured" when a base URL or an API key is known; a local server without
keys gets a placeholder key.

Whose key goes where. The environment's key is the operator's and belongs to the operator's
endpoint: the environment's base URL, else OpenAI's (``DEFAULT_BASE_URL``). A ``base_url`` given
to the constructor (a spec's ``search.llm_base_url``, which whoever submits the spec chooses)
gets that key only when it is the same endpoint (scheme, host, port and path; a trailing ``/``
aside). An ``api_key`` given with it is that endpoint's own key and is used as given. Any other
endpoint, while the operator has a key, is not called at all: the expander goes offline and logs
why (sending it no key would leak nothing, but would spend the spec's requests on an endpoint
the operator did not choose and that cannot authenticate them). With no operator key there is
nothing to leak and such an endpoint is called with the placeholder key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable

from yarl import URL

from builder.text import well_formed
from builder.urls import without_secrets

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
"""The endpoint the openai client uses when no base URL is configured."""
DEFAULT_CACHE_DIR = "~/.cache/pixcrawler/keywords"
# Disk cache entries older than this are ignored (and overwritten by the next answer).
CACHE_MAX_AGE_S = 30 * 24 * 3600.0
# Bumped when the cache key or the entry format changes.
CACHE_FORMAT = 2
MAX_QUERY_CHARS = 120
MAX_PROMPT_QUERIES = 20
"""The class's own queries a prompt shows the model (each cut to ``MAX_QUERY_CHARS``): what a
call costs stays bounded however many a spec lists."""
TOKENS_PER_QUERY = 48
"""The answer's token budget per query asked for (a query is at most 8 words; in Chinese or
Japanese a word can take several tokens), plus 32 for the JSON around them: the call's cost is
bounded whatever the model does. Sent as ``max_tokens``, which the chat models and local
servers take; a model that refuses it gets ``max_completion_tokens`` (``adapted_options``)."""
REASONING_TOKENS = 1024
"""What a model that refuses ``max_tokens`` may spend besides the answer: OpenAI's reasoning
models (o-series, gpt-5) count their reasoning in ``max_completion_tokens``, and are asked for
``reasoning_effort: low``."""
FIXED_OPTIONS = frozenset({"max_completion_tokens"})
"""Options never dropped when an endpoint refuses them: without a token limit a call's cost
would be unbounded."""
MAX_ADAPTATIONS = 4
"""Refused options a call drops, one per attempt, before it counts as failed (a reasoning model
may refuse ``max_tokens``, ``temperature``, ``reasoning_effort`` and ``response_format``)."""
# After this many failed LLM calls in a row an expander stops trying and stays offline.
MAX_CONSECUTIVE_FAILURES = 2

OFFLINE_TEMPLATES = (
    "{label} photo",
    "{label} close-up",
    "{label} outdoors",
    "a {label} in the wild",
    "{label} high resolution",
    "{label} side view",
    "{label} front view",
    "{label} indoors",
    "{label} in natural light",
    "{label} on white background",
    "group of {label}",
    "{label} detail shot",
    "{label} at night",
    "{label} real photo",
    "{label} from above",
    "{label} in daylight",
)

_SYSTEM_PROMPT = (
    "You write web image-search queries that find photographs of one class for an image "
    "classification dataset. Answer only with a JSON object {\"queries\": [\"...\", ...]}."
)
_USER_PROMPT = (
    "Class label: {label}\n"
    "Queries already used: {queries}\n"
    "Write {n} more distinct image-search queries for this class: synonyms, sub-types and "
    "typical visual contexts, each at most 8 words, none repeating the ones already used.")
_REQUEST_OPTIONS: dict[str, Any] = {"response_format": {"type": "json_object"},
                                    "temperature": 0.2}
PROMPT_VERSION = hashlib.sha256(json.dumps([_SYSTEM_PROMPT, _USER_PROMPT, _REQUEST_OPTIONS],
                                           sort_keys=True).encode("utf-8")).hexdigest()[:16]
"""Part of every cache key: any change to the prompts or request options invalidates old
entries without anyone having to remember to bump a number."""
_FENCE_TAG = re.compile(r"[a-zA-Z0-9_-]*")
"""A Markdown code fence's language tag (```json)."""
MAX_ANSWER_CHARS = 64 * 1024
"""The longest LLM answer read; a longer one is refused (asked for ``n`` short queries, an
answer is a few hundred characters)."""


def _norm(query: str) -> str:
    return " ".join(query.casefold().split())


def _dedup(candidates: Iterable[str], exclude: Iterable[str], n: int) -> list[str]:
    """First ``n`` distinct candidates (case/whitespace-insensitive) not in ``exclude``."""
    seen = {_norm(q) for q in exclude}
    out: list[str] = []
    for q in candidates:
        q = " ".join(str(q).split())
        key = _norm(q)
        if not key or key in seen or len(q) > MAX_QUERY_CHARS:
            continue
        seen.add(key)
        out.append(q)
        if len(out) >= n:
            break
    return out


def _label_text(label: str) -> str:
    return " ".join(label.replace("/", " ").replace("_", " ").replace("-", " ").split())


def offline_expand(label: str, queries: list[str], n: int) -> list[str]:
    """``n`` extra queries from fixed templates over the label (and then over its queries)."""
    if n <= 0:
        return []
    subjects = [_label_text(label)] + [q for q in queries if _norm(q) != _norm(label)]
    candidates = [t.format(label=s) for s in subjects for t in OFFLINE_TEMPLATES]
    return _dedup(candidates, [*queries, _label_text(label)], n)


def parse_queries(content: str) -> list[str]:
    """The query list from an LLM answer: JSON ``{"queries": [...]}`` or a bare list, possibly
    inside a Markdown code fence. Raises ValueError for anything else. (No regular expression
    spans the answer: one did, and an answer of an unclosed fence and 2,000 spaces took 4 s
    to read, 10,000 spaces minutes.)"""
    if len(content or "") > MAX_ANSWER_CHARS:
        raise ValueError(f"answer of {len(content)} characters (at most {MAX_ANSWER_CHARS})")
    text = (content or "").strip()
    if len(text) >= 6 and text.startswith("```") and text.endswith("```"):
        inner = text[3:-3]
        text = inner[_FENCE_TAG.match(inner).end():].strip()
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError:
        start, end = text.find("{"), text.rfind("}")
        if start < 0 or end <= start:
            raise ValueError(f"answer is not JSON: {text[:80]!r}") from None
        data = json.loads(text[start:end + 1])
    if isinstance(data, dict):
        data = data.get("queries")
    if not isinstance(data, list) or not all(isinstance(q, str) for q in data):
        raise ValueError(f"answer has no list of strings under 'queries': {text[:80]!r}")
    return [well_formed(q) for q in data]  # JSON may spell a lone surrogate


def _llm_errors() -> tuple[type[BaseException], ...]:
    """What a failed LLM call can raise: the client's errors (connection, timeout, HTTP status),
    a missing ``openai`` package, and malformed answers (RecursionError: JSON nested past
    Python's limit)."""
    errors: tuple[type[BaseException], ...] = (ImportError, OSError, ValueError, TypeError,
                                               KeyError, IndexError, AttributeError,
                                               RecursionError)
    try:
        from openai import OpenAIError
    except ImportError:
        return errors
    return (OpenAIError, *errors)


def adapted_options(options: dict[str, Any], exc: BaseException) -> dict[str, Any] | None:
    """The request's options without what the endpoint refused, or None when nothing can be
    changed. A refusal is a 400 naming the parameter (OpenAI's ``param``: reasoning models
    refuse ``max_tokens`` and any ``temperature`` but 1): ``max_tokens`` becomes
    ``max_completion_tokens`` with room to reason; another refused option is left out, but
    never the token limit (``FIXED_OPTIONS``)."""
    param = getattr(exc, "param", None)
    if getattr(exc, "status_code", None) != 400 or not isinstance(param, str) \
            or param not in options or param in FIXED_OPTIONS:
        return None
    out = {k: v for k, v in options.items() if k != param}
    if param == "max_tokens":
        out["max_completion_tokens"] = options["max_tokens"] + REASONING_TOKENS
        out["reasoning_effort"] = "low"
    return out


def same_endpoint(a: str, b: str) -> bool:
    """Whether two base URLs name the same endpoint: scheme, host and port (default ports
    filled in) and path, ignoring case in scheme and host and a trailing ``/``."""
    try:
        x, y = URL(a), URL(b)
        return (x.scheme.lower(), (x.host or "").lower(), x.port, x.path.rstrip("/")) == \
            (y.scheme.lower(), (y.host or "").lower(), y.port, y.path.rstrip("/"))
    except (ValueError, TypeError):
        return False


def _operator_url() -> str | None:
    return os.environ.get("PIXCRAWLER_LLM_BASE_URL") or os.environ.get("OPENAI_BASE_URL")


def operator_endpoint() -> str:
    """The operator's LLM endpoint: the one the server's API key is sent to, and that a job
    calls when its spec names none."""
    return _operator_url() or DEFAULT_BASE_URL


def cache_endpoint(base_url: str) -> str | None:
    """The endpoint as it goes into a cache key: scheme and host lower-cased, port filled in,
    raw path without a trailing ``/``. None (do not cache) for a URL that is not absolute or
    that carries user info, a query or a fragment: these may hold credentials, which must
    never be written into a key, and leaving them out would let two endpoints share entries."""
    try:
        u = URL(base_url)
    except (ValueError, TypeError):
        return None
    if not u.is_absolute() or not u.host or u.user is not None or u.password is not None \
            or u.query_string or u.fragment:
        return None
    return f"{u.scheme.lower()}://{u.host.lower()}:{u.port}{u.raw_path.rstrip('/')}"


class KeywordExpander:
    def __init__(self, *, base_url: str | None = None, api_key: str | None = None,
                 model: str | None = None, n: int = 5, cache_dir: str | None = None,
                 timeout_s: float = 20.0):
        env = os.environ.get
        operator_url = _operator_url()
        operator_key = env("PIXCRAWLER_LLM_API_KEY") or env("OPENAI_API_KEY")
        self.base_url = base_url or operator_url
        self.shown = without_secrets(str(base_url))[:200] if base_url else \
            "the server's LLM endpoint" if operator_url else "OpenAI"
        """The endpoint as messages name it: the operator's URL never (it may hold
        credentials, and a failed API job's error keeps the WARNING lines)."""
        self.api_key = api_key
        self.withheld = ""  # why the endpoint is not called (not the operator's), or ""
        if not api_key and operator_key:
            operator = operator_endpoint()
            if same_endpoint(self.base_url or DEFAULT_BASE_URL, operator):
                self.api_key = operator_key
            else:
                self.withheld = (
                    f"search.llm_base_url {self.shown} is not the operator's LLM "
                    "endpoint, and the server's API key is sent only there; "
                    "using offline query templates (leave search.llm_base_url unset, or set "
                    "PIXCRAWLER_LLM_BASE_URL to this endpoint on the server)")
        self.model = model or env("PIXCRAWLER_LLM_MODEL") or DEFAULT_MODEL
        self.n = n
        self.cache_dir = Path(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR))
        self.timeout_s = timeout_s
        self.source = "offline"
        self._memory: dict[str, list[str]] = {}
        self._client: Any = None
        self._options: dict[str, Any] = {**_REQUEST_OPTIONS,
                                         "max_tokens": TOKENS_PER_QUERY * n + 32}
        """What a call sends besides the model and messages, as the endpoint took it."""
        self._failures = 0
        self._warned = False

    @property
    def configured(self) -> bool:
        return bool(self.base_url or self.api_key)

    def expand(self, label: str, queries: list[str]) -> list[str]:
        """``n`` extra queries for ``label``, none equal to one of ``queries``."""
        exclude = [*queries, _label_text(label)]
        suggestions = self._llm_queries(label, queries)
        if suggestions is None:
            self.source = "offline"
            return offline_expand(label, queries, self.n)
        self.source = "llm"
        picked = _dedup(suggestions, exclude, self.n)
        if len(picked) < self.n:
            picked += _dedup(offline_expand(label, queries, self.n), [*exclude, *picked],
                             self.n - len(picked))
        return picked

    def cache_key(self, label: str, queries: list[str]) -> str | None:
        """sha256 (hex) of everything the LLM's answer depends on: the cache format, the prompt
        version, the label, the queries as given (the prompt lists them in this order), n, the
        model and the normalised endpoint (never an API key). None when the endpoint cannot be
        keyed safely (``cache_endpoint``): then nothing is cached."""
        endpoint = cache_endpoint(self.base_url or DEFAULT_BASE_URL)
        if endpoint is None:
            return None
        material = {"format": CACHE_FORMAT, "prompt": PROMPT_VERSION, "label": label,
                    "queries": list(queries), "n": self.n, "model": self.model,
                    "endpoint": endpoint}
        canonical = json.dumps(material, sort_keys=True, ensure_ascii=True)
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()

    def _llm_queries(self, label: str, queries: list[str]) -> list[str] | None:
        key = self.cache_key(label, queries)
        if key is not None:
            if key in self._memory:
                return self._memory[key]
            cached = self._read_disk(key)
            if cached is not None:
                self._memory[key] = cached
                return cached
        if not self.configured:
            self._warn("no LLM endpoint configured (set PIXCRAWLER_LLM_BASE_URL or "
                       "OPENAI_API_KEY); using offline query templates")
            return None
        if self.withheld:
            self._warn(f"keyword expansion: {self.withheld}")
            return None
        if self._failures >= MAX_CONSECUTIVE_FAILURES:
            return None
        try:
            result = self._ask(label, queries)
        except _llm_errors() as exc:
            self._failures += 1
            # The error may quote the endpoint's answer (openai's carry its whole body, which
            # can name the key); a failed API job's error keeps its WARNING lines.
            log.debug("keyword expansion failed: %r", exc)
            status = getattr(exc, "status_code", None)
            self._warn(f"keyword expansion via {self.shown} ({self.model}) "
                       f"failed: {type(exc).__name__}" + (f" (HTTP {status})" if status else "")
                       + "; using offline query templates (the whole error is in the debug "
                       "log)")
            return None
        self._failures = 0
        if key is not None:
            self._memory[key] = result
            self._write_disk(key, result)
        return result

    def _ask(self, label: str, queries: list[str]) -> list[str]:
        if self._client is None:
            from openai import DefaultHttpxClient, OpenAI

            # No redirects (the client follows them by default): an endpoint the HTTP API's
            # operator allows (llm_base_urls) could otherwise send the call on anywhere the
            # server reaches, its internal network included.
            self._client = OpenAI(base_url=self.base_url, api_key=self.api_key or "not-needed",
                                  timeout=self.timeout_s, max_retries=0,
                                  http_client=DefaultHttpxClient(follow_redirects=False))
        shown = [q[:MAX_QUERY_CHARS] for q in queries[:MAX_PROMPT_QUERIES]]
        prompt = _USER_PROMPT.format(label=_label_text(label),
                                     queries=json.dumps(shown, ensure_ascii=False), n=self.n)
        messages = [{"role": "system", "content": _SYSTEM_PROMPT},
                    {"role": "user", "content": prompt}]
        for attempt in range(MAX_ADAPTATIONS + 1):
            try:
                resp = self._client.chat.completions.create(model=self.model,
                                                            messages=messages, **self._options)
                break
            except _llm_errors() as exc:
                options = adapted_options(self._options, exc)
                if options is None or attempt == MAX_ADAPTATIONS:
                    raise
                log.info("keyword expansion: %s refused %r; asking again without it",
                         self.model, getattr(exc, "param", None))
                self._options = options
        return parse_queries(resp.choices[0].message.content or "")

    def _cache_path(self, key: str) -> Path:
        """``key`` is a sha256 hex digest, so the name cannot leave the cache directory. Entries
        of the old format were named by a 24-digit digest of (label, model) and are never
        looked up."""
        return self.cache_dir / f"{key}.json"

    def _read_disk(self, key: str) -> list[str] | None:
        path = self._cache_path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.debug("ignoring unreadable keyword cache %s: %s", path, exc)
            return None
        if not isinstance(data, dict) or data.get("key") != key:
            return None
        created, cached = data.get("created"), data.get("queries")
        # Chained comparison: a NaN, infinite or future timestamp fails it too.
        if not isinstance(created, (int, float)) or \
                not 0 <= time.time() - created <= CACHE_MAX_AGE_S or not isinstance(cached, list):
            return None
        return [str(q) for q in cached]

    def _write_disk(self, key: str, queries: list[str]) -> None:
        """Write the entry readable by its owner only (the folder it creates too): what a job
        searches for is the user's own business, and an entry another user could change would
        steer that user's searches."""
        path = self._cache_path(key)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            text = json.dumps({"key": key, "created": time.time(), "queries": queries},
                              ensure_ascii=False)
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w",
                      encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("cannot write keyword cache %s: %s", path, exc)

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning(message)
