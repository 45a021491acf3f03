"""The web page in headless Chromium: a bad spec shows its field errors; the prefilled sandbox
example runs to the end with live progress bars and a gallery of thumbnails per class.

A screenshot is kept in test-artifacts/serve_page.png."""

from __future__ import annotations

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
    page.wait_for_selector("#job-state[data-state='succeeded']", timeout=120_000)
    bars = page.locator("#classes .class-row em").all_inner_texts()
    assert bars == ["3 / 3", "3 / 3", "3 / 3"]
    page.wait_for_function("document.querySelectorAll('.gallery img').length >= 9",
                           timeout=30_000)
    for label in ("cat", "dog", "bird"):
        assert page.locator(f".gallery[data-label='{label}'] img").count() == 3
    assert page.inner_text("#output").endswith(page.inner_text("#job-title").split(" — ")[1])
    assert page.locator("#jobs tbody tr").count() == 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve_page.png"), full_page=True)
