"""Where the job store lives by default. Kept apart from ``serve.store`` so that the command
line can show it without importing SQLAlchemy."""

from __future__ import annotations

import os
from pathlib import Path


def default_store_url() -> str:
    """``PIXCRAWLER_STORE``, else a SQLite file in ``~/.pixcrawler``."""
    url = os.environ.get("PIXCRAWLER_STORE")
    if url:
        return url
    return f"sqlite:///{Path('~/.pixcrawler/serve.db').expanduser()}"
