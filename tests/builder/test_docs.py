"""README.md stays in step with the code it documents."""

from pathlib import Path

from builder.reasons import REASON_DOCS, REASON_STAGE, Reason, reasons_markdown
from builder.records import ACCEPTED_DOCS, ACCEPTED_SCHEMA

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_every_reason_has_a_stage_and_a_doc():
    assert set(REASON_STAGE) == set(Reason) == set(REASON_DOCS)


def test_readme_has_the_reason_table():
    assert reasons_markdown() in README


def test_readme_documents_every_parquet_column():
    assert set(ACCEPTED_DOCS) == set(ACCEPTED_SCHEMA.names)
    for column in ACCEPTED_SCHEMA.names:
        assert f"| `{column}` |" in README, column


def test_the_readme_s_full_spec_example_is_a_valid_spec():
    """The annotated spec under "The dataset spec" parses, and names the defaults it shows."""
    import yaml

    from builder.spec import DownloadSpec, ResourcesSpec, ValidationSpec, parse_spec

    start = README.index("name: pets")
    data = yaml.safe_load(README[start:README.index("```", start)])
    spec = parse_spec(data)
    assert data["download"]["timeout_s"] == DownloadSpec().timeout_s
    assert data["validation"]["nsfw_labels"] == ValidationSpec().nsfw_labels
    assert data["sources"][0]["region"] == spec.sources[0].region == "wt-wt"
    assert data["resources"]["max_buffered_mb"] == ResourcesSpec().max_buffered_mb
