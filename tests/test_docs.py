"""The documentation site (docs/): its Python examples run as written, and its generated blocks match the
result files they are generated from."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO, run_example

DOCS = REPO / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
BLOCKS = [(page, code) for page in PAGES
          for code in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)]


def _load(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ImportError:  # a parent package is missing
        return True


def _block(text: str, begin: str, end: str) -> str:
    assert text.count(begin) == 1 and text.count(end) == 1, f"expected one {begin} ... {end} block"
    return text[text.index(begin) + len(begin):text.index(end)].strip("\n")


def test_every_page_is_in_the_site_nav():
    nav = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    assert [p for p in PAGES if f" {p.relative_to(DOCS).as_posix()}\n" not in nav] == []


@pytest.mark.parametrize("page, code", BLOCKS, ids=[
    f"{p.relative_to(DOCS).as_posix()}-{sum(q == p for q, _ in BLOCKS[:i])}" for i, (p, _) in enumerate(BLOCKS)])
def test_docs_example_runs(page, code, tmp_path):
    run_example(code, page.name, tmp_path)


def test_benchmark_tables_are_generated_from_the_results():
    """docs/benchmarks.md and the README hold exactly what bench/report.py makes of bench/results/."""
    report = _load("bench_report", REPO / "bench" / "report.py")
    page = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert _block(page, report.BEGIN, report.END) == report.render(), \
        "run: python bench/report.py --readme README.md --docs docs/benchmarks.md"
    assert _block(readme, report.HEADLINE_BEGIN, report.HEADLINE_END) == report.headline(), \
        "run: python bench/report.py --readme README.md --docs docs/benchmarks.md"


def test_report_rewrites_both_blocks_or_neither(tmp_path, capsys):
    report = _load("bench_report", REPO / "bench" / "report.py")
    readme, page = tmp_path / "README.md", tmp_path / "benchmarks.md"
    readme.write_text(f"intro\n{report.HEADLINE_BEGIN}\nold\n{report.HEADLINE_END}\nrest\n")
    page.write_text("no block\n")
    assert report.main(["--readme", str(readme), "--docs", str(page)]) == 1
    assert "benchmarks.md: no '<!-- bench-tables:begin -->'" in capsys.readouterr().err
    assert "old" in readme.read_text() and page.read_text() == "no block\n"
    page.write_text(f"{report.BEGIN}\n{report.END}\n")
    assert report.main(["--readme", str(readme), "--docs", str(page)]) == 0
    assert readme.read_text() == f"intro\n{report.HEADLINE_BEGIN}\n{report.headline()}\n{report.HEADLINE_END}\nrest\n"
    assert page.read_text() == f"{report.BEGIN}\n{report.render()}\n{report.END}\n"


def test_reproduction_block_is_generated_from_the_summary(monkeypatch):
    """docs/reproduction.md holds what experiments/tev_repro.py writes from its committed summary, and
    its plots are copies of the committed ones."""
    pytest.importorskip("matplotlib")
    exp = _load("tev_repro", REPO / "experiments" / "tev_repro.py")
    monkeypatch.chdir(REPO)  # the block names its files relative to the checkout's root
    out, page = "experiments/results/cpu", "docs/reproduction.md"
    summary = (REPO / out / "summary.md").read_text(encoding="utf-8")
    text = (REPO / page).read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\((assets/[^)]+)\)", _block(text, exp.README_BEGIN, exp.README_END))
    assert [pathlib.PurePosixPath(link).name for link in links] == ["tev_repro.png", "tev_curves_by_depth.png"]
    expected = exp.page_block(out, summary, page, links)
    assert text[text.index(exp.README_BEGIN):text.index(exp.README_END) + len(exp.README_END)] == expected, \
        f"run: python experiments/tev_repro.py --only-plots --out {out} --page {page}"
    for link in links:
        copy = DOCS / link
        assert copy.read_bytes() == (REPO / out / copy.name).read_bytes(), f"{copy} is not the committed plot"


def test_page_plots_are_copied_beside_a_page_outside_their_folder(tmp_path):
    exp = _load("tev_repro", REPO / "experiments" / "tev_repro.py")
    (tmp_path / "out").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "out" / "p.png").write_bytes(b"png")
    assert exp.page_plots(str(tmp_path / "README.md"), [str(tmp_path / "out" / "p.png")]) == ["out/p.png"]
    assert exp.page_plots(str(tmp_path / "docs" / "r.md"), [str(tmp_path / "out" / "p.png")]) == ["assets/r/p.png"]
    assert (tmp_path / "docs" / "assets" / "r" / "p.png").read_bytes() == b"png"


def test_site_builds_strictly(tmp_path):
    """mkdocs build --strict: a broken link, anchor, cross-reference or docstring fails (the docs extra)."""
    missing = [m for m in ("mkdocs", "material", "mkdocstrings_handlers.python") if _missing(m)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (the docs extra: pip install '.[docs]')")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
