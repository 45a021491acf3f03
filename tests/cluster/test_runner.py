"""Which runner a command picks (no Ray needed)."""

from __future__ import annotations

import logging

import pytest

from builder.spec import parse_spec
from cluster.runner import LOCAL_MAX_CPUS, choose_runner


def spec(**resources):
    data = {"name": "x", "classes": {"cat": {"urls": ["http://example.com/a.jpg"]}},
            "resources": resources}
    return parse_spec(data, "test")


@pytest.fixture(autouse=True)
def no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_a_job_that_fits_a_small_machine_runs_in_this_process():
    choice = choose_runner(spec(), address=None, local=False, ray=False, cpus=2)
    assert not choice.ray and "fits this machine's 2 cores" in choice.describe()
    assert "--ray" in choice.describe()


@pytest.mark.parametrize("resources, cpus, why", [
    ({}, LOCAL_MAX_CPUS + 1, "more than the in-process runner's 4 worker processes use"),
    ({"workers": 3}, 2, "3 workers of 1 CPU, more than this machine's 2 cores"),
    ({"worker_resources": {"crawl": 1}}, 2, "resources.worker_resources"),
])
def test_ray_when_the_job_or_the_machine_needs_it(resources, cpus, why):
    choice = choose_runner(spec(**resources), address=None, local=False, ray=False, cpus=cpus)
    assert choice.ray and why in choice.describe(), choice


def test_gpus_at_the_slow_level_choose_ray():
    s = parse_spec({"name": "x", "classes": {"cat": {"urls": ["http://example.com/a.jpg"]}},
                    "validation": {"level": "slow"}, "resources": {"gpus_per_actor": 1}}, "t")
    assert choose_runner(s, address=None, local=False, ray=False, cpus=2).ray


def test_an_address_or_ray_address_joins_the_cluster(monkeypatch):
    assert "joining the cluster at ray://h:10001" in choose_runner(
        spec(), address="ray://h:10001", local=False, ray=False, cpus=2).describe()
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # what `ray job submit` sets
    assert choose_runner(spec(), address=None, local=False, ray=False, cpus=2).ray


def test_flags_force_either(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert not choose_runner(spec(workers=64), address=None, local=True, ray=False).ray
    monkeypatch.delenv("RAY_ADDRESS")
    assert choose_runner(spec(), address=None, local=False, ray=True, cpus=2).ray
    assert choose_runner(spec(), address=None, local=False, ray=False, dashboard=True,
                         cpus=2).ray


def test_local_and_ray_together_are_refused(capsys):
    from cluster.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["build", "spec.yaml", "--local", "--ray"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_build_says_which_runner_it_chose(tmp_path, caplog, monkeypatch):
    """`build` logs its choice before it runs (an output that cannot be written stops the job
    right after, in this process: no Ray is started)."""
    from cluster.cli import main

    path = tmp_path / "spec.yaml"
    path.write_text("name: x\nclasses:\n  cat:\n    urls: ['http://example.com/a.jpg']\n"
                    "download:\n  contact: ops@example.org\n"
                    f"output:\n  uri: {tmp_path / 'file'}\n")
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    with caplog.at_level(logging.INFO, logger="pixcrawler"):
        code = main(["build", str(path)])
    assert code != 0
    assert "running in this process: the job fits this machine's 2 cores" in caplog.text
