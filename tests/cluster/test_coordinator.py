"""Planning checks of the Ray runner that need no cluster."""

from __future__ import annotations

import pytest

from builder.errors import PixCrawlerError
from cluster.coordinator import check_job_output
from cluster.rayjob import JOB_CONFIG_ENV


@pytest.mark.parametrize("uri", ["datasets/pets", "./pets", "file://pets"])
def test_a_relative_output_under_ray_job_submit_is_refused(monkeypatch, uri):
    monkeypatch.setenv(JOB_CONFIG_ENV, "raysubmit_123")
    with pytest.raises(PixCrawlerError, match="relative path.*ray job submit.*absolute path"):
        check_job_output(uri)


@pytest.mark.parametrize("uri", ["/srv/datasets/pets", "file:///srv/pets", "s3://bucket/pets",
                                 "~/datasets/pets"])
def test_absolute_and_remote_outputs_under_ray_job_submit_pass(monkeypatch, uri):
    monkeypatch.setenv(JOB_CONFIG_ENV, "raysubmit_123")
    check_job_output(uri)


def test_a_relative_output_outside_ray_job_submit_passes(monkeypatch):
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    check_job_output("datasets/pets")
