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
