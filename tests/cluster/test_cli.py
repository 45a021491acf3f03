"""The ``pixcrawler`` command line as a shell user meets it (no Ray started here)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster import cli
from cluster.cli import EXIT_USAGE, build_parser, main

ROOT = Path(__file__).resolve().parents[2]
SPEC = {"name": "tiny", "classes": {"cat": None},
        "sources": [{"engine": "sandbox", "url": "http://127.0.0.1:9"}]}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}


def _parsers(parser: argparse.ArgumentParser, path: str = "pixcrawler"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_option_has_help_and_help_shows_the_defaults():
    missing = []
    for path, parser in _parsers(build_parser()):
        assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter), path
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                                   argparse._SubParsersAction)):
                continue
            if not action.help:
                missing.append(f"{path} {action.option_strings or action.dest}")
    assert missing == []
    demo = dict(_parsers(build_parser()))["pixcrawler demo"].format_help()
    assert "(default: 20)" in " ".join(demo.split())


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"pixcrawler {version('pixcrawler')}"


def test_keys_takes_store_before_or_after_its_command(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    assert main(["keys", "create", "alice", "--store", url]) == 0
    capsys.readouterr()
    assert main(["keys", "list", "--store", url]) == 0
    assert "alice" in capsys.readouterr().out
    assert main(["keys", "--store", url, "list"]) == 0
    assert "alice" in capsys.readouterr().out


def test_serve_on_a_busy_port_says_so_in_one_line_before_starting_ray(monkeypatch, capsys,
                                                                       tmp_path):
    import socket

    import serve.cli

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("started Ray with the port taken")

    monkeypatch.setattr(serve.cli, "connect_with_jobs", must_not_run)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["serve", "--no-auth", "--port", str(port),
                     "--store", f"sqlite:///{tmp_path / 's.db'}"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"port {port}" in err[0] and "in use" in err[0], err


def test_the_command_exits_with_mains_code_and_leaves_the_callers_collector_alone(tmp_path):
    """``entry`` (the installed ``pixcrawler`` and ``python -m cluster.cli``) exits with what
    ``main`` returns; only it freezes the objects out of the garbage collector."""
    import gc

    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "check",
                           str(tmp_path / "missing.yaml")], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=60)
    assert proc.returncode == EXIT_USAGE and "missing.yaml" in proc.stderr, proc.stderr
    frozen = gc.get_freeze_count()
    assert main(["check", str(tmp_path / "missing.yaml")]) == EXIT_USAGE
    assert gc.get_freeze_count() == frozen


def test_check_piped_into_head_ends_quietly(tmp_path):
    """The reader closes the pipe before the spec is printed: no BrokenPipeError traceback."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "check", str(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
                            cwd=ROOT)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode != 0


IMPORTS = """
import atexit, json, sys
from cluster.cli import main
SERVING = {"sqlalchemy", "ray", "fastapi", "starlette", "uvicorn", "serve"}
COMMANDS = {"serve", "serve.cli", "serve.locations"}  # the serve/keys options only
def report():
    loaded = sorted(m for m in sys.modules
                    if m.split(".")[0] in SERVING and m not in COMMANDS)
    print("MODULES " + json.dumps(loaded), file=sys.stderr)
atexit.register(report)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", ["check", "build --local", "help"])
def test_check_and_local_build_do_not_import_the_serving_stack_or_ray(tmp_path, command):
    """cluster/cli.py adds the serve and keys commands from serve/cli.py, which must not pull
    in the job store (SQLAlchemy), the API (FastAPI) or Ray: half a second of start-up."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "download": {"timeout_s": 0.5, "retries": 0,
                                                         "allow_private_networks": True},
                                    "output": {"uri": str(tmp_path / "out")}}))
    args = {"check": ["check", str(spec)], "build --local": ["build", "--local", str(spec)],
            "help": ["--help"]}[command]
    out = subprocess.run([sys.executable, "-c", IMPORTS, *args], capture_output=True,
                         text=True, env=_env(), cwd=ROOT, timeout=120)
    line = [x for x in out.stderr.splitlines() if x.startswith("MODULES ")]
    assert line, out.stderr[-2000:]
    assert json.loads(line[-1][len("MODULES "):]) == []


def test_rebuilding_onto_a_complete_dataset_names_the_overwrite_flag(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_SUCCESS").write_text(json.dumps({"job_id": "old", "created": "2026-01-01"}))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "output": {"uri": str(out)}}))
    assert main(["build", "--local", str(spec)]) != 0
    err = capsys.readouterr().err
    assert "--overwrite" in err and "Traceback" not in err


def test_what_a_datasets_files_say_reaches_the_terminal_without_its_escape_sequences(
        tmp_path, capsys):
    """The error naming the job of a dataset already at the output quoted its marker's job id
    as written: a shared folder's ``_SUCCESS`` could set the terminal's title or colours (or,
    on some terminals, its clipboard) for whoever built there. Unprintable characters are
    shown as ``?``; a message's lines stay lines."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "_SUCCESS").write_text(json.dumps({"job_id": "old\x1b]0;pwned\x07\x1b[31m",
                                              "created": "2026-01-01\r"}))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "output": {"uri": str(out)}}))
    assert main(["build", "--local", str(spec)]) != 0
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "\r" not in err
    assert "job old?]0;pwned??[31m, created 2026-01-01?" in err
    spec.write_text(yaml.safe_dump({**SPEC, "target": -1, "resources": {"workers": -1}}))
    assert main(["build", "--local", str(spec)]) == EXIT_USAGE
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("error: invalid dataset spec") and len(lines) >= 3
    assert all(line.startswith("  ") for line in lines[1:])


def _descendants(pid: int) -> list[int]:
    """The live processes below ``pid`` (Linux: from /proc), zombies left out."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except (OSError, ValueError):
            continue
        if entry.isdigit() and fields[0] not in (b"Z", b"X"):
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads processes from /proc")
@pytest.mark.parametrize("when", ["the job fails at once", "interrupted before the job"])
def test_a_build_that_fails_before_its_job_starts_leaves_no_worker_process(tmp_path,
                                                                          monkeypatch, when):
    """The command starts the in-process runner's workers before its own imports; a job that
    then fails at once (a complete dataset is in the way), or a Ctrl-C before the job took
    the workers over, still ends them all and removes their socket's directory."""
    import tempfile

    import builder.journal

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "_SUCCESS").write_text(json.dumps({"job_id": "old", "created": "2026-01-01"}))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "output": {"uri": str(out)}}))
    started = []
    real = cli.StartedWorkers

    def spy(workers):
        started.append(real(workers))
        return started[-1]

    def interrupted(spec):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "StartedWorkers", spy)
    if when == "interrupted before the job":
        monkeypatch.setattr(builder.journal, "new_job_id", interrupted)
    before = set(_descendants(os.getpid()))  # the session's servers
    assert main(["build", str(spec)]) != 0
    assert started and started[0].procs, "the command did not start its workers early"
    assert set(_descendants(os.getpid())) - before == set()
    assert os.listdir(tmp_path / "tmp") == []


@pytest.mark.parametrize("started,mode,dashboard,expected", [
    (True, "embedded", False, False), (True, "embedded", True, True),
    (False, "embedded", False, True), (True, "cluster", False, True),
    (False, "cluster", False, True)])
def test_only_the_commands_own_embedded_ray_without_a_dashboard_skips_the_progress_actor(
        started, mode, dashboard, expected):
    """A Ray that this command started, embedded and without a dashboard, is its alone: no
    other process could follow the job through a progress actor. Any other Ray can."""
    from cluster.cli import observed

    assert observed({"started": started, "mode": mode}, dashboard) is expected


@pytest.mark.parametrize("flag", ["--dashboard", "--ray", "--local"])
def test_retry_failed_passes_its_runner_options_on(monkeypatch, tmp_path, flag):
    """``retry-failed`` takes the runner options that ``build`` takes, and they reach the
    runner choice (``--dashboard`` was once accepted and dropped)."""
    import builder.pipeline
    from builder.spec import parse_spec

    spec = parse_spec(SPEC)
    monkeypatch.setattr(builder.pipeline, "plan_retry",
                        lambda uri, options, job_id, **kwargs: (spec, None))
    monkeypatch.setattr(builder.pipeline, "count_retryable", lambda uri, options: 3)
    seen: dict = {}

    def run_spec(spec, **kwargs):
        seen.update(kwargs)
        return 0

    monkeypatch.setattr(cli, "run_spec", run_spec)
    assert main(["retry-failed", str(tmp_path), flag]) == 0
    assert {k: seen[k] for k in ("dashboard", "ray", "local")} == {
        "dashboard": flag == "--dashboard", "ray": flag == "--ray", "local": flag == "--local"}


@pytest.mark.parametrize("download, flag, refusal", [
    ({"allow_private_networks": True}, "--allow-private-networks", "allow_private_networks"),
    ({"respect_robots": False, "signals": {"ai_txt": False}}, "--allow-weaker-opt-outs",
     "download.respect_robots: false; download.signals.ai_txt: false"),
])
def test_a_datasets_spec_opens_the_network_or_honours_fewer_opt_outs_only_when_told(
        monkeypatch, tmp_path, capsys, download, flag, refusal):
    """``retry-failed`` and ``recheck`` take their download settings from the dataset's own
    spec. One from elsewhere (a shared bucket, a download) that set
    ``allow_private_networks`` had them request its images' URLs on loopback, the LAN or a
    cloud's metadata service (``retry-failed`` writing the answers into the dataset); one
    that turned robots.txt and the opt-out signals off had ``retry-failed`` fetch what the
    sites refuse and ``recheck`` find nothing to remove. Both refuse before any request,
    naming what the spec sets, unless given ``--allow-private-networks`` or
    ``--allow-weaker-opt-outs``."""
    import builder.pipeline
    import builder.recheck
    from builder.errors import SpecError
    from builder.recheck import RecheckResult
    from builder.spec import parse_spec

    spec = parse_spec({**SPEC, "download": download})
    monkeypatch.setattr(builder.pipeline, "published_spec", lambda uri, options: spec)
    monkeypatch.setattr(builder.pipeline, "read_marker", lambda uri, options: {"job_id": "x"})
    monkeypatch.setattr(builder.pipeline, "_crawl_partial", lambda uri, options, marker: "")
    monkeypatch.setattr(builder.pipeline, "count_retryable", lambda uri, options: 3)
    monkeypatch.setattr(builder.recheck, "dataset_spec", lambda uri, options: spec)
    monkeypatch.setattr(builder.recheck, "needs_contact", lambda uri, download, options: False)
    ran: list[str] = []
    monkeypatch.setattr(cli, "run_spec", lambda spec, **kwargs: ran.append("retry") or 0)
    for call in (lambda: builder.pipeline.plan_retry(str(tmp_path)),  # as a library too
                 lambda: builder.recheck.recheck(str(tmp_path))):
        with pytest.raises(SpecError, match=refusal):
            call()

    def recheck(uri, **kwargs):
        ran.append("recheck")
        return RecheckResult(uri, kwargs["mode"], checked=0, checked_at="")

    monkeypatch.setattr(builder.recheck, "recheck", recheck)
    out = str(tmp_path / "removals.csv")
    assert main(["retry-failed", str(tmp_path), "--local"]) == EXIT_USAGE
    assert main(["recheck", str(tmp_path), "--out", out]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count(flag) >= 2 and refusal in " ".join(err.split())
    assert ran == []
    assert main(["retry-failed", str(tmp_path), "--local", flag]) == 0
    assert main(["recheck", str(tmp_path), "--out", out, flag]) == 0
    assert ran == ["retry", "recheck"]


def _usage_error(capsys, argv: list[str]) -> str:
    """What ``main(argv)`` prints when argparse refuses it (exit 2, no traceback)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("job_id", ["a/b", " ", ".", "..", "_x", ""])
@pytest.mark.parametrize("command", [["build", "spec.yaml", "--local"], ["retry-failed", "out"]])
def test_a_job_id_that_cannot_name_files_is_a_usage_error(capsys, command, job_id):
    """Output files and folders are named after the job id: one that cannot name them is
    refused before anything runs, naming the characters allowed."""
    err = _usage_error(capsys, [*command, "--job-id", job_id])
    assert f"argument --job-id: {job_id!r} is not a job id: use letters, digits" in err
    assert "starting with a letter or digit" in err
    assert build_parser().parse_args([*command, "--job-id", "cats.v2_run-1"]).job_id == \
        "cats.v2_run-1"


@pytest.mark.parametrize("argv, message", [
    (["demo", "--images-per-class", "-5"], "argument --images-per-class: -5 is negative"),
    (["demo", "--images-per-class", "x"], "argument --images-per-class: 'x' is not a whole"),
    (["demo", "--classes", "cat,cat"], "argument --classes: 'cat' given more than once"),
    (["demo", "--classes", "cat,,dog"], "argument --classes: 'cat,,dog' has an empty class"),
    (["sandbox", "--classes", "dog,cat,dog"], "argument --classes: 'dog' given more than once"),
    (["sandbox", "--images-per-class", "-1"], "argument --images-per-class: -1 is negative"),
    (["sandbox", "--port", "99999"], "argument --port: 99999 is not a TCP port: give 0-65535"),
    (["sandbox", "--port", "-1"], "argument --port: -1 is not a TCP port"),
])
def test_the_sandbox_commands_refuse_bad_options_before_starting(capsys, argv, message):
    assert message in _usage_error(capsys, argv)


def test_the_sandbox_commands_default_classes_are_a_list():
    assert build_parser().parse_args(["demo"]).classes == ["cat", "dog", "bird"]
    assert build_parser().parse_args(["sandbox", "--classes", "a b,c"]).classes == ["a b", "c"]


def test_sandbox_on_a_busy_port_says_so_in_one_line(capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["sandbox", "--port", str(port), "--images-per-class", "1"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"127.0.0.1:{port}" in err[0] and "in use" in err[0], err


@pytest.mark.parametrize("command", [["build", "spec.yaml"], ["retry-failed", "out"], ["demo"]])
def test_dashboard_with_local_is_a_usage_error_as_ray_with_local_is(capsys, command):
    """``--dashboard`` means running on Ray, so ``--local`` contradicts it (it was dropped)."""
    err = _usage_error(capsys, [*command, "--local", "--dashboard"])
    assert f"pixcrawler {command[0]}: error: argument --dashboard: not allowed with argument " \
           "--local" in err
    err = _usage_error(capsys, [*command, "--dashboard", "--local"])
    assert "argument --dashboard: not allowed with argument --local" in err
    assert "argument --ray: not allowed with argument --local" in \
        _usage_error(capsys, [*command, "--local", "--ray"])
    args = build_parser().parse_args([*command, "--ray", "--dashboard"])
    assert args.ray and args.dashboard


def test_the_demo_replaces_only_what_a_demo_wrote(tmp_path, capsys):
    """The demo's spec overwrites its output, so `demo --output` pointed at a real dataset
    deleted it without a word."""
    import json

    from cluster.cli import demo_output_taken, main

    real = tmp_path / "pets"
    real.mkdir()
    (real / "_SUCCESS").write_text(json.dumps({"job_id": "pets-1a2b3c4d", "files": []}))
    assert main(["demo", "--local", "--output", str(real)]) == 1
    assert "did not build (job pets-1a2b3c4d)" in capsys.readouterr().err
    assert json.loads((real / "_SUCCESS").read_text())["job_id"] == "pets-1a2b3c4d"
    interrupted = tmp_path / "run" / "_journal" / "pets-5e6f7a8b"
    interrupted.mkdir(parents=True)
    (interrupted / "job.json").write_text("{}")
    assert "interrupted job the demo did not start" in demo_output_taken(str(tmp_path / "run"))
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "_PARTIAL").write_text(json.dumps({"job_id": "demo-9c8d7e6f"}))
    assert demo_output_taken(str(demo)) is None
    assert demo_output_taken(str(tmp_path / "nothing-yet")) is None
