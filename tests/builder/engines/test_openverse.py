"""Openverse engine against a fake of its /v1/images/ API."""

from __future__ import annotations

import pytest

from builder.engines.openverse import OpenverseEngine, format_license
from builder.errors import EngineError, SourceError
from tests.builder.engines.fakes import (FakeServer, OpenverseOAuth, Response, fake_images,
                                         openverse_handler)


def _local(url: str, **kwargs) -> OpenverseEngine:
    """The engine against a fake on 127.0.0.1, a private address the spec would allow
    with download.allow_private_networks."""
    return OpenverseEngine(url, allow_private_networks=True, **kwargs)


@pytest.fixture(autouse=True)
def _no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENVERSE_TOKEN", raising=False)


def test_maps_results_with_license_and_creator():
    images = fake_images(5)
    with FakeServer(openverse_handler(images)) as srv:
        page = _local(f"{srv.url}/v1/images/").search("cat", label="cat", page=0,
                                                      per_page=5)
    assert [h.url for h in page.hits] == [img["url"] for img in images]
    hit = page.hits[1]
    assert (hit.rank, hit.page_url, hit.title) == (1, images[1]["page_url"], "Cat number 1")
    assert hit.license == "CC BY 2.0" and hit.author == "Photographer 1"
    assert page.hits[2].license == "CC0 1.0"
    assert not page.has_more
    q = srv.requests[0].query
    assert (q["q"], q["page"], q["page_size"]) == ("cat", "1", "5")
    assert "authorization" not in srv.requests[0].headers


def test_pages_are_one_based_and_end_with_page_count():
    images = fake_images(25)
    with FakeServer(openverse_handler(images)) as srv:
        engine = _local(f"{srv.url}/v1/images/")
        pages = [engine.search("cat", label="cat", page=p, per_page=10) for p in range(3)]
    assert [len(p.hits) for p in pages] == [10, 10, 5]
    assert [p.has_more for p in pages] == [True, True, False]
    assert [r.query["page"] for r in srv.requests] == ["1", "2", "3"]
    assert [h.url for p in pages for h in p.hits] == [img["url"] for img in images]


def test_anonymous_pages_are_capped_at_20_and_mapped_onto_ours():
    images = fake_images(100)
    with FakeServer(openverse_handler(images)) as srv:
        page = _local(f"{srv.url}/v1/images/").search("cat", label="cat", page=1,
                                                      per_page=30)
    assert [h.rank for h in page.hits] == list(range(30, 60))
    assert [h.url for h in page.hits] == [img["url"] for img in images[30:60]]
    assert [(r.query["page"], r.query["page_size"]) for r in srv.requests] == \
        [("2", "20"), ("3", "20")]
    assert page.has_more


def test_token_is_sent_and_allows_big_pages():
    images = fake_images(60)
    with FakeServer(openverse_handler(images, token="tok-123")) as srv:
        page = _local(f"{srv.url}/v1/images/", token="tok-123").search("cat", label="cat",
                                                                       page=0, per_page=50)
    assert len(page.hits) == 50 and page.has_more
    assert srv.requests[0].headers["authorization"] == "Bearer tok-123"
    assert srv.requests[0].query["page_size"] == "50"


def test_bad_token_is_not_retryable():
    with FakeServer(openverse_handler(fake_images(3), token="right")) as srv:
        with pytest.raises(EngineError) as info:
            _local(f"{srv.url}/v1/images/", token="wrong").search(
                "cat", label="cat", page=0, per_page=5)
    assert info.value.status == 401 and not info.value.retryable


def test_throttled_is_retryable_with_retry_after():
    with FakeServer(openverse_handler(fake_images(3))) as srv:
        srv.fail_next(status=429, headers={"Retry-After": "56"},
                      body={"detail": "Request was throttled. Expected available in 56 seconds."})
        with pytest.raises(EngineError) as info:
            _local(f"{srv.url}/v1/images/").search("cat", label="cat", page=0,
                                                   per_page=5)
    assert info.value.retryable and info.value.status == 429 and info.value.retry_after == 56.0
    assert "throttled" in str(info.value)


def test_empty_result_and_safesearch_off_asks_for_mature():
    with FakeServer(openverse_handler([])) as srv:
        page = _local(f"{srv.url}/v1/images/", safesearch="off",
                      filters={"license_type": "commercial", "bogus": "x"}).search(
            "nothing", label="x", page=0, per_page=5)
    assert page.hits == [] and not page.has_more
    q = srv.requests[0].query
    assert q["mature"] == "true" and q["license_type"] == "commercial" and "bogus" not in q


def test_format_license():
    assert format_license("by-nc-sa", "3.0") == "CC BY-NC-SA 3.0"
    assert format_license("pdm", "1.0") == "Public Domain Mark 1.0"
    assert format_license("") == ""


def test_malformed_results_keep_the_good_hits_with_text_fields():
    """Wrong JSON types never crash: junk URLs are dropped, junk text becomes "", and an
    infinite ``page_count`` ends the paging."""
    body = (b'{"page_count": 1e999, "results": ['
            b'{"url": "https://a.example/x.jpg", "license": 5, "license_version": [1],'
            b' "title": ["t"], "creator": {"n": 1}, "foreign_landing_url": null},'
            b' {"url": {"a": 1}}, {"url": 12345}, {"url": null}, {"url": "  "}, "junk", 7,'
            b' {"url": "https://a.example/y.jpg", "title": 7, "license": "by",'
            b' "license_version": 2.0, "foreign_landing_url": 3}]}')
    with FakeServer(lambda req: Response(200, body)) as srv:
        page = _local(f"{srv.url}/v1/images/").search("cat", label="cat", page=0,
                                                      per_page=10)
    assert [(h.url, h.rank) for h in page.hits] == [("https://a.example/x.jpg", 0),
                                                    ("https://a.example/y.jpg", 7)]
    x, y = page.hits
    assert (x.title, x.license, x.author, x.page_url) == ("", "", "", "")
    assert (y.title, y.license, y.page_url) == ("7", "CC BY 2.0", "")
    assert not page.has_more


@pytest.mark.parametrize("body", [
    {"results": {"url": "https://a.example/x.jpg"}}, [1, 2], {"results": None}, b"[" * 50_000,
])
def test_answer_of_the_wrong_shape_is_a_retryable_engine_error(body):
    with FakeServer(lambda req: Response(200, body)) as srv:
        with pytest.raises(EngineError) as info:
            _local(f"{srv.url}/v1/images/").search("cat", label="cat", page=0,
                                                   per_page=5)
    assert info.value.retryable


def test_format_license_of_junk_is_empty():
    assert format_license(5, "1.0") == "" and format_license(None) == ""
    assert format_license(["by"]) == "" and format_license("by", None) == "CC BY"


# ---- the 240-result depth, client credentials, token renewal ---------------------------------


@pytest.fixture()
def _no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENVERSE_CLIENT_ID", raising=False)
    monkeypatch.delenv("OPENVERSE_CLIENT_SECRET", raising=False)


CLIENTS = {"client-1": "secret-1"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_anonymous_search_ends_at_the_240th_result(_no_credentials):
    fake = OpenverseOAuth(fake_images(400), clients=CLIENTS)
    with FakeServer(fake) as srv:
        engine = OpenverseEngine(f"{srv.url}/v1/images/", allow_private_networks=True)
        pages = [engine.search("cat", label="cat", page=p, per_page=50) for p in range(6)]
    assert [len(p.hits) for p in pages] == [50, 50, 50, 50, 40, 0]
    assert [p.has_more for p in pages] == [True, True, True, True, False, False]
    assert pages[4].hits[-1].rank == 239
    assert fake.depth_refusals == 0
    assert max(int(r.query["page"]) * int(r.query["page_size"]) for r in srv.requests) == 240


def test_anonymous_depth_with_a_page_size_that_does_not_divide_240(_no_credentials):
    fake = OpenverseOAuth(fake_images(400), clients=CLIENTS)
    with FakeServer(fake) as srv:
        engine = OpenverseEngine(f"{srv.url}/v1/images/", allow_private_networks=True)
        last = engine.search("cat", label="cat", page=33, per_page=7)
    assert [h.rank for h in last.hits] == [231, 232, 233, 234, 235, 236, 237]
    assert not last.has_more and fake.depth_refusals == 0


def test_client_credentials_get_a_token_and_search_past_240(_no_credentials):
    fake = OpenverseOAuth(fake_images(600), clients=CLIENTS)
    with FakeServer(fake) as srv:
        engine = OpenverseEngine(f"{srv.url}/v1/images/", allow_private_networks=True,
                                 client_id="client-1",
                                 client_secret="secret-1")
        page = engine.search("cat", label="cat", page=1, per_page=300)
    assert [h.rank for h in page.hits] == list(range(300, 600))
    token_request, search = srv.requests[0], srv.requests[1]
    assert (token_request.method, token_request.path) == ("POST", "/v1/auth_tokens/token/")
    assert "grant_type=client_credentials" in token_request.body.decode()
    assert search.headers["authorization"] == "Bearer ov-token-1"
    assert search.query["page_size"] == "300"
    assert fake.tokens_issued == 1


def test_token_is_renewed_before_it_expires(_no_credentials):
    clock = Clock()
    fake = OpenverseOAuth(fake_images(100), clients=CLIENTS, lifetime=600, clock=clock)
    with FakeServer(fake) as srv:
        engine = OpenverseEngine(f"{srv.url}/v1/images/", allow_private_networks=True,
                                 client_id="client-1",
                                 client_secret="secret-1", clock=clock)
        engine.search("cat", label="cat", page=0, per_page=10)
        clock.now += 550  # inside the last minute of the token's life
        engine.search("cat", label="cat", page=1, per_page=10)
        clock.now += 100
        engine.search("cat", label="cat", page=2, per_page=10)
    assert fake.tokens_issued == 2
    auths = [r.headers.get("authorization") for r in srv.requests if r.method == "GET"]
    assert auths == ["Bearer ov-token-1", "Bearer ov-token-2", "Bearer ov-token-2"]


def test_a_refused_token_is_renewed_once(_no_credentials):
    fake = OpenverseOAuth(fake_images(100), clients=CLIENTS)
    with FakeServer(fake) as srv:
        engine = OpenverseEngine(f"{srv.url}/v1/images/", allow_private_networks=True,
                                 client_id="client-1",
                                 client_secret="secret-1")
        engine.search("cat", label="cat", page=0, per_page=10)
        fake.revoke()  # expired early on the server's side: 401 invalid_token
        page = engine.search("cat", label="cat", page=1, per_page=10)
    assert len(page.hits) == 10 and fake.tokens_issued == 2


def test_a_fixed_token_that_expires_says_how_to_renew(_no_credentials):
    fake = OpenverseOAuth(fake_images(10), clients=CLIENTS)
    with FakeServer(fake) as srv:
        engine = OpenverseEngine(f"{srv.url}/v1/images/", token="stale",
                                 allow_private_networks=True)
        with pytest.raises(EngineError) as info:
            engine.search("cat", label="cat", page=0, per_page=5)
    assert info.value.status == 401 and not info.value.retryable
    assert "OPENVERSE_CLIENT_ID" in str(info.value)


def test_half_the_credentials_is_a_source_error(_no_credentials,
                                                monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OPENVERSE_CLIENT_ID", "client-1")
    with pytest.raises(SourceError, match="OPENVERSE_CLIENT_SECRET"):
        OpenverseEngine()


def test_bad_credentials_fail_the_search(_no_credentials):
    with FakeServer(OpenverseOAuth(fake_images(10), clients=CLIENTS)) as srv:
        engine = OpenverseEngine(f"{srv.url}/v1/images/", allow_private_networks=True,
                                 client_id="client-1",
                                 client_secret="wrong")
        with pytest.raises(EngineError) as info:
            engine.search("cat", label="cat", page=0, per_page=5)
    assert info.value.status == 401 and "secret" not in str(info.value).replace("secret-", "")
