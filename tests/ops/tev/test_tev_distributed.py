"""Vocab-sharded TEV over torch.distributed (gloo, real processes on the CPU) equals the whole matrix."""

import os
import pathlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mlra_kernels.ops.tev import tev
from tests.helpers import gloo_worker

pytestmark = [pytest.mark.distributed, pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")]


def make_matrix(dtype):
    g = torch.Generator().manual_seed(123)
    w = torch.randn(1003, 72, generator=g, dtype=torch.float64) * (0.5 + torch.rand(1003, 1, generator=g)) + 3.0
    w = w.to(dtype)
    w[10, 5] = float("nan")
    w[900, 0] = float("inf")
    return w


def _body(rank, world, out_dir, dtype):
    w = make_matrix(dtype)
    shard = torch.tensor_split(w, world)[rank]  # uneven shards
    s = tev(shard, process_group=dist.group.WORLD)
    u = tev(shard, unbiased=True, process_group=dist.group.WORLD)
    # Rows subset: every third row of the whole matrix, expressed as local indices of each shard.
    start = sum(t.shape[0] for t in torch.tensor_split(w, world)[:rank])
    local = torch.arange(shard.shape[0])
    sel = local[(local + start) % 3 == 0]
    r = tev(shard, rows=sel, process_group=dist.group.WORLD)
    torch.save(
        {"all": (s.mean, s.std, s.rows, s.nonfinite_rows), "unbiased": u.std, "subset": (r.mean, r.std, r.rows)},
        pathlib.Path(out_dir) / f"rank{rank}.pt",
    )


@pytest.mark.parametrize(
    "world, dtype", [(2, torch.float32), (3, torch.bfloat16)], ids=["2ranks-fp32", "3ranks-bf16"]
)
def test_sharded_equals_whole(world, dtype, tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(gloo_worker, args=(_body, world, str(tmp_path / "pg_init"), str(tmp_path), dtype), nprocs=world, join=True)
    w = make_matrix(dtype)
    whole = tev(w)
    whole_u = tev(w, unbiased=True)
    sub = tev(w, rows=torch.arange(0, w.shape[0], 3))
    for rank in range(world):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        mean, std, rows, bad = res["all"]
        assert (rows, bad) == (whole.rows, whole.nonfinite_rows) == (1001, 2)
        assert abs(mean - whole.mean) <= 1e-12 * whole.mean
        assert abs(std - whole.std) <= 1e-10 * whole.std
        assert abs(res["unbiased"] - whole_u.std) <= 1e-10 * whole_u.std
        smean, sstd, srows = res["subset"]
        assert srows == sub.rows
        assert abs(smean - sub.mean) <= 1e-12 * sub.mean and abs(sstd - sub.std) <= 1e-10 * sub.std
