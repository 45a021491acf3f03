"""`pixcrawler keys ...`, the serve parser, and serve_config.yaml (no Ray started)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from cluster.cli import build_parser, main
from serve.store import JobStore

CONFIG = Path(__file__).resolve().parents[2] / "serve" / "serve_config.yaml"


def test_keys_create_list_revoke(store_url, capsys):
    url = store_url
    assert main(["keys", "--store", url, "create", "alice"]) == 0
    out = capsys.readouterr()
    plaintext = out.out.strip()
    assert plaintext.startswith("pxc_") and "shown only now" in out.err
    assert JobStore(url).verify_key(plaintext).name == "alice"

    assert main(["keys", "--store", url, "list"]) == 0
    listed = capsys.readouterr().out
    assert "alice" in listed and "active" in listed and plaintext not in listed

    assert main(["keys", "--store", url, "revoke", "alice"]) == 0
    assert "revoked" in capsys.readouterr().out
    assert JobStore(url).verify_key(plaintext) is None
    assert main(["keys", "--store", url, "revoke", "alice"]) == 1
    assert "no active key" in capsys.readouterr().err


def test_serve_command_options():
    args = build_parser().parse_args(["serve", "--port", "8123", "--demo", "--no-auth",
                                      "--store", "sqlite:////tmp/x.db"])
    assert (args.host, args.port, args.demo, args.no_auth, args.store) == (
        "127.0.0.1", 8123, True, True, "sqlite:////tmp/x.db")
    from serve.cli import serve_settings

    settings = serve_settings(args, {"name": "demo"})
    assert settings["auth"] is False and settings["example_spec"] == {"name": "demo"}
    assert settings["access_log"] is False and args.ingress == "proxy"
    args = build_parser().parse_args(["serve", "--ingress", "haproxy", "--access-log"])
    assert args.ingress == "haproxy" and serve_settings(args, None)["access_log"] is True


def test_allowed_hosts_are_the_options_and_the_bound_host_name():
    from serve.app import ServeSettings
    from serve.cli import serve_settings

    def allowed(*options: str) -> list[str]:
        args = build_parser().parse_args(["serve", "--no-auth", *options])
        return ServeSettings.model_validate(serve_settings(args, None)).allowed_hosts

    assert allowed() == []  # 127.0.0.1: an IP address is always answered
    assert allowed("--host", "0.0.0.0") == allowed("--host", "::") == []
    assert allowed("--host", "Pix-Box.lan", "--allowed-host", "pix.example.com",
                   "--allowed-host", "API.Example.org.") == [
        "pix.example.com", "api.example.org", "pix-box.lan"]


@pytest.fixture
def short_tmp(monkeypatch):
    """RAY_TMPDIR a folder in /tmp, short enough for HAProxy's socket paths (a test's own is
    not)."""
    path = Path(tempfile.mkdtemp(prefix="pxt", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_haproxy_env_picks_its_own_ports(short_tmp):
    from serve.cli import haproxy_env

    env = haproxy_env()
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    ports = [env[k] for k in ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
                              "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")]
    assert len(set(ports)) == 3 and "8404" not in ports and "9101" not in ports


def test_haproxys_files_are_out_of_other_users_reach(short_tmp, monkeypatch):
    """Serve keeps HAProxy's config, the Lua it loads and an admin socket that anyone may
    use (mode 666, level admin) in /tmp/haproxy-serve, which any user of the machine can make
    first or enter: they go in the user's private folder."""
    import stat

    from cluster.connect import UnsafeTempFolder
    from serve.cli import haproxy_env

    shared = short_tmp
    shared.chmod(0o1777)
    env = haproxy_env()
    folder = shared / f"pixcrawler-{os.geteuid()}" / "haproxy"
    assert stat.S_IMODE(folder.parent.stat().st_mode) == 0o700 and folder.is_dir()
    assert {k: env[k] for k in env if k.endswith(("_LOC", "_PATH", "_BASE", "_FILE"))} == {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock")}
    # HAProxy turned on by the environment (as the README tells cluster users), any
    # ingress: its files still go in the private folder, unless the environment names them
    from serve.cli import use_haproxy

    for name in env:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "/elsewhere/haproxy.cfg")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # a Ray to start here
    use_haproxy("proxy", None)
    assert os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"] == str(folder / "admin.sock")
    assert os.environ["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] == "/elsewhere/haproxy.cfg"
    deep = shared / ("d" * 60)
    deep.mkdir()
    deep.chmod(0o1777)
    monkeypatch.setenv("RAY_TMPDIR", str(deep))
    with pytest.raises(UnsafeTempFolder, match="RAY_TMPDIR"):
        haproxy_env()


def test_replicas_log_no_access_lines_and_run_on_their_own_loop_by_default(tmp_path):
    from cluster.connect import WORKER_NICENESS_ENV
    from serve.app import USER_CODE_THREAD_ENV, build_app

    store = f"sqlite:///{tmp_path / 's.db'}"
    deployment = build_app({"store": store})._bound_deployment
    assert deployment.logging_config["enable_access_log"] is False
    assert deployment.ray_actor_options["runtime_env"]["env_vars"] == {
        USER_CODE_THREAD_ENV: "0", WORKER_NICENESS_ENV: "0"}
    assert deployment.ray_actor_options["num_cpus"] <= 0.25
    deployment = build_app({"store": store, "access_log": True, "user_code_thread": True,
                            "niceness": 10})._bound_deployment
    assert deployment.logging_config["enable_access_log"] is True
    assert deployment.ray_actor_options["runtime_env"]["env_vars"] == {
        USER_CODE_THREAD_ENV: "1", WORKER_NICENESS_ENV: "10"}


def test_serve_config_is_a_valid_serve_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    from serve.app import ServeSettings

    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    app = config.applications[0]
    assert app.import_path == "serve.app:build_app"
    ServeSettings.model_validate(app.args)
    options = app.deployments[0].ray_actor_options
    assert options.num_cpus <= 0.25
    # ray_actor_options in the config replace the code's: the replica env is repeated there.
    from cluster.connect import WORKER_NICENESS_ENV
    from serve.app import USER_CODE_THREAD_ENV

    assert options.runtime_env["env_vars"] == {USER_CODE_THREAD_ENV: "0",
                                               WORKER_NICENESS_ENV: "0"}


def test_demo_example_uses_the_sandbox_and_leaves_output_to_the_server():
    from builder.spec import parse_spec
    from serve.cli import demo_example

    spec = parse_spec(demo_example("http://127.0.0.1:9", 5))
    assert spec.sources[0].engine == "sandbox" and spec.output.uri is None
    assert spec.download.allow_private_networks


def test_build_reads_spec_from_env_and_rejects_ambiguity(monkeypatch, capsys):
    from cluster.cli import main

    monkeypatch.setenv("PXC_SPEC", '{"name": "x", "classes": {"a": null}, "validation": '
                       '{"level": "fastest"}, "sources": [{"engine": "sandbox", '
                       '"url": "http://127.0.0.1:1"}]}')
    assert main(["build", "--spec-env", "PXC_SPEC"]) == 2
    assert "validation.level" in capsys.readouterr().err
    assert main(["build"]) == 2
    assert "not both or none" in capsys.readouterr().err
    monkeypatch.delenv("PXC_SPEC")
    assert main(["build", "--spec-env", "PXC_SPEC"]) == 2
    assert "is not set" in capsys.readouterr().err


def test_a_spec_the_api_queued_before_an_upgrade_is_read_as_saved(monkeypatch, caplog):
    """The API hands a queued job's spec over in the environment; one saved by an earlier
    version with a field this one refuses (a two-word contact) still runs."""
    import argparse

    from cluster.cli import _spec_from_args

    monkeypatch.setenv("PXC_SPEC", '{"name": "x", "classes": {"a": null}, "download": '
                       '{"contact": "ops@example.org; https://example.org/bot"}, "sources": '
                       '[{"engine": "duckduckgo", "url": "http://127.0.0.1:1"}]}')
    spec = _spec_from_args(argparse.Namespace(spec=None, spec_env="PXC_SPEC"))
    assert spec.download.contact == "ops@example.org" and spec.sources[0].url is None
    assert "saved by an earlier version" in caplog.text


def test_keys_with_a_database_driver_missing_say_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed
    assert main(["keys", "--store", "postgresql+psycopg://u@127.0.0.1:1/db", "list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install 'pixcrawler[serve]'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("option, value, got", [("--max-jobs", "0", "(got 0)"),
                                                ("--burst", "0", "(got 0)"),
                                                ("--rate-limit", "-1", "(got -1.0)"),
                                                ("--store", "nosuchdb://x/y", "nosuchdb"),
                                                ("--allowed-host", "http://pix.example.com/",
                                                 "is not a host name")])
def test_serve_rejects_bad_options_before_starting_anything(monkeypatch, capsys, option,
                                                            value, got):
    import builder.sandbox
    import serve.cli

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("started with settings the app refuses")

    monkeypatch.setattr(serve.cli, "connect_with_jobs", must_not_run)
    monkeypatch.setattr(builder.sandbox, "SandboxWeb", must_not_run)
    assert main(["serve", "--demo", option, value]) == 2
    err = capsys.readouterr().err
    assert f"pixcrawler serve: error: argument {option}: " in err and got in err
    assert "Traceback" not in err and "validation error" not in err


def test_serve_reads_the_policy_file_and_demo_lets_users_reach_its_sandbox(tmp_path):
    from serve.app import ServeSettings
    from serve.cli import demo_example, serve_settings

    policy = tmp_path / "policy.yaml"
    policy.write_text("max_classes: 20\nsource_urls: [https://api.example.org/]\n")
    args = build_parser().parse_args(["serve", "--policy", str(policy)])
    settings = ServeSettings.model_validate(serve_settings(args, None)).resolved()
    assert settings.policy.max_classes == 20 and not settings.policy.allow_private_networks
    assert settings.policy.output_prefix == f"{settings.data_dir}/datasets/{{owner}}"
    demo = ServeSettings.model_validate(
        serve_settings(args, demo_example("http://127.0.0.1:9", 5))).policy
    assert demo.source_urls == ["https://api.example.org/", "http://127.0.0.1:9"]
    assert demo.private_network_sources == ["http://127.0.0.1:9"]
    assert not demo.allow_private_networks and demo.max_classes == 20


@pytest.mark.parametrize("text, got", [("max_clases: 3\n", "(max_clases)"),
                                       ("max_classes: 0\n", "(max_classes)"),
                                       ("- a\n", "must hold a mapping"),
                                       ("a: [\n", "not valid YAML"),
                                       (None, "cannot read")])
def test_serve_rejects_a_bad_policy_file_before_starting_anything(monkeypatch, capsys, tmp_path,
                                                                  text, got):
    import serve.cli

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("started with a policy the app refuses")

    monkeypatch.setattr(serve.cli, "connect_with_jobs", must_not_run)
    policy = tmp_path / "policy.yaml"
    if text is not None:
        policy.write_text(text)
    assert main(["serve", "--policy", str(policy)]) == 2
    err = capsys.readouterr().err
    assert "pixcrawler serve: error: argument --policy" in err and got in err
    assert "Traceback" not in err
