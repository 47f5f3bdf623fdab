"""FSDP2 × tensor parallelism on a 2 × 2 mesh (4 CPU processes, gloo): the loss matches one process, and a
distributed checkpoint (model and optimizer) saved mid-run resumes bit for bit in a fresh sharded model."""

import os
import pathlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mlra_kernels.models import GPT2, GPT2Config
from tests.helpers import gloo_worker

pytestmark = [pytest.mark.distributed, pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")]

CFG = dict(vocab_size=61, block_size=12, n_layer=2, n_head=4, n_embd=16, attention="mlra", rank=4, latent_groups=2)
SAVE_AT, STEPS = 2, 4


def batches():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 61, (4, 11), generator=g) for _ in range(STEPS)]


def _body(rank, world, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from mlra_kernels.distributed import tensor_parallel

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp = mesh["dp"].get_local_rank()

    def build(seed):
        torch.manual_seed(seed)
        model = tensor_parallel(GPT2(GPT2Config(**CFG)).double(), mesh["tp"])
        for block in model.h:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    def step(model, opt, idx):
        idx = idx.chunk(2)[dp]  # each data-parallel rank half the batch; the TP ranks of a row the same half
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss = loss.detach()
        dist.all_reduce(loss, group=mesh["dp"].get_group())
        return loss.item() / 2

    ck = os.path.join(out_dir, "ck")
    model, opt = build(0)
    losses = []
    for i, idx in enumerate(batches()):
        if i == SAVE_AT:
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=ck)
        losses.append(step(model, opt, idx))
    model2, opt2 = build(1)
    msd, osd = get_state_dict(model2, opt2)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=ck)
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    resumed = [step(model2, opt2, idx) for idx in batches()[SAVE_AT:]]
    same = all(torch.equal(p.to_local(), q.to_local()) for p, q in zip(model.parameters(), model2.parameters()))
    result = {"losses": losses, "resumed": resumed, "same_params": same}
    torch.save(result, pathlib.Path(out_dir) / f"rank{rank}.pt")


def test_fsdp2_tp_matches_one_process_and_resumes(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(gloo_worker, args=(_body, 4, str(tmp_path / "pg_init"), str(tmp_path)), nprocs=4, join=True)
    torch.manual_seed(0)
    model = GPT2(GPT2Config(**CFG)).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for idx in batches():
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    for r in range(4):
        res = torch.load(tmp_path / f"rank{r}.pt")
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(losses), rtol=1e-10, atol=0)
        assert res["resumed"] == res["losses"][SAVE_AT:]  # bit for bit
        assert res["same_params"]
