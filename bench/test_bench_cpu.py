"""CPU benchmarks with pytest-benchmark: each op next to the baseline a user would otherwise write.

    pytest bench/test_bench_cpu.py --benchmark-only --benchmark-group-by=group
    pytest bench/test_bench_cpu.py --benchmark-only --benchmark-json=bench/results/pytest_cpu.json

Not part of the test suite (tests/ is): timings are only meaningful on a quiet machine. The package's
ops are checked against a baseline before they are timed, and no JSON is written when a case fails.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mlra_kernels
from mlra_kernels.ops.mlra import kernel_path
from mlra_kernels.ops.tev.reference import tev_one_liner

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="module", params=list(DTYPES))
def gpt2_embedding(request):
    """GPT-2 small's token embedding shape, 50257 x 768, with rows of different spread."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50257, 768, generator=g) * (0.01 + 0.02 * torch.rand(50257, 1, generator=g))
    return request.param, w.to(DTYPES[request.param])


@pytest.mark.parametrize("impl", ["tev", "one_liner", "sum"])
def test_tev_gpt2_embedding(benchmark, gpt2_embedding, impl):
    name, w = gpt2_embedding
    benchmark.group = f"TEV 50257x768 {name}"
    benchmark.extra_info["bytes"] = w.numel() * w.element_size()
    ref_mean, ref_std = (t.item() for t in tev_one_liner(w))  # its std is unbiased: 1e-5 off at V = 50257
    if impl == "tev":
        s = mlra_kernels.tev(w)
        assert math.isclose(s.mean, ref_mean, rel_tol=1e-5) and math.isclose(s.std, ref_std, rel_tol=1e-4)
        benchmark(mlra_kernels.tev, w)
    elif impl == "one_liner":
        benchmark(tev_one_liner, w)
    else:
        benchmark(torch.sum, w)


def _mlra_inputs(B=2, T=256, d=256, H=4, r=64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, d, generator=g)
    down = torch.randn(3 * r, d, generator=g) * 0.05
    up = torch.randn(3, d, r, generator=g) * 0.05
    bias = torch.randn(3 * d, generator=g) * 0.02
    return x, down, up, bias, H


def _unfused(x, down, up, bias, H):
    B, T, d = x.shape
    c = (x @ down.t()).view(B, T, 3, -1)  # [B, T, 3, r]
    qkv = torch.einsum("btpr,pdr->btpd", c, up) + bias.view(3, d)  # [B, T, 3, d]
    q, k, v = (qkv[:, :, i].view(B, T, H, d // H).transpose(1, 2) for i in range(3))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)


def _mha(x, w, bias, H):
    B, T, d = x.shape
    q, k, v = (x @ w.t() + bias).view(B, T, 3, H, d // H).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)


def _timed(fn, leaves, backward):
    if not backward:
        return fn

    def step():
        fn().sum().backward()
        for t in leaves:
            t.grad = None

    return step


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["mlra_attention", "unfused_mlra", "mha"])
def test_attention_cpu(benchmark, impl, backward):
    """The CPU path of mlra_attention against unfused MLRA and MHA (GEMMs + SDPA), causal, fp32."""
    x, down, up, bias, H = _mlra_inputs()
    benchmark.group = f"attention {'fwd+bwd' if backward else 'fwd'} B=2 T=256 d=256 H=4 r=64 fp32"
    w = torch.randn(3 * x.shape[-1], x.shape[-1]) * 0.05
    leaves = [t.requires_grad_() for t in (x, down, up, bias, w)]
    if impl == "mlra_attention":
        if kernel_path(x) != "torch-cpu":
            pytest.skip("TRITON_INTERPRET=1 is set: this would time the interpreter, not the CPU path")
        torch.testing.assert_close(mlra_kernels.mlra_attention(x, down, up, bias, num_heads=H),
                                   _unfused(x, down, up, bias, H), rtol=1e-4, atol=1e-5)
        fn = lambda: mlra_kernels.mlra_attention(x, down, up, bias, num_heads=H)  # noqa: E731
    elif impl == "unfused_mlra":
        fn = lambda: _unfused(x, down, up, bias, H)  # noqa: E731
    else:
        fn = lambda: _mha(x, w, bias, H)  # noqa: E731
    benchmark(_timed(fn, leaves, backward))
