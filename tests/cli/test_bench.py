"""`mlra bench tev` / `mlra bench mlra` and bench/*.py on bad input and around their result files: every
bad flag is one line on stderr naming it, a non-zero status and no result file; a relative --out is the
user's current folder, and so is the default (./bench/results), where a file git tracks is replaced only
through --out; a failed or empty run never replaces an earlier result."""

import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from mlra_kernels.benchmarks import common
from mlra_kernels.benchmarks import mlra as mlra_bench
from mlra_kernels.benchmarks import tev as tev_bench

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY_TEV = ["--max-elems", "1e6", "--rep", "1", "--dtypes", "fp32"]


def _run(main, argv):
    try:
        return main(argv)
    except SystemExit as exc:  # argparse usage errors
        return exc.code


def _one_line_error(capsys, rc, *needles, progress=False):
    """The failure is one line on stderr (after the progress bar, for a run that had started)."""
    err = capsys.readouterr().err
    assert rc not in (0, None), err
    lines = err.strip().splitlines()
    if progress:
        lines = [line for line in lines[:-1] if "error" in line or "Error" in line] + lines[-1:]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in pathlib.Path(folder).rglob("*"))


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------- bad flags: one line, nothing written


@pytest.mark.parametrize("argv, flag, hint", [
    (["--max-elems", "-1"], "--max-elems", "at least 1e6"),
    (["--max-elems", "5e5"], "--max-elems", "at least 1e6"),
    (["--max-elems", "nan"], "--max-elems", "at least 1e6"),
    (["--max-elems", "lots"], "--max-elems", "'lots'"),
    (["--rep", "0"], "--rep", "positive integer"),
    (["--rep", "-2"], "--rep", "positive integer"),
    (["--rep", "1.5"], "--rep", "positive integer"),
    (["--dtypes", "fp8"], "--dtypes", "fp32, bf16, fp16"),
    (["--dtypes", "fp32,"], "--dtypes", "fp32, bf16, fp16"),
    (["--dtypes", ""], "--dtypes", "fp32, bf16, fp16"),
    (["--device", "tpu"], "--device", "cpu"),
    (["--rep"], "--rep", "expected one argument"),
    (["--re", "1"], "--re", "unrecognized"),
])
def test_tev_bad_flag(cwd, capsys, argv, flag, hint):
    rc = _run(tev_bench.main, [*argv, "--out", str(cwd / "out")])
    _one_line_error(capsys, rc, flag, hint, "mlra bench tev: error:")
    assert _files(cwd) == []


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible")
def test_tev_cuda_without_gpu(cwd, capsys):
    _one_line_error(capsys, _run(tev_bench.main, ["--device", "cuda", "--out", "out"]), "--device cuda", "no GPU")
    assert _files(cwd) == []


@pytest.mark.parametrize("argv, flag, hint", [
    (["--T", "-5"], "--T", "positive integer"),
    (["--T", "40", "x"], "--T", "'x'"),
    (["--tokens", "0"], "--tokens", "positive integer"),
    (["--ranks", "foo"], "--ranks", "d/N"),
    (["--ranks", "d/0"], "--ranks", "d/N"),
    (["--ranks", "d/128"], "--ranks d/128", "r would be 0"),
    (["--groups", "0"], "--groups", "H or a positive integer"),
    (["--groups", "3"], "--groups 3", "does not divide H=2"),
    (["--dtypes", "fp8"], "--dtypes", "'bf16', 'fp16', 'fp32'"),
    (["--models", "tiny"], "--models", "'small', 'medium', 'large'"),
    (["--out", "a/b"], "--out", "without folders"),
    (["--out", ".json"], "--out", "without folders"),
    (["--smo"], "--smo", "unrecognized"),
])
def test_mlra_bad_flag(cwd, capsys, monkeypatch, argv, flag, hint):
    ran = []
    monkeypatch.setattr(mlra_bench, "correctness_gate", lambda *a: ran.append(a))
    argv = [*argv, "--out-dir", str(cwd / "out")]
    rc = _run(mlra_bench.main, argv if "--smo" in argv else ["--smoke", *argv])
    _one_line_error(capsys, rc, flag, hint, "mlra bench mlra: error:")
    assert ran == [] and _files(cwd) == []


@pytest.mark.parametrize("make, out, hint", [
    (lambda cwd: (cwd / "out").write_text("a file"), "out", "is a file, expected a folder"),
    (lambda cwd: (cwd / "out").write_text("a file"), "out/under", "cannot be created: "),
    (lambda cwd: (cwd / "out" / "tev_cpu.json").mkdir(parents=True), "out", "tev_cpu.json there is a folder"),
])
def test_tev_bad_out_is_refused_before_measuring(cwd, capsys, monkeypatch, make, out, hint):
    monkeypatch.setattr(tev_bench, "check_small", lambda device: pytest.fail("measured before checking --out"))
    make(cwd)
    before = _files(cwd)
    _one_line_error(capsys, _run(tev_bench.main, [*TINY_TEV, "--out", out]), f"--out {cwd / out}", hint)
    assert _files(cwd) == before


def test_mlra_bad_out_dir_is_refused_before_measuring(cwd, capsys, monkeypatch):
    monkeypatch.setattr(mlra_bench, "correctness_gate", lambda *a: pytest.fail("measured before checking --out-dir"))
    (cwd / "f").write_text("x")
    _one_line_error(capsys, _run(mlra_bench.main, ["--smoke", "--out-dir", "f"]), "--out-dir", "is a file")
    assert _files(cwd) == ["f"]


def test_mlra_cpu_benchmark_refuses_to_time_the_interpreter(cwd, capsys, monkeypatch):
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is visible")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _one_line_error(capsys, _run(mlra_bench.main, ["--T", "64", "--out-dir", "out"]),
                    "TRITON_INTERPRET=1 would time the Triton interpreter", "--smoke")
    assert _files(cwd) == []


def test_mlra_cpu_benchmark_default_grid(monkeypatch):
    """Without a GPU the benchmark's defaults are the CPU grid: GPT-2 small, T = 1024, fp32, every latent shape."""
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is visible")
    args = mlra_bench.build_parser().parse_args([])
    rows = mlra_bench.grid(args, __import__("torch").device("cpu"))
    assert {(d, H, T, dt) for _, d, H, T, _, _, _, dt in rows} == {(768, 12, 1024, "fp32")}
    assert sorted((g, r) for *_, g, r, _ in rows) == [(1, 96), (1, 192), (1, 384), (12, 8), (12, 16), (12, 32)]


def test_gpu_rows_keep_the_fastest_sdpa_backend(monkeypatch):
    """The GPU branch of a row times every SDPA backend that runs and keeps the fastest (timers stubbed:
    no GPU here); a backend that raises is skipped, and a row no backend can run is an error."""
    torch = __import__("torch")
    leaf = torch.ones(2, requires_grad=True)
    speed = {"flash": 3.0, "efficient": 2.0}

    def make(name):
        if name not in speed:
            raise RuntimeError(f"{name} does not run here")
        return (leaf * speed[name]).sum()

    monkeypatch.setattr(mlra_bench, "timings", lambda fn, leaves, go, cuda: {"fwdbwd": {"ms": fn().item()}})
    name, t = mlra_bench.best_backend(make, [leaf], torch.tensor(1.0), True)
    assert name == "efficient" and t["fwdbwd"]["ms"] == 4.0

    def none_runs(name):
        raise RuntimeError("no kernel")

    with pytest.raises(mlra_bench.BenchError, match="no SDPA backend"):
        mlra_bench.best_backend(none_runs, [leaf], torch.tensor(1.0), True)


def test_bad_flags_through_mlra_bench_in_a_subprocess(tmp_path):
    """The real commands: exactly one stderr line, status != 0, nothing in the current folder."""
    for argv, flag in ((["tev", "--rep", "0"], "--rep"), (["mlra", "--smoke", "--T", "-5"], "--T")):
        proc = subprocess.run([sys.executable, "-m", "mlra_kernels.cli", "bench", *argv, "--out-dir" if argv[0] == "mlra"
                               else "--out", "good"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        assert len(proc.stderr.strip().splitlines()) == 1 and flag in proc.stderr, proc.stderr
        assert _files(tmp_path) == []


# ---------------------------------------------------------------- where results go


def test_relative_out_is_the_current_folder(tmp_path):
    """Run from another folder, `--out good` is <cwd>/good, never <checkout>/good."""
    assert not (REPO / "good").exists()
    proc = subprocess.run([sys.executable, "-m", "mlra_kernels.cli", "bench", "tev", *TINY_TEV, "--out", "good"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "good" / "tev_cpu.json"
    assert f"wrote {path}" in proc.stdout
    assert [r["dtype"] for r in json.loads(path.read_text())["rows"]] == ["fp32"]
    assert not (REPO / "good").exists()
    assert _files(tmp_path) == ["good", "good/tev_cpu.json"]  # no temporary file left


def test_default_folder_is_the_current_folder_even_from_the_checkout(cwd):
    """The package runs from its source checkout here, and still writes under the current folder."""
    if common.SOURCE_CHECKOUT is None:
        pytest.skip("the package is not running from its source checkout")
    assert common.SOURCE_CHECKOUT == REPO
    assert common.default_results_dir() == cwd / "bench" / "results"
    assert common.results_dir(None) == cwd / "bench" / "results"
    assert common.results_dir("bench/results") == cwd / "bench" / "results"


def test_default_folder_without_a_checkout_is_the_current_folder(cwd, monkeypatch):
    monkeypatch.setattr(common, "SOURCE_CHECKOUT", None)
    assert common.default_results_dir() == cwd / "bench" / "results"
    assert common.results_dir("r") == cwd / "r"
    assert common.results_dir(cwd / "abs") == cwd / "abs"


def test_tev_default_out_goes_to_the_current_folders_bench_results(tmp_path, monkeypatch, capsys):
    """A tiny run without --out: ./bench/results of the current folder, not the checkout's."""
    checkout = tmp_path / "checkout"
    monkeypatch.setattr(common, "SOURCE_CHECKOUT", checkout)
    monkeypatch.chdir(tmp_path)
    assert tev_bench.main(TINY_TEV) == 0
    path = tmp_path / "bench" / "results" / "tev_cpu.json"
    assert f"wrote {path}" in capsys.readouterr().out
    assert _files(tmp_path) == ["bench", "bench/results", "bench/results/tev_cpu.json"]


def _tracked_results():
    """{path: sha256} of every result file git tracks in the checkout's bench/results."""
    names = subprocess.run(["git", "ls-files", "-z", "--", "bench/results"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    files = {name: hashlib.sha256((REPO / name).read_bytes()).hexdigest() for name in names if name}
    assert "bench/results/tev_cpu.json" in files
    return files


def test_mlra_bench_from_another_folder_leaves_the_committed_results_byte_identical(tmp_path):
    """`mlra bench tev` without --out, run from another folder with the package from this checkout: the
    result goes to ./bench/results there, and the checkout's tracked results are byte for byte the same."""
    if common.SOURCE_CHECKOUT != REPO or not (REPO / ".git").exists():
        pytest.skip("needs the package running from its git checkout")
    before = _tracked_results()
    proc = subprocess.run([sys.executable, "-m", "mlra_kernels.cli", "bench", "tev", *TINY_TEV], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "bench" / "results" / "tev_cpu.json"
    assert f"wrote {path}" in proc.stdout
    data = json.loads(path.read_text())
    assert data["meta"]["clock"]["resolution_s"] > 0 and "rerun_at_floor" in data["meta"]
    assert set(data["rows"][0]["inner_reps"]) == {"tev", "one_liner", "sum"}
    assert _tracked_results() == before


def test_from_the_checkout_root_without_out_the_committed_results_are_refused_before_measuring():
    """Run from the checkout root, the default ./bench/results is the committed results: without --out the
    module refuses, in one line that says how to replace them, and nothing there changes."""
    if common.SOURCE_CHECKOUT != REPO or not (REPO / ".git").exists():
        pytest.skip("needs the package running from its git checkout")
    before = _tracked_results()
    listing = sorted(os.listdir(REPO / "bench" / "results"))
    proc = subprocess.run([sys.executable, "-m", "mlra_kernels.benchmarks.tev", *TINY_TEV], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    line, = proc.stderr.strip().splitlines()
    assert "--out not given" in line and "tracked by git" in line and "pass --out bench/results to replace it" in line
    assert _tracked_results() == before and sorted(os.listdir(REPO / "bench" / "results")) == listing


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git repository with committed results in bench/results (tev, decode, mlra), as the current folder."""
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    for name in ("tev_cpu", "decode_cpu", "mlra_cpu"):
        (results / f"{name}.json").write_text('{"committed": true}\n')
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "add", "bench"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _stub_tev(monkeypatch):
    monkeypatch.setattr(tev_bench, "check_small", lambda device: None)
    monkeypatch.setattr(tev_bench, "bench_one", lambda v, d, name, device, rep: {
        "speedup_vs_one_liner": 1.0, "gbps": 1.0, "one_liner_gbps": 1.0, "sum_gbps": 1.0,
        "fraction_of_sum_read_rate": 1.0})


def test_a_tracked_result_is_replaced_only_through_out(repo, capsys, monkeypatch):
    from mlra_kernels.benchmarks import decode

    committed = '{"committed": true}\n'
    monkeypatch.setattr(tev_bench, "check_small", lambda device: pytest.fail("measured before refusing"))
    monkeypatch.setattr(decode, "check_decode", lambda *a: pytest.fail("measured before refusing"))
    monkeypatch.setattr(mlra_bench, "correctness_gate", lambda *a: pytest.fail("measured before refusing"))
    before = _files(repo)
    for main, argv, flag in ((tev_bench.main, TINY_TEV, "--out"), (decode.main, ["--no-generate"], "--out"),
                             (mlra_bench.main, ["--smoke", "--out", "mlra_cpu"], "--out-dir")):
        line = _one_line_error(capsys, main(argv), f"{flag} not given", "tracked by git",
                               f"pass {flag} bench/results to replace it, or {flag} FOLDER")
        assert "no result file written" in line
    assert _files(repo) == before  # no probe file, no new folder
    assert all((repo / "bench" / "results" / f"{n}.json").read_text() == committed for n in ("tev_cpu", "decode_cpu",
                                                                                             "mlra_cpu"))

    _stub_tev(monkeypatch)
    assert tev_bench.main([*TINY_TEV, "--out", "bench/results"]) == 0  # named: replaced
    assert json.loads((repo / "bench" / "results" / "tev_cpu.json").read_text())["rows"][0]["gbps"] == 1.0
    (repo / "bench" / "results" / "new.json").write_text("{}")  # an untracked file is no reason to refuse
    path = common.write_results("new", [{"a": 1}])
    assert path == repo / "bench" / "results" / "new.json"
    with pytest.raises(ValueError, match="out_dir not given: the default .*decode_cpu.json is tracked by git"):
        common.write_results("decode_cpu", [{"a": 1}])
    assert (repo / "bench" / "results" / "decode_cpu.json").read_text() == committed


def test_bench_scripts_replace_the_committed_results_only_from_the_checkout_root(repo, tmp_path, monkeypatch,
                                                                                   capsys):
    """`python bench/bench_tev.py` from the checkout root names bench/results (the README's way to
    regenerate the committed results); from any other folder a script follows the rule of `mlra bench`."""
    script = repo / "bench" / "bench_tev.py"
    assert common.script_default_out(script) == repo / "bench" / "results"
    assert common.script_default_out(REPO / "bench" / "bench_tev.py") is None  # the current folder is `repo`
    _stub_tev(monkeypatch)
    assert tev_bench.main(TINY_TEV, default_out=common.script_default_out(script)) == 0
    assert json.loads((repo / "bench" / "results" / "tev_cpu.json").read_text())["rows"][0]["gbps"] == 1.0
    text = " ".join(tev_bench.build_parser("bench_tev.py", repo / "bench" / "results").format_help().split())
    assert "(default: bench/results, the committed results of this checkout, which this run replaces)" in text

    elsewhere = repo / "sub"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert common.script_default_out(script) is None
    assert tev_bench.main(TINY_TEV, default_out=common.script_default_out(script)) == 0
    assert (elsewhere / "bench" / "results" / "tev_cpu.json").is_file()


def test_git_tracked_outside_a_repository_and_without_git(tmp_path, monkeypatch):
    (tmp_path / "r.json").write_text("{}")
    assert not common.git_tracked(tmp_path / "r.json")  # not a repository
    assert not common.git_tracked(tmp_path / "none" / "r.json")

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(common.subprocess, "run", no_git)
    monkeypatch.setattr(common, "SOURCE_CHECKOUT", tmp_path)
    assert common.git_tracked(tmp_path / "r.json")  # git cannot tell: inside the checkout, kept
    assert not common.git_tracked(tmp_path / "missing.json")


def _fake_row(model, d, H, T, B, g, r, dtype_name, device):
    return {"model": model, "d": d, "H": H, "T": T, "B": B, "g": g, "r": r, "dtype": dtype_name,
            "ours_fwdbwd_ms": 1.0, "speedup_fwdbwd_vs_unfused": 1.0, "ours_fwd_ms": 1.0, "speedup_fwd_vs_mha": 1.0,
            "saved_ratio_vs_unfused": 1.0}


def test_mlra_relative_out_dir_and_explicit_flags_under_smoke(cwd, capsys, monkeypatch):
    """--smoke sets defaults only: flags given are used as given; a relative --out-dir is the cwd's."""
    rows = []
    monkeypatch.setattr(mlra_bench, "correctness_gate", lambda device, dtypes: None)
    monkeypatch.setattr(mlra_bench, "bench_row", lambda *a: rows.append(a[:8]) or _fake_row(*a))
    assert mlra_bench.main(["--smoke", "--T", "16", "--tokens", "32", "--groups", "2", "--dtypes", "fp16",
                            "--out-dir", "res", "--out", "mine.json"]) == 0
    assert [(m, d, H, T, B, g, r, dt) for m, d, H, T, B, g, r, dt in rows] == [("smoke", 64, 2, 16, 2, 2, 8, "fp16")]
    data = json.loads((cwd / "res" / "mine.json").read_text())
    assert data["rows"][0]["T"] == 16 and data["meta"]["device_type"] in ("cpu", "cuda")
    assert f"wrote {cwd / 'res' / 'mine.json'}" in capsys.readouterr().out

    rows.clear()
    assert mlra_bench.main(["--smoke", "--out-dir", "res"]) == 0
    expected_dtypes = ["fp32", "bf16"] if not __import__("torch").cuda.is_available() else ["bf16", "fp16"]
    assert [(T, g, r) for _, _, _, T, _, g, r, _ in rows][::2] == [(40, 1, 16), (40, 2, 8)]
    assert [row[7] for row in rows[:2]] == expected_dtypes


# ---------------------------------------------------------------- failures never replace a result


def test_failed_check_keeps_the_earlier_result(cwd, capsys, monkeypatch):
    out = cwd / "out"
    out.mkdir()
    (out / "tev_cpu.json").write_text('{"earlier": "good"}\n')
    calls = []

    def failing(v, d, name, device, rep):
        calls.append(name)
        if len(calls) == 2:
            raise common.BenchError(f"tev disagrees with the one-liner on {v}x{d} {name}")
        return {"speedup_vs_one_liner": 1.0, "gbps": 1.0, "one_liner_gbps": 1.0, "sum_gbps": 1.0,
                "fraction_of_sum_read_rate": 1.0}

    monkeypatch.setattr(tev_bench, "check_small", lambda device: None)
    monkeypatch.setattr(tev_bench, "bench_one", failing)
    rc = tev_bench.main(["--max-elems", "1e6", "--dtypes", "fp32,bf16", "--out", "out"])
    _one_line_error(capsys, rc, "disagrees with the one-liner", "no result file written", progress=True)
    assert (out / "tev_cpu.json").read_text() == '{"earlier": "good"}\n'
    assert _files(cwd) == ["out", "out/tev_cpu.json"]


def test_failed_gate_leaves_no_folder(cwd, capsys, monkeypatch):
    def gate(device, dtypes):
        raise common.BenchError("correctness check failed (torch.float32, out)")

    monkeypatch.setattr(mlra_bench, "correctness_gate", gate)
    _one_line_error(capsys, mlra_bench.main(["--smoke", "--out-dir", "new/deep"]), "correctness check failed")
    assert _files(cwd) == []


def test_interrupt_and_unforeseen_errors_are_one_line(cwd, capsys, monkeypatch):
    def interrupted(device):
        raise KeyboardInterrupt

    monkeypatch.setattr(tev_bench, "check_small", interrupted)
    assert tev_bench.main([*TINY_TEV, "--out", "o"]) == 130
    _one_line_error(capsys, 130, "interrupted", "no result file written")

    def boom(device):
        raise RuntimeError("DefaultCPUAllocator: not enough memory\nsecond line")

    monkeypatch.setattr(tev_bench, "check_small", boom)
    _one_line_error(capsys, tev_bench.main([*TINY_TEV, "--out", "o"]), "RuntimeError: DefaultCPUAllocator", "--traceback")
    with pytest.raises(RuntimeError):
        tev_bench.main([*TINY_TEV, "--out", "o", "--traceback"])
    assert _files(cwd) == []


def test_write_results_refuses_no_rows_and_writes_atomically(cwd, monkeypatch):
    (cwd / "r.json").write_text("earlier")
    with pytest.raises(ValueError, match="nothing was measured"):
        common.write_results("r", [], out_dir=cwd)
    with pytest.raises(ValueError, match="without folders"):
        common.write_results("../r", [{"a": 1}], out_dir=cwd)

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(common.os, "replace", full_disk)
    with pytest.raises(OSError):
        common.write_results("r", [{"a": 1}], out_dir=cwd)
    assert (cwd / "r.json").read_text() == "earlier" and _files(cwd) == ["r.json"]
    monkeypatch.undo()
    path = common.write_results("r", [{"a": 1}], out_dir=cwd)
    assert json.loads(path.read_text())["rows"][0]["a"] == 1 and _files(cwd) == ["r.json"]


# ---------------------------------------------------------------- bench/report.py, bench/conftest.py


def _report():
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_errors_are_one_line(tmp_path, capsys):
    report = _report()
    _one_line_error(capsys, report.main(["--readme", str(tmp_path / "nope.md")]), "--readme", "no such file")
    (tmp_path / "R.md").write_text("no blocks\n")
    _one_line_error(capsys, report.main(["--readme", str(tmp_path / "R.md")]), "R.md", "block to rewrite")
    assert (tmp_path / "R.md").read_text() == "no blocks\n"
    (tmp_path / "tev_cpu.json").write_text('{"meta": ')
    with pytest.raises(report.ReportError, match="tev_cpu.json: cannot read it as JSON"):
        report.render(tmp_path)
    (tmp_path / "tev_cpu.json").write_text('{"meta": {}, "rows": [{"shape": [1, 2]}]}')
    with pytest.raises(report.ReportError, match="tev_cpu.json: no field"):
        report.render(tmp_path)


def test_pytest_benchmark_failure_keeps_the_earlier_json(tmp_path):
    """bench/conftest.py: a run with a failing case leaves --benchmark-json's earlier file as it was."""
    pytest.importorskip("pytest_benchmark")
    (tmp_path / "bench").mkdir()
    shutil.copy(REPO / "bench" / "conftest.py", tmp_path / "bench" / "conftest.py")
    (tmp_path / "bench" / "test_x.py").write_text(
        "def test_ok(benchmark):\n    benchmark(sum, [1])\n\n"
        "def test_fails(benchmark):\n    benchmark(sum, [1])\n    assert False\n")
    (tmp_path / "r.json").write_text('{"earlier": "good"}')
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", "--benchmark-json=r.json",
         "--benchmark-min-rounds=1", "--benchmark-max-time=0.01", "--benchmark-warmup=off"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")),
    )
    assert proc.returncode != 0
    assert "no results were written" in proc.stdout, proc.stdout
    assert (tmp_path / "r.json").read_text() == '{"earlier": "good"}'
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_decode_benchmark_tiny_run_writes_rows_with_speedups(tmp_path):
    from mlra_kernels.benchmarks import decode

    rc = decode.main(["--batches", "2", "--lengths", "16,40", "--width", "64", "--heads", "4", "--rep", "1",
                      "--no-generate", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "decode_cpu.json").read_text())
    rows = data["rows"]
    variants = decode.VARIANTS + decode.TORCH_PATH_VARIANTS
    assert {(r["S"], r["variant"]) for r in rows} == {(S, v) for S in (16, 40) for v in variants}
    for r in rows:
        assert r["ms"] > 0 and r["bytes"] > r["cache_bytes"] > 0 and r["speedup_vs_mha"] > 0
        assert r["cache_numbers_per_token"] == (2 * 64 if r["variant"] == "mha" else 2 * 16)
        # Tiny layers: the stack is as deep as it may be, so each layer's data has left the caches.
        assert r["stack_depth"] == decode.MAX_STACK
        expected_path = None if r["variant"] == "mha" else "torch" if r["variant"].endswith("-torch") else "cpu-kernel"
        assert r["decode_path"] == expected_path


def test_decode_benchmark_in_bfloat16_writes_its_own_file(tmp_path):
    from mlra_kernels.benchmarks import decode

    rc = decode.main(["--batches", "1", "--lengths", "40", "--width", "64", "--heads", "4", "--rep", "1",
                      "--variants", "mha,mlra-gH", "--dtype", "bf16", "--no-generate", "--out", str(tmp_path)])
    assert rc == 0 and [p.name for p in tmp_path.iterdir()] == ["decode_cpu_bf16.json"]
    rows = json.loads((tmp_path / "decode_cpu_bf16.json").read_text())["rows"]
    assert {r["dtype"] for r in rows} == {"bfloat16"}
    assert [r["decode_path"] for r in rows if r["variant"] == "mlra-gH"] == ["cpu-kernel"]


def test_decode_benchmark_refuses_bad_flags(tmp_path, capsys):
    from mlra_kernels.benchmarks import decode

    assert decode.main(["--width", "60", "--heads", "4", "--out", str(tmp_path)]) == 1
    assert "--width 60 must be a multiple of 4·--heads = 16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        decode.main(["--variants", "mqa", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_generate_rounds_report_the_median_and_the_nearest_rank_percentiles():
    from mlra_kernels.benchmarks import decode

    # Five rounds: the median is the third fastest; the 20th/80th percentiles of the rate are the second
    # slowest and the second fastest rounds, whatever order they were timed in.
    assert decode._time_quantiles([5.0, 1.0, 4.0, 2.0, 3.0]) == (3.0, 4.0, 2.0)
    assert decode._time_quantiles([7.0]) == (7.0, 7.0, 7.0)
    spec = importlib.util.spec_from_file_location("report", pathlib.Path(__file__).parents[2] / "bench" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    row = {"op": "generate", "variant": "mha", "B": 4, "prompt": 512, "new_tokens": 32, "tokens_per_s": 100.0,
           "tokens_per_s_p20": 90.0, "tokens_per_s_p80": 110.0, "rounds": 5}
    old = {k: v for k, v in row.items() if not k.startswith("tokens_per_s_") and k != "rounds"}
    text = report.decode_table({"meta": {}, "rows": [row, dict(old, variant="mlra-g1")]})
    assert "| mha | 4 | 512 | 32 | 100.0 | 90.0–110.0 (5 rounds) |" in text
    assert "| mlra-g1 | 4 | 512 | 32 | 100.0 | – |" in text
