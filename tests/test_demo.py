"""`mlra demo` with a tiny configuration, and its embedded default data."""

import json
import math

import pytest

from mlra_kernels import demo
from mlra_kernels.cli import main
from mlra_kernels.monitor import read_jsonl

@pytest.fixture
def reference_path(monkeypatch):
    """Run mlra_attention's pure-torch path on CPU: this test is about the demo, not the kernels, which
    the Triton interpreter (TRITON_INTERPRET=1, set by the kernel tests) would make slow."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


TINY = ["--steps", "6", "--layers", "1", "--width", "16", "--heads", "2", "--context", "16", "--batch", "2",
        "--log-every", "2", "--eval-batches", "2", "--max-bytes", "60000", "--no-progress", "--device", "cpu"]


def test_default_data_is_the_stdlib_in_a_fixed_order():
    files = demo.stdlib_text_files()
    assert len(files) > 100 and files == demo.stdlib_text_files()
    assert not any("site-packages" in f for f in files)
    tokens, source = demo.load_bytes(max_bytes=50_000)
    assert tokens.numel() >= 50_000 - 1000 and int(tokens.max()) < 256 and tokens.dtype.is_floating_point is False
    assert "standard library" in source


@pytest.mark.usefixtures("reference_path")
def test_demo_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["demo", *TINY, "--out", str(out), "--seed", "3"]) == 0
    text = capsys.readouterr().out
    for word in ("train loss", "val ppl", "µ_TEV", "σ_TEV", "tokens/s", "params", "MHA", "MLRA"):
        assert word in text
    assert str(out / "demo.png") in text and str(out / "mha.jsonl") in text
    summary = json.loads((out / "summary.json").read_text())
    by_name = {r["name"]: r for r in summary["results"]}
    assert set(by_name) == {"MHA", "MLRA"}
    assert by_name["MLRA"]["params"] < by_name["MHA"]["params"]
    for name, r in by_name.items():
        assert math.isfinite(r["val_loss"]) and r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert 0 < r["tev_mean"] < 1 and r["tokens_per_s"] > 0
        meta, records = read_jsonl(out / f"{name.lower()}.jsonl")
        assert meta["name"] == name and [rec["step"] for rec in records] == [0, 2, 4, 5]
        assert r["tev_mean"] == records[-1]["tev_mean"]
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.usefixtures("reference_path")
def test_demo_same_seed_same_result_and_user_data(tmp_path, capsys):
    text = tmp_path / "corpus"
    text.mkdir()
    (text / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 300)
    (text / "b.md").write_text("lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 200)
    runs = []
    for i in range(2):
        out = tmp_path / f"r{i}"
        assert main(["demo", *TINY, "--data", str(text), "--out", str(out)]) == 0
        runs.append(json.loads((out / "summary.json").read_text())["results"])
    assert "corpus: 2 files" in capsys.readouterr().out
    for a, b in zip(*runs):
        assert a["val_loss"] == b["val_loss"] and a["tev_mean"] == b["tev_mean"]


def test_demo_bad_arguments(tmp_path, capsys):
    assert main(["demo", *TINY, "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path)]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["demo", *TINY, "--steps", "0", "--out", str(tmp_path)]) == 1
    assert "--steps must be positive" in capsys.readouterr().err
