"""examples/train_distributed.py runs as its docstring says: torchrun, 4 CPU processes, a 2 × 2 mesh, then --resume;
without --resume it refuses an --out that holds an earlier run."""

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from tests.helpers import REPO


def _torchrun(out, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           str(REPO / "examples" / "train_distributed.py"), "--out", str(out), "--no-compile", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _refused(out):
    """Run the example without --resume into ``out`` (no process group forms): the error it exits with."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "train_distributed.py"), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stderr


@pytest.mark.parametrize("held", [["tev.jsonl"], ["step-3", "step-6"]])
def test_example_refuses_an_out_holding_a_run(tmp_path, held):
    for name in held:
        if name.startswith("step-"):
            (tmp_path / name).mkdir()
            (tmp_path / name / ".metadata").write_bytes(b"an earlier checkpoint")
        else:
            (tmp_path / name).write_text('{"step": 0}\n')
    err = _refused(tmp_path)
    assert f"--out {tmp_path} already holds a run ({', '.join(held)})" in err and "--resume" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == held  # nothing written, nothing removed
    if "tev.jsonl" in held:
        assert (tmp_path / "tev.jsonl").read_text() == '{"step": 0}\n'


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")
def test_example_trains_saves_and_resumes(tmp_path):
    out = tmp_path / "run"
    first = _torchrun(out, "--steps", "6", "--save-every", "3")
    assert "step   0" in first and "step   5" in first
    assert sorted(p.name for p in out.iterdir()) == ["step-3", "step-6", "tev.jsonl"]
    log = (out / "tev.jsonl").read_text()
    _refused(out)  # a second run without --resume
    assert (out / "tev.jsonl").read_text() == log
    _torchrun(out, "--steps", "11", "--save-every", "3", "--resume")
    lines = [json.loads(line) for line in (out / "tev.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "step" in r]
    assert steps == [0, 5, 10]  # the second run went on from step 6
    assert sum("meta" in r for r in lines) == 2
    assert all(r["tev_mean"] > 0 and r["loss"] > 0 for r in lines if "step" in r)
