"""serve.samples without Ray: what one request for thumbnails may cost the API's replica."""

from __future__ import annotations

import io

from PIL import Image

from serve import samples
from serve.samples import MAX_SAMPLES, SampleCache, thumbnail


def encoded(size: tuple[int, int], fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("L", size, 128).save(out, fmt)
    return out.getvalue()


def test_a_huge_image_is_left_out_unless_a_reduced_decode_makes_it_small():
    """A PNG of up to 89 Mpx (validation.max_pixels) was decoded whole for its thumbnail, in
    the replica, up to 200 per request."""
    assert thumbnail(encoded((6000, 5000), "PNG")) is None
    assert thumbnail(encoded((6000, 5000), "JPEG")).startswith("data:image/jpeg;base64,")
    assert thumbnail(encoded((400, 300), "PNG")).startswith("data:image/jpeg;base64,")


def test_answers_are_cached_by_job_and_label_whatever_the_limit(monkeypatch):
    """The cache was keyed by limit too: each limit from 1 to 200 read the dataset again."""
    reads = []

    def read(uri, label, limit):
        reads.append(limit)
        return [{"id": str(i)} for i in range(min(limit, 30))]

    monkeypatch.setattr(samples, "read_samples", read)
    cache = SampleCache()
    assert len(cache.get("u", "cat", 5)) == 5
    assert [len(cache.get("u", "cat", n)) for n in range(1, 6)] == [1, 2, 3, 4, 5]
    assert len(cache.get("u", "cat", 24)) == 24 and reads == [5, MAX_SAMPLES]
    assert [len(cache.get("u", "cat", n)) for n in (100, 200, 7)] == [30, 30, 7]
    assert reads == [5, MAX_SAMPLES]  # the dataset has 30: nothing more to read
    cache.get("u", "dog", 3)
    assert reads == [5, MAX_SAMPLES, 3]
