"""The `mlra` command: tev on every checkpoint format, plot, bench, info, and a subprocess run."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mlra_kernels import cli
from mlra_kernels.cli import main
from mlra_kernels.models import GPT2, GPT2Config
from tests.helpers import REPO as REPO_ROOT

REPO = str(REPO_ROOT)


def _expected(E):
    E = E.to(torch.float64)
    per_row = E.std(dim=1, unbiased=False)
    return per_row.mean().item(), per_row.std(unbiased=False).item()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT2(GPT2Config(vocab_size=101, block_size=8, n_layer=1, n_head=2, n_embd=24))
    with torch.no_grad():
        m.wte.weight.mul_(torch.rand(101, 1) * 3)
    return m


def _tev_json(capsys, *argv):
    assert main(["tev", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_tev_state_dict_and_wrapped_checkpoint(tmp_path, capsys, model):
    mean, std = _expected(model.wte.weight.detach())
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    torch.save({"model": model.state_dict(), "step": 3}, tmp_path / "ckpt.pt")
    for name in ("sd.pt", "ckpt.pt"):
        out = _tev_json(capsys, str(tmp_path / name))
        assert out["key"] == "wte.weight" and out["shape"] == [101, 24]
        assert out["tev_mean"] == pytest.approx(mean, rel=1e-5) and out["tev_std"] == pytest.approx(std, rel=1e-4)
    assert main(["tev", str(tmp_path / "sd.pt")]) == 0
    text = capsys.readouterr().out
    assert "µ_TEV" in text and f"{mean:.6f}" in text


def test_tev_safetensors_and_key_errors(tmp_path, capsys, model):
    safetensors = pytest.importorskip("safetensors.torch", reason="safetensors is an optional dependency")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state["transformer.wpe.weight"] = state.pop("wpe.weight")
    safetensors.save_file(state, str(tmp_path / "m.safetensors"))
    out = _tev_json(capsys, str(tmp_path / "m.safetensors"))
    assert out["key"] == "wte.weight"
    out = _tev_json(capsys, str(tmp_path / "m.safetensors"), "--key", "transformer.wpe.weight")
    assert out["shape"] == [8, 24]
    assert main(["tev", str(tmp_path / "m.safetensors"), "--key", "nope"]) == 1
    err = capsys.readouterr().err
    assert "--key 'nope' is not in" in err and "2-D tensors: " in err and "wte.weight" in err
    safetensors.save_file({"a.weight": torch.randn(4, 4)}, str(tmp_path / "other.safetensors"))
    assert main(["tev", str(tmp_path / "other.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "no token-embedding key found" in err and "a.weight" in err and "--key" in err
    assert main(["tev", str(tmp_path / "missing.pt")]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["tev", str(tmp_path / "junk.pt")]) == 1
    err = capsys.readouterr().err
    assert "cannot read" in err and "Unsupported operand" not in err
    torch.save({"wte.weight": torch.randint(-128, 127, (16, 8), dtype=torch.int8)}, tmp_path / "int8.pt")
    assert main(["tev", str(tmp_path / "int8.pt")]) == 1
    assert "has dtype int8; TEV is defined on a floating-point embedding" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_demo_on_cuda_without_a_gpu_is_a_clear_error(capsys):
    assert main(["demo", "--device", "cuda", "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "torch sees no CUDA device" in err and "leave --device out" in err and "Traceback" not in err


def test_tev_transformers_folder(tmp_path, capsys):
    transformers = pytest.importorskip("transformers", reason="transformers is an optional dependency")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    hf = transformers.GPT2LMHeadModel(cfg)
    hf.save_pretrained(tmp_path / "hf")
    mean, std = _expected(hf.transformer.wte.weight.detach())
    out = _tev_json(capsys, str(tmp_path / "hf"))
    assert out["key"].endswith("wte.weight") and out["shape"] == [97, 32]
    assert out["tev_mean"] == pytest.approx(mean, rel=1e-5) and out["tev_std"] == pytest.approx(std, rel=1e-4)
    assert main(["tev", str(tmp_path)]) == 1
    assert "folder without" in capsys.readouterr().err


def test_plot_command(tmp_path, capsys):
    from mlra_kernels import TEVMonitor

    emb = torch.nn.Embedding(50, 8)
    mon = TEVMonitor(emb, every=1, path=tmp_path / "a.jsonl")
    for step in range(4):
        mon.step(step, loss=1.0 / (step + 1))
    mon.close()
    assert main(["plot", str(tmp_path / "a.jsonl"), str(tmp_path / "a.jsonl"), "-o", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(tmp_path / "a.jsonl")]) == 0
    assert (tmp_path / "a.png").exists()
    assert main(["plot", str(tmp_path / "none.jsonl")]) == 1
    assert "no such log" in capsys.readouterr().err


def test_bench_runs_the_shipped_modules(tmp_path, capsys, monkeypatch):
    """`mlra bench` runs mlra_kernels.benchmarks.* (shipped in the wheel), passing the arguments on."""
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert main(["bench", "mlra", "--smoke", "--out-dir", str(tmp_path)]) == 0
    assert calls == [[sys.executable, "-m", "mlra_kernels.benchmarks.mlra", "--smoke", "--out-dir", str(tmp_path)]]
    calls.clear()
    assert main(["bench"]) == 0
    assert [c[2] for c in calls] == ["mlra_kernels.benchmarks.tev", "mlra_kernels.benchmarks.mlra",
                                     "mlra_kernels.benchmarks.decode"]


def test_bench_tev_end_to_end_from_another_folder(tmp_path):
    """A real (tiny) TEV benchmark run in a child process, started outside the source tree."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "mlra_kernels.cli", "bench", "tev", "--max-elems", "1e6", "--rep", "1", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "tev_cpu.json").read_text())
    assert {r["dtype"] for r in data["rows"]} == {"fp32", "bf16"}
    assert all(r["gbps"] > 0 and r["speedup_vs_one_liner"] > 0 for r in data["rows"])
    assert data["meta"]["torch"] == torch.__version__ and data["meta"]["mlra_kernels"]


def test_info_and_help(capsys):
    assert main(["info"]) == 0
    assert capsys.readouterr().out.strip()
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_console_entry_point_in_a_subprocess(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    emb = torch.nn.Embedding(30, 6)
    torch.save({"tok_embeddings.weight": emb.weight.detach()}, tmp_path / "e.pt")
    res = subprocess.run([sys.executable, "-m", "mlra_kernels.cli", "tev", str(tmp_path / "e.pt"), "--json"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["key"] == "tok_embeddings.weight"
