"""The sandbox web, through plain HTTP clients: search, images, and every deliberate fault."""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import urllib.robotparser
from pathlib import Path

import pytest
from PIL import Image

from builder.reasons import Reason
from builder.sandbox import DEFAULT_CLASSES, FAULTS, SandboxWeb, server

REPO = Path(__file__).resolve().parents[2]
FORMAT_OF_EXT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF"}
TYPE_OF_EXT = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif"}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def get(url: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a GET that follows no redirects and raises on no HTTP error."""
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def search(base: str, q: str, page: int = 0, per_page: int = 20, **extra: str) -> dict:
    qs = urllib.parse.urlencode({"q": q, "page": page, "per_page": per_page, **extra})
    status, _, body = get(f"{base}/search?{qs}")
    assert status == 200, body
    return json.loads(body)


def path_of(url: str) -> str:
    return urllib.parse.urlsplit(url).path


@pytest.fixture(scope="module")
def web():
    with SandboxWeb(images_per_class=16, slow_s=0.6, big_bytes=300_000) as sandbox:
        yield sandbox


def test_starts_fast_on_a_free_port_and_stops():
    started = time.perf_counter()
    sandbox = SandboxWeb()  # the default corpus: 3 classes x 40 images
    base = sandbox.start()
    assert time.perf_counter() - started < 1.0
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", base)
        assert sandbox.start() == base  # idempotent
        status, _, body = get(f"{base}/healthz")
        assert (status, body) == (200, b"ok\n")
    finally:
        sandbox.stop()
    sandbox.stop()  # idempotent
    port = int(base.rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_urls_need_a_started_server():
    with pytest.raises(RuntimeError, match="start"):
        SandboxWeb(images_per_class=1).fault_urls()


def test_search_pages_through_a_class(web: SandboxWeb):
    first = search(web.base_url, "cat", per_page=7)
    total = first["total"]
    # 16 clean images, one fault after every 6 of them
    assert total == 16 + 2
    urls, page = [], 0
    while True:
        answer = search(web.base_url, "cat", page=page, per_page=7)
        assert answer["total"] == total
        urls += [r["url"] for r in answer["results"]]
        if not answer["has_more"]:
            break
        assert len(answer["results"]) == 7
        page += 1
    assert page == 2 and len(urls) == total == len(set(urls))
    assert search(web.base_url, "cat", page=9, per_page=7)["results"] == []
    assert urls == web.search_urls("cat")
    first_hit = first["results"][0]
    assert first_hit["page_url"].startswith(web.base_url + "/page/")
    assert "cat" in first_hit["title"]
    assert first_hit["license"] == "CC-BY-4.0" and first_hit["author"] == "sandbox"
    status, headers, page_html = get(first_hit["page_url"])
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert first_hit["url"].encode() in page_html


def test_search_matches_the_class_named_in_the_query(web: SandboxWeb):
    cat = web.class_image_urls("cat")
    assert [r["url"] for r in search(web.base_url, "A photo of CATS")["results"]][:3] == cat[:3]
    assert search(web.base_url, "dog in the park")["results"][0]["url"] == \
        web.class_image_urls("dog")[0]
    for unmatched in ("zebra", "category theory", ""):
        assert search(web.base_url, unmatched) == {"results": [], "has_more": False, "total": 0}


def test_search_rejects_bad_paging_and_fails_on_demand(web: SandboxWeb):
    assert get(f"{web.base_url}/search?q=cat&page=-1")[0] == 400
    assert get(f"{web.base_url}/search?q=cat&per_page=x")[0] == 400
    status, headers, _ = get(f"{web.base_url}/search?q=cat&fail=429")
    assert status == 429 and headers["Retry-After"] == "1"
    assert get(f"{web.base_url}/search?q=cat&fail=500")[0] == 500


def test_faults_follow_every_fault_every_clean_images_and_cycle_across_classes():
    with SandboxWeb(images_per_class=13, fault_every=3) as sandbox:
        kinds = []
        for label in DEFAULT_CLASSES:
            urls = sandbox.search_urls(label)
            assert len(urls) == 13 + 4
            for i, url in enumerate(urls):
                # clean, clean, clean, fault, ...: a fault at every 4th position
                is_fault = not path_of(url).startswith("/img/")
                assert is_fault == (i % 4 == 3)
                assert (sandbox.outcome_of(url) == "accepted") == (
                    not is_fault or "/flaky_500/" in url or "/rate_limited_once/" in url)
                if is_fault:
                    kinds.append(path_of(url).split("/")[2] if path_of(url).startswith("/f/")
                                 else "robots_disallowed")
        assert kinds == list(FAULTS)[:12]  # 4 faults per class, continuing from class to class
    with SandboxWeb(images_per_class=5, faults=False) as clean_only:
        assert clean_only.search_urls("bird") == clean_only.class_image_urls("bird")


def test_same_seed_same_web_other_seed_other_images():
    def snapshot(sandbox: SandboxWeb) -> tuple[list[str], list[bytes]]:
        urls = sandbox.search_urls("dog")
        results = [r["url"] for r in search(sandbox.base_url, "dog", per_page=50)["results"]]
        assert results == urls
        images = [get(u)[2] for u in sandbox.class_image_urls("dog")[:3]]
        return [u.replace(sandbox.base_url, "") for u in urls], images

    with SandboxWeb(images_per_class=8, seed=7) as a, SandboxWeb(images_per_class=8, seed=7) as b:
        assert a.base_url != b.base_url
        seven = snapshot(a)
        assert snapshot(b) == seven
    with SandboxWeb(images_per_class=8, seed=8) as c:
        eight = snapshot(c)
    assert eight[0] == seven[0]  # the same URL layout
    assert all(x != y for x, y in zip(eight[1], seven[1]))  # other pictures


def test_clean_images_decode_in_their_format_at_varied_sizes():
    with SandboxWeb(classes=("cat", "dog"), images_per_class=16) as sandbox:
        sizes, digests, animated = set(), set(), 0
        for label in sandbox.classes:
            for url in sandbox.class_image_urls(label):
                status, headers, body = get(url)
                ext = url.rsplit(".", 1)[1]
                assert status == 200 and headers["Content-Type"] == TYPE_OF_EXT[ext]
                with Image.open(io.BytesIO(body)) as img:
                    assert img.format == FORMAT_OF_EXT[ext]
                    img.load()
                    w, h = img.size
                    animated += getattr(img, "n_frames", 1) > 1
                assert 150 <= min(w, h) and max(w, h) <= 650 and max(w, h) / min(w, h) <= 2.0
                sizes.add((w, h))
                digests.add(hashlib.sha256(body).hexdigest())
        assert len(digests) == 32  # no two clean images share bytes
        assert len(sizes) > 20
        assert animated >= 1
        formats = {u.rsplit(".", 1)[1] for u in sandbox.class_image_urls("cat")}
        assert formats == {"jpg", "png", "webp", "gif"}


def test_fault_table_names_reasons_or_accepted(web: SandboxWeb):
    reasons = {r.value for r in Reason}
    assert all(v in reasons or v == "accepted" for v in FAULTS.values())
    assert FAULTS["flaky_500"] == FAULTS["rate_limited_once"] == "accepted"
    urls = web.fault_urls()
    assert set(urls) == set(FAULTS)
    assert {web.outcome_of(u) for u in urls.values()} == set(FAULTS.values())
    assert all(web.outcome_of(u) == FAULTS[k] for k, u in urls.items())
    assert all(urls[k] not in web.search_urls(label) for k in urls for label in web.classes)


def test_duplicates_copy_their_original(web: SandboxWeb):
    urls = web.fault_urls()
    original = web.class_image_urls(web.classes[0])[0]
    _, _, orig_bytes = get(original)
    assert get(urls["exact_duplicate"])[2] == orig_bytes
    status, headers, near = get(urls["near_duplicate"])
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and near != orig_bytes
    with Image.open(io.BytesIO(orig_bytes)) as o, Image.open(io.BytesIO(near)) as n:
        assert n.format == "JPEG"
        assert n.size == (round(o.width * 0.9), round(o.height * 0.9))


def test_duplicates_in_results_come_after_their_originals():
    with SandboxWeb(classes=("bird",), images_per_class=3, fault_every=1) as sandbox:
        urls = sandbox.search_urls("bird")
        assert [sandbox.outcome_of(u) for u in urls] == [
            "accepted", "exact_duplicate", "accepted", "near_duplicate", "accepted", "truncated"]
        assert get(urls[1])[2] == get(urls[0])[2]
        with Image.open(io.BytesIO(get(urls[3])[2])) as near, \
                Image.open(io.BytesIO(get(urls[2])[2])) as orig:
            assert near.size == (round(orig.width * 0.9), round(orig.height * 0.9))


def test_broken_bodies(web: SandboxWeb):
    urls = web.fault_urls()
    status, headers, truncated = get(urls["truncated"])
    assert status == 200 and truncated[:3] == b"\xff\xd8\xff"
    assert not truncated.endswith(b"\xff\xd9")
    with Image.open(io.BytesIO(truncated)) as img, pytest.raises(OSError, match="truncated"):
        img.load()
    status, headers, corrupt = get(urls["corrupt"])
    assert status == 200 and corrupt[:3] == b"\xff\xd8\xff"
    with pytest.raises(OSError):  # UnidentifiedImageError is an OSError
        Image.open(io.BytesIO(corrupt)).load()
    status, headers, page = get(urls["html_as_jpeg"])
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert page.lstrip().lower().startswith(b"<!doctype html")


def test_bomb_declares_30000_squared_pixels(web: SandboxWeb):
    status, headers, body = get(web.fault_urls()["bomb"])
    assert status == 200 and headers["Content-Type"] == "image/png" and len(body) < 2000
    try:
        with Image.open(io.BytesIO(body)) as img:
            assert img.size == (30000, 30000)
    except Image.DecompressionBombError:
        pass


def test_status_faults(web: SandboxWeb):
    urls = web.fault_urls()
    assert get(urls["not_found"])[0] == 404
    assert [get(urls["always_500"])[0] for _ in range(2)] == [500, 500]
    for _ in range(2):
        status, headers, _ = get(urls["always_429"])
        assert status == 429 and headers["Retry-After"] == "1"
    assert get(urls["flaky_500"])[0] == 500
    status, headers, body = get(urls["flaky_500"])
    assert status == 200 and Image.open(io.BytesIO(body)).format == "JPEG"
    status, headers, _ = get(urls["rate_limited_once"])
    assert status == 429 and headers["Retry-After"] == "1"
    status, headers, body = get(urls["rate_limited_once"])
    assert status == 200 and Image.open(io.BytesIO(body)).format == "JPEG"
    assert web.hits(urls["rate_limited_once"]) == 2


def test_flaky_state_is_per_url():
    with SandboxWeb(images_per_class=9, fault_every=1) as sandbox:  # 27 faults: flaky twice
        flaky = [u for label in sandbox.classes for u in sandbox.search_urls(label)
                 if "/flaky_500/" in u]
        flaky.append(sandbox.fault_urls()["flaky_500"])
        assert len(set(flaky)) == len(flaky) == 3
        assert [get(u)[0] for u in flaky] == [500, 500, 500]
        assert [get(u)[0] for u in flaky] == [200, 200, 200]


def test_slow_answers_only_after_slow_s(web: SandboxWeb):
    url = web.fault_urls()["slow"]
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        get(url, timeout=0.2)
    started = time.perf_counter()
    status, _, body = get(url, timeout=5)
    assert status == 200 and body[:3] == b"\xff\xd8\xff"
    assert time.perf_counter() - started >= 0.5


def test_too_big_streams_past_the_cap_without_content_length(web: SandboxWeb):
    cap = 200_000
    with urllib.request.urlopen(web.fault_urls()["too_big"], timeout=5) as resp:
        assert resp.headers.get("Content-Length") is None
        assert resp.headers.get("Transfer-Encoding") == "chunked"
        assert resp.headers["Content-Type"] == "image/jpeg"
        got = b""
        while len(got) <= cap:
            chunk = resp.read(65536)
            assert chunk, "the body ended before the cap"
            got += chunk
    assert got[:3] == b"\xff\xd8\xff"
    assert len(get(web.fault_urls()["too_big"])[2]) == web.big_bytes


def test_heavy_urls_answer_distinct_bodies_of_the_asked_size(web: SandboxWeb):
    plain, chunked = web.heavy_urls(2, size=300_000), web.heavy_urls(1, size=250_000,
                                                                      chunked=True)
    bodies = []
    for url in plain:
        status, headers, body = get(url)
        assert (status, headers["Content-Length"], len(body)) == (200, "300000", 300_000)
        bodies.append(body)
    assert bodies[0][:3] == b"\xff\xd8\xff" and bodies[0] != bodies[1]
    status, headers, body = get(chunked[0])
    assert headers.get("Transfer-Encoding") == "chunked" and len(body) == 250_000
    base = web.base_url
    for bad in ("/heavy/x.jpg", "/heavy/1.png", "/heavy/1.jpg?bytes=10",
                "/heavy/1.jpg?bytes=999999999999", "/heavy/1.jpg?chunked=yes",
                "/heavy/1.jpg?meet=two"):
        assert get(base + bad)[0] == 400, bad


def test_heavy_answers_that_meet_are_half_sent_together(web: SandboxWeb, monkeypatch):
    """Two answers of a ``meet=2`` group: the first waits at its half until the second gets
    there, and both then finish; a group that never fills finishes after the timeout."""
    monkeypatch.setattr(server, "MEET_TIMEOUT_S", 30.0)
    first, second = web.heavy_urls(2, size=200_000, meet=2)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(get, first, 60.0)
        time.sleep(0.5)
        assert not waiting.done()
        assert len(get(second)[2]) == 200_000
        assert len(waiting.result(timeout=20)[2]) == 200_000
    assert time.monotonic() - started < 20  # met, not timed out
    monkeypatch.setattr(server, "MEET_TIMEOUT_S", 0.5)
    started = time.monotonic()
    assert len(get(web.heavy_urls(1, size=200_000, meet=3)[0])[2]) == 200_000
    assert time.monotonic() - started >= 0.4


def test_redirect_loop(web: SandboxWeb):
    url = web.fault_urls()["redirect_loop"]
    status, headers, _ = get(url)
    assert status == 302
    hop = urllib.parse.urljoin(url, headers["Location"])
    assert hop != url
    status, headers, _ = get(hop)
    assert status == 302 and urllib.parse.urljoin(hop, headers["Location"]) == url


def test_opt_outs_and_robots(web: SandboxWeb):
    urls = web.fault_urls()
    status, headers, body = get(urls["noai"])
    assert status == 200 and headers["X-Robots-Tag"] == "noai"
    assert Image.open(io.BytesIO(body)).format == "JPEG"
    status, _, robots_txt = get(f"{web.base_url}/robots.txt")
    assert status == 200 and b"Disallow: /private/" in robots_txt
    robots = urllib.robotparser.RobotFileParser()
    robots.parse(robots_txt.decode().splitlines())
    private = urls["robots_disallowed"]
    assert path_of(private).startswith("/private/")
    assert not robots.can_fetch("PixCrawler/0.1", private)
    assert robots.can_fetch("PixCrawler/0.1", web.class_image_urls("cat")[0])
    assert get(private)[0] == 200 and web.hits(private) == 1


def test_odd_sizes_and_unreachable_urls(web: SandboxWeb):
    urls = web.fault_urls()
    for name, size in (("tiny", (16, 16)), ("panorama", (1000, 100))):
        status, _, body = get(urls[name])
        with Image.open(io.BytesIO(body)) as img:
            assert status == 200 and img.size == size
            img.load()
    assert urls["bad_scheme"].startswith("ftp://")
    refused = urllib.parse.urlsplit(urls["connection_refused"])
    assert refused.hostname == "127.0.0.1" and refused.port != urllib.parse.urlsplit(
        web.base_url).port
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((refused.hostname, refused.port), timeout=2).close()


def test_bench_images():
    with SandboxWeb(images_per_class=1, bench_images=3) as sandbox:
        urls = sandbox.bench_urls()
        assert len(urls) == 3
        bodies = [get(u)[2] for u in urls]
        assert len(set(bodies)) == 3
        for body in bodies:
            with Image.open(io.BytesIO(body)) as img:
                assert img.format == "JPEG" and img.size == (512, 384)
            assert 25_000 < len(body) < 70_000
        assert get(urls[0])[2] == bodies[0]
        assert get(f"{sandbox.base_url}/bench/00003.jpg")[0] == 404
        assert sandbox.outcome_of(urls[2]) == "accepted"


def test_non_ascii_digit_paths_are_404_not_500():
    with SandboxWeb(images_per_class=2, bench_images=3) as sandbox:
        base = sandbox.base_url
        for path in ("/bench/%C2%B2.jpg", "/bench/%D9%A3.jpg", "/page/cat/%C2%B2",
                     "/page/cat/" + "9" * 5000):
            assert get(base + path)[0] == 404, path
        assert get(base + "/page/cat/0")[0] == 200
        assert sandbox.outcome_of(base + "/bench/\u00b2.jpg") is None
        assert sandbox.outcome_of("http://[broken/bench/00001.jpg") is None


def test_serve_forever_prints_its_url_and_stops_on_sigterm():
    code = ("from builder.sandbox import serve_forever; "
            "serve_forever(port=0, images_per_class=2)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert match, line
        assert get(match.group(0) + "/healthz")[:1] == (200,)
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("port", [-1, 65_536, 99_999])
def test_a_port_out_of_range_is_refused_at_once(port):
    """Not an OverflowError in the server thread and a 30 s wait for it to start."""
    with pytest.raises(ValueError, match=rf"port {port} is not a TCP port: give 0-65535"):
        SandboxWeb(images_per_class=1, port=port)


def test_a_busy_port_says_it_is_in_use():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        web = SandboxWeb(images_per_class=1, port=port)
        with pytest.raises(OSError, match=rf"cannot listen on 127\.0\.0\.1:{port}: the port is "
                           "in use by another program"):
            web.start()
