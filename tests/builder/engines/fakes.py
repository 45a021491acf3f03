"""Local fake search APIs on 127.0.0.1 speaking each real service's wire format.

``FakeServer`` is a threaded ``http.server`` whose answers come from a handler function; it
records every request and can be told to fail the next ones (``fail_next``) with a status,
headers and body, to test 429s and errors. The ``*_handler`` factories below answer like
Wikimedia Commons' API, Openverse, Google's Custom Search JSON API, Baidu's ``acjson``,
DuckDuckGo (the HTML page holding the ``vqd`` token, then ``i.js``) and Bing's
``images/async`` HTML, over a given list of fake images.
"""

from __future__ import annotations

import html
import json
import math
import socket
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from builder.ports import free_port

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Response:
    status: int = 200
    body: Any = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    def encoded(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode("utf-8")
        return json.dumps(self.body).encode("utf-8")


Handler = Callable[[Request], Response]


class FakeServer:
    """``with FakeServer(handler) as srv: srv.url ...``; stops (and joins) on exit."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.requests: list[Request] = []
        self._faults: list[Response] = []
        self._lock = threading.Lock()
        outer = self

        class _H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                parsed = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                req = Request(self.command, parsed.path,
                              dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True)),
                              {k.lower(): v for k, v in self.headers.items()},
                              self.rfile.read(length) if length else b"")
                with outer._lock:
                    outer.requests.append(req)
                    fault = outer._faults.pop(0) if outer._faults else None
                resp = fault or outer.handler(req)
                body = resp.encoded()
                self.send_response(resp.status)
                self.send_header("Content-Type", resp.content_type)
                self.send_header("Content-Length", str(len(body)))
                for k, v in resp.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _H)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,),
                                        daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail_next(self, count: int = 1, status: int = 429, *, body: Any = b"",
                  headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
        with self._lock:
            self._faults += [Response(status, body, dict(headers or {}), content_type)
                             for _ in range(count)]

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    def __enter__(self) -> "FakeServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def closed_port() -> int:
    """A loopback port nothing listens on (bound then released)."""
    return free_port()


def block_external_network(monkeypatch: Any) -> list[tuple]:
    """Make every Python socket connect to a non-loopback address fail; returns the attempts."""
    attempts: list[tuple] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def _check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            if host not in LOOPBACK:
                attempts.append(address)
                raise ConnectionRefusedError(f"test blocked a connection to {address!r}")

    def connect(self: socket.socket, address: Any) -> None:
        _check(self, address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        _check(self, address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    return attempts


# --- fake images ---------------------------------------------------------------------------

def fake_images(n: int, *, host: str = "img.example.org") -> list[dict[str, str]]:
    """``n`` distinct fake images with titles, landing pages, authors and licenses."""
    licenses = [("by-sa", "4.0", "CC BY-SA 4.0"), ("by", "2.0", "CC BY 2.0"),
                ("cc0", "1.0", "CC0 1.0")]
    out = []
    for i in range(n):
        code, version, name = licenses[i % len(licenses)]
        out.append({"url": f"https://{host}/photos/cat-{i:03d}.jpg",
                    "page_url": f"https://{host}/pages/cat-{i:03d}",
                    "title": f"Cat number {i}", "author": f"Photographer {i % 4}",
                    "license_code": code, "license_version": version, "license": name,
                    "width": 640 + i, "height": 480})
    return out


# --- Wikimedia Commons (action=query, generator=search, prop=imageinfo, formatversion=2) -----

def wikimedia_handler(images: list[dict[str, Any]], *, mimes: dict[int, str] | None = None
                      ) -> Handler:
    """``mimes`` overrides the MIME type of some results (index -> type), e.g. a PDF."""
    mimes = mimes or {}

    def handle(req: Request) -> Response:
        if req.path != "/w/api.php" or req.query.get("action") != "query":
            return Response(404, {"error": {"code": "badpath", "info": req.path}})
        offset = int(req.query.get("gsroffset", 0))
        limit = int(req.query.get("gsrlimit", 10))
        chunk = images[offset:offset + limit]
        if not chunk:
            return Response(200, {"batchcomplete": True})
        pages = []
        for i, img in enumerate(chunk):
            n = offset + i
            name = img["url"].rsplit("/", 1)[-1]
            pages.append({
                "pageid": 1000 + n, "ns": 6, "title": f"File:{name}", "index": n + 1,
                "imagerepository": "local",
                "imageinfo": [{
                    "size": 123456, "width": img["width"], "height": img["height"],
                    "url": img["url"],
                    "descriptionurl": f"https://commons.wikimedia.org/wiki/File:{name}",
                    "descriptionshorturl": f"https://commons.wikimedia.org/w/index.php?curid={n}",
                    "mime": mimes.get(n, "image/jpeg"),
                    "extmetadata": {
                        "ObjectName": {"value": img["title"], "source": "mediawiki-metadata",
                                       "hidden": ""},
                        "LicenseShortName": {"value": img["license"],
                                             "source": "commons-desc-page", "hidden": ""},
                        "Artist": {"value": f'<a href="//commons.wikimedia.org/wiki/User:X" '
                                            f'title="User:X">{html.escape(img["author"])}</a>',
                                   "source": "commons-desc-page"},
                        "ImageDescription": {"value": f'<div class="description">A '
                                                      f'<b>{img["title"]}</b> asleep</div>',
                                             "source": "commons-desc-page"},
                    },
                }],
            })
        # The real API lists pages in page-id order, not search order: shuffle to prove sorting.
        pages.reverse()
        body: dict[str, Any] = {"batchcomplete": True, "query": {"pages": pages}}
        if offset + limit < len(images):
            body["continue"] = {"gsroffset": offset + limit, "continue": "gsroffset||"}
        return Response(200, body)

    return handle


# --- Openverse (GET /v1/images/) ---------------------------------------------------------------

def openverse_handler(images: list[dict[str, Any]], *, token: str | None = None) -> Handler:
    def handle(req: Request) -> Response:
        if req.path != "/v1/images/":
            return Response(404, {"detail": "Not found."})
        auth = req.headers.get("authorization")
        if auth is not None and auth != f"Bearer {token}":
            return Response(401, {"detail": "Invalid token."})
        size = int(req.query.get("page_size", 20))
        if auth is None and size > 20:
            return Response(401, {"detail": "Authentication credentials were not provided."})
        page = int(req.query.get("page", 1))
        chunk = images[(page - 1) * size: page * size]
        results = [{
            "id": f"id-{i}", "title": img["title"], "foreign_landing_url": img["page_url"],
            "url": img["url"], "creator": img["author"], "creator_url": None,
            "license": img["license_code"], "license_version": img["license_version"],
            "license_url": "https://creativecommons.org/licenses/", "provider": "flickr",
            "source": "flickr", "category": "photograph", "filesize": None, "filetype": "jpg",
            "tags": [{"name": "cat"}], "attribution": f'"{img["title"]}" by {img["author"]}',
            "fields_matched": ["title"], "mature": False, "height": img["height"],
            "width": img["width"],
            "thumbnail": f"https://api.openverse.org/v1/images/id-{i}/thumb/",
            "detail_url": f"https://api.openverse.org/v1/images/id-{i}/",
            "related_url": f"https://api.openverse.org/v1/images/id-{i}/related/",
            "unstable__sensitivity": [],
        } for i, img in enumerate(chunk)]
        return Response(200, {"result_count": len(images),
                              "page_count": math.ceil(len(images) / size),
                              "page_size": size, "page": page, "results": results,
                              "warnings": []})

    return handle


class OpenverseOAuth:
    """Openverse with its OAuth side: ``POST /v1/auth_tokens/token/`` (client credentials) issues
    tokens that expire after ``lifetime`` seconds of ``clock``; a request with an expired or
    revoked token answers 401 ``invalid_token``; anonymous requests may not reach past the 240th
    result. ``tokens_issued`` counts the grants; ``revoke()`` invalidates every token."""

    def __init__(self, images: list[dict[str, Any]], *, clients: dict[str, str],
                 lifetime: int = 36_000, clock: Callable[[], float] = lambda: 0.0):
        self.images = images
        self.clients = clients
        self.lifetime = lifetime
        self.clock = clock
        self.valid: dict[str, float] = {}
        self.tokens_issued = 0
        self.depth_refusals = 0

    def revoke(self) -> None:
        self.valid.clear()

    def __call__(self, req: Request) -> Response:
        if req.path == "/v1/auth_tokens/token/":
            form = dict(urllib.parse.parse_qsl(req.body.decode()))
            if req.method != "POST" or form.get("grant_type") != "client_credentials" or \
                    self.clients.get(form.get("client_id", "")) != form.get("client_secret"):
                return Response(401, {"error": "invalid_client"})
            self.tokens_issued += 1
            token = f"ov-token-{self.tokens_issued}"
            self.valid[token] = self.clock() + self.lifetime
            return Response(200, {"access_token": token, "scope": "read write",
                                  "expires_in": self.lifetime, "token_type": "Bearer"})
        auth = req.headers.get("authorization")
        token = auth.removeprefix("Bearer ") if auth is not None else None
        if token is not None and self.valid.get(token, -1.0) <= self.clock():
            return Response(401, {"detail": "Invalid token."}, headers={
                "WWW-Authenticate": 'Bearer realm="api",error="invalid_token",'
                                    'error_description="The access token has expired."'})
        size, page = int(req.query.get("page_size", 20)), int(req.query.get("page", 1))
        if token is None and page * size > 240:
            self.depth_refusals += 1
            return Response(401, {"detail": "Anonymous requests may not reach past result "
                                            "240; authenticate for more."})
        return openverse_handler(self.images, token=token)(req)


# --- Google Custom Search JSON API (searchType=image) ---------------------------------------

def google_handler(images: list[dict[str, Any]], *, key: str, cx: str) -> Handler:
    def handle(req: Request) -> Response:
        q = req.query
        if q.get("key") != key:
            return Response(400, {"error": {"code": 400, "message": "API key not valid. "
                                            "Please pass a valid API key.", "errors": [
                {"message": "API key not valid.", "domain": "global", "reason": "badRequest"}],
                "status": "INVALID_ARGUMENT"}})
        start, num = int(q.get("start", 1)), int(q.get("num", 10))
        if num > 10 or start + num - 1 > 100:
            return Response(400, {"error": {"code": 400, "message": "Request contains an "
                                            "invalid argument.", "status": "INVALID_ARGUMENT"}})
        chunk = images[start - 1:start - 1 + num]
        request_info = {"title": f"Google Custom Search - {q.get('q')}",
                        "totalResults": str(len(images)), "searchTerms": q.get("q"),
                        "count": num, "startIndex": start, "inputEncoding": "utf8",
                        "outputEncoding": "utf8", "safe": q.get("safe", "off"), "cx": cx,
                        "searchType": "image"}
        queries: dict[str, Any] = {"request": [request_info]}
        if start - 1 + num < len(images) and start + num <= 100:
            queries["nextPage"] = [{**request_info, "startIndex": start + num}]
        body: dict[str, Any] = {
            "kind": "customsearch#search",
            "url": {"type": "application/json", "template": "https://www.googleapis.com/"
                    "customsearch/v1?q={searchTerms}&num={count?}..."},
            "queries": queries, "context": {"title": "pixcrawler"},
            "searchInformation": {"searchTime": 0.31, "formattedSearchTime": "0.31",
                                  "totalResults": str(len(images)),
                                  "formattedTotalResults": str(len(images))},
        }
        if chunk:
            body["items"] = [{
                "kind": "customsearch#result", "title": img["title"],
                "htmlTitle": f"<b>{img['title']}</b>", "link": img["url"],
                "displayLink": "img.example.org", "snippet": img["title"],
                "htmlSnippet": img["title"], "mime": "image/jpeg", "fileFormat": "image/jpeg",
                "image": {"contextLink": img["page_url"], "height": img["height"],
                          "width": img["width"], "byteSize": 54321,
                          "thumbnailLink": "https://encrypted-tbn0.gstatic.com/images?q=tbn:x",
                          "thumbnailHeight": 120, "thumbnailWidth": 160},
            } for img in chunk]
        return Response(200, body)

    return handle


def google_quota_error(code: int = 429) -> dict[str, Any]:
    reason = "rateLimitExceeded" if code == 429 else "dailyLimitExceeded"
    return {"error": {"code": code, "message": "Quota exceeded for quota metric 'Queries' and "
                      "limit 'Queries per day' of service 'customsearch.googleapis.com'.",
                      "errors": [{"message": "Quota exceeded", "domain": "global",
                                  "reason": reason}],
                      "status": "RESOURCE_EXHAUSTED" if code == 429 else "PERMISSION_DENIED"}}


# --- Baidu image search (GET /search/acjson?tn=resultjson_com&ipn=rj...) ----------------------

def baidu_obfuscate(url: str) -> str:
    """Baidu's objURL obfuscation (the inverse of builder.engines.baidu.decode_baidu_url)."""
    table = str.maketrans("abcdefghijklmnopqrstuvw1234567890", "wkv1ju2it3hs4g5rq6fp7eo8dn9cm0bla")
    out = url.translate(table)
    for plain, token in ((":", "_z2C$q"), (".", "_z&e3B"), ("/", "AzdH3F")):
        out = out.replace(plain, token)
    return out


def baidu_handler(images: list[dict[str, Any]], *, list_num: int | None = None) -> Handler:
    def handle(req: Request) -> Response:
        q = req.query
        if req.path != "/search/acjson" or q.get("tn") != "resultjson_com":
            return Response(404, b"<html>404</html>", content_type="text/html")
        pn, rn = int(q.get("pn", 0)), int(q.get("rn", 30))
        chunk = images[pn:pn + rn]
        data = []
        for i, img in enumerate(chunk):
            n = pn + i
            data.append({
                "adType": "0", "hasAspData": "0",
                "thumbURL": f"https://img{n % 3}.baidu.com/it/u={n},1&fm=253&fmt=auto?w=200",
                "middleURL": f"https://img{n % 3}.baidu.com/it/u={n},1&fm=253&fmt=auto?w=400",
                "largeTipData": "", "hoverURL": "", "pageNum": n,
                "objURL": baidu_obfuscate(img["url"]),
                "fromURL": baidu_obfuscate(img["page_url"]),
                "fromURLHost": "img.example.org", "currentIndex": "",
                "width": img["width"], "height": img["height"], "type": "jpg", "is_gif": 0,
                "isCopyright": 0, "bdSrcType": "0", "di": str(7000 + n), "is": "0,0",
                "replaceUrl": [{"ObjURL": img["url"], "ObjUrl": img["url"],
                                "FromURL": img["page_url"], "FromUrl": img["page_url"]}],
                "fromPageTitle": f"<strong>{img['title']}</strong>",
                "fromPageTitleEnc": img["title"], "bdSourceName": "", "token": "",
                "cs": f"{n},{n}", "os": f"{n},{n}", "simid": f"{n},{n}", "adPicId": "0",
            })
        data.append({})  # the real endpoint ends ``data`` with an empty object
        body = json.dumps({"queryEnc": urllib.parse.quote(q.get("word", "")),
                           "queryExt": q.get("word", ""), "listNum": list_num or len(images),
                           "displayNum": 1000000, "gsm": "1e", "bdFmtDispNum": "约1,000,000",
                           "bdSearchTime": "", "isNeedAsyncRequest": 0, "bdIsClustered": "1",
                           "data": data}, ensure_ascii=False)
        # Baidu escapes single quotes JavaScript-style, which is not valid JSON.
        body = body.replace("Cat number 1\"", "Cat number 1 \\'tabby\\'\"", 1)
        return Response(200, body, content_type="text/html; charset=utf-8")

    return handle


# --- DuckDuckGo: GET / (HTML with the vqd token), then GET /i.js (JSON, 100 a page) ---------

DDG_VQD = "4-2901812342346345375437891234"
DDG_PAGE = 100


def ddg_handler(images: list[dict[str, Any]]) -> Handler:
    def handle(req: Request) -> Response:
        if req.path == "/":
            page = (f'<!DOCTYPE html><html><head><title>{html.escape(req.query.get("q", ""))} at '
                    f'DuckDuckGo</title></head><body><script>DDG.deep.initialize('
                    f'"/d.js?q=cats&vqd={DDG_VQD}&l=us-en");vqd="{DDG_VQD}";</script>'
                    "</body></html>")
            return Response(200, page, content_type="text/html; charset=UTF-8")
        if req.path == "/i.js":
            if req.query.get("vqd") != DDG_VQD:
                return Response(403, b"", content_type="text/html")
            start = int(req.query.get("s", 0))
            chunk = images[start:start + DDG_PAGE]
            results = [{"height": img["height"], "image": img["url"],
                        "image_token": f"tok{start + i}", "source": "Bing",
                        "thumbnail": f"https://tse1.mm.bing.net/th?id=OIP.{start + i}",
                        "thumbnail_token": f"th{start + i}", "title": img["title"],
                        "url": img["page_url"], "width": img["width"]}
                       for i, img in enumerate(chunk)]
            body: dict[str, Any] = {"ads": None, "query": req.query.get("q"),
                                    "queryEncoded": urllib.parse.quote(req.query.get("q", "")),
                                    "response_type": "images", "results": results,
                                    "vqd": {req.query.get("q", ""): DDG_VQD}}
            if start + DDG_PAGE < len(images):
                body["next"] = f"i.js?q=cats&o=json&p=1&s={start + DDG_PAGE}&u=bing&f=,,,&l=wt-wt"
            return Response(200, body)
        return Response(404, b"not found", content_type="text/html")

    return handle


# --- Bing: GET /images/async (HTML fragments, 35 a page) -------------------------------------

BING_PAGE = 35


def bing_handler(images: list[dict[str, Any]]) -> Handler:
    def handle(req: Request) -> Response:
        if req.path != "/images/async":
            return Response(404, b"not found", content_type="text/html")
        first = int(req.query.get("first", 1))
        count = int(req.query.get("count", BING_PAGE))
        chunk = images[first - 1:first - 1 + count]
        items = []
        for img in chunk:
            m = html.escape(json.dumps({"cid": "x", "purl": img["page_url"], "murl": img["url"],
                                        "turl": "https://tse2.mm.bing.net/th?id=OIP.x",
                                        "md5": "0", "shkey": "", "t": img["title"],
                                        "mid": "", "desc": ""}), quote=True)
            items.append(
                '<li><div class="iuscp isv"><div class="imgpt">'
                f'<a class="iusc" m="{m}" href="/images/search?q=cat">'
                '<div class="img_cont hoff"><img class="mimg" src="x.jpg"></div></a>'
                f'<div class="img_info hon"><span class="nowrap">{img["width"]} x '
                f'{img["height"]} · jpeg</span></div></div>'
                '<div class="infopt"><div class="lnkw"><a href="#">img.example.org</a></div>'
                "</div></div></li>")
        page = f'<ul class="dgControl_list">{"".join(items)}</ul>'
        return Response(200, page, content_type="text/html; charset=utf-8")

    return handle


# --- routing ddgs to the fakes ----------------------------------------------------------------

DDGS_HOSTS = ("https://duckduckgo.com", "https://www.bing.com")


def route_ddgs(monkeypatch: Any, base_url: str) -> list[str]:
    """Send every HTTP request ddgs makes to ``base_url`` instead of DuckDuckGo/Bing.

    ddgs' HTTP goes through ``primp`` (Rust), out of reach of the Python socket guard, so this
    patch is the guard for it: a URL on any other host is refused and listed in the returned
    list, which tests assert is empty.
    """
    from ddgs.http_client import HttpClient

    refused: list[str] = []
    real_request = HttpClient.request

    def request(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        for prefix in DDGS_HOSTS:
            if url == prefix or url.startswith(prefix + "/"):
                return real_request(self, method, base_url + url[len(prefix):], *args, **kwargs)
        refused.append(url)
        raise ConnectionRefusedError(f"test refused a ddgs request to {url}")

    monkeypatch.setattr(HttpClient, "request", request)
    return refused
