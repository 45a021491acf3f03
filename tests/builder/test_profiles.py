"""Host politeness profiles, the operator contact in the User-Agent, and their spec fields."""

from __future__ import annotations

import pytest
import yaml
from yarl import URL

from builder.errors import SpecError
from builder.profiles import (HostProfiles, WIKIMEDIA_MAX_BYTES_PER_S, contact_problem,
                              has_contact, user_agent)
from builder.spec import DownloadSpec, parse_spec
from cluster.cli import main

MINIMAL = {"name": "p", "classes": ["cat"]}


def test_wikimedia_is_built_in():
    wm = HostProfiles(DownloadSpec()).for_host("upload.wikimedia.org")
    assert (wm.concurrency, wm.max_bytes_per_s) == (2, WIKIMEDIA_MAX_BYTES_PER_S)
    assert wm.thumb_widths == (120, 250, 330, 500, 960, 1280, 1920, 3840)
    other = HostProfiles(DownloadSpec()).for_host("example.org")
    assert (other.concurrency, other.max_bytes_per_s, other.thumb_widths) == (16, None, ())


def test_a_host_is_its_profile_however_it_is_spelled():
    """upload.wikimedia.org. (a fully qualified name, which yarl keeps and aiohttp strips
    before asking) got no profile: 16 at once, no bandwidth cap, no standard widths."""
    profiles = HostProfiles(DownloadSpec())
    wm = profiles.for_host("upload.wikimedia.org")
    assert profiles.for_host("upload.wikimedia.org.") == wm
    assert profiles.for_host("UPLOAD.Wikimedia.ORG..") == wm


def test_spec_overrides_field_by_field_and_adds_domains():
    cfg = DownloadSpec(per_host_concurrency=8, per_host_delay_s=0.5, hosts={
        "upload.wikimedia.org": {"concurrency": 1},
        "*.example.org": {"delay_s": 2.0, "concurrency": 32}})
    profiles = HostProfiles(cfg)
    wm = profiles.for_host("upload.wikimedia.org")
    assert (wm.concurrency, wm.delay_s, wm.max_bytes_per_s) == (1, 0.5,
                                                                 WIKIMEDIA_MAX_BYTES_PER_S)
    sub = profiles.for_host("img.cdn.example.org")
    assert (sub.concurrency, sub.delay_s) == (32, 2.0)  # the spec's own values stand
    assert profiles.for_host("example.org") == sub
    assert profiles.for_host("example.com").concurrency == 8


def test_a_job_s_downloaders_share_each_host_s_limits():
    cfg = DownloadSpec(per_host_concurrency=5, per_host_delay_s=0.5, hosts={
        "*.example.org": {"delay_s": 2.0, "concurrency": 1}})
    one, three = HostProfiles(cfg), HostProfiles(cfg, share=3)
    assert (three.default.concurrency, three.default.delay_s) == (2, 1.5)
    assert three.for_host("example.com") == three.default
    sub = three.for_host("img.example.org")
    assert (sub.concurrency, sub.delay_s) == (1, 6.0)  # never below one at a time
    wm, wm1 = three.for_host("upload.wikimedia.org"), one.for_host("upload.wikimedia.org")
    assert wm.concurrency == 1 and wm.max_bytes_per_s == wm1.max_bytes_per_s / 3
    assert three.for_host("upload.wikimedia.org") is wm  # resolved once
    assert one.for_host("example.com") == one.default and one.default.delay_s == 0.5


def test_a_built_in_profile_never_loosens_the_download_settings():
    wm = HostProfiles(DownloadSpec(per_host_concurrency=1)).for_host("upload.wikimedia.org")
    assert wm.concurrency == 1


@pytest.mark.parametrize("name,standard", [
    ("317px-Cat.jpg", "330px-Cat.jpg"), ("120px-Cat.jpg", "120px-Cat.jpg"),
    ("121px-Cat.jpg", "250px-Cat.jpg"), ("5000px-Cat.jpg", "3840px-Cat.jpg"),
    ("lossy-page1-400px-Scan.tif.jpg", "lossy-page1-500px-Scan.tif.jpg"),
])
def test_thumbnail_widths_go_up_to_a_standard_one(name: str, standard: str):
    wm = HostProfiles(DownloadSpec()).for_host("upload.wikimedia.org")
    url = URL(f"https://upload.wikimedia.org/wikipedia/commons/thumb/a/ab/Cat.jpg/{name}")
    assert wm.thumb_url(url).raw_path.rsplit("/", 1)[1] == standard
    original = URL("https://upload.wikimedia.org/wikipedia/commons/a/ab/317px-Cat.jpg")
    assert wm.thumb_url(original) == original  # not a thumbnail


def test_a_thumbnail_width_of_thousands_of_digits_is_left_as_it_is():
    """int() of it raised (past Python's 4,300 digits), and the fetch rejected the image as
    a connection error."""
    wm = HostProfiles(DownloadSpec()).for_host("upload.wikimedia.org")
    url = URL("https://upload.wikimedia.org/wikipedia/commons/thumb/a/ab/Cat.jpg/"
              + "9" * 5000 + "px-Cat.jpg")
    assert wm.thumb_url(url) == url


def test_contact_goes_into_the_user_agent():
    cfg = DownloadSpec(contact="ops@example.org")
    assert user_agent(cfg) == ("PixCrawler/0.1 (+https://github.com/pixcrawler/pixcrawler; "
                               "ops@example.org)")
    assert user_agent(DownloadSpec(user_agent="MyBot/2", contact="https://ex.org/bot")) == \
        "MyBot/2 (https://ex.org/bot)"
    assert has_contact(cfg) and not has_contact(DownloadSpec())
    assert has_contact(DownloadSpec(user_agent="MyBot/2 (+mailto:me@ex.org)"))
    assert not has_contact(DownloadSpec(user_agent="MyBot/2"))


@pytest.mark.parametrize("bad", ["ops", "(ops@example.org)", "http://", "a@b"])
def test_a_contact_must_be_an_email_or_url(bad: str):
    with pytest.raises(SpecError, match=r"download\.contact: .*not a contact"):
        parse_spec({**MINIMAL, "sources": [{"engine": "duckduckgo"}],
                    "download": {"contact": bad}})


def test_who_needs_a_contact(tmp_path):
    web = parse_spec({**MINIMAL, "sources": [{"engine": "wikimedia"}]})
    assert "sources wikimedia crawl the public web" in contact_problem(web)
    assert "download.contact" in contact_problem(web)
    local = tmp_path / "local.txt"
    local.write_text("http://127.0.0.1:8800/a.jpg\nhttp://10.0.0.5/b.jpg\nhttp://localhost/c\n")
    assert contact_problem(parse_spec({**MINIMAL, "sources": [
        {"engine": "urllist", "path": str(local)}]})) is None
    public = tmp_path / "public.txt"
    public.write_text("http://127.0.0.1/a.jpg\nhttps://example.org/b.jpg\n")
    assert "https://example.org/b.jpg" in contact_problem(parse_spec({**MINIMAL, "sources": [
        {"engine": "urllist", "path": str(public)}]}))
    inline = parse_spec({"name": "p", "classes": {"cat": {"urls": ["https://ex.org/a.jpg"]}}})
    assert "class urls" in contact_problem(inline)
    sandbox = parse_spec({**MINIMAL, "sources": [{"engine": "sandbox",
                                                   "url": "http://127.0.0.1:1"}]})
    assert contact_problem(sandbox) is None
    assert contact_problem(parse_spec({**MINIMAL, "sources": [{"engine": "wikimedia"}],
                                       "download": {"contact": "me@ex.org"}})) is None


def test_check_and_build_say_how_to_set_the_contact(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "sources": [{"engine": "duckduckgo"}],
                                    "output": {"uri": str(tmp_path / "out")}}))
    for command in (["check", str(path)], ["build", str(path), "--local"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "download.contact" in err and "you@example.org" in err
    assert not (tmp_path / "out").exists()


def test_signals_section_defaults_all_on_but_page_meta():
    s = DownloadSpec().signals
    assert (s.tdmrep, s.content_usage, s.content_signal, s.xmp_datamining, s.ai_txt) == \
        (True,) * 5
    assert s.page_meta is False and s.usage == "train-genai"
    with pytest.raises(SpecError, match=r"download\.signals\.usage: 'train' is not valid"):
        parse_spec({**MINIMAL, "sources": [{"engine": "duckduckgo"}],
                    "download": {"signals": {"usage": "train"}}})
