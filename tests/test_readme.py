"""The README's Python examples run as written (each in a fresh interpreter, in an empty folder), and the
README stays a user's page: its first two commands are the ones .ci/run and new users start from."""

from __future__ import annotations

import pathlib
import re

import pytest

from tests.helpers import run_example

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3, "the README's quickstart lost its examples (the three uses)"


def test_readme_starts_with_the_demo_and_test_commands():
    first = re.search(r"```\w*\n(.*?)```", README, re.S).group(1)
    assert [line.split("#")[0].strip() for line in first.splitlines()] == ["./dev.sh demo", "./dev.sh test"]


def test_readme_stays_short():
    """Internals, method and long results belong in docs/; the README is what a newcomer reads first."""
    assert len(README.splitlines()) <= 250, "move the longer material to a docs/ page"


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code, tmp_path):
    run_example(code, "README", tmp_path)
