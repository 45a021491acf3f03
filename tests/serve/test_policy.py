"""The API policy (serve/policy.py) on specs directly, no Ray: where outputs go, which files
and endpoints a user may name, the caps, and the pools sized to a job's share. The same
attacks through the real app, with two keys, are in test_policy_app.py."""

from __future__ import annotations

import os
from typing import Any

import pytest

from builder.errors import SourceError, SpecError
from builder.spec import DatasetSpec, DownloadSpec, parse_spec
from serve.policy import ApiPolicy, PolicyRefused, apply_policy, place_output, url_within

DATA = "/srv/pixcrawler"
PREFIX = f"{DATA}/datasets/alice"
CLUSTER = {"CPU": 8.0}


def spec(**overrides: Any) -> DatasetSpec:
    data: dict[str, Any] = {"name": "pets", "target": 10, "classes": {"cat": None},
                            "sources": [{"engine": "duckduckgo"}]}
    data.update(overrides)
    return parse_spec(data)


def apply(s: DatasetSpec, policy: ApiPolicy | None = None, owner: str = "alice",
          cluster: dict[str, float] = CLUSTER) -> DatasetSpec:
    return apply_policy((policy or ApiPolicy()).resolved(DATA), s, owner, "pets-0001", cluster)


def refused(s: DatasetSpec, policy: ApiPolicy | None = None) -> tuple[int, dict[str, Any]]:
    """The status and {field: (policy setting, message)} of a refused spec."""
    with pytest.raises(PolicyRefused) as info:
        apply(s, policy)
    return info.value.status, {p.field: (p.setting, p.message) for p in info.value.problems}


@pytest.mark.parametrize("uri, placed", [
    (None, f"{PREFIX}/pets-0001"),
    ("pets", f"{PREFIX}/pets"),
    ("./team/pets-v2/", f"{PREFIX}/team/pets-v2"),
    (f"{PREFIX}/pets", f"{PREFIX}/pets"),  # the answer's output_uri, sent back
])
def test_outputs_land_under_the_owners_prefix(uri, placed):
    assert place_output(uri, PREFIX, "pets-0001") == (placed, None)
    assert apply(spec(output={"uri": uri})).output.uri == placed


@pytest.mark.parametrize("uri", [
    "/etc/pixcrawler-pwn", "file:///root/x", "file:relative", "s3://someone-elses-bucket/x",
    "../../../../x", "pets/../../x", "~/x", f"{DATA}/datasets/bob/pets", f"{DATA}/datasets/x",
    "C:\\Windows\\x", "pets::s3://b/x",
])
def test_outputs_anywhere_else_are_forbidden(uri):
    status, problems = refused(spec(output={"uri": uri, "overwrite": True}))
    assert status == 403 and list(problems) == ["output.uri"]
    setting, message = problems["output.uri"]
    assert setting == "output_prefix" and f"{PREFIX}/pets" in message


@pytest.mark.parametrize("uri", ["my pets", "pets%2f..", "-x", PREFIX, "pets\n"])
def test_output_names_outside_the_plain_alphabet_are_422(uri):
    status, problems = refused(spec(output={"uri": uri}))
    assert status == 422 and problems["output.uri"][0] == "output_prefix"


def test_each_key_gets_its_own_prefix_so_overwrite_only_replaces_ones_own():
    mine = apply(spec(output={"uri": "pets", "overwrite": True}), owner="alice")
    theirs = apply(spec(output={"uri": "pets", "overwrite": True}), owner="bob")
    assert mine.output.uri == f"{PREFIX}/pets"
    assert theirs.output.uri == f"{DATA}/datasets/bob/pets"


def test_an_operator_prefix_on_object_storage():
    policy = ApiPolicy(output_prefix="s3://datasets/users/{owner}/")
    assert apply(spec(output={"uri": "pets"}), policy).output.uri == \
        "s3://datasets/users/alice/pets"
    status, problems = refused(spec(output={"uri": "s3://datasets/users/bob/pets"}), policy)
    assert status == 403


@pytest.mark.parametrize("prefix", ["/srv/x", "/srv/u{owner}", "s3://{owner}/x",
                                    "/a/{owner}/{owner}"])
def test_the_output_prefix_needs_the_owner_as_a_part_of_its_own(prefix):
    with pytest.raises(ValueError, match="{owner}"):
        ApiPolicy(output_prefix=prefix)


def test_url_list_files_only_from_the_operators_directories(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "cats.txt").write_text("https://example.org/a.jpg\n")
    (tmp_path / "secret.txt").write_text("nope\n")
    os.symlink(tmp_path / "secret.txt", lists / "escape.txt")
    source = {"engine": "urllist", "path": "/etc/passwd"}
    status, problems = refused(spec(sources=[source]))
    assert status == 403 and problems["sources.0.path"][0] == "url_list_dirs"
    assert "urls" in problems["sources.0.path"][1]  # says how to send the URLs instead
    policy = ApiPolicy(url_list_dirs=[str(lists)])
    for path in ("/etc/passwd", str(lists / "escape.txt"), "../secret.txt"):
        status, problems = refused(spec(sources=[{**source, "path": path}]), policy)
        assert status == 403 and "sources.0.path" in problems, path
    for path in (str(lists / "cats.txt"), "cats.txt"):
        placed = apply(spec(sources=[{**source, "path": path}]), policy)
        assert placed.sources[0].path == str((lists / "cats.txt").resolve())


def test_the_url_list_the_api_checked_is_the_only_file_its_job_reads(tmp_path):
    """The policy resolved the path once, at submission, in a folder the key's user may
    write: a link put in the file's place before the job ran (a queued job waits) had the job
    read any file the server can, another key's list or its secrets, into its rejects."""
    from builder.listsource import ListReader, plan_slices

    lists, other = tmp_path / "lists" / "alice", tmp_path / "lists" / "bob"
    lists.mkdir(parents=True)
    other.mkdir(parents=True)
    (lists / "my.txt").write_text("https://example.org/a.jpg\n")
    (other / "list.txt").write_text("SECRET-of-bob\nhttps://bob.example/1.jpg\n")
    policy = ApiPolicy(url_list_dirs=[str(tmp_path / "lists" / "{owner}")])
    src = apply(spec(sources=[{"engine": "urllist", "path": "my.txt"}]), policy,
                owner="alice").sources[0]
    assert src.path_inode == (lists / "my.txt").stat().st_ino
    plan = plan_slices(src.path, 64, inode=src.path_inode)
    assert [r.url for r in ListReader(plan).read(0)] == ["https://example.org/a.jpg"]
    (lists / "my.txt").unlink()
    os.symlink(other / "list.txt", lists / "my.txt")
    for read in (lambda: ListReader(plan).read(0),
                 lambda: plan_slices(src.path, 64, inode=src.path_inode)):
        with pytest.raises(SourceError, match="not the file this server checked"):
            read()
    with pytest.raises(PolicyRefused):  # and the check itself refuses it now
        apply(spec(sources=[{"engine": "urllist", "path": "my.txt"}]), policy, owner="alice")


def test_a_url_list_that_is_missing_or_a_folder_is_refused_when_the_job_is_sent(tmp_path):
    (tmp_path / "folder.txt").mkdir()
    policy = ApiPolicy(url_list_dirs=[str(tmp_path)])
    for path, says in (("missing.txt", "cannot be read here"), ("folder.txt", "is not a file")):
        with pytest.raises(PolicyRefused) as info:
            apply(spec(sources=[{"engine": "urllist", "path": path}]), policy)
        [problem] = info.value.problems
        assert problem.field == "sources.0.path" and says in problem.message, path


def test_url_list_directories_may_be_each_keys_own(tmp_path):
    """Without ``{owner}`` every key reads every list there: another key's datasets too, if
    the directory holds them."""
    for owner in ("alice", "bob"):
        (tmp_path / "lists" / owner).mkdir(parents=True)
        (tmp_path / "lists" / owner / "cats.txt").write_text("https://example.org/a.jpg\n")
    policy = ApiPolicy(url_list_dirs=[str(tmp_path / "lists" / "{owner}")])
    source = {"engine": "urllist", "path": "cats.txt"}
    assert apply(spec(sources=[source]), policy, owner="bob").sources[0].path == \
        str((tmp_path / "lists" / "bob" / "cats.txt").resolve())
    alices = {**source, "path": str(tmp_path / "lists" / "alice" / "cats.txt")}
    assert apply(spec(sources=[alices]), policy, owner="alice").sources[0].path
    with pytest.raises(PolicyRefused) as info:
        apply(spec(sources=[alices]), policy, owner="bob")
    assert [p.field for p in info.value.problems] == ["sources.0.path"]


def test_url_lists_in_the_request_body_need_no_permission():
    placed = apply(spec(sources=[], classes={"cat": {"urls": ["https://example.org/a.jpg"]}}))
    assert placed.classes["cat"].urls == ["https://example.org/a.jpg"]


@pytest.mark.parametrize("overrides, field, setting", [
    ({"sources": [{"engine": "openverse",
                   "options": {"base_url": "http://169.254.169.254/latest/meta-data#"}}]},
     "sources.0.options.base_url", "source_urls"),
    ({"sources": [{"engine": "openverse",
                   "options": {"base_url": "http://127.0.0.1:9/internal-admin#"}}]},
     "sources.0.options.base_url", "source_urls"),
    ({"sources": [{"engine": "sandbox", "url": "http://127.0.0.1:9"}]}, "sources.0.url",
     "source_urls"),
    ({"sources": [{"engine": "duckduckgo", "options": {"proxy": "socks5://10.0.0.1:1080"}}]},
     "sources.0.options.proxy", "allow_proxy"),
    ({"search": {"llm_base_url": "http://capture.example:8080/v1"}}, "search.llm_base_url",
     "llm_base_urls"),
    ({"download": {"allow_private_networks": True}}, "download.allow_private_networks",
     "allow_private_networks"),
    ({"validation": {"clip_model": "/root/some-model"}}, "validation.clip_model", "models"),
    ({"validation": {"nsfw_backend": "hf", "nsfw_model": "/etc"}}, "validation.nsfw_model",
     "models"),
    ({"search": {"llm_model": "gpt-4-32k"}}, "search.llm_model", "llm_models"),
    ({"search": {"expand": True, "expand_n": 50}}, "search.expand", "allow_expand"),
    ({"download": {"hosts": {"upload.wikimedia.org": {"max_bytes_per_s": 1e12}}}},
     "download.hosts.upload.wikimedia.org.max_bytes_per_s", "max_per_host_concurrency"),
])
def test_endpoints_proxies_private_networks_and_models_need_the_operators_permission(
        overrides, field, setting):
    status, problems = refused(spec(**overrides))
    assert status == 403 and list(problems) == [field]
    assert problems[field][0] == setting
    parse_spec({"name": "pets", "classes": {"cat": None}, "sources": [{"engine": "bing"}],
                **overrides})  # the CLI takes them all: there the user is the operator


def test_per_host_profiles_are_capped_and_built_in_ones_only_made_politer():
    """``download.hosts`` once let an API user set any host's concurrency (100,000 for
    *.com) and lift Wikimedia's published limits."""
    policy = ApiPolicy(max_per_host_concurrency=4)
    status, problems = refused(spec(download={"hosts": {
        "*.com": {"concurrency": 100_000, "delay_s": 0},
        "upload.wikimedia.org": {"concurrency": 3}}}), policy)
    assert status == 403 and {f: s for f, (s, _) in problems.items()} == {
        "download.hosts.*.com.concurrency": "max_per_host_concurrency",
        "download.hosts.upload.wikimedia.org.concurrency": "max_per_host_concurrency"}
    assert "published robot policy (2)" in \
        problems["download.hosts.upload.wikimedia.org.concurrency"][1]
    placed = apply(spec(download={"hosts": {"*.com": {"concurrency": 4},
                                            "upload.wikimedia.org": {"concurrency": 1}}}),
                   policy)
    assert placed.download.hosts["upload.wikimedia.org"].concurrency == 1


@pytest.mark.parametrize("contact", ["Googlebot/2.1@google.com",
                                     "http://www.google.com/bot.html?Googlebot/2.1",
                                     "https://example.org/GPTBot"])
def test_a_contact_may_not_name_another_crawler(contact):
    """The contact goes into the User-Agent, where sites look for crawlers by name."""
    status, problems = refused(spec(download={"contact": contact}))
    assert status == 403 and problems["download.contact"][0] == "user_agents"
    assert apply(spec(download={"contact": "https://example.org/crawler"}))


def test_an_engines_own_timeout_is_held_to_the_servers_limit():
    for timeout in (600, "600", "nan", "not a number"):
        status, problems = refused(spec(sources=[{"engine": "bing",
                                                  "options": {"timeout_s": timeout}}]))
        assert status == 422 and problems["sources.0.options.timeout_s"][0] == "max_timeout_s"
    assert apply(spec(sources=[{"engine": "bing", "options": {"timeout_s": 30}}]))


def test_a_built_in_profile_is_found_however_its_host_is_spelled_and_only_made_politer():
    """UPLOAD.wikimedia.org was not looked up as upload.wikimedia.org, whose published limits
    the fetcher (which lower-cases hosts) then lifted; its standard thumbnail widths were not
    checked at all."""
    status, problems = refused(spec(download={"hosts": {
        "UPLOAD.Wikimedia.org.": {"concurrency": 16, "max_bytes_per_s": 1e12,
                                  "thumb_widths": [100, 250]}}}))
    assert status == 403 and sorted(problems) == [
        f"download.hosts.upload.wikimedia.org.{name}"
        for name in ("concurrency", "max_bytes_per_s", "thumb_widths")]
    assert "standard widths (120, 250" in \
        problems["download.hosts.upload.wikimedia.org.thumb_widths"][1]
    placed = apply(spec(download={"hosts": {"Upload.Wikimedia.org": {
        "concurrency": 1, "thumb_widths": [250, 500]}}}))
    assert placed.download.hosts["upload.wikimedia.org"].thumb_widths == [250, 500]


@pytest.mark.parametrize("key, value", [("max_requests_per_day", None), ("rate", 1000),
                                        ("burst", 1000), ("min_rate", 1e-6),
                                        ("failure_threshold", 1), ("cooldown_s", 1e9)])
def test_a_spec_may_not_set_the_limits_every_job_of_an_engine_shares(key, value):
    """Every job of an engine configures one shared limiter: a spec's rate, burst, breaker or
    daily budget lifted the server's caps for everyone, or starved every other job."""
    s = spec(sources=[{"engine": "duckduckgo", "options": {key: value}}])
    status, problems = refused(s)
    assert status == 403
    assert problems[f"sources.0.options.{key}"][0] == "allow_engine_limits"
    assert apply(s, ApiPolicy(allow_engine_limits=True)).sources[0].options[key] == value
    own = spec(sources=[{"engine": "duckduckgo", "options": {"max_requests_per_job": 5}}])
    assert apply(own).sources[0].options["max_requests_per_job"] == 5


def test_a_job_spends_at_most_its_share_of_an_engines_daily_budget():
    """Every job and key shares an engine's daily budget (openverse 200 requests, google 100)
    and nothing capped one job's spend: a spec of four queries and 50 pages took Openverse's
    whole day from every other key. A job now gets a share, split between its sources of the
    engine as each one's own cap; one asking for more is refused."""
    one = apply(spec(sources=[{"engine": "openverse"}, {"engine": "duckduckgo"}]))
    assert one.sources[0].options["max_requests_per_job"] == 50  # a quarter of 200
    assert "max_requests_per_job" not in one.sources[1].options  # no daily budget to share
    two = apply(spec(sources=[{"engine": "openverse", "options": {"max_requests_per_job": 10}},
                              {"engine": "openverse", "per_page": 20},
                              {"engine": "google"}]))
    assert [src.options.get("max_requests_per_job") for src in two.sources] == [10, 25, 25]
    status, problems = refused(spec(sources=[
        {"engine": "openverse", "options": {"max_requests_per_job": 200}}]))
    assert status == 422
    assert problems["sources.0.options.max_requests_per_job"][0] == "max_budget_share"
    assert "50" in problems["sources.0.options.max_requests_per_job"][1]
    status, problems = refused(spec(sources=[{"engine": "google"}, {"engine": "google",
                                             "per_page": 5}]),
                               ApiPolicy(max_budget_share=0.01))
    assert status == 422 and problems["sources"][0] == "max_budget_share"
    assert "2 google sources" in problems["sources"][1]
    whole = apply(spec(sources=[{"engine": "google"}]), ApiPolicy(max_budget_share=1))
    assert whole.sources[0].options["max_requests_per_job"] == 100
    # A spec allowed to set the engine's limits may lower the budget, not lift or drop it.
    free = ApiPolicy(allow_engine_limits=True)
    for day, share in ((None, 50), (10**9, 50), (40, 10)):
        ov = apply(spec(sources=[{"engine": "openverse",
                                  "options": {"max_requests_per_day": day}}]), free)
        assert ov.sources[0].options["max_requests_per_job"] == share, day
    # a value of the wrong type is the spec's error, naming the field (it was a 500)
    with pytest.raises(SpecError, match="max_requests_per_job: must be a whole number"):
        spec(sources=[{"engine": "openverse", "options": {"max_requests_per_job": "1000"}}])


def test_what_a_job_may_write_is_held_to_the_servers_limit():
    """Nothing bounded what one job wrote: 100,000 images of up to 20 MB each, once per
    output format (ImageFolder, WebDataset and Parquet are each a full copy), on the storage
    every key shares. An unset download.max_bytes is lowered to fit max_job_gb; a larger one
    set by the spec, or a job that would not fit even at 256 KiB an image, is refused."""
    from serve.policy import MIN_FITTED_BYTES

    big = {"target": 10_000, "classes": {f"c{i}": None for i in range(10)}}
    fitted = apply(spec(**big))  # 100,000 images x 2 formats (the default)
    assert fitted.download.max_bytes == 2_500_000
    assert apply(spec()).download.max_bytes == DownloadSpec().max_bytes  # a small job
    three = apply(spec(**big, output={"formats": ["parquet", "imagefolder", "webdataset"]}))
    assert three.download.max_bytes == 500_000_000_000 // 300_000
    status, problems = refused(spec(**big, download={"max_bytes": 20_000_000}))
    assert status == 422 and problems["download.max_bytes"][0] == "max_job_gb"
    assert "2500000 bytes" in problems["download.max_bytes"][1]
    status, problems = refused(spec(**big), ApiPolicy(max_job_gb=1))
    assert status == 422 and problems["target"][0] == "max_job_gb"
    assert str(MIN_FITTED_BYTES) in problems["target"][1]
    assert apply(spec(**big, download={"max_bytes": 1_000_000})).download.max_bytes == 1_000_000


@pytest.mark.parametrize("named", ["http://LLM.internal:8000/v1/", "http://llm.internal:8000/v1"])
def test_naming_the_servers_own_llm_endpoint_asks_what_leaving_it_unset_asks(monkeypatch,
                                                                              named):
    """The expander sends the server's key to its own endpoint however a spec names it, so a
    spec naming it ran any model, and expanded, where leaving it unset may not."""
    monkeypatch.setenv("PIXCRAWLER_LLM_BASE_URL", "http://llm.internal:8000/v1")
    policy = ApiPolicy(llm_base_urls=["http://llm.internal:8000/v1"], llm_models=["small"])
    status, problems = refused(spec(search={"llm_base_url": named, "llm_model": "gpt-huge",
                                             "expand": True, "expand_n": 50}), policy)
    assert status == 403
    assert problems["search.llm_model"][0] == "llm_models"
    assert problems["search.expand"][0] == "allow_expand"
    assert apply(spec(search={"llm_base_url": named, "llm_model": "small"}), policy)
    other = ApiPolicy(llm_base_urls=["http://llm.other:8000/v1"])
    assert apply(spec(search={"llm_base_url": "http://llm.other:8000/v1", "llm_model": "x",
                              "expand": True}), other).search.expand


def test_what_the_operator_allows_passes():
    policy = ApiPolicy(source_urls=["http://127.0.0.1:9/api/"],
                       llm_base_urls=["https://llm.internal/v1"], allow_proxy=True,
                       allow_private_networks=True, models=["org/clip-small"],
                       llm_models=["gpt-4o"], allow_expand=True)
    placed = apply(spec(sources=[{"engine": "openverse",
                                  "options": {"base_url": "http://127.0.0.1:9/api/v1/images"}},
                                 {"engine": "bing", "options": {"proxy": "http://proxy:3128"}},
                                 {"engine": "sandbox", "url": "http://127.0.0.1:9/api"}],
                        search={"llm_base_url": "https://llm.internal/v1/", "expand": True},
                        download={"allow_private_networks": True},
                        validation={"clip_model": "org/clip-small"}), policy)
    assert placed.download.allow_private_networks


@pytest.mark.parametrize("url, ok", [
    ("http://127.0.0.1:9/api", True),
    ("http://127.0.0.1:9/api/images?q=1#x", True),
    ("http://127.0.0.1:9/apix", False),
    ("http://127.0.0.1:9/api/../admin", False),
    ("http://127.0.0.1:9/api/%2e%2e/admin", False),
    ("http://127.0.0.1:9/api/%252e%252e/admin", False),  # a server decoding twice
    ("http://127.0.0.1:9/api/..;/admin", False),  # ';' parameters, as Tomcat reads them
    ("http://127.0.0.1:9/api/.;x=1/admin", False),
    ("http://127.0.0.1:9/api/%25252525252e/admin", False),
    ("http://127.0.0.1:9/api/v1;a=b/images", True),
    ("http://127.0.0.1:9/api/a%2520b", True),
    ("http://127.0.0.1:10/api", False),
    ("https://127.0.0.1:9/api", False),
    ("http://127.0.0.1:9@evil.example/api", False),
    ("http://user@127.0.0.1:9/api", False),
    ("http://127.0.0.1:9\\@evil.example/api", False),
    ("http://127.0.0.1:9/api\n", False),
    ("file:///api", False),
    ("http://127.0.0.1:99999999/api", False),
])
def test_url_prefixes_compare_scheme_host_port_and_whole_path_segments(url, ok):
    assert url_within(url, ["http://127.0.0.1:9/api/"]) is ok


def test_values_over_a_cap_are_refused_naming_the_field_and_setting():
    policy = ApiPolicy(max_classes=2, max_target=50, max_images=80,
                       max_download_concurrency=8, max_per_host_concurrency=2,
                       max_bytes=2_000_000, max_pixels=10_000_000)
    status, problems = refused(spec(
        target=60, classes={"a": {"target": 70}, "b": None, "c": None},
        categories={"x": {"y": {"target": 51}}},
        download={"concurrency": 9, "per_host_concurrency": 3, "max_bytes": 2_000_001},
        validation={"max_pixels": 10_000_001}), policy)
    assert status == 422
    assert {field: setting for field, (setting, _) in problems.items()} == {
        "classes": "max_classes", "target": "max_images", "classes.a.target": "max_target",
        "categories.x.y": "max_target", "download.concurrency": "max_download_concurrency",
        "download.per_host_concurrency": "max_per_host_concurrency",
        "download.max_bytes": "max_bytes", "validation.max_pixels": "max_pixels"}
    assert "over this server's limit 8" in problems["download.concurrency"][1]


def test_a_10000_class_spec_is_over_the_default_cap():
    status, problems = refused(spec(classes=[f"c{i}" for i in range(10_000)], target=1))
    assert status == 422 and problems["classes"][0] == "max_classes"


def test_a_spec_of_more_sources_than_the_cap_is_refused():
    """Each search source is a budget from the server's addresses and, on Ray, a limiter
    actor: a spec of 1,300 sources was taken."""
    many = [{"engine": "duckduckgo"}] * 17
    status, problems = refused(spec(sources=many))
    assert status == 422 and problems["sources"][0] == "max_sources"
    assert "17 sources; this server takes at most 16" in problems["sources"][1]
    assert len(apply(spec(sources=many[:16])).sources) == 16
    assert len(apply(spec(sources=many), ApiPolicy(max_sources=17)).sources) == 17


def test_unset_values_take_a_lower_cap_instead_of_being_refused():
    policy = ApiPolicy(max_target=20, max_download_concurrency=8, max_per_host_concurrency=2,
                       max_bytes=2_000_000, max_pixels=10_000_000)
    placed = apply(parse_spec({"name": "pets", "classes": {"cat": None},
                               "sources": [{"engine": "bing"}]}), policy)
    assert placed.target == 20
    assert (placed.download.concurrency, placed.download.per_host_concurrency,
            placed.download.max_bytes, placed.validation.max_pixels) == (
        8, 2, 2_000_000, 10_000_000)


def test_the_default_caps_take_the_spec_defaults():
    placed = apply(spec())
    default = parse_spec({"name": "x", "classes": {"a": None}, "sources": [{"engine": "bing"}]})
    assert placed.download == default.download and placed.validation == default.validation


def test_pools_are_sized_to_the_jobs_share_of_the_cluster():
    """Unset pools are sized as on a cluster of the job's share (cluster / max_running_jobs);
    pools a user sets must fit in it."""
    placed = apply(spec(), ApiPolicy(max_running_jobs=4), cluster={"CPU": 16.0})
    res = placed.resources
    assert (res.workers, res.worker_cpus, res.dedup_partitions) == (4, 0.96, 1)  # 4 CPUs
    placed = apply(spec(), ApiPolicy(job_cpus=12), cluster={"CPU": 16.0})
    assert placed.resources.workers == 12
    # job_cpus over what the cluster has for jobs (less the API's replicas) is held to it
    assert ApiPolicy(job_cpus=2.0).job_share({"CPU": 1.9}) == {"CPU": 1.9}
    status, problems = refused(spec(resources={"workers": 8}), ApiPolicy(max_running_jobs=4))
    assert status == 422 and problems["resources"][0] == "max_running_jobs"
    assert "need 8.15 CPUs" in problems["resources"][1] and "gets 2 CPUs" in \
        problems["resources"][1]
    ok = apply(spec(resources={"workers": 1, "worker_cpus": 0.5}),
               ApiPolicy(max_running_jobs=4))
    assert (ok.resources.workers, ok.resources.worker_cpus) == (1, 0.5)


def test_every_problem_is_reported_at_once_403_before_422():
    status, problems = refused(spec(output={"uri": "/etc/x"}, download={"concurrency": 999}))
    assert status == 403 and set(problems) == {"output.uri", "download.concurrency"}


def test_a_model_on_the_servers_own_llm_endpoint_needs_the_operators_list():
    policy = ApiPolicy(llm_models=["gpt-4o"], allow_expand=True)
    assert apply(spec(search={"expand": True, "llm_model": "gpt-4o"}), policy)
    status, problems = refused(spec(search={"expand": True, "llm_model": "o1-pro"}), policy)
    assert status == 403 and "allowed: gpt-4o" in problems["search.llm_model"][1]
    # on an endpoint of the user's own (allowed, and never sent the server's key) the model is
    # theirs to pick
    own = ApiPolicy(llm_base_urls=["https://llm.mine/v1"])
    assert apply(spec(search={"expand": True, "llm_base_url": "https://llm.mine/v1",
                              "llm_model": "o1-pro"}), own)


def test_expansion_on_the_servers_own_llm_endpoint_needs_the_operators_permission():
    """Each class of an expanded spec is a call to the LLM endpoint: on the server's own, the
    operator pays for it (up to max_classes calls a job, any number of jobs)."""
    status, problems = refused(spec(search={"expand": True}),
                               ApiPolicy(llm_base_urls=["https://llm.mine/v1"]))
    assert status == 403 and problems["search.expand"][0] == "allow_expand"
    assert "https://llm.mine/v1" in problems["search.expand"][1]
    assert apply(spec(search={"expand": True}), ApiPolicy(allow_expand=True))
    assert apply(spec(search={"expand": True, "llm_base_url": "https://llm.mine/v1"}),
                 ApiPolicy(llm_base_urls=["https://llm.mine/v1"]))


def test_what_a_worker_buffers_before_it_writes_is_capped():
    """A worker holds up to output.shard_size rows or resources.max_buffered_mb of accepted
    images before it writes; a billion-row shard and a TiB buffer were accepted, so one API
    user could make workers hold every image in memory."""
    status, problems = refused(spec(output={"shard_size": 1_000_000_000},
                                    resources={"max_buffered_mb": 1_048_576}))
    assert status == 422 and {f: s for f, (s, _) in problems.items()} == {
        "output.shard_size": "max_shard_size", "resources.max_buffered_mb": "max_buffered_mb"}
    assert "1000000000 is over this server's limit 10000" in problems["output.shard_size"][1]
    assert "1048576 is over this server's limit 2048" in \
        problems["resources.max_buffered_mb"][1]
    placed = apply(spec(output={"shard_size": 10_000}, resources={"max_buffered_mb": 2048}))
    assert (placed.output.shard_size, placed.resources.max_buffered_mb) == (10_000, 2048)
    lowered = apply(spec(), ApiPolicy(max_shard_size=500, max_buffered_mb=256))
    assert (lowered.output.shard_size, lowered.resources.max_buffered_mb) == (500, 256)


def test_what_a_workers_running_units_hold_is_capped():
    status, problems = refused(spec(resources={"max_held_mb": 1_048_576}))
    assert status == 422 and problems["resources.max_held_mb"][0] == "max_held_mb"
    assert "1048576 is over this server's limit 2048" in problems["resources.max_held_mb"][1]
    assert apply(spec(), ApiPolicy(max_held_mb=64)).resources.max_held_mb == 64
    assert apply(spec(resources={"max_held_mb": 100})).resources.max_held_mb == 100


def test_worker_resources_only_from_the_operators_list():
    """resources.worker_resources once let an API user pin workers to a chosen node or claim
    a custom resource the operator reserved."""
    status, problems = refused(spec(resources={"worker_resources": {"node:10.0.0.1": 0.01}}))
    assert status == 403 and list(problems) == ["resources.worker_resources.node:10.0.0.1"]
    setting, message = problems["resources.worker_resources.node:10.0.0.1"]
    assert setting == "worker_resources" and "'node:10.0.0.1'" in message and \
        "allowed: none" in message
    policy = ApiPolicy(worker_resources=["crawl"])
    status, problems = refused(spec(resources={"worker_resources": {"crawl": 1, "gpu_box": 1}}),
                               policy)
    assert status == 403 and list(problems) == ["resources.worker_resources.gpu_box"]
    assert "allowed: crawl" in problems["resources.worker_resources.gpu_box"][1]
    placed = apply(spec(resources={"worker_resources": {"crawl": 1}}), policy)
    assert placed.resources.worker_resources == {"crawl": 1}


@pytest.mark.parametrize("download, field, setting, cap", [
    ({"per_host_delay_s": 3600}, "download.per_host_delay_s", "max_per_host_delay_s", 10.0),
    ({"hosts": {"*.com": {"delay_s": 3600}}}, "download.hosts.*.com.delay_s",
     "max_per_host_delay_s", 10.0),
    ({"max_retry_after_s": 3600}, "download.max_retry_after_s", "max_retry_after_s", 60.0),
    ({"timeout_s": 600}, "download.timeout_s", "max_timeout_s", 60.0),
    ({"deadline_s": 3600}, "download.deadline_s", "max_deadline_s", 300.0),
    ({"retries": 10}, "download.retries", "max_retries", 5),
    ({"backoff_s": 60}, "download.backoff_s", "max_backoff_s", 10.0),
])
def test_fetch_delays_timeouts_and_retries_are_capped(download, field, setting, cap):
    """Each was accepted at the spec's own bound (an hour between requests to a host, ten
    minutes per request, ten retries), so one job could hold its place in the cluster for
    days doing nothing."""
    status, problems = refused(spec(download=download))
    assert status == 422 and list(problems) == [field]
    assert problems[field][0] == setting
    assert f"is over this server's limit {cap} ({setting})" in problems[field][1]


def test_fetch_times_at_the_caps_pass_and_unset_ones_take_a_lower_cap():
    placed = apply(spec(download={"per_host_delay_s": 10, "max_retry_after_s": 60,
                                  "timeout_s": 60, "retries": 5, "backoff_s": 10,
                                  "hosts": {"*.com": {"delay_s": 10}}}))
    assert placed.download.hosts["*.com"].delay_s == 10
    policy = ApiPolicy(max_timeout_s=5, max_retries=1, max_backoff_s=0.25,
                       max_retry_after_s=10)
    lowered = apply(spec(), policy).download
    assert (lowered.timeout_s, lowered.retries, lowered.backoff_s,
            lowered.max_retry_after_s) == (5, 1, 0.25, 10)


def test_the_new_caps_take_the_defaults_the_examples_and_the_built_in_profiles():
    from builder.profiles import BUILTIN_PROFILES
    from serve.app import EXAMPLE_SPEC
    from serve.cli import demo_example

    policy = ApiPolicy()
    default = parse_spec({"name": "x", "classes": {"a": None}, "sources": [{"engine": "bing"}]})
    assert default.download.timeout_s <= policy.max_timeout_s
    assert default.download.deadline_s <= policy.max_deadline_s
    assert default.download.retries <= policy.max_retries
    assert default.download.backoff_s <= policy.max_backoff_s
    assert default.download.max_retry_after_s <= policy.max_retry_after_s
    assert default.download.per_host_delay_s <= policy.max_per_host_delay_s
    assert default.output.shard_size <= policy.max_shard_size
    assert default.resources.max_buffered_mb <= policy.max_buffered_mb
    assert default.resources.max_held_mb <= policy.max_held_mb
    assert all((p.delay_s or 0) <= policy.max_per_host_delay_s
               for p in BUILTIN_PROFILES.values())
    example = parse_spec(EXAMPLE_SPEC)
    assert apply(example).download == example.download
    base_url = "http://127.0.0.1:8765"
    demo = parse_spec(demo_example(base_url, 20))
    placed = apply(demo, ApiPolicy(source_urls=[base_url], private_network_sources=[base_url]))
    assert placed.download == demo.download and placed.output.shard_size == 50


DEMO_WEB = "http://127.0.0.1:8765"


@pytest.mark.parametrize("change", [
    {"classes": {"cat": {"urls": ["http://127.0.0.1:6379/x.jpg"]}}},
    {"sources": [{"engine": "urllist", "path": "/srv/lists/urls.txt"}]},
    {"sources": [{"engine": "duckduckgo"}]},
    {"sources": [{"engine": "sandbox", "url": DEMO_WEB},
                 {"engine": "sandbox", "url": "http://127.0.0.1:8265"}]},
    {"sources": [{"engine": "wikimedia", "options": {"base_url": "http://127.0.0.1:8265"}}]},
], ids=["class-urls", "url-list", "web-search", "another-sandbox", "another-search-server"])
def test_private_addresses_only_for_what_the_allowed_sources_find(change):
    """--demo's policy: a spec may fetch from private addresses only what the sandbox web
    finds, never URLs the user names (a class's urls, a list, another source). A source
    counts by the server its engine asks (a url or base_url its engine ignores is refused
    with the spec: tests/builder/test_spec.py)."""
    from serve.cli import demo_example

    policy = ApiPolicy(source_urls=[DEMO_WEB, "http://127.0.0.1:8265"],
                       url_list_dirs=["/srv/lists"], private_network_sources=[DEMO_WEB])
    demo = demo_example(DEMO_WEB, 5)
    assert apply(parse_spec(demo), policy).download.allow_private_networks
    status, fields = refused(parse_spec({**demo, **change}), policy)
    setting, message = fields["download.allow_private_networks"]
    assert status == 403 and setting == "private_network_sources" and DEMO_WEB in message


@pytest.mark.parametrize("section, name, value, setting, cap", [
    ("resources", "batch_size", 65_536, "max_batch_size", 256),
    ("resources", "max_in_flight_batches", 100_000, "max_in_flight_batches", 8),
    ("download", "max_bytes_in_flight", 10**12, "max_bytes_in_flight", 256_000_000),
    ("resources", "gpu_batch_size", 65_536, "max_gpu_batch_size", 128),
])
def test_what_a_worker_holds_while_it_works_is_capped(section, name, value, setting, cap):
    """A unit holds its validated images until it is decided, so batch_size x max_bytes is one
    unit's memory, times the units in flight; a byte budget of 10**12 turns the fetcher's off.
    Each was accepted up to the spec's own bound, so one API user could exhaust a node."""
    field = f"{section}.{name}"
    status, problems = refused(spec(**{section: {name: value}}))
    assert status == 422 and list(problems) == [field]
    assert problems[field][0] == setting
    assert f"{value} is over this server's limit {cap} ({setting})" in problems[field][1]
    placed = apply(spec(**{section: {name: cap}}))
    assert getattr(getattr(placed, section), name) == cap


def test_unset_unit_sizes_take_a_lower_cap():
    policy = ApiPolicy(max_batch_size=32, max_in_flight_batches=2,
                       max_bytes_in_flight=1_000_000, max_gpu_batch_size=16)
    res = apply(spec(), policy).resources
    assert (res.batch_size, res.max_in_flight_batches, res.gpu_batch_size) == (32, 2, 16)
    assert apply(spec(), policy).download.max_bytes_in_flight == 1_000_000
    # a job sized at 125 whose URL-list slices would grow to 256: pinned at 125, growth off
    sized = apply(spec(target=4000), ApiPolicy(max_batch_size=128))
    assert sized.resources.batch_size == 125 and sized.list_growth() == (0, 0)
    # under the default caps a job sizes itself as before
    placed = apply(spec(target=4000))
    assert (placed.resources.batch_size, placed.resources.max_in_flight_batches) == (None, None)
    assert placed.list_growth() == (16000, 256)


@pytest.mark.parametrize("download, field", [
    ({"respect_robots": False}, "download.respect_robots"),
    ({"respect_optouts": False}, "download.respect_optouts"),
    ({"signals": {"tdmrep": False}}, "download.signals.tdmrep"),
    ({"signals": {"content_usage": False}}, "download.signals.content_usage"),
    ({"signals": {"content_signal": False}}, "download.signals.content_signal"),
    ({"signals": {"xmp_datamining": False}}, "download.signals.xmp_datamining"),
    ({"signals": {"ai_txt": False}}, "download.signals.ai_txt"),
    ({"signals": {"usage": "train-ai"}}, "download.signals.usage"),
])
def test_turning_off_robots_or_an_opt_out_needs_the_operators_permission(download, field):
    """Any key holder could have the operator's addresses ignore robots.txt and AI opt-outs."""
    status, problems = refused(spec(download=download))
    assert status == 403 and list(problems) == [field]
    assert problems[field][0] == "allow_ignore_optouts"
    placed = apply(spec(download=download), ApiPolicy(allow_ignore_optouts=True))
    assert placed.download == spec(download=download).download


def test_honouring_more_needs_no_permission():
    placed = apply(spec(download={"respect_robots": True, "signals": {"page_meta": True}}))
    assert placed.download.respect_robots and placed.download.signals.page_meta


GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"


def test_a_user_agent_other_than_the_default_needs_the_operators_list():
    """Any key holder could have the operator's addresses claim to be Googlebot."""
    status, problems = refused(spec(download={"user_agent": GOOGLEBOT}))
    assert status == 403 and list(problems) == ["download.user_agent"]
    setting, message = problems["download.user_agent"]
    assert setting == "user_agents" and "Googlebot" in message and "contact" in message
    ours = "AcmeCrawler/1.0 (+https://acme.example/bot)"
    policy = ApiPolicy(user_agents=[ours])
    assert apply(spec(download={"user_agent": ours}), policy).download.user_agent == ours
    status, problems = refused(spec(download={"user_agent": GOOGLEBOT}), policy)
    assert status == 403 and "AcmeCrawler" in problems["download.user_agent"][1]
    named = apply(spec(download={"user_agent": DownloadSpec().user_agent,
                                  "contact": "ops@example.org"}))
    assert named.download.contact == "ops@example.org"


def test_pools_split_thinner_than_min_actor_cpus_are_refused():
    """The caps on what a worker holds count once per worker: 3,000 workers of 0.001 CPUs fit
    in a 4-CPU share, each with its own fetcher, byte budget and buffers."""
    for resources in ({"workers": 3000, "worker_cpus": 0.001}, {"worker_cpus": 0.1}):
        status, problems = refused(spec(resources=resources))
        assert status == 422 and list(problems) == ["resources.worker_cpus"], resources
        assert problems["resources.worker_cpus"][0] == "min_actor_cpus"
        assert "least 0.25 CPUs per actor" in problems["resources.worker_cpus"][1]
    scorers = {"gpu_actors": 50, "gpu_actor_cpus": 0.01}
    status, problems = refused(spec(validation={"level": "slow"}, resources=scorers))
    assert status == 422 and list(problems) == ["resources.gpu_actor_cpus"]
    assert apply(spec(resources=scorers))  # no scorers run at the medium level
    placed = apply(spec(resources={"workers": 2, "worker_cpus": 0.25}))
    assert (placed.resources.workers, placed.resources.worker_cpus) == (2, 0.25)
    thin = apply(spec(resources={"workers": 3000, "worker_cpus": 0.001}),
                 ApiPolicy(min_actor_cpus=0.001))
    assert thin.resources.workers == 3000


def test_search_pages_and_candidates_are_capped_but_a_url_lists_pages_are_not(tmp_path):
    """Nothing bounded either: a spec could ask an engine for any number of pages (requests
    from the server's addresses, drawn from the budget every job shares) and for up to 100
    candidates, each a download, per image still missing."""
    policy = ApiPolicy(max_pages=10, max_candidates_factor=3.0,
                       url_list_dirs=[str(tmp_path)])
    status, problems = refused(spec(
        sources=[{"engine": "duckduckgo", "max_pages": 11}, {"engine": "bing"},
                 {"engine": "bing", "max_pages": 10}],
        search={"candidates_factor": 3.5}), policy)
    assert status == 422
    assert {field: setting for field, (setting, _) in problems.items()} == {
        "sources.0.max_pages": "max_pages", "search.candidates_factor": "max_candidates_factor"}
    assert "over this server's limit 10" in problems["sources.0.max_pages"][1]
    urls = tmp_path / "urls.txt"
    urls.write_text("http://example.com/a.jpg\n")
    placed = apply(parse_spec({"name": "pets", "classes": {"cat": None}, "sources": [
        {"engine": "bing"}, {"engine": "urllist", "path": str(urls), "max_pages": 400}]}),
        ApiPolicy(max_pages=5, max_candidates_factor=1.5, url_list_dirs=[str(tmp_path)]))
    assert [s.max_pages for s in placed.sources] == [5, 400]  # unset: held to the cap
    assert placed.search.candidates_factor == 1.5
    default = apply(spec(sources=[{"engine": "bing"}]))
    assert default.sources[0].max_pages == 20 and default.search.candidates_factor == 2.0


@pytest.mark.parametrize("proxy, ok", [
    ("http://proxy.example.com:3128", True),
    ("socks5://203.0.113.7:1080", False),  # documentation range: not globally routable
    ("http://8.8.8.8:3128", True),
    ("socks5://10.0.0.1:1080", False),
    ("http://127.0.0.1:6379", False),
    ("http://[::1]:3128", False),
    ("http://169.254.169.254", False),
    ("http://localhost:3128", False),
    ("http://redis.localhost:6379", False),
    ("http://2130706433:80", False),
    ("http://%31%32%37.0.0.1:6379", False),  # the proxy client decodes it: 127.0.0.1
    ("http://127%2E0%2E0%2E1:6379", False),
    ("socks5h://user:pass@proxy.example.com:1080", True),
    ("http://[2606:4700::1111]:3128", True),
    ("http://xn--bcher-kva.de:8080", True),
    ("http://b\u00fccher.de:8080", True),
    ("not a proxy", False),
])
def test_an_allowed_proxy_may_not_name_a_private_address(proxy, ok):
    """``options.proxy`` goes to the engines' HTTP client, outside the fetcher's address
    checks: with proxies allowed, a spec named 127.0.0.1:6379 and the server connected to
    it."""
    s = spec(sources=[{"engine": "duckduckgo", "options": {"proxy": proxy}}])
    if ok:
        assert apply(s, ApiPolicy(allow_proxy=True)).sources[0].options["proxy"] == proxy
        return
    status, problems = refused(s, ApiPolicy(allow_proxy=True))
    assert status == 403
    assert problems["sources.0.options.proxy"][0] == "allow_private_networks"
    assert apply(s, ApiPolicy(allow_proxy=True, allow_private_networks=True)).sources
