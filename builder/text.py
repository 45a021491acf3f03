"""Text from outside made well-formed before it is hashed, put in a URL or written to Arrow.

Python strings may hold lone surrogates, which have no UTF-8 form: aiohttp decodes a header's
undecodable bytes to ``\\udc80``-``\\udcff`` (``surrogateescape``), and JSON may spell ``\\ud800``.
sha256, ``urlencode`` and Arrow all encode to UTF-8 and raise on them, so a candidate's text or
a site's opt-out header would stop a unit instead of being read.
"""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def _replace(match: re.Match[str]) -> str:
    code = ord(match.group())
    # an undecodable byte kept by surrogateescape: read it as Latin-1, HTTP's historical charset
    return chr(code - 0xDC00) if 0xDC80 <= code <= 0xDCFF else "\ufffd"


def well_formed(text: str) -> str:
    """``text`` with each lone surrogate replaced: an escaped byte 0x80-0xFF by its Latin-1
    character, any other by U+FFFD. Text that is already well-formed is returned as it is."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub(_replace, text)
    return text
