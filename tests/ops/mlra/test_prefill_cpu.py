"""The CPU path of mlra_attention (no Triton): torch's fused CPU attention where it applies, else the
the torch path; forward and every gradient against float64, with the bound of tests/helpers.py."""

import pytest
import torch

import mlra_kernels
from mlra_kernels.ops.mlra import explain, kernel_path
from mlra_kernels.ops.mlra.reference import mlra_attention_reference
from tests.helpers import assert_close_rel, make_inputs

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def cpu_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # what a CPU call does without the interpreter


def _run(fn, leaves, go):
    y = fn(*leaves)
    y.backward(go.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


# (id, B, T, H, g, r, d_h, dtype, causal, kwargs)
CASES = [
    ("T16-fp32", 2, 16, 2, 1, 8, 32, "fp32", True, {}),
    ("T37-gH-bf16", 1, 37, 4, 4, 8, 48, "bf16", True, {}),
    ("T40-gH-r16-dh64-fp32", 2, 40, 4, 4, 16, 64, "fp32", True, {}),
    ("T50-g2-r8-dh32-fp16-noncausal", 1, 50, 4, 2, 8, 32, "fp16", False, {"scale": 0.2}),
    ("T17-g1-r4-dh32-fp32", 2, 17, 2, 1, 4, 32, "fp32", True, {}),
    ("T64-g2-fp32-noncausal", 2, 64, 4, 2, 16, 32, "fp32", False, {}),
    ("T45-fp16-scale", 1, 45, 2, 1, 24, 80, "fp16", True, {"scale": 0.3}),
    ("T33-bf16-noncausal-r64", 1, 33, 2, 1, 64, 64, "bf16", False, {}),
    # The latent path pads latents narrower than 16 with zeros; a group of several heads with and without it.
    ("T70-g2-r16-dh64-fp32", 2, 70, 4, 2, 16, 64, "fp32", True, {}),
    ("T30-g3-r12-dh32-nobias-fp32", 1, 30, 6, 3, 12, 32, "fp32", True, {"bias": False}),
    ("T28-gH-r16-dh64-nobias-fp32", 1, 28, 4, 4, 16, 64, "fp32", True, {"bias": False}),
    ("T25-gH-r4-dh48-bf16-noncausal", 2, 25, 3, 3, 4, 48, "bf16", False, {}),
    # A latent of 4 in a head of 16 counts as 16 wide: not narrower than the head's own attention.
    ("T20-gH-r4-dh16-fp32", 1, 20, 4, 4, 4, 16, "fp32", True, {}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cpu_path_forward_backward_vs_float64(case):
    _, B, T, H, g, r, dh, dt, causal, kw = case
    kw = dict(kw)
    bias = kw.pop("bias", True)
    x, down, up, b, go = make_inputs(B, T, H, g, r, dh, device="cpu", bias=bias)
    # A latent at most half a head wide (16 at least) runs attention on the latents (absorbed), the others
    # on the heads.
    expected = "torch-cpu-latent" if 2 * max(r, 16) <= dh else "torch-cpu"
    assert kernel_path(x.to(DT[dt]), rank=r, head_dim=dh) == expected
    args = dict(num_heads=H, latent_groups=g, causal=causal, **kw)
    leaves = [t for t in (x, down, up, b) if t is not None]
    got = _run(lambda *t: mlra_kernels.mlra_attention(*t, **args), [t.to(DT[dt]).requires_grad_() for t in leaves], go)
    low = _run(lambda *t: mlra_attention_reference(*t, **args), [t.to(DT[dt]).requires_grad_() for t in leaves], go)
    exact = _run(lambda *t: mlra_attention_reference(*t, **args), [t.clone().requires_grad_() for t in leaves], go)
    for name, a, lo, ex in zip(("out", "dx", "ddown", "dup", "dbias"), got, low, exact):
        assert a.dtype == DT[dt]
        assert_close_rel(name, a, lo, ex)


def test_cpu_path_skips_the_fused_attention_where_it_would_differ():
    x = torch.randn(1, 16, 8)
    assert kernel_path(x) == "torch-cpu"
    assert kernel_path(x, torch.zeros(1, 16)) == "torch"  # key padding: fully masked rows give zeros
    assert kernel_path(x, None, 0.1) == "torch"  # dropout: the torch path draws the mask from the seed
    assert kernel_path(x.double()) == "torch"  # float64 stays exact
    assert kernel_path(x[:, :15]) == "torch"  # 15 tokens: the T×T path is cheap and more exact
    assert "key padding" in explain(x, torch.zeros(1, 16)) and "dropout" in explain(x, None, 0.1)


@pytest.mark.parametrize("kw, error, match", [
    ({"x": torch.randn(16, 8)}, ValueError, r"x must be the call's input \[B, T, d\], got shape \(16, 8\)"),
    ({"x": [[1.0]]}, ValueError, r"x must be the call's input \[B, T, d\], got list"),
    ({"rank": 0}, ValueError, r"rank must be a positive int, got 0"),
    ({"rank": 16.0}, TypeError, r"rank must be a positive int, got 16.0 \(float\)"),
    ({"head_dim": True}, TypeError, r"head_dim must be a positive int, got True \(bool\)"),
    ({"head_dim": -4, "op": "decode"}, ValueError, r"head_dim must be a positive int, got -4"),
], ids=["2d-x", "list-x", "zero-rank", "float-rank", "bool-head-dim", "negative-head-dim-decode"])
def test_kernel_path_and_explain_check_their_arguments(kw, error, match):
    kw = {"x": torch.randn(1, 16, 8), **kw}
    for fn in (kernel_path, explain):
        with pytest.raises(error, match=match):
            fn(**kw)


def test_explain_says_when_the_latent_form_was_not_considered():
    x = torch.randn(1, 16, 64)
    note = "(rank or head_dim not given: attention on the latents was not considered)"
    assert explain(x).endswith(note) and explain(x, rank=16).endswith(note) and explain(x, head_dim=32).endswith(note)
    assert explain(x, rank=16, head_dim=32).startswith("torch-cpu-latent: ")
    assert "not given" not in explain(x, rank=64, head_dim=32) and "not given" not in explain(x[:, :15])
    with mlra_kernels.ops.mlra.use_backend("torch-cpu"):  # a forced path considers nothing
        assert explain(x) == "torch-cpu: forced by MLRA_BACKEND / use_backend"


def test_kernel_path_takes_numpy_integers():
    np = pytest.importorskip("numpy")
    x = torch.randn(1, 16, 64)
    assert kernel_path(x, rank=np.int64(16), head_dim=np.int32(32)) == "torch-cpu-latent"


def test_cpu_path_opcheck_and_compile():
    x, down, up, b, go = make_inputs(1, 20, 2, 1, 8, 16, device="cpu")
    x, down, up, b = (t.float() for t in (x, down, up, b))
    assert kernel_path(x) == "torch-cpu"
    fwd_args = (x, down, up, b, 2, 1, True, 0.25)
    ops = torch.ops.mlra
    torch.library.opcheck(ops.mlra_attention_torch_cpu_fwd.default, fwd_args)
    o, lse, qkv, c = ops.mlra_attention_torch_cpu_fwd(*fwd_args)
    torch.library.opcheck(ops.mlra_attention_torch_cpu_bwd.default,
                          (go.float(), x, down, up, o, lse, qkv, c, 2, 1, True, 0.25))
    torch.library.opcheck(ops.mlra_attention_torch_cpu_latent_fwd.default, fwd_args)
    _, lse, c, z = ops.mlra_attention_torch_cpu_latent_fwd(*fwd_args)
    torch.library.opcheck(ops.mlra_attention_torch_cpu_latent_bwd.default,
                          (go.float(), x, down, up, b, lse, c, z, 2, 1, True, 0.25))

    def f(x, down, up, b):
        return (mlra_kernels.mlra_attention(x, down, up, b, num_heads=2) * go.float()).sum()

    leaves = [t.clone().requires_grad_() for t in (x, down, up, b)]
    f(*leaves).backward()
    eager = [t.grad for t in leaves]
    leaves = [t.clone().requires_grad_() for t in (x, down, up, b)]
    torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves).backward()
    for a, e in zip((t.grad for t in leaves), eager):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("g", [1, 2], ids=["g1", "g2"])
def test_cpu_path_without_bias_and_with_a_strided_input(g):
    B, T, H, r, dh = 2, 24, 4, 8, 16
    x, down, up, _, go = make_inputs(B, T, H, g, r, dh, device="cpu")
    x_strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # [B, T, d] with T-major memory
    assert not x_strided.is_contiguous()
    args = dict(num_heads=H, latent_groups=g)
    assert kernel_path(x_strided.float()) == "torch-cpu"
    got = _run(lambda *t: mlra_kernels.mlra_attention(*t, **args), [t.float().requires_grad_() for t in (x_strided, down, up)], go)
    low = _run(lambda *t: mlra_attention_reference(*t, **args), [t.float().requires_grad_() for t in (x, down, up)], go)
    exact = _run(lambda *t: mlra_attention_reference(*t, **args), [t.clone().requires_grad_() for t in (x, down, up)], go)
    for name, a, lo, ex in zip(("out", "dx", "ddown", "dup"), got, low, exact):
        assert_close_rel(name, a, lo, ex)
