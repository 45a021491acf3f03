"""Exception types. Sample-level problems are never exceptions: they are reason codes on records."""

from __future__ import annotations


class PixCrawlerError(Exception):
    """Base class for errors a user can act on; the message says what to do."""


class SpecError(PixCrawlerError):
    """The dataset spec is invalid. ``problems`` lists (field path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "spec"):
        self.problems = problems
        lines = [f"invalid dataset spec ({source}):"]
        lines += [f"  {path}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


class OutputExistsError(PixCrawlerError):
    """The output location already holds a complete dataset."""


class CancelledUnpublished(PixCrawlerError):
    """A resumed job was cancelled before it finished the units an earlier run left
    half-written: their images are in shards that no count holds, so nothing is published and
    the journal stays for ``--resume``."""


class JobInterrupted(PixCrawlerError):
    """The job cannot go on (its workers keep failing); what was committed is journaled, and
    the message says how to continue."""


class StorageError(PixCrawlerError):
    """The output location cannot be reached or written."""


class SourceError(PixCrawlerError):
    """A search source cannot be used as configured (missing file, bad column, no credentials)."""


class EngineUnavailable(SourceError):
    """An engine is disabled here (for example its credentials are missing)."""


class EngineNeedsKey(EngineUnavailable):
    """An engine needs credentials that are not set; the message names them."""


class EngineSunset(EngineUnavailable):
    """An engine's service has ended; the message says when and what to use instead."""


class EngineError(PixCrawlerError):
    """An engine request failed; ``retryable`` tells the rate limiter whether to back off."""

    def __init__(self, message: str, *, status: int = 0, retryable: bool = True,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        self.requests = 0
        """The HTTP requests the failed search had taken (``builder.engines.base``)."""


class ModelLoadError(PixCrawlerError):
    """A validator model cannot be loaded (missing extra, unknown id, no network to a hub)."""


def printable(text: str) -> str:
    """``text`` for a terminal, a log or a message: whitespace collapsed, other unprintable
    characters (a server's escape sequences among them) shown as ``?``."""
    return _shown(" ".join(text.split()))


def printable_lines(text: str) -> str:
    """``text`` for a terminal with its lines and indentation kept: every other unprintable
    character shown as ``?``. For a message of several lines that may quote what a dataset's
    files hold (a marker's job id, a folder's name)."""
    return "\n".join(_shown(line) for line in text.split("\n"))


def _shown(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)
