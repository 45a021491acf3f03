"""The XMP packet embedded in an image's bytes, and the IPTC ``plus:DataMining`` value in it.

IPTC Photo Metadata 2023.1 carries a rights holder's text-and-data-mining choice in XMP as
``plus:DataMining`` (namespace ``http://ns.useplus.org/ldf/xmlns/1.0/``), whose value is a PLUS
vocabulary URI such as ``http://ns.useplus.org/ldf/vocab/DMI-PROHIBITED-AIMLTRAINING``. It has to
be read from the downloaded bytes: a resize or re-encode drops it.

The packet is found by walking the container, not by searching the whole file: JPEG APP1
segments up to the start of scan, PNG ``iTXt`` chunks (``XML:com.adobe.xmp``), WebP's ``XMP ``
chunk, GIF's ``XMP DataXMP`` application extension. That costs a few microseconds per image, and
an image without XMP is never parsed as XML.
"""

from __future__ import annotations

import struct
import zlib
from typing import Optional
from xml.etree import ElementTree

PLUS_NS = "http://ns.useplus.org/ldf/xmlns/1.0/"
PLUS_VOCAB = "http://ns.useplus.org/ldf/vocab/"
RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
MAX_PACKET_BYTES = 1 << 20
"""A larger XMP packet is not parsed (real ones are a few KiB)."""

_JPEG_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
_PNG_XMP_KEY = b"XML:com.adobe.xmp"
_TAG = f"{{{PLUS_NS}}}DataMining"
_RESOURCE = f"{{{RDF_NS}}}resource"


def xmp_packet(data: bytes, fmt: str) -> Optional[bytes]:
    """The XMP packet in ``data`` (an image of format ``fmt``), or None."""
    if fmt == "jpeg":
        return _jpeg(data)
    if fmt == "png":
        return _png(data)
    if fmt == "webp":
        return _webp(data)
    if fmt == "gif":
        return _gif(data)
    return None


def _jpeg(data: bytes) -> Optional[bytes]:
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no more metadata
            return None
        length = struct.unpack_from(">H", data, pos + 2)[0]
        if length < 2:
            return None
        body = pos + 4
        if marker == 0xE1 and data.startswith(_JPEG_XMP, body):
            return data[body + len(_JPEG_XMP):pos + 2 + length]
        pos += 2 + length
    return None


def _png(data: bytes) -> Optional[bytes]:
    pos, end = 8, len(data)
    while pos + 8 <= end:
        length, kind = struct.unpack_from(">I4s", data, pos)
        body = pos + 8
        if kind == b"iTXt" and data.startswith(_PNG_XMP_KEY + b"\x00", body):
            chunk = data[body + len(_PNG_XMP_KEY) + 1:body + length]
            if len(chunk) < 2:
                return None
            compressed = chunk[0] == 1
            # language tag and translated keyword, each NUL-terminated, precede the text
            rest = chunk[2:]
            for _ in range(2):
                nul = rest.find(b"\x00")
                if nul < 0:
                    return None
                rest = rest[nul + 1:]
            if compressed:
                decomp = zlib.decompressobj()
                try:
                    rest = decomp.decompress(rest, MAX_PACKET_BYTES)
                except zlib.error:
                    return None
            return rest
        if kind == b"IEND":
            return None
        pos = body + length + 4
    return None


def _webp(data: bytes) -> Optional[bytes]:
    pos, end = 12, len(data)
    while pos + 8 <= end:
        kind, length = struct.unpack_from("<4sI", data, pos)
        if kind == b"XMP ":
            return data[pos + 8:pos + 8 + length]
        pos += 8 + length + (length & 1)
    return None


def _gif(data: bytes) -> Optional[bytes]:
    start = data.find(b"XMP DataXMP")
    if start < 0:
        return None
    start += len(b"XMP DataXMP")
    end = data.find(b"<?xpacket end", start)
    if end < 0:
        return None
    close = data.find(b"?>", end)
    return data[start:close + 2 if close >= 0 else end]


def data_mining(data: bytes, fmt: str) -> Optional[str]:
    """The ``plus:DataMining`` value of the image (``DMI-PROHIBITED-AIMLTRAINING``, ...: the
    PLUS vocabulary URI without its prefix), or None when it has none."""
    packet = xmp_packet(data, fmt)
    if not packet or b"DataMining" not in packet or len(packet) > MAX_PACKET_BYTES:
        return None
    return data_mining_in_packet(packet)


def data_mining_in_packet(packet: bytes) -> Optional[str]:
    """The ``plus:DataMining`` value in an XMP packet: an element's text or ``rdf:resource``,
    an ``rdf:li`` inside it, or an attribute of ``rdf:Description``."""
    start = packet.find(b"<x:xmpmeta")
    if start < 0:
        start = packet.find(b"<rdf:RDF")
    if start < 0:
        return None
    end_tag = b"</x:xmpmeta>" if packet.startswith(b"<x:xmpmeta", start) else b"</rdf:RDF>"
    end = packet.find(end_tag, start)
    if end < 0:
        return None
    try:
        root = ElementTree.fromstring(packet[start:end + len(end_tag)])
    except ElementTree.ParseError:
        return None
    for element in root.iter():
        value = element.get(_TAG)
        if value is None and element.tag == _TAG:
            for node in element.iter():  # the element itself, then an rdf:Alt/Bag's items
                value = node.get(_RESOURCE) or (node.text or "").strip()
                if value:
                    break
        if value:
            value = value.strip()
            return value[len(PLUS_VOCAB):] if value.startswith(PLUS_VOCAB) else value
    return None


def data_mining_verdict(value: str) -> str:
    """``refuse`` for the DMI-PROHIBITED values (all of them: AI/ML training, generative AI
    training, except search indexing, see constraint, ...), ``allow`` for DMI-ALLOWED (with or
    without constraints), ``none`` for DMI-UNSPECIFIED and anything unknown."""
    token = value.upper()
    if token.startswith("DMI-PROHIBITED"):
        return "refuse"
    if token.startswith("DMI-ALLOWED"):
        return "allow"
    return "none"


def xmp_with_data_mining(value: str) -> bytes:
    """A minimal XMP packet declaring ``plus:DataMining`` (for the sandbox web and tests)."""
    uri = value if value.startswith("http") else PLUS_VOCAB + value
    return (f'<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
            f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="{RDF_NS}">'
            f'<rdf:Description rdf:about="" xmlns:plus="{PLUS_NS}">'
            f'<plus:DataMining rdf:resource="{uri}"/>'
            f'</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="r"?>').encode()


def jpeg_with_xmp(jpeg: bytes, packet: bytes) -> bytes:
    """``jpeg`` with an XMP APP1 segment after its SOI marker."""
    payload = _JPEG_XMP + packet
    if len(payload) + 2 > 0xFFFF:
        raise ValueError("XMP packet too large for one APP1 segment")
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


__all__ = ["data_mining", "data_mining_in_packet", "data_mining_verdict", "jpeg_with_xmp",
           "xmp_packet", "xmp_with_data_mining"]
