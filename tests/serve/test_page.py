"""The web page in headless Chromium: a bad spec shows its field errors; the prefilled sandbox
example runs to the end with live progress bars and a gallery of thumbnails per class.

A screenshot is kept in test-artifacts/serve_page.png.

Two more tests drive the page's own logic against answers held back or refused on purpose
(Playwright's request routing, for the job paths only; the page itself comes from the app):
polling that backs off when the event stream is refused, and a late answer for one job that
must not replace the job opened since."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason=f"{CHROMIUM} is missing (apt-get install -y chromium)"),
]


@pytest.fixture
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 1000})
            yield tab
        finally:
            browser.close()


def test_page_submits_the_example_and_shows_it_finish(serve_app, page):
    key = serve_app.new_key("browser")
    requested: list[tuple[str, str]] = []
    page.on("request", lambda request: requested.append((request.method, request.url)))
    page.goto(serve_app.url("/"))
    page.wait_for_selector("body[data-ready='1']")
    assert "engine: sandbox" in page.input_value("#spec")
    page.fill("#api-key", key)
    page.dispatch_event("#api-key", "change")

    example = page.input_value("#spec")
    page.fill("#spec", "name: broken\nclasses: {cat: null}\n")
    page.click("#submit")
    page.wait_for_selector("#submit-error li")
    assert "sources" in page.inner_text("#submit-error")

    page.fill("#spec", example)
    page.click("#submit")
    page.wait_for_selector("#job-state[data-state='running'], #job-state[data-state='writing'], "
                           "#job-state[data-state='succeeded']", timeout=90_000)
    # The jobs list shows the open job as its panel does (not 'starting' while it writes).
    shown = page.evaluate("() => [document.querySelector('#job-state').dataset.state, "
                          "document.querySelector('#jobs tbody tr .state').textContent]")
    assert shown[0] == shown[1], shown
    page.wait_for_selector("#job-state[data-state='succeeded']", timeout=120_000)
    bars = page.locator("#classes .class-row em").all_inner_texts()
    assert bars == ["3 / 3", "3 / 3", "3 / 3"]
    page.wait_for_function("document.querySelectorAll('.gallery img').length >= 9",
                           timeout=30_000)
    for label in ("cat", "dog", "bird"):
        assert page.locator(f".gallery[data-label='{label}'] img").count() == 3
    assert page.inner_text("#output").endswith(page.inner_text("#job-title").split(" — ")[1])
    assert page.locator("#jobs tbody tr").count() == 1
    # The live progress came over the event stream, opened with a token: the key is in no URL.
    streams = [url for method, url in requested if method == "GET" and "/events?" in url]
    assert streams and all("/events?token=pxs_" in url for url in streams), streams
    assert ("POST", streams[0].split("?")[0] + "/token") in requested
    assert not any(key in url for _, url in requested)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve_page.png"), full_page=True)


def job_json(job_id: str, state: str, detail: bool = True) -> dict:
    """A job as the API writes it: serve.app.job_view of a store row."""
    from serve.app import job_view
    from serve.store import JobRow

    row = JobRow(id=job_id, owner="o", name=f"name-{job_id}", state=state, created_at=1.0,
                 updated_at=2.0, output_uri=f"/data/{job_id}",
                 spec={"name": f"name-{job_id}", "classes": {"cat": {"target": 2}}},
                 progress={"candidates": 3, "accepted": 1, "rejected": 2})
    return job_view(row, detail=detail)


def fulfill(route, status: int, body: dict) -> None:
    route.fulfill(status=status, content_type="application/json", body=json.dumps(body))


def open_page(serve_app, page) -> None:
    page.goto(serve_app.url("/"))
    page.wait_for_selector("body[data-ready='1']")
    page.fill("#api-key", serve_app.new_key())
    page.dispatch_event("#api-key", "change")


def test_polling_backs_off_on_errors_when_the_event_stream_is_refused(serve_app, page):
    gets: list[float] = []

    def job_route(route) -> None:
        gets.append(time.monotonic())
        if len(gets) == 1:  # the page opens the job: it runs
            fulfill(route, 200, job_json("stub-poll", "running"))
        elif len(gets) == 2:  # the first poll: the server is busy
            fulfill(route, 503, {"error": {"code": "unavailable", "message": "busy"}})
        else:
            fulfill(route, 200, job_json("stub-poll", "failed"))

    page.route(re.compile(r".*/v1/jobs/stub-poll$"), job_route)
    page.route(re.compile(r".*/v1/jobs/stub-poll/events.*"),
               lambda route: fulfill(route, 503, {"error": {"code": "x", "message": "no"}}))
    open_page(serve_app, page)
    page.evaluate("() => { openJob('stub-poll'); }")
    page.wait_for_selector("#job-state[data-state='failed']", timeout=30_000)
    assert len(gets) == 3
    # Polls every 2 s; after the 503 the wait doubles instead of the polling stopping.
    assert 1.5 <= gets[1] - gets[0] and 3.5 <= gets[2] - gets[1] < 8, gets
    page.wait_for_timeout(2500)
    assert len(gets) == 3  # the job ended: no more polls


def test_a_late_answer_does_not_replace_the_job_opened_since(serve_app, page):
    held = []
    page.route(re.compile(r".*/v1/jobs\?limit=50$"), lambda route: fulfill(route, 200, {
        "jobs": [job_json(j, "failed", detail=False) for j in ("stub-a", "stub-b")],
        "total": 2, "limit": 50, "offset": 0, "next_offset": None}))
    page.route(re.compile(r".*/v1/jobs/stub-a$"), lambda route: held.append(route))
    page.route(re.compile(r".*/v1/jobs/stub-b$"),
               lambda route: fulfill(route, 200, job_json("stub-b", "failed")))
    open_page(serve_app, page)
    page.click("#jobs tbody tr[data-id='stub-a']")
    deadline = time.monotonic() + 10
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    assert held, "the page did not ask for job stub-a"
    page.click("#jobs tbody tr[data-id='stub-b']")
    page.wait_for_selector("#job-title:has-text('stub-b')")
    fulfill(held[0], 200, job_json("stub-a", "failed"))
    page.wait_for_timeout(1000)
    assert page.inner_text("#job-title") == "name-stub-b \u2014 stub-b"
    assert page.locator("#jobs tbody tr.selected").get_attribute("data-id") == "stub-b"


def test_the_gallery_says_why_it_may_show_fewer_thumbnails(serve_app, page):
    """A samples answer's ``message`` (e.g. a WebDataset scan cut short) is shown, in place
    of "no accepted images" when it found none."""
    note = "only the first 5,000 samples of the WebDataset shards were looked at"
    job = job_json("stub-gal", "succeeded")
    job["classes"] = {"cat": {}, "dog": {}}
    thumb = ("data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")

    def samples(route) -> None:
        found = [] if "label=cat" in route.request.url else [{"id": "d1", "thumbnail": thumb}]
        fulfill(route, 200, {"job_id": "stub-gal", "ready": True, "samples": found,
                             "message": note})

    page.route(re.compile(r".*/v1/jobs/stub-gal$"), lambda route: fulfill(route, 200, job))
    page.route(re.compile(r".*/v1/jobs/stub-gal/events.*"),
               lambda route: fulfill(route, 503, {"error": {"code": "x", "message": "no"}}))
    page.route(re.compile(r".*/v1/jobs/stub-gal/samples.*"), samples)
    open_page(serve_app, page)
    page.evaluate("() => { openJob('stub-gal'); }")
    page.wait_for_selector(".gallery[data-label='dog'] img")
    assert page.inner_text("#galleries [data-label='cat']") == note
    assert page.locator(".gallery[data-label='dog'] + p.muted").inner_text() == note


def test_a_stream_whose_token_expired_is_opened_again_with_a_new_token(serve_app, page):
    """A stream opened with a token ends when the token expires (``stream_expired``); the
    page used to wait for the browser's reconnect to be refused with that token, and where
    the stream had run under a minute it polled instead of streaming again."""
    tokens: list[str] = []
    streams: list[str] = []

    def token_route(route) -> None:
        tokens.append(route.request.method)
        token = f"pxs_t{len(tokens)}"
        fulfill(route, 200, {"token": token, "expires_at": 0,
                             "events_url": f"/v1/jobs/stub-exp/events?token={token}"})

    def events_route(route) -> None:
        streams.append(route.request.url)
        if len(streams) == 1:
            time.sleep(10.5)  # a stream that ran its token's course
            body = ('event: error\ndata: {"error": {"code": "stream_expired", '
                    '"message": "its stream token has expired"}}\n\n')
        else:
            body = f"event: end\ndata: {json.dumps(job_json('stub-exp', 'succeeded'))}\n\n"
        route.fulfill(status=200, content_type="text/event-stream", body=body)

    page.route(re.compile(r".*/v1/jobs/stub-exp$"),
               lambda route: fulfill(route, 200, job_json("stub-exp", "running")))
    page.route(re.compile(r".*/v1/jobs/stub-exp/events/token$"), token_route)
    page.route(re.compile(r".*/v1/jobs/stub-exp/events\?.*"), events_route)
    open_page(serve_app, page)
    page.evaluate("() => { openJob('stub-exp'); }")
    page.wait_for_selector("#job-state[data-state='succeeded']", timeout=30_000)
    assert tokens == ["POST", "POST"]
    assert [url.rsplit("=", 1)[1] for url in streams] == ["pxs_t1", "pxs_t2"]
