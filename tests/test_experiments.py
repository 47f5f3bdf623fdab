"""The depth-sweep experiment script: its statistics and a tiny end-to-end run."""

import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def exp():
    spec = importlib.util.spec_from_file_location("tev_depth", os.path.join(ROOT, "experiments", "tev_depth.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spearman_matches_known_values(exp):
    assert exp.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert exp.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties take their mean rank: ranks (0.5, 0.5, 2) against (0, 1, 2).
    assert exp.spearman([1, 1, 5], [1, 2, 3]) == pytest.approx(0.8660254, rel=1e-6)


def test_count_spikes(exp):
    norms = [1.0] * 30
    norms[25] = 10.0
    assert exp.count_spikes(norms) == 1
    assert exp.count_spikes([1.0] * 30) == 0


def test_tiny_sweep_end_to_end(exp, tmp_path):
    out = tmp_path / "exp"
    exp.main(["--depths", "1", "2", "--steps", "6", "--width", "16", "--heads", "2", "--context", "16",
              "--batch", "2", "--no-sweep", "--eval-batches", "1", "--checkpoints", "2", "--gvar-batches", "2",
              "--max-bytes", "200000", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["runs"]
    assert sorted(r["name"] for r in runs) == ["mha-L1", "mha-L2", "mlra-L1-r4-g1", "mlra-L2-r4-g1"]
    for r in runs:
        assert math.isfinite(r["val_loss"]) and r["tev_mean"] > 0 and r["tev_std"] > 0
        assert len(r["grad_var"]) == 2 and all(g["emb_grad_var"] > 0 for g in r["grad_var"])
        assert r["tokens"] == 6 * 2 * 16
    md = (out / "summary.md").read_text()
    assert "Spearman" in md and "| 2 | MHA |" in md
    assert (out / "tev_loss_by_depth.png").stat().st_size > 10_000
    assert (out / "ppl_tev_vs_depth.png").stat().st_size > 10_000
