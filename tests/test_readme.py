"""The README's Python examples run as written (each in a fresh interpreter, in an empty folder), and the
README stays a user's page: its first two commands are the ones .ci/run and new users start from."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

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
    if "transformers" in code and importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (pip install '.[transformers]')")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TRITON_INTERPRET", None)  # as a user runs them (the kernel tests set it for themselves)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"README example failed:\n{code}\n--- stderr ---\n{proc.stderr[-3000:]}"
