"""Docs that are generated or executable stay in sync with the code."""

from pathlib import Path

from dancecore.config.docgen import render

ROOT = Path(__file__).resolve().parent.parent


def test_config_reference_is_fresh():
    committed = (ROOT / "docs" / "config-reference.md").read_text()
    assert committed == render(), "docs/config-reference.md is stale: run `make docs`"


def test_readme_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    first_commands = [line.split("#")[0].strip() for line in readme.splitlines() if line.startswith("make ")][:2]
    assert first_commands == ["make quickstart", "make test"]
