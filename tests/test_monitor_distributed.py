"""TEV logging under torch.distributed, 2 gloo processes on the CPU (one spawn): FSDP2, vocab shards, replicas.

Monitors built before and after ``fully_shard`` (and the Lightning and Trainer hooks) log the TEV of the
trained, gathered embedding at every step, and only rank 0 writes each log. The test gathers the weight
with ``full_tensor()`` for its oracle; the library never does.
"""

import json
import os
import pathlib
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mlra_kernels.monitor import read_jsonl
from tests.helpers import gloo_worker

pytestmark = [pytest.mark.distributed, pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")]

WORLD, STEPS = 2, 3
CFG = dict(vocab_size=97, block_size=16, n_layer=2, n_head=4, n_embd=32, attention="mlra", rank=8, latent_groups=2)
OLD_LOG = b'{"meta": {"name": "earlier run"}}\n{"step": 0, "tev_mean": 1.0, "tev_std": 0.1, "nonfinite_rows": 0}\n'


def _body(rank, world, out_dir):
    from torch.distributed.fsdp import fully_shard
    from transformers import TrainerControl, TrainerState

    from mlra_kernels.integrations.lightning import TEVLightningHooks
    from mlra_kernels.integrations.transformers import TEVTrainerCallback
    from mlra_kernels.models import GPT2, GPT2Config
    from mlra_kernels.monitor import TEVMonitor
    from mlra_kernels.ops.tev import tev

    out = pathlib.Path(out_dir)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = GPT2(GPT2Config(**CFG))
    initial = tev(model.wte.weight)
    # Every rank passes the same path, as a training script does.
    before = TEVMonitor(model, every=1, path=out / "before.jsonl", name="before")
    for block in model.h:
        fully_shard(block)
    fully_shard(model)
    assert type(model.wte.weight).__name__ == "DTensor"
    after = TEVMonitor(model, every=1, path=out / "after.jsonl", mode="a")  # continues the earlier run's log
    subset = TEVMonitor(model.wte, every=1, rows=torch.arange(0, 97, 2))  # global row ids, in memory
    hooks = TEVLightningHooks(str(out / "pl.jsonl"), every=1)
    trainer = SimpleNamespace(is_global_zero=rank == 0, global_step=0)
    hooks.on_train_start(trainer, model)
    callback = TEVTrainerCallback(str(out / "hf.jsonl"), every=1)
    state, control = TrainerState(is_world_process_zero=rank == 0), TrainerControl()
    callback.on_train_begin(None, state, control, model=model)

    # A vocab-sharded plain tensor with a process group, and replicas that differ per rank (no group).
    whole = torch.randn(101, 24, generator=torch.Generator().manual_seed(5)) + 2.0
    shards = TEVMonitor(whole.chunk(world)[rank], every=1, path=out / "pg.jsonl", process_group=dist.group.WORLD)
    own = torch.randn(50, 16, generator=torch.Generator().manual_seed(10 + rank))
    replica = TEVMonitor(own, every=1, path=out / "replica.jsonl")

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(1 + rank)  # each rank its own batches
    expected = []
    for step in range(1, STEPS + 1):
        idx = torch.randint(0, 97, (2, 17))
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        full = model.wte.weight.detach().full_tensor()  # the oracle: the trained weight, gathered
        want = tev(full)
        expected.append((want.mean, want.std, tev(full, rows=torch.arange(0, 97, 2)).mean))
        for mon in (before, after, subset, shards, replica):
            mon.step(step, loss=loss)
        trainer.global_step = step
        hooks.on_train_batch_end(trainer, model, {"loss": loss.detach()}, None, step)
        callback.on_step_begin(None, state, control)
        state.global_step = step
        callback.on_step_end(None, state, control)
        callback.on_log(None, state, control, logs={"loss": loss.item()})
    hooks.on_train_end(trainer, model)
    callback.on_train_end(None, state, control)
    for mon in (before, after, shards, replica):
        mon.close()
    mons = {"before": before, "after": after, "subset": subset, "pg": shards, "replica": replica,
            "pl": hooks.monitor, "hf": callback.monitor}
    torch.save({
        "expected": expected, "initial": initial.mean,
        "records": {k: [(r["step"], r["tev_mean"], r["tev_std"]) for r in m.records] for k, m in mons.items()},
        "writes": {k: (m.writes_log, m._fd is None) for k, m in mons.items()},
        "pg": (tev(whole).mean, tev(whole).std), "replica": (tev(own).mean, tev(own).std),
    }, out / f"rank{rank}.pt")


def test_fsdp2_tev_logs_the_trained_weight_once_from_rank_zero(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "after.jsonl").write_bytes(OLD_LOG)
    mp.spawn(gloo_worker, args=(_body, WORLD, str(tmp_path / "pg_init"), str(logs)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / "logs" / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    expected = res[0]["expected"]
    assert res[1]["expected"] == expected  # one trained weight, seen alike from both ranks
    assert abs(expected[-1][0] - res[0]["initial"]) > 1e-4  # training moved TEV: a stale weight would show

    for r in res:
        for name in ("before", "after", "pl", "hf"):  # on every rank: the merged TEV of the gathered weight
            recs = r["records"][name]
            assert [s for s, _, _ in recs] == list(range(1, STEPS + 1)), name
            for (_, mean, std), (w_mean, w_std, _) in zip(recs, expected):
                assert abs(mean - w_mean) <= 1e-12 * w_mean and abs(std - w_std) <= 1e-10 * w_std, (name, mean, w_mean)
        for (_, mean, _), (_, _, w_sub) in zip(r["records"]["subset"], expected):
            assert abs(mean - w_sub) <= 1e-12 * w_sub
        for _, mean, std in r["records"]["pg"]:
            w_mean, w_std = r["pg"]
            assert abs(mean - w_mean) <= 1e-12 * w_mean and abs(std - w_std) <= 1e-10 * w_std
    # Replicas are taken as each rank's own whole matrix: nothing merged.
    assert res[0]["replica"] != res[1]["replica"]
    for r in res:
        assert all((mean, std) == r["replica"] for _, mean, std in r["records"]["replica"])

    # One log per monitor, written by rank 0 alone; rank 1 opened nothing.
    assert sorted(p.name for p in logs.glob("*.jsonl")) == ["after.jsonl", "before.jsonl", "hf.jsonl", "pg.jsonl",
                                                           "pl.jsonl", "replica.jsonl"]
    assert all(res[0]["writes"][k] == (True, True) for k in ("before", "after", "pg", "replica", "pl", "hf"))
    assert all(res[1]["writes"][k] == (False, True) for k in res[1]["writes"])
    for name in ("before", "pl", "hf", "pg", "replica"):
        lines = [json.loads(line) for line in (logs / f"{name}.jsonl").read_text().splitlines()]
        assert ["meta" in obj for obj in lines] == [True] + [False] * STEPS, name
    meta, records = read_jsonl(logs / "before.jsonl")
    assert meta["name"] == "before" and meta["vocab_size"] == 97
    assert [(r["step"], r["tev_mean"]) for r in records] == [(s, m) for s, m, _ in res[0]["records"]["before"]]
    assert read_jsonl(logs / "pg.jsonl")[0]["vocab_size"] == 101  # the whole vocabulary, not rank 0's shard
    assert [r["tev_mean"] for r in read_jsonl(logs / "replica.jsonl")[1]] == [res[0]["replica"][0]] * STEPS
    # The earlier run's log is continued by rank 0, never cut by rank 1.
    text = (logs / "after.jsonl").read_bytes()
    assert text.startswith(OLD_LOG)
    assert [r["step"] for r in read_jsonl(logs / "after.jsonl")[1]] == [0] + list(range(1, STEPS + 1))
