"""TEVMonitor: the statistics follow DESIGN.md, the JSONL log, embedding lookup, cost, and plots."""

import json
import math
import time

import pytest
import torch
from torch import nn

from mlra_kernels import TEVMonitor
from mlra_kernels.models import GPT2, GPT2Config
from mlra_kernels import tev
from mlra_kernels._warnings import _WARNED
from mlra_kernels.monitor import compute_tev, find_token_embedding, read_jsonl


def _expected(E, rows=None, unbiased=False):
    """DESIGN.md in float64: population std per row, then mean and std across rows."""
    E = E.detach().to(torch.float64)
    if rows is not None:
        E = E[rows]
    per_row = ((E - E.mean(dim=1, keepdim=True)) ** 2).mean(dim=1).sqrt()
    return per_row.mean().item(), per_row.std(unbiased=unbiased).item()


def _emb(V=300, d=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(V, d, generator=g) * torch.rand(V, 1, generator=g)  # rows with different spreads
    return nn.Embedding.from_pretrained(E + 0.3, freeze=False)


def test_records_follow_the_math_and_the_jsonl_format(tmp_path):
    emb = _emb()
    log = tmp_path / "sub" / "run.jsonl"
    with TEVMonitor(emb, every=3, path=log, name="run-a") as mon:
        for step in range(10):
            with torch.no_grad():
                emb.weight.mul_(1.1)  # the monitor must see the live parameter
            rec = mon.step(step, loss=torch.tensor(2.0 - 0.1 * step), lr=1e-3)
            if step % 3:
                assert rec is None
            else:
                mean, std = _expected(emb.weight)
                assert rec["tev_mean"] == pytest.approx(mean, rel=1e-5)
                assert rec["tev_std"] == pytest.approx(std, rel=1e-4)
    lines = log.read_text().splitlines()
    assert json.loads(lines[0])["meta"] == {
        "name": "run-a", "vocab_size": 300, "embed_dim": 48, "every": 3, "dtype": "float32", "device": "cpu"}
    meta, records = read_jsonl(log)
    assert [r["step"] for r in records] == [0, 3, 6, 9]
    assert [r["loss"] for r in records] == pytest.approx([2.0, 1.7, 1.4, 1.1])
    assert all(r["lr"] == 1e-3 and r["nonfinite_rows"] == 0 for r in records)
    times = [r["time"] for r in records]
    assert times == sorted(times) and all(r["monitor_ms"] > 0 for r in records)
    assert records[-1]["tev_mean"] > records[0]["tev_mean"] * 1.1 ** 8
    assert mon.cost_per_call_ms > 0


def test_rows_unbiased_and_nonfinite_rows():
    emb = _emb(V=64, d=32, seed=1)
    rows = torch.tensor([1, 5, 6, 30, 63])
    mean, std, bad, _ = compute_tev(emb.weight, rows=rows, unbiased=True)
    exp_mean, exp_std = _expected(emb.weight, rows=rows, unbiased=True)
    assert (mean, std, bad) == (pytest.approx(exp_mean, rel=1e-5), pytest.approx(exp_std, rel=1e-4), 0)
    with torch.no_grad():
        emb.weight[7, 3] = float("nan")
        emb.weight[9, 0] = float("inf")
    mean, std, bad, _ = compute_tev(emb.weight)
    keep = torch.tensor([i for i in range(64) if i not in (7, 9)])
    exp_mean, exp_std = _expected(emb.weight, rows=keep)
    assert bad == 2 and math.isfinite(mean)
    assert mean == pytest.approx(exp_mean, rel=1e-5) and std == pytest.approx(exp_std, rel=1e-4)


def test_finds_the_token_embedding():
    model = GPT2(GPT2Config(vocab_size=97, block_size=8, n_layer=1, n_head=2, n_embd=16))
    assert find_token_embedding(model) is model.wte.weight

    class Wrapper(nn.Module):  # what DistributedDataParallel looks like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert find_token_embedding(Wrapper(model)) is model.wte.weight

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Embedding(8, 4)
            self.tok_embeddings = nn.Embedding(50, 4)

    assert find_token_embedding(Named()).shape == (50, 4)

    class Ambiguous(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Embedding(8, 4), nn.Embedding(9, 4)

    with pytest.raises(ValueError, match="cannot tell which nn.Embedding"):
        find_token_embedding(Ambiguous())
    with pytest.raises(ValueError, match="2-D"):
        find_token_embedding(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="every must be a positive int"):
        TEVMonitor(model, every=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the 1% budget is defined on the GPU")
def test_gpu_cost_is_under_one_percent_of_a_gpt2_small_step():
    torch.manual_seed(0)
    model = GPT2(GPT2Config()).cuda()  # GPT-2 small, 124M
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, 50257, (8, 1024), device="cuda")

    def train_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, x)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        train_step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        train_step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) / 5 * 1e3
    mon = TEVMonitor(model, every=1)
    for i in range(20):
        mon.step(i)
    cost = sorted(r["monitor_ms"] for r in mon.records[2:])[len(mon.records[2:]) // 2]
    assert cost < 0.01 * step_ms, f"monitor {cost:.3f} ms against a {step_ms:.1f} ms step"


def test_plot_draws_a_png(tmp_path):
    from mlra_kernels.plot import plot_runs

    logs = []
    for name, scale in (("A", 1.0), ("B", 1.5)):
        emb = _emb(seed=2)
        mon = TEVMonitor(emb, every=1, path=tmp_path / f"{name}.jsonl", name=name)
        for step in range(5):
            with torch.no_grad():
                emb.weight.mul_(scale)
            mon.step(step, loss=3.0 / (step + 1))
        mon.close()
        logs.append(tmp_path / f"{name}.jsonl")
    png = plot_runs(logs, tmp_path / "out" / "curves.png")
    data = open(png, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    (tmp_path / "empty.jsonl").write_text('{"meta": {}}\n')
    with pytest.raises(ValueError, match="holds no records"):
        plot_runs([tmp_path / "empty.jsonl"], tmp_path / "x.png")


def test_monitor_reads_through_the_tev_op_when_built():
    from mlra_kernels import _ext, tev

    if not _ext.available():
        pytest.skip("the compiled extension is not built here; the monitor then uses the float64 reference")
    emb = _emb(V=513, d=40, seed=5)
    mean, std, bad, used = compute_tev(emb.weight)
    stats = tev(emb.weight)
    assert used and (mean, std, bad) == (stats.mean, stats.std, stats.nonfinite_rows)


def test_falls_back_to_the_reference_with_one_warning(monkeypatch):
    from mlra_kernels import _ext, _warnings

    def missing():
        raise _ext.ExtensionNotAvailableError("the compiled extension mlra_kernels._C is not built.")

    monkeypatch.setattr(_ext, "load", missing)
    monkeypatch.setattr("mlra_kernels.ops.tev.op._fake_registered", False)
    monkeypatch.setattr(_warnings, "_WARNED", set())
    emb = _emb(V=200, d=32, seed=3)
    with pytest.warns(UserWarning, match="float64 torch reference"):
        first = TEVMonitor(emb, every=1).step(0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second monitor in the same process does not warn again
        second = TEVMonitor(emb, every=1).step(0)
    mean, std = _expected(emb.weight)
    for rec in (first, second):
        assert rec["tev_mean"] == pytest.approx(mean, rel=1e-12) and rec["tev_std"] == pytest.approx(std, rel=1e-12)


def test_float64_embedding_warns_once_and_is_exact(monkeypatch):
    from mlra_kernels import _warnings

    monkeypatch.setattr(_warnings, "_WARNED", set())
    E = _emb(V=100, d=16, seed=4).weight.detach().double()
    with pytest.warns(UserWarning, match="float64"):
        rec = TEVMonitor(E, every=1).step(0)
    mean, std = _expected(E)
    assert rec["tev_mean"] == pytest.approx(mean, rel=1e-12) and rec["tev_std"] == pytest.approx(std, rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(rows=[100]), IndexError, r"TEVMonitor: 1 entries of `rows` are outside \[0, 30\)"),
        (dict(rows=torch.tensor([0, -1, 29, 30])), IndexError, r"2 entries of `rows` are outside \[0, 30\)"),
        (dict(rows=[0.5, 2.0]), TypeError, "`rows` must hold integer row indices"),
        (dict(rows=[True] * 30), TypeError, "boolean mask"),
        (dict(rows=[]), ValueError, "no rows"),
        (dict(every=0), ValueError, "every must be a positive int"),
        (dict(every=-5), ValueError, "every must be a positive int"),
        (dict(every=2.5), ValueError, "every must be a positive int"),
        (dict(every=True), ValueError, "every must be a positive int"),
        (dict(every="10"), ValueError, "every must be a positive int"),
        (dict(mode="r"), ValueError, "mode must be 'x'"),
        (dict(unbiased="yes"), TypeError, "unbiased must be a bool"),
        (dict(name=3), TypeError, "name must be a str"),
        (dict(path=3), TypeError, "path must be a str"),
    ],
    ids=["row_too_big", "rows_out_of_range", "float_rows", "mask_rows", "no_rows", "every_0", "every_negative",
         "every_float", "every_bool", "every_str", "mode", "unbiased", "name", "path"],
)
def test_arguments_are_checked_at_construction(kwargs, exc, match, tmp_path):
    log = tmp_path / "never.jsonl"
    kwargs.setdefault("path", log)
    with pytest.raises(exc, match=match):
        TEVMonitor(_emb(V=30, d=8), **kwargs)
    assert not log.exists()  # refused before anything is written


@pytest.mark.parametrize(
    "weight, exc, match",
    [
        (torch.randint(0, 5, (30, 8)), TypeError, "dtype int64; TEV is defined on a floating-point embedding"),
        (torch.ones(30, 8, dtype=torch.int8), TypeError, "dtype int8; TEV is defined on a floating-point"),
        (torch.ones(30, 8, dtype=torch.bool), TypeError, "dtype bool"),
        (torch.ones(30, 8, dtype=torch.complex64), TypeError, "dtype complex64"),
        (torch.empty(30, 8, device="meta"), ValueError, "meta device.*real values on the CPU or a CUDA device"),
        (torch.empty(0, 8), ValueError, "empty"),
    ],
    ids=["int64", "int8", "bool", "complex", "meta", "empty"],
)
def test_unusable_embeddings_are_refused_at_construction(weight, exc, match):
    with pytest.raises(exc, match=match):
        TEVMonitor(weight, every=1)


def test_rows_given_as_a_list_are_checked_once_and_used():
    emb = _emb(V=30, d=8, seed=6)
    rows = [1, 4, 4, 29]
    mon = TEVMonitor(emb, every=1, rows=rows)
    assert mon.rows.dtype == torch.int64 and mon.rows.tolist() == rows
    mean, std = _expected(emb.weight, rows=torch.tensor(rows))
    rec = mon.step(0)
    assert rec["tev_mean"] == pytest.approx(mean, rel=1e-6) and rec["tev_std"] == pytest.approx(std, rel=1e-5)


def test_the_reference_path_checks_rows_too():
    E = _emb(V=20, d=8, seed=7).weight.detach().double()  # float64: computed by the reference
    with pytest.warns(UserWarning, match="float64"):
        mean, _, _, _ = compute_tev(E, rows=[2, 5])
    assert mean == pytest.approx(_expected(E, rows=torch.tensor([2, 5]))[0], rel=1e-12)
    with pytest.raises(TypeError, match="`rows` must hold integer row indices"):
        compute_tev(E, rows=[2.7, 5.1])
    with pytest.raises(IndexError, match=r"outside \[0, 20\)"):
        compute_tev(E, rows=[-1])


def test_a_replaced_embedding_is_the_one_measured():
    """The model's embedding is looked up at each record: a parameter or module replaced later is seen."""
    model = GPT2(GPT2Config(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16))
    mon = TEVMonitor(model, every=1)
    model.wte.weight = nn.Parameter(model.wte.weight.detach() * 3.0)  # as fully_shard swaps the parameter
    assert mon.step(0)["tev_mean"] == pytest.approx(_expected(model.wte.weight)[0], rel=1e-5)
    model.wte = _emb(V=50, d=16, seed=2)  # as a resized vocabulary swaps the module
    assert mon.step(1)["tev_mean"] == pytest.approx(_expected(model.wte.weight)[0], rel=1e-5)
    assert mon.weight is model.wte.weight


def test_only_rank_zero_writes_the_log(tmp_path, monkeypatch):
    """Without a process group, the RANK that torchrun sets says which process writes: others open nothing."""
    log = tmp_path / "sub" / "run.jsonl"
    monkeypatch.setenv("RANK", "1")
    _WARNED.clear()
    with pytest.warns(UserWarning, match="not rank 0, so it does not write .*rank_zero_only=False"):
        mon = TEVMonitor(_emb(), every=1, path=log, mode="w")
    assert mon.step(0) is not None and len(mon.records) == 1
    mon.close()
    assert not mon.writes_log and not log.parent.exists()
    own = tmp_path / "rank1.jsonl"  # a log per rank, asked for
    with TEVMonitor(_emb(), every=1, path=own, rank_zero_only=False) as mon:
        mon.step(0)
    assert mon.writes_log and len(read_jsonl(own)[1]) == 1
    monkeypatch.setenv("RANK", "0")
    with TEVMonitor(_emb(), every=1, path=log) as mon:
        mon.step(0)
    assert mon.writes_log and len(read_jsonl(log)[1]) == 1


def test_the_measured_weight_can_be_assigned():
    a, b = torch.nn.Embedding(50, 8), torch.nn.Embedding(60, 8)
    with torch.no_grad():
        b.weight.mul_(3.0)
    mon = TEVMonitor(a, every=1)
    mon.weight = b
    assert mon.weight is b.weight and mon.step(0)["tev_mean"] == pytest.approx(tev(b.weight).mean)
    with pytest.raises(TypeError):
        mon.weight = "not an embedding"


def test_process_group_is_checked_at_construction():
    with pytest.raises(TypeError, match="TEVMonitor: process_group must be a torch.distributed ProcessGroup"):
        TEVMonitor(_emb(), process_group="world")


@pytest.mark.parametrize("step", ["a", None, 2.5, True, torch.tensor(2.5)],
                         ids=["str", "none", "float", "bool", "float-tensor"])
def test_a_step_that_is_not_an_int_is_refused(step):
    mon = TEVMonitor(torch.randn(16, 8), every=2)
    for call in (mon.step, mon.record):
        with pytest.raises(TypeError, match=r"step must be an int \(the training step\), got "):
            call(step)
    assert mon.records == []


def test_integer_steps_of_numpy_and_torch_are_taken():
    np = pytest.importorskip("numpy")
    mon = TEVMonitor(torch.randn(16, 8), every=2)
    assert mon.step(np.int64(3)) is None
    assert [mon.step(s)["step"] for s in (np.int64(4), torch.tensor(6), 8)] == [4, 6, 8]
    assert all(type(r["step"]) is int for r in mon.records)
