"""examples/train_distributed.py runs as its docstring says: torchrun, 4 CPU processes, a 2 × 2 mesh, then --resume."""

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from tests.helpers import REPO

pytestmark = [pytest.mark.distributed, pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")]


def _torchrun(out, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           str(REPO / "examples" / "train_distributed.py"), "--out", str(out), "--no-compile", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_example_trains_saves_and_resumes(tmp_path):
    out = tmp_path / "run"
    first = _torchrun(out, "--steps", "6", "--save-every", "3")
    assert "step   0" in first and "step   5" in first
    assert sorted(p.name for p in out.iterdir()) == ["step-3", "step-6", "tev.jsonl"]
    _torchrun(out, "--steps", "11", "--save-every", "3", "--resume")
    lines = [json.loads(line) for line in (out / "tev.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "step" in r]
    assert steps == [0, 5, 10]  # the second run went on from step 6
    assert sum("meta" in r for r in lines) == 2
    assert all(r["tev_mean"] > 0 and r["loss"] > 0 for r in lines if "step" in r)
