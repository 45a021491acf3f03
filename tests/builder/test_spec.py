import json
import time

import pytest

from builder.errors import SpecError
from builder.profiles import has_contact
from builder.spec import load_spec, loads_spec, parse_spec

MINIMAL = {"name": "pets",
           "classes": {"cat": "cat photo", "dog": {"queries": ["dog"], "target": 5}},
           "sources": [{"engine": "sandbox", "url": "http://127.0.0.1:1"}]}


def test_minimal_spec_defaults():
    spec = parse_spec(MINIMAL)
    assert spec.labels == ["cat", "dog"]
    assert spec.queries_of("cat") == ["cat photo"]
    assert spec.target_of("cat") == 100 and spec.target_of("dog") == 5
    assert spec.output_uri() == "./datasets/pets"
    assert spec.download.allow_private_networks is False
    assert spec.validation.level == "medium"
    assert "PixCrawler" in spec.download.user_agent


def test_class_without_queries_searches_by_name():
    spec = parse_spec({**MINIMAL, "classes": {"red_fox": None}})
    assert spec.queries_of("red_fox") == ["red fox"]


def test_bad_level_names_field_value_and_allowed():
    with pytest.raises(SpecError) as e:
        parse_spec({**MINIMAL, "validation": {"level": "fastest"}})
    msg = str(e.value)
    assert "validation.level" in msg and "'fastest'" in msg
    assert "'fast'" in msg and "'medium'" in msg and "'slow'" in msg


def test_bad_resample_names_field_value_and_filters():
    assert parse_spec({**MINIMAL, "output": {"resize": {"max_side": 256}}}
                      ).output.resize.resample == "lanczos"
    with pytest.raises(SpecError) as e:
        parse_spec({**MINIMAL, "output": {"resize": {"max_side": 256, "resample": "area"}}})
    msg = str(e.value)
    assert "output.resize.resample" in msg and "'area'" in msg
    assert all(f"'{f}'" in msg for f in ("lanczos", "bicubic", "bilinear", "box"))


def test_bad_engine_lists_engines():
    with pytest.raises(SpecError) as e:
        parse_spec({**MINIMAL, "sources": [{"engine": "altavista"}]})
    msg = str(e.value)
    assert "sources.0.engine" in msg and "altavista" in msg and "duckduckgo" in msg


def test_unknown_field_lists_valid_fields():
    with pytest.raises(SpecError) as e:
        parse_spec({**MINIMAL, "download": {"timeout": 3}})
    msg = str(e.value)
    assert "download.timeout" in msg and "unknown field" in msg and "timeout_s" in msg


def test_several_problems_reported_together():
    with pytest.raises(SpecError) as e:
        parse_spec({**MINIMAL, "target": 0, "output": {"splits": {"train": 0.5}}})
    paths = [p for p, _ in e.value.problems]
    assert "target" in paths and "output.splits" in paths


def test_urllist_needs_path_and_min_max_sides():
    with pytest.raises(SpecError, match="needs 'path'"):
        parse_spec({**MINIMAL, "sources": [{"engine": "urllist"}]})
    with pytest.raises(SpecError, match="min_side"):
        parse_spec({**MINIMAL, "validation": {"min_side": 500, "max_side": 100}})


@pytest.mark.parametrize("source, field, why", [
    ({"engine": "duckduckgo", "url": "http://127.0.0.1:8765"}, "url",
     "it always asks its own service"),
    ({"engine": "bing", "options": {"base_url": "http://127.0.0.1:8765"}}, "options.base_url",
     "it always asks its own service"),
    ({"engine": "wikimedia", "url": "http://127.0.0.1:8765"}, "url",
     "it takes its server from 'options.base_url'"),
    ({"engine": "sandbox", "url": "http://127.0.0.1:8765", "path": "urls.txt"}, "path",
     "it takes its server from 'url'"),
    ({"engine": "urllist", "path": "urls.txt", "url": "http://127.0.0.1:8765"}, "url",
     "it reads the file named by 'path'"),
    ({"engine": "openverse", "options": {"proxy": "socks5://10.0.0.1:1080"}}, "options.proxy",
     "it searches through no proxy"),
])
def test_a_source_field_its_engine_ignores_is_refused(source, field, why):
    """A url, path or base_url that the engine never reads would look like it chose the server
    (and counted as one for the API policy and the request budgets) while it did nothing."""
    with pytest.raises(SpecError) as e:
        parse_spec({**MINIMAL, "sources": [source]})
    assert [path for path, _ in e.value.problems] == [f"sources.0.{field}"]
    message = e.value.problems[0][1]
    assert f"does not use {field!r} ({why})" in message and "remove it" in message


@pytest.mark.parametrize("key", ["base_url", "proxy"])
def test_a_server_option_is_a_url(key):
    engine = "wikimedia" if key == "base_url" else "bing"
    with pytest.raises(SpecError) as e:
        parse_spec({**MINIMAL, "sources": [{"engine": engine, "options": {key: 5}}]})
    assert e.value.problems == [(f"sources.0.options.{key}", "must be a URL (a string), not 5")]
    assert parse_spec({**MINIMAL, "sources": [{"engine": engine, "options": {key: ""}}]})


@pytest.mark.parametrize("source, field", [
    ({"engine": "wikimedia", "options": {"base_url": "commons-api"}}, "options.base_url"),
    ({"engine": "openverse", "options": {"base_url": "file:///etc/passwd#"}}, "options.base_url"),
    ({"engine": "google", "options": {"base_url": "https://:443/customsearch"}},
     "options.base_url"),
    ({"engine": "sandbox", "url": "http://"}, "url"),
    ({"engine": "sandbox", "url": "127.0.0.1:8080"}, "url"),
])
def test_the_server_a_source_asks_is_an_http_url_with_a_host(source, field):
    """A base_url without a host (a typo, a missing scheme) failed every search only once the
    job ran, and on Ray counted against the public service's budget: its errors opened the
    breaker of every job there."""
    with pytest.raises(SpecError) as e:
        parse_spec({**MINIMAL, "sources": [source]})
    [(path, message)] = e.value.problems
    assert path == f"sources.0.{field}"
    assert message.startswith("must be an http:// or https:// URL with a host name, not ")
    ok = {**source, **({"url": "http://127.0.0.1:8080"} if field == "url" else
                       {"options": {"base_url": "HTTPS://api.example.org:8443/v1/"}})}
    assert parse_spec({**MINIMAL, "sources": [ok]}).sources[0].endpoint()


@pytest.mark.parametrize("key, value, what", [
    ("max_requests_per_job", "1000", "a whole number, 0 or more, or null"),
    ("max_requests_per_day", -1, "a whole number, 0 or more, or null"),
    ("rate", 0, "a number of requests a second above 0"),
    ("burst", "2", "a number of requests, 1 or more"),
    ("burst", 0.5, "a number of requests, 1 or more"),
    ("failure_threshold", 2.5, "a whole number, 1 or more"),
    ("cooldown_s", True, "a number of seconds, 0 or more")])
def test_a_rate_limit_option_is_a_number_in_range(key, value, what):
    """Options are free-form, and a string or a negative number here reached the limiter
    (a TypeError when the job compared it) or the API server's policy (a 500)."""
    with pytest.raises(SpecError) as e:
        parse_spec({**MINIMAL, "sources": [{"engine": "bing", "options": {key: value}}]})
    assert e.value.problems == [(f"sources.0.options.{key}", f"must be {what}, not {value!r}")]
    good = {"rate": 0.5, "burst": 2, "min_rate": None, "cooldown_s": 0, "failure_threshold": 3,
            "max_requests_per_job": 0, "max_requests_per_day": None}
    assert parse_spec({**MINIMAL, "sources": [{"engine": "bing", "options": good}]})
    saved = {"failure_threshold": 3.0, "max_requests_per_job": 10.0}  # a saved spec's floats
    assert parse_spec({**MINIMAL, "sources": [{"engine": "bing", "options": saved}]})


def test_a_min_rate_above_the_rate_names_the_field():
    """The limiter refuses a floor above its rate: the job stopped when it made it."""
    with pytest.raises(SpecError) as e:
        parse_spec({**MINIMAL, "sources": [{"engine": "bing", "options": {"min_rate": 5}}]})
    assert e.value.problems == [("sources.0.options.min_rate",
                                 "must be at most the rate, 0.5 requests a second here, not 5")]
    assert parse_spec({**MINIMAL, "sources": [{"engine": "bing",
                                               "options": {"rate": 8, "min_rate": 5}}]})


def test_a_saved_spec_is_read_as_this_version_reads_it():
    """What an earlier version accepted and saved (in a dataset's spec.yaml, a journal) and
    this one refuses or spells otherwise still loads, so the dataset can be continued."""
    from builder.spec import upgrade_saved_spec

    data = {**MINIMAL, "sources": [
        {"engine": "bing", "url": "http://a", "options": {"base_url": "http://b", "x": 1}},
        {"engine": "sandbox", "url": "http://c", "options": {"proxy": "http://d"}}],
        "download": {"hosts": {"Img.Example.ORG.": {"concurrency": 2}},
                     "contact": "ops@example.org; https://example.org/bot"}}
    upgraded, changes = upgrade_saved_spec(data)
    assert [c.split(" ")[0] for c in changes] == [
        "sources.0.url", "sources.0.options.base_url", "sources.1.options.proxy",
        "download.hosts.Img.Example.ORG.", "download.contact"]
    assert upgraded["sources"] == [{"engine": "bing", "url": None, "options": {"x": 1}},
                                   {"engine": "sandbox", "url": "http://c", "options": {}}]
    assert upgraded["download"] == {"hosts": {"img.example.org": {"concurrency": 2}},
                                    "contact": "ops@example.org"}
    assert data["sources"][0]["url"] == "http://a"  # the caller's copy is left as it was
    spec = parse_spec(data, stored=True)
    assert spec.sources[0].options == {"x": 1} and spec.download.contact == "ops@example.org"
    with pytest.raises(SpecError, match="sources.0.url"):
        parse_spec(data)
    assert upgrade_saved_spec(MINIMAL) == (MINIMAL, [])
    for hosts in ({"A.org.": {}, "a.org": {"concurrency": 3}},
                  {"a.org": {"concurrency": 3}, "A.org": {}}):
        upgraded, changes = upgrade_saved_spec({**MINIMAL, "download": {"hosts": hosts}})
        assert upgraded["download"]["hosts"] == {"a.org": {"concurrency": 3}}, hosts
        assert any("dropped (a.org is given)" in c for c in changes), changes
    upgraded, changes = upgrade_saved_spec({**MINIMAL, "download": {"hosts": {
        "A.org": {"concurrency": 1}, "a.org.": {"concurrency": 2}}}})
    assert upgraded["download"]["hosts"] == {"a.org": {"concurrency": 2}}  # the last given
    assert "download.hosts.A.org dropped (a.org. is given)" in changes
    assert upgrade_saved_spec({**MINIMAL, "download": {"contact": "no contact here"}}
                              )[0]["download"]["contact"] is None


def test_a_source_names_its_server_only_where_its_engine_asks_it():
    spec = parse_spec({**MINIMAL, "sources": [
        {"engine": "sandbox", "url": "http://127.0.0.1:1"},
        {"engine": "openverse", "options": {"base_url": "http://127.0.0.1:2/v1"}},
        {"engine": "openverse"}, {"engine": "bing"}]})
    assert [s.endpoint() for s in spec.sources] == [
        "http://127.0.0.1:1", "http://127.0.0.1:2/v1", None, None]


def test_host_names_are_compared_in_lower_case_and_given_once():
    spec = parse_spec({**MINIMAL, "download": {"hosts": {"Img.Example.ORG.": {"concurrency": 2},
                                                         "*.CDN.example": {"delay_s": 1}}}})
    assert list(spec.download.hosts) == ["img.example.org", "*.cdn.example"]
    with pytest.raises(SpecError, match="names the host 'a.org' again"):
        parse_spec({**MINIMAL, "download": {"hosts": {"a.org": {}, "A.org": {}}}})


@pytest.mark.parametrize("contact, ok", [
    ("ops@example.org", True), ("https://example.org/crawler", True),
    ("Googlebot/2.1; +http://www.google.com/bot.html", False),
    ("https://example.org/;Googlebot/2.1", False), ("a@b.org, c@d.org", False),
    ("see https://example.org", False),
])
def test_a_contact_is_one_email_or_one_url(contact, ok):
    """The contact goes inside the User-Agent's comment: more words there were more product
    tokens, and a spec could make the API's crawler claim to be Googlebot."""
    data = {**MINIMAL, "download": {"contact": contact}}
    if ok:
        assert parse_spec(data).download.contact == contact
    else:
        with pytest.raises(SpecError, match="download.contact"):
            parse_spec(data)


def test_no_sources_is_an_error():
    with pytest.raises(SpecError, match="sources"):
        parse_spec({"name": "x", "classes": {"a": None}})


def test_load_yaml_and_json(tmp_path):
    y = tmp_path / "s.yaml"
    y.write_text("name: pets\nclasses:\n  cat: [cat, kitten]\nsources:\n"
                 "  - {engine: sandbox, url: 'http://127.0.0.1:1'}\n")
    assert load_spec(y).queries_of("cat") == ["cat", "kitten"]
    j = tmp_path / "s.json"
    j.write_text(json.dumps(MINIMAL))
    assert load_spec(j).name == "pets"
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "missing.yaml")
    with pytest.raises(SpecError, match="not valid YAML"):
        loads_spec("name: [unclosed")
    with pytest.raises(SpecError, match="mapping"):
        loads_spec("- a\n- b\n")


def test_bad_name_and_label():
    with pytest.raises(SpecError, match="name"):
        parse_spec({**MINIMAL, "name": "has space"})
    with pytest.raises(SpecError, match="bad class label"):
        parse_spec({**MINIMAL, "classes": {"../etc": None}})


def problems(data) -> dict[str, str]:
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    return dict(e.value.problems)


@pytest.mark.parametrize("section,field", [
    ("download", "timeout_s"), ("download", "per_host_delay_s"), ("download", "backoff_s"),
    ("download", "max_retry_after_s"), ("search", "candidates_factor"),
    ("validation", "max_aspect_ratio"), ("resources", "worker_cpus"),
    ("resources", "gpus_per_actor"),
])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_floats_are_rejected_naming_the_field(section, field, value):
    found = problems({**MINIMAL, section: {field: value}})
    assert list(found) == [f"{section}.{field}"]
    assert "finite" in found[f"{section}.{field}"]


def test_infinite_timeout_from_yaml_is_a_spec_error():
    with pytest.raises(SpecError, match=r"download\.timeout_s: .*finite"):
        loads_spec("name: d\nclasses: [cat]\ndownload: {timeout_s: .inf}\n"
                   "sources: [{engine: sandbox, url: 'http://127.0.0.1:1'}]\n")


@pytest.mark.parametrize("field,too_big", [("timeout_s", 601), ("per_host_delay_s", 3601),
                                           ("backoff_s", 61), ("max_retry_after_s", 3601)])
def test_download_timeouts_and_delays_have_upper_bounds(field, too_big):
    found = problems({**MINIMAL, "download": {field: too_big}})
    assert "less than or equal" in found[f"download.{field}"]
    ok = parse_spec({**MINIMAL, "download": {field: too_big - 1}})
    assert getattr(ok.download, field) == too_big - 1


def test_nan_split_fraction_is_rejected():
    found = problems({**MINIMAL, "output": {"splits": {"train": float("nan")}}})
    assert "finite" in found["output.splits.train"]
    found = problems({**MINIMAL, "output": {"splits": {"train": 1.0, "val": float("nan")}}})
    assert list(found) == ["output.splits.val"]


@pytest.mark.parametrize("name", [".", "..", "a/b", "a\\b", ""])
def test_split_names_the_writer_would_refuse_are_spec_errors(name):
    found = problems({**MINIMAL, "output": {"splits": {name: 1.0}}})
    assert f"output.splits.{name}" in found
    assert f"bad split name {name!r}" in found[f"output.splits.{name}"]


@pytest.mark.parametrize("name", ["a\nb", "a\tb", "a\0b", "x\x1b[31m", "a\u2028b"])
def test_control_characters_in_split_names_and_labels_are_rejected(name):
    found = problems({**MINIMAL, "output": {"splits": {name: 1.0}}})
    assert [p for p in found if p.startswith("output.splits.")]
    assert all("\n" not in p for p in found)
    for classes in ([name, "dog"], {name: "q", "dog": None}):
        found = problems({**MINIMAL, "classes": classes})
        path = f"classes.{name!r}"
        assert list(found) == [path]
        assert "control characters" in found[path] and repr(name) in found[path]


def test_ordinary_unicode_labels_stay_valid():
    spec = parse_spec({**MINIMAL, "classes": ["chat noir", "猫", "café_au_lait", "emoji 🐱"],
                       "output": {"splits": {"train": 0.5, "välid": 0.5}}})
    assert spec.labels == ["chat noir", "猫", "café_au_lait", "emoji 🐱"]


@pytest.mark.parametrize("name, rule", [
    (" ", "only whitespace"),
    ("\u3000", "only whitespace"),
    (" cat", "start or end with whitespace"),
    ("cat ", "start or end with whitespace"),
    ("cat\u00a0", "start or end with whitespace"),
    ("cat.", "end in '.'"),
    ("...", "end in '.'"),
    ("é" * 128, "at most 255 bytes in UTF-8 (this one is 256)"),
    ("猫" * 86, "at most 255 bytes in UTF-8 (this one is 258)"),
    ("CON", "device name Windows reserves"),
    ("nul.txt", "device name Windows reserves"),
    ("Com1", "device name Windows reserves"),
    ("lpt\u00b9", "device name Windows reserves"),
    ("aux .jpg", "device name Windows reserves"),
    ("cat\u202egnp.exe", "bidirectional control characters"),
    ("\u2066cat", "bidirectional control characters"),
    ("cat\u200f", "bidirectional control characters"),
])
def test_names_that_break_filesystems_or_display_are_refused_naming_the_rule(name, rule):
    """Class labels (each part), category names and split names all become folder names."""
    bidi = rule.startswith("bidirectional")  # such names are shown escaped in field paths
    shown = repr(name) if bidi else name
    for classes, path in (({name: "q", "dog": None}, f"classes.{shown}"),
                          ({f"animals/{name}": None, "dog": None},
                           f"classes.{repr('animals/' + name) if bidi else 'animals/' + name}")):
        found = problems({**MINIMAL, "classes": classes})
        assert list(found) == [path], found
        assert rule in found[path]
    found = problems({**MINIMAL, "categories": {"animals": {name: None}}})
    assert list(found) == [f"categories.animals.{shown}"] and rule in \
        found[f"categories.animals.{shown}"]
    found = problems({**MINIMAL, "output": {"splits": {name: 1.0}}})
    assert list(found) == [f"output.splits.{shown}"] and rule in \
        found[f"output.splits.{shown}"]


@pytest.mark.parametrize("name", ["é" * 127 + "e", "猫" * 85, "console", "CONNECT", "com10",
                                  "con_", "a.b", ".hidden", "cat\u200ddog", "😺" * 63])
def test_names_near_the_rules_stay_valid(name):
    spec = parse_spec({**MINIMAL, "classes": {name: "q"},
                       "output": {"splits": {name: 1.0}}})
    assert spec.labels == [name]


def test_a_whole_label_is_at_most_1024_bytes():
    parts = ["x" * 200] * 5  # 1004 bytes: fits, in a nested ImageFolder tree
    nested = {"output": {"imagefolder_labels": "nested"}}
    assert parse_spec({**MINIMAL, **nested, "classes": {"/".join(parts): None}}).labels
    flat = problems({**MINIMAL, "classes": {"/".join(parts): None}})
    assert "flat ImageFolder folder name of 1008 bytes (at most 255)" in "".join(flat.values())
    long = "/".join(parts + ["abcdefghijklmnopqrst"])  # 1025 bytes
    found = problems({**MINIMAL, "classes": {long: None}})
    assert list(found) == [f"classes.{long}"] and "at most 1024 bytes" in found[f"classes.{long}"]
    tree: dict = {"leaf": None}
    for part in reversed(parts + ["abcdefghijklmnopqrs"]):
        tree = {part: tree}
    found = problems({**MINIMAL, "categories": tree})
    (path, message), = found.items()
    assert path.startswith("categories.") and "at most 1024 bytes" in message


@pytest.mark.parametrize("item", [{"cat": ["a"]}, 1, None, True, ["cat"]])
def test_list_form_classes_must_be_strings(item):
    found = problems({**MINIMAL, "classes": ["dog", item]})
    assert list(found) == ["classes.1"]
    assert "name string" in found["classes.1"] and "mapping form" in found["classes.1"]
    assert repr(item) in found["classes.1"]


def test_list_form_classes_report_every_bad_item():
    found = problems({**MINIMAL, "classes": [1, 2]})
    assert list(found) == ["classes.0", "classes.1"]


def test_non_finite_numbers_in_source_options_are_refused():
    """options are free-form; inf would become null in the spec's JSON round trip."""
    data = {"name": "x", "classes": {"a": None},
            "sources": [{"engine": "wikimedia", "options": {"timeout_s": float("inf"),
                                                            "nested": {"k": [1.0, float("nan")]},
                                                            "ok": 3.5}}]}
    with pytest.raises(SpecError, match=r"sources\.0\.options.*nested: numbers must be finite; "
                                        r"timeout_s: numbers must be finite"):
        parse_spec(data, "t")
    looped: dict = {}
    looped["self"] = looped
    data["sources"][0]["options"] = {"loop": looped}
    with pytest.raises(SpecError, match=r"options loop: Circular reference"):
        parse_spec(data, "t")


@pytest.mark.parametrize("targets, expected", [
    ({"cat": 20}, 64),                       # a small job keeps small batches
    ({"bench": 4000}, 125),                  # about 1/32 of the total target
    ({"a": 3000, "b": 2000, "c": 1000}, 187),
    ({"bench": 40000}, 256),                 # capped
])
def test_the_default_batch_size_follows_the_jobs_total_target(targets, expected):
    spec = parse_spec({**MINIMAL, "classes": {k: {"target": v} for k, v in targets.items()}})
    assert spec.resources.batch_size is None
    assert spec.batch_size() == expected


def test_a_batch_size_in_the_spec_wins():
    spec = parse_spec({**MINIMAL, "target": 40000, "resources": {"batch_size": 16}})
    assert spec.batch_size() == 16


@pytest.mark.parametrize("targets, expected", [
    ({"cat": 20}, (8192, 256)),               # 4 x 64, capped; never before 32 x 256 rows
    ({"bench": 4000}, (16000, 256)),          # 125 -> 256 past 4 x the target
    ({"a": 3000, "b": 2000, "c": 1000}, (24000, 256)),
    ({"bench": 40000}, (0, 0)),               # already 256: no growth
])
def test_url_list_slices_grow_past_four_times_the_target(targets, expected):
    spec = parse_spec({**MINIMAL, "classes": {k: {"target": v} for k, v in targets.items()}})
    assert spec.list_growth() == expected


def test_a_batch_size_in_the_spec_keeps_list_slices_from_growing():
    spec = parse_spec({**MINIMAL, "target": 4000, "resources": {"batch_size": 64}})
    assert spec.list_growth() == (0, 0)


def test_the_validation_split_has_one_name():
    """Hugging Face names the split 'validation' however it is found; the spec does too."""
    assert list(parse_spec(MINIMAL).output.splits) == ["train", "validation", "test"]
    spec = parse_spec({**MINIMAL, "output": {"splits": {"train": 0.9, "val": 0.1}}})
    assert spec.output.splits == {"train": 0.9, "validation": 0.1}
    found = problems({**MINIMAL, "output": {"splits": {"val": 0.5, "validation": 0.5}}})
    assert "keep 'validation'" in "".join(found.values())


BASE = {"name": "x", "classes": {"cat": None},
        "sources": [{"engine": "sandbox", "url": "http://127.0.0.1:9"}]}


@pytest.mark.parametrize("extra,field", [
    ({"download": {"contact": "a" * 20_000}}, "download.contact"),
    ({"resources": {"workers": 10 ** 309}}, "resources.workers"),
    ({"resources": {"dedup_partitions": 10 ** 400}}, "resources.dedup_partitions"),
    ({"resources": {"gpu_actors": 10 ** 400}}, "resources.gpu_actors"),
    ({"resources": {"worker_resources": {"crawl": -5}}}, "resources.worker_resources.crawl"),
    ({"validation": {"clip_prompts": ["a photo of a {} {}"]}}, "validation.clip_prompts"),
    ({"validation": {"clip_prompts": ["{x} {}"]}}, "validation.clip_prompts"),
    ({"validation": {"clip_prompts": ["{{}}{:>2000000000}"]}}, "validation.clip_prompts"),
    ({"validation": {"clip_prompts": ["{{}}{:>10000000000000}"]}}, "validation.clip_prompts"),
    ({"validation": {"clip_prompts": ["{{}}{.__class__.__mro__}"]}}, "validation.clip_prompts"),
    ({"validation": {"clip_prompts": ["a {!r}"]}}, "validation.clip_prompts"),
    ({"validation": {"clip_prompts": ["a {} {"]}}, "validation.clip_prompts"),
    ({"validation": {"clip_prompts": ["a {}" + "." * 300]}}, "validation.clip_prompts"),
    ({"validation": {"clip_prompts": ["a {}"] * 33}}, "validation.clip_prompts"),
    ({"validation": {"nsfw_labels": "(unclosed"}}, "validation.nsfw_labels"),
])
def test_values_that_would_fail_inside_the_job_are_refused_naming_the_field(extra, field):
    """Each once passed the spec and failed later: a contact whose check took seconds per 10k
    characters, counts that overflowed Ray's float arithmetic, a negative resource, a prompt
    that str.format cannot fill with one name (or that pads the name to gigabytes: a 40-byte
    request allocated 1 GB per prompt in the API's replica), a label regex that does not
    compile."""
    with pytest.raises(SpecError) as info:
        parse_spec({**BASE, **extra})
    assert [path for path, _ in info.value.problems] == [field]


SLOW = {"level": "slow"}


@pytest.mark.parametrize("validation,field,says", [
    ({"nsfw_backend": "hf"}, "validation.nsfw_model", "nsfw_backend 'opennsfw'"),
    ({"nsfw": False, "clip": False}, "validation.level", "set nsfw: true or clip: true"),
    ({"clip_model": " "}, "validation.clip_model", "or set clip: false"),
    ({"clip": False, "keep_embedding": True}, "validation.keep_embedding",
     "keep_embedding: false"),
    ({"clip": False, "embedding_dedup_threshold": 0.95}, "validation.embedding_dedup_threshold",
     "embedding_dedup_threshold: null"),
])
def test_slow_settings_the_scorers_cannot_run_with_are_refused(validation, field, says):
    """Each passed ``pixcrawler check`` and then failed the job at its first batch; the
    other levels do not read these settings."""
    with pytest.raises(SpecError) as info:
        parse_spec({**BASE, "validation": {**SLOW, **validation}})
    assert [path for path, _ in info.value.problems] == [field]
    assert says in info.value.problems[0][1]
    assert parse_spec({**BASE, "validation": validation}).validation.level == "medium"


def test_slow_settings_that_can_run_stay_valid():
    for validation in ({"nsfw": False}, {"clip": False}, {"nsfw": False, "nsfw_backend": "hf"},
                       {"nsfw_backend": "hf", "nsfw_model": "org/nsfw-vit"},
                       {"keep_embedding": True, "embedding_dedup_threshold": 0.95}):
        assert parse_spec({**BASE, "validation": {**SLOW, **validation}})


def test_a_prompt_with_escaped_braces_is_fine():
    assert parse_spec({**BASE, "validation": {"clip_prompts": ["a {{b}} {}"]}})


@pytest.mark.parametrize("extra,field,valid", [
    ({"classes": {"cat": {"querys": ["x"]}}}, "classes.cat.querys", "queries, target, urls"),
    ({"download": {"hosts": {"x.org": {"foo": 1}}}}, "download.hosts.x.org.foo",
     "concurrency, delay_s"),
])
def test_an_unknown_field_under_a_named_entry_lists_the_valid_fields(extra, field, valid):
    with pytest.raises(SpecError) as info:
        parse_spec({**BASE, **extra})
    ((path, message),) = info.value.problems
    assert path == field and f"valid fields: {valid}" in message


@pytest.mark.parametrize("name,content,says", [
    ("spec.yaml", b"name: caf\xe9\n", "not UTF-8"),
    ("spec.yaml", b"name: x\ntarget: " + b"9" * 5000 + b"\n", "not valid YAML/JSON"),
    ("spec.yaml", b"[" * 3000 + b"]" * 3000, "nested too deeply"),
    ("spec.json", b'{"target": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ("spec.json", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
])
def test_a_spec_file_python_cannot_read_is_a_spec_error(tmp_path, name, content, says):
    """Not a traceback from ``pixcrawler check`` / ``build``: the file's problem, named."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    ((where, message),) = info.value.problems
    assert where == "(file)" and says in message


@pytest.mark.parametrize("labels,nested", [
    (("Cat", "cat"), False), (("caf\u00e9", "cafe\u0301"), False),
    (("animals/Cat", "animals/cat"), True)])
def test_labels_one_folder_apart_on_macos_and_windows_are_refused(labels, nested):
    """ImageFolder folders that differ only in case or Unicode form are one folder on
    macOS's and Windows' filesystems, where two classes' images would be mixed."""
    output = {"formats": ["parquet", "imagefolder"],
              "imagefolder_labels": "nested" if nested else "flat"}
    with pytest.raises(SpecError) as info:
        parse_spec({**BASE, "classes": {label: None for label in labels}, "output": output})
    ((path, message),) = info.value.problems
    assert "differ only in case or Unicode form" in message
    parse_spec({**BASE, "classes": {label: None for label in labels},
                "output": {"formats": ["parquet"]}})  # no folders, no clash


def test_max_redirects_has_an_upper_bound():
    """download.max_redirects had none: a million hops per candidate were accepted."""
    for hops in (31, 1_000_000):
        with pytest.raises(SpecError) as info:
            parse_spec({**BASE, "download": {"max_redirects": hops}})
        ((path, message),) = info.value.problems
        assert path == "download.max_redirects" and "30" in message
    assert parse_spec({**BASE, "download": {"max_redirects": 30}}).download.max_redirects == 30


@pytest.mark.parametrize("section, field, too_big, ok", [
    ("resources", "batch_size", 65_537, 65_536),
    ("download", "max_bytes_in_flight", 10**15, 10**12),  # 10**12: a budget that never binds
    ("download", "max_bytes", 2**30 + 1, 2**30),
])
def test_unit_and_body_budgets_have_upper_bounds(section, field, too_big, ok):
    """None had one: batch_size x max_bytes is one unit's memory, a byte budget of 10**15
    turned the fetcher's off, and an image over 2 GiB cannot be one value of a shard's
    image column."""
    found = problems({**BASE, section: {field: too_big}})
    assert list(found) == [f"{section}.{field}"]
    assert "less than or equal to" in found[f"{section}.{field}"]
    spec = parse_spec({**BASE, section: {field: ok}})
    assert getattr(getattr(spec, section), field) == ok
    assert parse_spec({**BASE, "resources": {"batch_size": 256}}).batch_size() == 256


@pytest.mark.parametrize("agent", ["Bot/1\r\nX-Injected: 1", "Bot/1\nmore", "Bot\x00/1",
                                   "Bot/1 \u00e9t\u00e9"])
def test_a_user_agent_is_one_line_of_printable_ascii(agent):
    """A line break in the User-Agent would start another request header."""
    found = problems({**BASE, "download": {"user_agent": agent}})
    assert list(found) == ["download.user_agent"]
    assert "one line of printable ASCII" in found["download.user_agent"]


def test_a_long_user_agent_is_refused_fast():
    """download.user_agent had no limit: checking a 32 kB one for a contact took 4 s, and
    the time grows with the square of its length."""
    start = time.perf_counter()
    found = problems({**BASE, "download": {"user_agent": "a" * 900_000}})
    assert time.perf_counter() - start < 1.0
    assert list(found) == ["download.user_agent"]
    message = found["download.user_agent"]
    assert "at most 512 characters" in message and "900000" in message and len(message) < 200
    longest = parse_spec({**BASE, "download": {"user_agent": "a" * 512}})
    start = time.perf_counter()
    assert not has_contact(longest.download)
    assert time.perf_counter() - start < 0.5


def test_the_published_form_of_a_spec_masks_the_credentials_of_its_servers():
    spec = parse_spec({
        "name": "x", "classes": {"a": None},
        "sources": [{"engine": "duckduckgo", "options": {"proxy": "http://me:pw1@p:3128"}},
                    {"engine": "openverse",
                     "options": {"base_url": "https://tok@api.example/v1?api_key=pw2&q=1"}},
                    {"engine": "sandbox", "url": "http://u:pw3@127.0.0.1:1"}],
        "search": {"llm_base_url": "https://x.example/v1?token=pw4"}})
    public = spec.public_dump()
    assert [s.get("url") or s["options"].get("proxy") or s["options"]["base_url"]
            for s in public["sources"]] == ["http://***@p:3128",
                                            "https://***@api.example/v1?api_key=***&q=1",
                                            "http://***@127.0.0.1:1"]
    assert public["search"]["llm_base_url"] == "https://x.example/v1?token=***"
    more = parse_spec({
        "name": "x", "classes": {"a": None},
        "sources": [{"engine": "duckduckgo", "options": {"proxy": "me:pw5@p:3128"}},
                    {"engine": "urllist", "path": "https://b.example/l.txt?X-Amz-Signature=pw6"
                                                  "&X-Amz-Credential=pw7&v=1"},
                    {"engine": "urllist", "path": "lists/me@home.txt"}]}).public_dump()
    assert [more["sources"][0]["options"]["proxy"], more["sources"][1]["path"],
            more["sources"][2]["path"]] == [
        "***@p:3128", "https://b.example/l.txt?X-Amz-Signature=***&X-Amz-Credential=***&v=1",
        "lists/me@home.txt"]
    assert spec.model_dump(mode="json")["sources"][0]["options"]["proxy"] == \
        "http://me:pw1@p:3128"  # the job itself still uses them
    assert parse_spec(public).public_dump() == public
    urls = ["https://bob:pw8@img.example/a.jpg?token=pw9", "https://img.example/b.jpg"]
    flat = parse_spec({"name": "x", "classes": {"a": {"urls": urls}}}).public_dump()
    masked = ["https://***@img.example/a.jpg?token=***", "https://img.example/b.jpg"]
    assert flat["classes"]["a"]["urls"] == masked
    tree = parse_spec({"name": "x", "categories": {"animal": {"dog": {"urls": urls}}}})
    assert "pw8" not in json.dumps(tree.public_dump()) and "pw9" not in json.dumps(
        tree.public_dump())


def test_an_images_deadline_holds_at_least_one_request():
    """The new deadline's default (120 s) cut every request of a spec whose timeout_s was
    longer; left unset it is raised to timeout_s, set shorter it is refused."""
    from builder.spec import DownloadSpec

    assert DownloadSpec().deadline_s == 120 and DownloadSpec(timeout_s=300).deadline_s == 300
    with pytest.raises(SpecError, match=r"download\.deadline_s: 60 s is shorter than "
                                        r"timeout_s 300 s"):
        parse_spec({"name": "x", "classes": {"a": None}, "sources": [{"engine": "bing"}],
                    "download": {"timeout_s": 300, "deadline_s": 60}})


def _alias_levels(depth: int) -> str:
    lines = ["name: x", "sources: [{engine: sandbox, url: 'http://127.0.0.1:1'}]",
             "categories:", "  l0: &l0 {a: {queries: [q]}, b: {queries: [q]}}"]
    lines += [f"  l{i}: &l{i} {{a: *l{i - 1}, b: *l{i - 1}}}" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


def test_aliases_that_repeat_the_spec_past_a_bound_are_refused_before_it_is_read():
    """Nested YAML aliases double a spec at each level: a dataset's spec.yaml of 552 bytes
    (read by retry-failed, recheck or --resume) stood for 131,070 classes, 7.5 s and 395 MB
    to check, and 30 levels never finished. Aliases may repeat values, within a bound; one
    that stands inside its own anchor's value makes an endless spec, refused too."""
    assert len(loads_spec(_alias_levels(8)).labels) == 510
    started = time.process_time()
    for depth in (16, 40):
        with pytest.raises(SpecError) as e:
            loads_spec(_alias_levels(depth), "spec.yaml", stored=True)
        [(field, message)] = e.value.problems
        assert field == "(file)" and "aliases repeat" in message and "at most 100,000" in message
    assert time.process_time() - started < 1.0
    with pytest.raises(SpecError) as e:
        loads_spec("name: x\nsources: [{engine: sandbox, url: 'http://127.0.0.1:1'}]\n"
                   "classes: &a\n  cat: {queries: [*a]}\n")
    assert "inside the value of its own anchor" in str(e.value)
    with pytest.raises(SpecError, match="not valid YAML/JSON"):  # the reader's own refusal
        loads_spec("name: x\x07\nclasses: [cat]\n")
    merged = loads_spec("name: x\nsources: [{engine: sandbox, url: 'http://127.0.0.1:1'}]\n"
                        "classes:\n  cat: &c {target: 7, queries: [a cat]}\n"
                        "  dog: {<<: *c, queries: [a dog]}\n")
    assert [merged.classes[c].target for c in ("cat", "dog")] == [7, 7]


def test_the_settings_that_honour_fewer_opt_outs_than_the_defaults_are_named():
    from builder.spec import weaker_opt_outs

    assert weaker_opt_outs(parse_spec(MINIMAL).download) == []
    assert weaker_opt_outs(parse_spec({**MINIMAL, "download": {
        "signals": {"page_meta": True}, "per_host_concurrency": 2,
        "hosts": {"upload.wikimedia.org": {"concurrency": 1}, "example.org": {
            "concurrency": 64}}}}).download) == []  # politer, or no published policy
    assert weaker_opt_outs(parse_spec({**MINIMAL, "download": {
        "respect_optouts": False, "signals": {"tdmrep": False, "usage": "train-ai"},
        "hosts": {"upload.wikimedia.org": {"concurrency": 50}}}}).download) == [
        "download.respect_optouts: false", "download.signals.tdmrep: false",
        "download.signals.usage: train-ai",
        "download.hosts.upload.wikimedia.org.concurrency: 50 (upload.wikimedia.org's "
        "published policy: 2)"]
