"""README.md's table of API error codes names every code the API answers with."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text()


def _codes_in_source() -> set[tuple[str, str]]:
    """(status, code) of every literal ``ApiError(status, "code"`` and error body in serve/."""
    found: set[tuple[str, str]] = set()
    for path in (ROOT / "serve").glob("*.py"):
        text = path.read_text()
        found.update(re.findall(r'ApiError\((\d{3}), "([a-z_]+)"', text))
        found.update((status, code) for code, status in re.findall(
            r'"code": "([a-z_]+)".*?status_code=(\d{3})', text, flags=re.S))
    return found


def _codes_in_readme() -> dict[str, set[str]]:
    """status -> codes, from the table rows of README's error codes."""
    table: dict[str, set[str]] = {}
    for statuses, codes in re.findall(r"^\| ([0-9 /]+) \| (`.+?`) \|", README, flags=re.M):
        for status in statuses.split(" / "):
            table.setdefault(status.strip(), set()).update(re.findall(r"`([a-z_]+)`", codes))
    return table


def test_the_readme_lists_every_error_code_the_api_answers_with():
    source = _codes_in_source()
    assert ("401", "unauthorized") in source and ("421", "host_not_allowed") in source
    table = _codes_in_readme()
    missing = sorted(f"{status} {code}" for status, code in source
                     if code not in table.get(status, set()))
    assert missing == [], f"README's error code table lacks: {missing}"


def test_the_policy_codes_are_in_the_table():
    """The policy's two codes come from one expression (``policy_error``), not a literal."""
    table = _codes_in_readme()
    assert "forbidden_by_policy" in table["403"] and "over_policy_limit" in table["422"]
    assert "forbidden_by_policy" in (ROOT / "serve" / "app.py").read_text()
