"""The one interface every search source implements.

A source answers ``search(query, label=, page=, per_page=)`` with a ``SearchPage``: hits plus
whether more pages exist. Query-based engines (the sandbox, DuckDuckGo, ...) use ``query``;
list sources (``query_based = False``) ignore it and page through the label's URLs. Engines are
synchronous and hold no rate limiting of their own: the rate limiter actor paces them.
Failures raise ``EngineError`` (``retryable`` for 429/5xx/network), never return bad data.

That contract is enforced here, once for every engine: each subclass's ``search`` is wrapped so
that an exception from parsing a malformed answer (a ``KeyError``, ``TypeError``, ``ValueError``,
``OverflowError``... from JSON of the wrong shape) becomes a retryable ``EngineError`` naming the
engine, and a ``SearchHit`` refuses non-string fields, so no such value reaches the job's URL
checks. Engines still parse defensively, so the good hits of an odd page come through.
The message of every error leaving ``search`` is cut to ``MAX_ERROR_CHARS``: it is shown to users
(the job's ``search_errors``) and may quote what a server answered.

One search may take several HTTP requests (Google answers 10 results a request, Commons 50).
The wrapper counts them (``count_request``, which ``webjson.fetch`` calls for each) into the
``SearchPage``'s ``requests``, or the ``EngineError``'s, so that the rate limiter charges the
engine's budget for every request, not one a search.
"""

from __future__ import annotations

import functools
import logging
from abc import ABC, abstractmethod
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

from builder.errors import EngineError, SourceError, printable
from builder.records import Candidate
from builder.urls import MAX_URL_CHARS

log = logging.getLogger("pixcrawler.engines")

MALFORMED_ERRORS: tuple[type[Exception], ...] = (
    LookupError, TypeError, AttributeError, ValueError, ArithmeticError, RecursionError)
"""What parsing an answer of the wrong shape raises; ``search`` turns these into EngineError."""

_TEXT_FIELDS = ("url", "page_url", "title", "license", "author", "label", "caption")
_CUT_FIELDS = ("title", "license", "author", "label", "caption")
MAX_TEXT_CHARS = 1000
"""The longest title, license, author, label or caption a hit keeps (longer ones are cut):
they go into every output row of the image. A page URL longer than ``MAX_URL_CHARS`` is
dropped; the image's own URL is refused where it is fetched."""
MAX_ERROR_CHARS = 600
"""The longest message of an error raised by ``search``; longer ones are cut."""


@dataclass(frozen=True)
class SearchHit:
    """One result. Every text field must be a ``str`` (``TypeError`` otherwise)."""

    url: str
    rank: int = 0
    page_url: str = ""
    title: str = ""
    license: str = ""
    author: str = ""
    label: str = ""
    caption: str = ""
    """The text the engine gives for the image (alt text, description); '' when it gives only
    a title (the output's ``caption`` column then falls back to the title)."""

    def __post_init__(self) -> None:
        for name in _TEXT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"SearchHit.{name} must be a str, not "
                                f"{type(value).__name__} ({value!r:.80})")
        if not isinstance(self.rank, int):
            raise TypeError(f"SearchHit.rank must be an int, not {type(self.rank).__name__}")
        for name in _CUT_FIELDS:
            if len(getattr(self, name)) > MAX_TEXT_CHARS:
                object.__setattr__(self, name, getattr(self, name)[:MAX_TEXT_CHARS])
        if len(self.page_url) > MAX_URL_CHARS:
            object.__setattr__(self, "page_url", "")

    def to_candidate(self, label: str, query: str, engine: str) -> Candidate:
        return Candidate(url=self.url, label=self.label or label, query=query, engine=engine,
                         rank=self.rank, page_url=self.page_url, title=self.title,
                         license=self.license, author=self.author, caption=self.caption)


@dataclass
class SearchPage:
    hits: list[SearchHit] = field(default_factory=list)
    has_more: bool = False
    requests: int = 0
    """The HTTP requests the search took (set by the wrapper, ``count_request``)."""


SearchFn = Callable[..., SearchPage]

_REQUESTS: ContextVar[Optional[list[int]]] = ContextVar("engine_requests", default=None)


def count_request() -> None:
    """Count one HTTP request of the engine search under way in this context, if any."""
    counter = _REQUESTS.get()
    if counter is not None:
        counter[0] += 1


def _checked(engine: "SearchEngine", search: SearchFn, query: str, *, label: str, page: int,
             per_page: int) -> SearchPage:
    """``search``'s page, or only an ``EngineError`` or ``SourceError`` (messages cut to
    ``MAX_ERROR_CHARS``). A page holds at most ``per_page`` hits: a unit sent again fetches
    every hit of its page, so an answer of a million hits must not become a million
    downloads."""
    name = engine.name or type(engine).__name__
    try:
        result = search(engine, query, label=label, page=page, per_page=per_page)
    except (EngineError, SourceError) as exc:
        message = printable(str(exc))  # (a server's words: no escape sequence of its own)
        if len(message) > MAX_ERROR_CHARS:
            message = message[:MAX_ERROR_CHARS] + "\u2026"
        if message != str(exc):
            exc.args = (message,)
        raise
    except MALFORMED_ERRORS as exc:
        log.debug("%s: malformed response", name, exc_info=True)
        raise EngineError(f"{name}: malformed response: {type(exc).__name__}: "
                          f"{printable(str(exc))[:MAX_ERROR_CHARS]}", retryable=True) from exc
    if not isinstance(result, SearchPage) or \
            not all(isinstance(h, SearchHit) for h in result.hits):
        raise EngineError(f"{name}: malformed response: search gave "
                          f"{type(result).__name__}, not a SearchPage of SearchHits",
                          retryable=True)
    if len(result.hits) > per_page:
        log.debug("%s: %d hits for a page of %d: the rest dropped", name, len(result.hits),
                  per_page)
        result.hits = result.hits[:per_page]
    return result


def _guarded(search: SearchFn) -> SearchFn:
    """``search`` with malformed-answer exceptions turned into a retryable ``EngineError``
    (``_checked``), and its HTTP requests counted (``count_request``)."""

    @functools.wraps(search)
    def guarded(self: "SearchEngine", query: str, *, label: str, page: int,
                per_page: int) -> SearchPage:
        requests = [0]
        token = _REQUESTS.set(requests)
        try:
            result = _checked(self, search, query, label=label, page=page, per_page=per_page)
        except EngineError as exc:
            exc.requests = requests[0]
            raise
        finally:
            _REQUESTS.reset(token)
        result.requests = requests[0]
        return result

    setattr(guarded, "_engine_guarded", True)
    return guarded


class SearchEngine(ABC):
    """A source of candidate image URLs."""

    name: ClassVar[str] = ""
    query_based: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        search = cls.__dict__.get("search")
        if callable(search) and not getattr(search, "_engine_guarded", False) and \
                not getattr(search, "__isabstractmethod__", False):
            cls.search = _guarded(search)  # type: ignore[method-assign]

    @abstractmethod
    def search(self, query: str, *, label: str, page: int, per_page: int) -> SearchPage:
        """Return page ``page`` (0-based) of results for ``query`` (or ``label``).

        Subclasses implement this; it is wrapped so that it raises only ``EngineError`` or
        ``SourceError`` and returns only a ``SearchPage`` of ``SearchHit``.
        """

    def close(self) -> None:
        """Release any connection the engine holds."""
