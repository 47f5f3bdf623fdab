"""A GPT-2 with MLRA under DistributedDataParallel (gloo, 2 CPU processes) matches one process."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from mlra_kernels.models import GPT2, GPT2Config
from tests.helpers import REPO as REPO_ROOT

REPO = str(REPO_ROOT)
CFG = dict(vocab_size=97, block_size=16, n_layer=2, n_head=4, n_embd=32, attention="mlra", rank=8, latent_groups=2)

WORKER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from mlra_kernels.models import GPT2, GPT2Config

    rank, out = int(os.environ["RANK"]), sys.argv[1]
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = GPT2(GPT2Config(**{cfg})).double()
    ddp = DDP(model)
    data = torch.load(os.path.join(out, "data.pt"))
    x, y = data["x"].chunk(2)[rank], data["y"].chunk(2)[rank]
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    _, loss = ddp(x, y)
    loss.backward()
    grads = {{n: p.grad.clone() for n, p in model.named_parameters()}}
    opt.step()
    params = {{n: p.detach().clone() for n, p in model.named_parameters()}}
    torch.save({{"grads": grads, "params": params}}, os.path.join(out, f"rank{{rank}}.pt"))
    dist.destroy_process_group()
""").format(cfg=repr(CFG))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_ddp_gradients_match_single_process(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 97, (4, 17), generator=g)
    x, y = idx[:, :-1], idx[:, 1:]
    torch.save({"x": x, "y": y}, tmp_path / "data.pt")
    (tmp_path / "worker.py").write_text(WORKER)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", TRITON_INTERPRET="0")
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(tmp_path)],
                              env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out

    torch.manual_seed(0)
    model = GPT2(GPT2Config(**CFG)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, loss = model(x, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert set(results[0]["grads"]) == set(grads) and "h.0.attn.qkv.down" in grads
    for res in results:
        for name, grad in grads.items():
            assert grad.abs().sum() > 0, name
            torch.testing.assert_close(res["grads"][name], grad, rtol=1e-9, atol=1e-12, msg=name)
        for name, p in model.named_parameters():
            torch.testing.assert_close(res["params"][name], p.detach(), rtol=1e-9, atol=1e-12, msg=name)
