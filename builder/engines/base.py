"""The one interface every search source implements.

A source answers ``search(query, label=, page=, per_page=)`` with a ``SearchPage``: hits plus
whether more pages exist. Query-based engines (the sandbox, DuckDuckGo, ...) use ``query``;
list sources (``query_based = False``) ignore it and page through the label's URLs. Engines are
synchronous and hold no rate limiting of their own: the rate limiter actor paces them.
Failures raise ``EngineError`` (``retryable`` for 429/5xx/network), never return bad data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from builder.records import Candidate


@dataclass(frozen=True)
class SearchHit:
    url: str
    rank: int = 0
    page_url: str = ""
    title: str = ""
    license: str = ""
    author: str = ""
    label: str = ""

    def to_candidate(self, label: str, query: str, engine: str) -> Candidate:
        return Candidate(url=self.url, label=self.label or label, query=query, engine=engine,
                         rank=self.rank, page_url=self.page_url, title=self.title,
                         license=self.license, author=self.author)


@dataclass
class SearchPage:
    hits: list[SearchHit] = field(default_factory=list)
    has_more: bool = False


class SearchEngine(ABC):
    """A source of candidate image URLs."""

    name: ClassVar[str] = ""
    query_based: ClassVar[bool] = True

    @abstractmethod
    def search(self, query: str, *, label: str, page: int, per_page: int) -> SearchPage:
        """Return page ``page`` (0-based) of results for ``query`` (or ``label``)."""

    def close(self) -> None:
        """Release any connection the engine holds."""
