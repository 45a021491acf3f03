"""Labels in any script and an emoji anywhere in the spec, end to end through the API on the
session's Ray: each used to fail the job (Ray's metric tags took ASCII only; the launcher's JSON
reached the job as lone surrogates and failed it when it wrote the card)."""

from __future__ import annotations

from pathlib import Path

from tests.serve.conftest import job_spec

LABELS = ("café", "猫", "😺")


def test_labels_in_any_script_and_an_emoji_in_the_description_build_on_ray(serve_app,
                                                                         sandbox):
    key = serve_app.new_key("unicode")
    spec = job_spec(sandbox, name="unicodejob", target=2,
                    description="Cats 😺, cafés and 猫 from the sandbox.")
    spec["classes"] = {label: [f"{c} photo"] for label, c in zip(LABELS, ("cat", "dog", "bird"))}
    job_id = serve_app.submit(key, spec)
    job = serve_app.wait(key, job_id)
    assert job["state"] == "succeeded", job["error"]
    assert {label: c["accepted"] for label, c in job["classes"].items()} == \
        dict.fromkeys(LABELS, 2)
    out = Path(job["output_uri"])
    assert (out / "classes.txt").read_text(encoding="utf-8").split() == sorted(LABELS)
    assert {p.name for p in (out / "imagefolder").glob("*/*")} == set(LABELS)
    assert "Cats 😺, cafés and 猫" in (out / "README.md").read_text(encoding="utf-8")
    assert job["spec"]["description"] == spec["description"]
    samples = serve_app.call("GET", f"/v1/jobs/{job_id}/samples", key, params={"label": "猫"})
    assert samples.status_code == 200 and len(samples.json()["samples"]) == 2
