"""The TEV reproduction script (experiments/tev_repro.py): its statistics, its plan, and tiny end-to-end runs."""

import importlib.util
import json
import math
import os

import pytest

from tests.helpers import REPO

pytest.importorskip("tokenizers", reason="the BPE vocabulary needs Hugging Face tokenizers (the test extra)")

TINY = ["--depths", "1", "2", "--steps", "8", "--width", "16", "--heads", "2", "--context", "16", "--batch", "2",
        "--lrs", "1e-3", "3e-3", "--lr-depth", "1", "--seeds", "2", "--vocab-size", "300", "--eval-batches", "1",
        "--checkpoints", "3", "--gvar-batches", "2", "--max-bytes", "120000"]


@pytest.fixture(scope="module")
def exp():
    spec = importlib.util.spec_from_file_location("tev_repro", os.path.join(REPO, "experiments", "tev_repro.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spearman_matches_known_values(exp):
    assert exp.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert exp.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties take their mean rank: ranks (0.5, 0.5, 2) against (0, 1, 2).
    assert exp.spearman([1, 1, 5], [1, 2, 3]) == pytest.approx(0.8660254, rel=1e-6)
    assert math.isnan(exp.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="one length"):
        exp.spearman([1, 2], [1, 2, 3])


def test_spikes(exp):
    norms = [1.0] * 30
    norms[25] = 10.0
    assert exp.spikes(norms, 3.0) == 1
    assert exp.spikes([1.0] * 30, 3.0) == 0


def test_bootstrap_interval_covers_the_statistic_and_narrows_with_more_data(exp):
    import torch

    g = torch.Generator().manual_seed(0)

    def interval(n):
        x = torch.randn(n, generator=g, dtype=torch.float64).tolist()
        lo, hi = exp.bootstrap(lambda idx: sum(x[i] for i in idx) / len(idx), n, draws=500)
        return sum(x) / n, lo, hi

    m, lo, hi = interval(20)
    assert lo < m < hi
    m2, lo2, hi2 = interval(2000)
    assert lo2 < m2 < hi2 and (hi2 - lo2) < (hi - lo) / 4  # the interval shrinks like 1/sqrt(n)
    assert exp.bootstrap(lambda idx: math.nan, 5, draws=10) == (pytest.approx(math.nan, nan_ok=True),) * 2


def test_mean_sd_and_sign_agreement(exp):
    mean, sd = exp.mean_sd([1.0, 2.0, 3.0])
    assert mean == 2.0 and sd == pytest.approx(1.0)
    assert math.isnan(exp.mean_sd([4.0])[1])
    assert exp.sign_agreement([-1.0, -0.5], 2) == "lower"
    assert exp.sign_agreement([1.0, 0.1, 0.2], 3) == "higher"
    assert exp.sign_agreement([1.0, -0.1], 2) == "mixed"
    # A diverged seed leaves fewer pairs than seeds: no verdict from the survivors.
    assert exp.sign_agreement([-1.0, -0.5], 3) == "n/a (2 of 3)"
    assert exp.sign_agreement([-1.0], 1) == "n/a (1 of 1)"


def test_plan_trains_a_configuration_shared_by_both_sweeps_once(exp):
    args = exp.parse_args(["--depths", "6", "12", "--lrs", "1e-3", "3e-3", "--lr", "3e-3", "--lr-depth", "12", "--seeds", "3"])
    plan = exp.run_plan(args)
    names = [s["name"] for s in plan]
    assert len(names) == len(set(names))
    # depth: 2 depths × 2 attentions; lr: 2 rates × 2 attentions, one rate shared with the depth sweep.
    assert len({s["config_name"] for s in plan}) == 6 and len(plan) == 18
    shared = [s for s in plan if s["depth"] == 12 and s["lr"] == 3e-3]
    assert len(shared) == 6 and all(s["sweeps"] == ["depth", "lr"] for s in shared)
    assert {s["seed"] for s in plan} == {0, 1, 2}


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds must be positive"),
    (["--gvar-batches", "1"], "at least 2"),
    (["--lrs", "0"], "positive and finite"),
    (["--width", "30", "--heads", "4"], "multiple of --heads"),
    (["--vocab-size", "200"], "--vocab-size must be above 256"),
    (["--depths", "0"], "positive layer counts"),
    (["--rank", "0"], "--rank must be in"),
    (["--max-bytes", "0"], "--max-bytes must be positive"),
])
def test_bad_flags_are_refused_by_name(exp, argv, message, capsys):
    with pytest.raises(SystemExit):
        exp.parse_args(argv)
    assert message in capsys.readouterr().err


def test_tiny_sweep_end_to_end(exp, tmp_path):
    out = tmp_path / "exp"
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- experiment:begin -->\nold\n<!-- experiment:end -->\nrest\n")
    summary = exp.main(TINY + ["--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--readme", str(readme)])
    runs = summary["runs"]
    # 2 depths + 2 rates (3e-3 at depth 1 shared) → 5 configurations × 2 attentions... minus the shared one:
    assert len({r["config_name"] for r in runs}) == 6 and len(runs) == 12
    for r in runs:
        assert r["vocab_size"] == 300 and 0 < r["trained_rows"] <= 300
        assert math.isfinite(r["val_loss"]) and r["tev_mean"] > 0 and r["tev_mean_trained"] > 0
        assert len(r["grad_var"]) == 3 and all(c["emb_grad_var"] > 0 and c["emb_grad_var_trained"] > 0 for c in r["grad_var"])
        assert r["tokens"] == 8 * 2 * 16 and not r["diverged"]
    md = (out / "summary.md").read_text()
    assert "byte-level BPE vocabulary of 300 tokens" in md and "| 2 | 0.003 | MHA |" in md
    assert "Spearman" in md and "Learning-rate sweep at 1 layers" in md
    corr = summary["meta"]["correlations"]
    assert corr["runs"] == 12 and -1 <= corr["across_runs"]["tev_mean vs emb_grad_var"]["rho"] <= 1
    assert (out / "tev_repro.png").stat().st_size > 10_000
    assert (out / "tev_curves_by_depth.png").stat().st_size > 10_000
    text = readme.read_text()
    assert text.startswith("intro\n<!-- experiment:begin -->\nGenerated by") and text.endswith("<!-- experiment:end -->\nrest\n")
    assert "old" not in text and "| 2 | 0.003 | MHA |" in text

    # A second sweep into the same folder is refused; --resume trains nothing more; --only-plots re-summarises.
    with pytest.raises(SystemExit, match="--resume"):
        exp.main(TINY + ["--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    before = (out / "runs.jsonl").read_text()
    exp.main(TINY + ["--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--resume"])
    assert (out / "runs.jsonl").read_text() == before
    again = exp.main(TINY + ["--out", str(out), "--only-plots"])
    assert len(again["runs"]) == 12


def _one_depth_sweep(out, *, steps, seeds):
    """A byte-vocabulary sweep of one depth, MHA and MLRA, small enough to train in seconds."""
    return ["--depths", "1", "--no-lr-sweep", "--steps", str(steps), "--width", "16", "--heads", "2", "--context", "8",
            "--batch", "2", "--seeds", str(seeds), "--tokenizer", "bytes", "--eval-batches", "1", "--checkpoints", "1",
            "--gvar-batches", "2", "--max-bytes", "20000", "--out", str(out)]


def test_resume_trains_only_the_missing_runs(exp, tmp_path):
    out = tmp_path / "exp"
    argv = _one_depth_sweep(out, steps=4, seeds=2)
    exp.main(argv)
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["vocab_size"] == 256
    # Drop one finished run and tear the last line, as an interrupted sweep leaves it.
    (out / "runs.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[3][:40])
    summary = exp.main(argv + ["--resume"])
    assert sorted(r["name"] for r in summary["runs"]) == sorted(json.loads(x)["name"] for x in lines)
    # The torn line is gone from the file and every result is on a line of its own.
    again = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["name"] for r in again) == sorted(r["name"] for r in summary["runs"])
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta["resumes"]) == 1 and meta["env"]["command"] != meta["resumes"][0]["command"]


def test_resume_refuses_other_settings(exp, tmp_path):
    out = tmp_path / "exp"
    argv = _one_depth_sweep(out, steps=3, seeds=1)
    exp.main(argv)
    with pytest.raises(SystemExit, match=r"--steps \(sweep 3, now 4\)"):
        exp.main(argv + ["--resume", "--steps", "4"])
    with pytest.raises(SystemExit, match="--max-bytes 15: the text gives"):
        exp.main(argv[:-2] + ["--out", str(tmp_path / "small"), "--max-bytes", "15"])


def test_divergence_rule(exp):
    trained = [8.0 - 0.01 * i for i in range(300)]  # steadily learning
    assert not exp.is_diverged(trained, 5.0, 4096, None)
    lost = trained[:200] + [8.0] * 100  # learnt, then back to where it started
    assert exp.is_diverged(lost, 5.0, 4096, None)
    assert exp.is_diverged(trained, math.inf, 4096, None)
    assert exp.is_diverged(trained[:10], 5.0, 4096, 9)
