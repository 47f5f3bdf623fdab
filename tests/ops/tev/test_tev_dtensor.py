"""TEV of a DTensor over 4 gloo processes on the CPU (one spawn): every placement gives the whole matrix's TEV.

Each worker runs every case and saves what it got and the oracle: the kernel on the gathered matrix where
whole rows stay on one rank (the same kernel, so the merge alone differs), the float64 reference where
columns are split (per-row partials are merged in float64 torch). The test gathers; the library never does.
"""

import os
import pathlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mlra_kernels.ops.tev import tev, tev_reference
from tests.helpers import gloo_worker

pytestmark = [pytest.mark.distributed, pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")]

WORLD = 4


def make_matrix(dtype, V=1003, d=70):  # 1003 rows and 70 columns split unevenly 4 and 2 ways
    g = torch.Generator().manual_seed(7)
    w = torch.randn(V, d, generator=g, dtype=torch.float64) * (0.5 + torch.rand(V, 1, generator=g)) + 3.0
    w = w.to(dtype)
    w[10, 5] = float("nan")  # in the first column block
    w[600, 69] = float("inf")  # in the last one
    return w


def _stats(s):
    return (s.mean, s.std, s.rows, s.nonfinite_rows)


def _case(res, name, got, oracle, pt=None, pt_oracle=None):
    res[name] = {"got": _stats(got), "want": _stats(oracle), "per_token": pt, "per_token_want": pt_oracle}


def _body(rank, world, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    from mlra_kernels.ops.tev.api import tev_stats

    mesh1 = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp, tp = mesh2.get_coordinate()
    w = make_matrix(torch.float32)
    rows = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(3))[:400]  # global ids, any order
    res = {}

    def run(name, dt, kernel_oracle, local_rows=None):
        full = dt.full_tensor()
        assert torch.equal(full.nan_to_num(), w.nan_to_num()), name  # the layout is the matrix itself
        oracle = (lambda t, **kw: tev(t, **kw)) if kernel_oracle else (lambda t, **kw: tev_reference(t.double(), **kw))
        s = tev(dt, per_token=local_rows is not None)
        if local_rows is None:
            _case(res, name, s, oracle(full))
        else:  # local_rows: the global rows this rank holds, a range
            _case(res, name, s, oracle(full), s.per_token, tev_reference(full[local_rows].double()).per_token)
            keep = rows[(rows >= local_rows.start) & (rows < local_rows.stop)]
            r = tev(dt, rows=rows, per_token=True)
            _case(res, name + "-rows", r, oracle(full, rows=rows), r.per_token,
                  tev_reference(full.double(), rows=keep).per_token)
        _case(res, name + "-unbiased", tev(dt, unbiased=True), oracle(full, unbiased=True))

    n0 = -(-w.shape[0] // world)  # torch.chunk's block of rows
    run("1d-shard0", distribute_tensor(w, mesh1, [Shard(0)]), True,
        range(min(rank * n0, w.shape[0]), min((rank + 1) * n0, w.shape[0])))
    run("1d-shard1", distribute_tensor(w, mesh1, [Shard(1)]), False, range(w.shape[0]))
    run("1d-replicate", distribute_tensor(w, mesh1, [Replicate()]), True, range(w.shape[0]))
    n2 = -(-w.shape[0] // 2)
    run("2d-shard0-shard1", distribute_tensor(w, mesh2, [Shard(0), Shard(1)]), False,
        range(dp * n2, min((dp + 1) * n2, w.shape[0])))
    run("2d-shard1-shard0", distribute_tensor(w, mesh2, [Shard(1), Shard(0)]), False,
        range(tp * n2, min((tp + 1) * n2, w.shape[0])))
    run("2d-shard0-shard0", distribute_tensor(w, mesh2, [Shard(0), Shard(0)]), True)
    run("2d-replicate-shard1", distribute_tensor(w, mesh2, [Replicate(), Shard(1)]), False)

    # bfloat16, 2-D mesh with split columns: the merge of per-row partials against the float64 reference.
    wb = make_matrix(torch.bfloat16)
    dtb = distribute_tensor(wb, mesh2, [Shard(0), Shard(1)])
    _case(res, "2d-bf16", tev(dtb), tev_reference(dtb.full_tensor().double()))

    # FSDP2 over row-wise tensor parallelism: a strided shard of the rows. µ and σ hold; rows= cannot.
    local = make_matrix(torch.float32, V=1000)[rank * 250:(rank + 1) * 250]
    strided = DTensor.from_local(local, mesh2, [_StridedShard(0, split_factor=2), Shard(0)], run_check=False,
                                 shape=torch.Size([1000, 70]), stride=(70, 1))
    _case(res, "2d-strided", tev(strided), tev(strided.full_tensor()))
    errors = {}
    for name, call in {
        "strided-rows": lambda: tev(strided, rows=[1, 2]),
        "strided-per-token": lambda: tev(strided, per_token=True),
        "partial": lambda: tev(DTensor.from_local(w, mesh1, [Partial()], run_check=False)),
        "process-group": lambda: tev(distribute_tensor(w, mesh1, [Shard(0)]), process_group=dist.group.WORLD),
        "rows-out-of-range": lambda: tev(distribute_tensor(w, mesh1, [Shard(1)]), rows=[0, 1003]),
    }.items():
        try:
            call()
            errors[name] = None
        except (ValueError, IndexError) as err:
            errors[name] = f"{type(err).__name__}: {err}"

    # Without the compiled op (TEVMonitor's fallback): float64 torch for whole rows too.
    dt = distribute_tensor(w, mesh1, [Shard(0)])
    _case(res, "1d-shard0-torch", tev_stats(dt, kernel=False), tev_reference(w.double()))
    dt64 = distribute_tensor(w.double(), mesh2, [Shard(0), Shard(1)])
    _case(res, "2d-float64-torch", tev_stats(dt64, kernel=False, unbiased=True),
          tev_reference(w.double(), unbiased=True))
    torch.save({"cases": res, "errors": errors}, pathlib.Path(out_dir) / f"rank{rank}.pt")


def test_dtensor_tev_equals_the_whole_matrix(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(gloo_worker, args=(_body, WORLD, str(tmp_path / "pg_init"), str(tmp_path)), nprocs=WORLD, join=True)
    whole = tev(make_matrix(torch.float32))
    assert (whole.rows, whole.nonfinite_rows) == (1001, 2)
    for rank in range(WORLD):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        cases = out["cases"]
        assert len(cases) == 23, sorted(cases)
        for name, c in cases.items():
            (mean, std, n, bad), (w_mean, w_std, w_n, w_bad) = c["got"], c["want"]
            assert (n, bad) == (w_n, w_bad), (rank, name)
            assert abs(mean - w_mean) <= 1e-12 * w_mean, (rank, name, mean, w_mean)
            assert abs(std - w_std) <= 1e-10 * w_std, (rank, name, std, w_std)
            if c["per_token"] is not None:  # TEV_i of this rank's rows, from the kernel or merged partials
                torch.testing.assert_close(c["per_token"].double(), c["per_token_want"], rtol=2e-6, atol=0,
                                           equal_nan=True, msg=f"{rank} {name}")
        assert cases["1d-shard0"]["got"][2] == 1001
        errors = out["errors"]
        assert "ValueError" in errors["strided-rows"] and "one range" in errors["strided-rows"]
        assert "ValueError" in errors["strided-per-token"] and "per_token" in errors["strided-per-token"]
        assert "ValueError" in errors["partial"] and "Partial" in errors["partial"]
        assert "ValueError" in errors["process-group"] and "leave process_group None" in errors["process-group"]
        assert "IndexError" in errors["rows-out-of-range"]
