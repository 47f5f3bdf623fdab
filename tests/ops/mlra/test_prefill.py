"""MLRA attention: the Triton kernels through the public call, against the float64 reference.

Without a GPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set by the conftest).

Tolerance: the rule of ``tests/helpers.py`` (``assert_close_rel``).
"""

import os

import torch

import math  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402

import mlra_kernels  # noqa: E402
from mlra_kernels.ops.mlra import launcher  # noqa: E402
from mlra_kernels._warnings import _WARNED  # noqa: E402
from mlra_kernels.ops.mlra import config, kernel_path  # noqa: E402
from mlra_kernels.ops.mlra.reference import mlra_attention_reference  # noqa: E402

from tests.helpers import DEVICE, DTYPES, assert_close_rel, key_padding, make_inputs, max_abs_score, run_case  # noqa: E402,E501


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.delenv("MLRA_BACKEND", raising=False)  # and restored after the test (see _require_kernels)
    config.POISON_OUTPUTS = True
    yield
    config.POISON_OUTPUTS = False


def _require_kernels(x):
    if x.is_cuda:  # the default on CUDA is SDPA's composition; these tests are about the kernels
        os.environ["MLRA_BACKEND"] = "triton"
    path = kernel_path(x)
    assert path.startswith("triton"), (
        "the Triton kernels are not active: on a CPU machine set TRITON_INTERPRET=1 before triton is imported"
    )


# (id, B, T, H, g, r, d_h, dtype, causal, bias, key padding, extra kwargs)
CPU_CASES = [
    ("T1-fp32", 2, 1, 2, 1, 8, 32, "fp32", True, True, None, {}),
    ("T17-kpm-fp32", 1, 17, 2, 1, 8, 32, "fp32", True, True, "random", {}),
    ("T63-g2-r40-dh48-noncausal", 1, 63, 2, 2, 40, 48, "fp32", False, True, "random", {}),
    ("T100-g2-dh64-fp16-left", 1, 100, 2, 2, 24, 64, "fp16", True, True, "left", {}),
    ("T40-gH-dh80-bf16", 1, 40, 3, 3, 16, 80, "bf16", True, True, None, {}),
    ("T33-dh128-fp16-nobias", 1, 33, 2, 1, 16, 128, "fp16", True, False, None, {}),
    ("T65-r256-fp32", 2, 65, 4, 1, 256, 64, "fp32", True, True, None, {}),
    ("T31-gH-r8-dh48-fp16", 1, 31, 4, 4, 8, 48, "fp16", True, True, "random", {}),
    ("T50-dh96-floatkpm-fp32", 1, 50, 2, 1, 40, 96, "fp32", True, True, "float", {}),
    ("T37-r33-dh80-fp16-noncausal", 1, 37, 2, 1, 33, 80, "fp16", False, True, "random", {}),
    ("T29-dh128-bf16-noncausal", 1, 29, 2, 2, 64, 128, "bf16", False, True, "random", {}),
    ("T45-dh96-bf16-scale", 2, 45, 2, 1, 24, 96, "bf16", True, True, None, {"scale": 0.3}),
    ("T70-g2-fp16-noncontig", 1, 70, 4, 2, 16, 32, "fp16", True, True, None, {"noncontiguous": True}),
]

GPU_CASES = [
    ("gpu-T1000-dh64-bf16", 2, 1000, 12, 1, 96, 64, "bf16", True, True, "random", {}),
    ("gpu-T1023-dh48-fp16-gH", 2, 1023, 8, 8, 32, 48, "fp16", True, True, None, {}),
    ("gpu-T777-dh80-fp16-g2", 1, 777, 4, 2, 160, 80, "fp16", False, True, "left", {}),
    ("gpu-T513-dh96-bf16", 2, 513, 4, 1, 256, 96, "bf16", True, False, "float", {}),
    ("gpu-T2048-dh128-bf16", 1, 2048, 8, 1, 128, 128, "bf16", True, True, None, {}),
    ("gpu-T300-dh32-fp32", 2, 300, 6, 3, 8, 32, "fp32", True, True, "random", {}),
    ("gpu-T4096-dh64-fp16", 1, 4096, 12, 12, 64, 64, "fp16", True, True, None, {}),
]


def _params(cases, gpu):
    marks = [pytest.mark.skipif(not torch.cuda.is_available(), reason="large shapes need a CUDA GPU")] if gpu else []
    return [pytest.param(*c[1:], id=c[0], marks=marks) for c in cases]


@pytest.fixture(params=["rebuild", "absorbed"])
def fwd_variant(request, monkeypatch):
    """Both forward kernels: q/k/v rebuilt from latent tiles, and attention on the latent."""
    monkeypatch.setenv("MLRA_FWD_VARIANT", request.param)
    return request.param


@pytest.mark.parametrize(
    "B,T,H,g,r,dh,dtype,causal,bias,kpm,extra", _params(CPU_CASES, False) + _params(GPU_CASES, True)
)
def test_forward_backward_vs_float64(B, T, H, g, r, dh, dtype, causal, bias, kpm, extra, fwd_variant):
    x, down, up, b, go = make_inputs(B, T, H, g, r, dh, bias=bias)
    mask = key_padding(kpm, B, T)
    dt = DTYPES[dtype]
    _require_kernels(x.to(dt))
    assert launcher.fwd_variant(r, dh) == fwd_variant
    kw = dict(num_heads=H, latent_groups=g, causal=causal, **extra)
    ins = [x, down, up, b]
    exact = run_case(mlra_attention_reference, ins, torch.float64, go, mask, **kw)
    low = run_case(mlra_attention_reference, ins, dt, go, mask, **kw)
    got = run_case(mlra_kernels.mlra_attention, ins, dt, go, mask, **kw)
    smax = max_abs_score(*ins, **kw)
    names = ["out", "dx", "ddown", "dup", "dbias"]
    for name, a, lo, ex in zip(names, got, low, exact):
        assert a.dtype == dt and a.shape == ex.shape, name
        assert_close_rel(name, a, lo, ex, score_max=0.0 if name == "out" else smax)


def test_fully_masked_rows_are_zero_with_zero_grad():
    B, T, H, g, r, dh = 2, 20, 2, 1, 8, 32
    x, down, up, b, go = make_inputs(B, T, H, g, r, dh)
    mask = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
    mask[0] = True  # every key of batch 0 is padding
    mask[1, :5] = True  # causal rows 0..4 of batch 1 see nothing
    xs = x.float().requires_grad_()
    out = mlra_kernels.mlra_attention(xs, down.float(), up.float(), b.float(), num_heads=H, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[1, :5] == 0).all() and (out[1, 5:] != 0).any()
    out.backward(go.float())
    assert torch.isfinite(xs.grad).all()
    assert (xs.grad[0] == 0).all(), "nothing depends on a batch whose keys are all masked"


def test_float64_uses_torch_path_and_handwritten_backward():
    """float64 runs the op's torch path: its hand-written backward must match autograd on the oracle."""
    B, T, H, g, r, dh = 2, 11, 2, 2, 8, 16
    x, down, up, b, go = make_inputs(B, T, H, g, r, dh)
    mask = key_padding("random", B, T)
    assert kernel_path(x) == "torch"
    a = run_case(mlra_kernels.mlra_attention, [x, down, up, b], torch.float64, go, mask, num_heads=H, latent_groups=g)
    e = run_case(mlra_attention_reference, [x, down, up, b], torch.float64, go, mask, num_heads=H, latent_groups=g)
    for u, v in zip(a, e):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)


def _seed_after(manual_seed):
    """The seed the public call draws right after ``torch.manual_seed(manual_seed)``."""
    torch.manual_seed(manual_seed)
    return int(torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).item())


def test_dropout_matches_reference_with_kernel_mask(fwd_variant):
    B, T, H, g, r, dh, p = 2, 37, 2, 1, 16, 32, 0.3
    x, down, up, b, go = make_inputs(B, T, H, g, r, dh)
    mask = key_padding("random", B, T)
    _require_kernels(x.float())
    assert launcher.fwd_variant(r, dh) == fwd_variant
    keep = launcher.dropout_keep_mask(B, H, T, p, _seed_after(123), x.device)
    torch.manual_seed(123)
    got = run_case(mlra_kernels.mlra_attention, [x, down, up, b], torch.float32, go, mask,
                   num_heads=H, latent_groups=g, dropout_p=p)
    exact = run_case(mlra_attention_reference, [x, down, up, b], torch.float64, go, mask,
                     num_heads=H, latent_groups=g, dropout_p=p, dropout_mask=keep)
    low = run_case(mlra_attention_reference, [x, down, up, b], torch.float32, go, mask,
                   num_heads=H, latent_groups=g, dropout_p=p, dropout_mask=keep)
    for name, a, lo, ex in zip(["out", "dx", "ddown", "dup", "dbias"], got, low, exact):
        assert_close_rel(name, a, lo, ex)


def test_dropout_keep_statistics():
    B, H, T, p = 2, 3, 96, 0.25
    _require_kernels(torch.empty(1, 1, 1, device=DEVICE))
    keep = launcher.dropout_keep_mask(B, H, T, p, 987654, DEVICE).float()
    n = keep.numel()
    rate = keep.mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate:.4f}, expected {1 - p} ± {5 * sigma:.4f}"
    # Different heads, rows and seeds draw different masks.
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0, 0], keep[0, 0, 1])
    other = launcher.dropout_keep_mask(B, H, T, p, 987655, DEVICE).float()
    assert (keep != other).float().mean().item() > 0.2
    # Neighbouring entries are uncorrelated.
    a, c = keep[..., :-1].flatten() - (1 - p), keep[..., 1:].flatten() - (1 - p)
    corr = (a * c).mean().item() / (p * (1 - p))
    assert abs(corr) < 5 / math.sqrt(n)


def test_dropout_same_seed_same_result():
    B, T, H, g, r, dh = 1, 29, 2, 2, 8, 48
    x, down, up, b, go = make_inputs(B, T, H, g, r, dh)
    _require_kernels(x.half())
    kw = dict(num_heads=H, latent_groups=g, dropout_p=0.2)
    torch.manual_seed(7)
    a = run_case(mlra_kernels.mlra_attention, [x, down, up, b], torch.float16, go, None, **kw)
    torch.manual_seed(7)
    c = run_case(mlra_kernels.mlra_attention, [x, down, up, b], torch.float16, go, None, **kw)
    torch.manual_seed(8)
    e = run_case(mlra_kernels.mlra_attention, [x, down, up, b], torch.float16, go, None, **kw)
    for u, v in zip(a, c):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], e[0])
    # Dropout is unbiased: on average over seeds the output approaches the output without dropout.
    plain = run_case(mlra_kernels.mlra_attention, [x, down, up, b], torch.float32, go, None,
                     num_heads=H, latent_groups=g)[0]
    mean = torch.zeros_like(plain)
    for s in range(24):
        torch.manual_seed(100 + s)
        mean += mlra_kernels.mlra_attention(x.float(), down.float(), up.float(), b.float(), **kw).detach() / 24
    spread = (mean - plain).abs().mean() / plain.abs().mean()
    assert spread < 0.15, f"mean of dropout outputs is off by {spread:.3f} relative"


def _op_args(dtype=torch.float32, dropout=0.0):
    B, T, H, g, r, dh = 1, 19, 2, 1, 8, 32
    x, down, up, b, _ = make_inputs(B, T, H, g, r, dh)
    kpm = torch.zeros(B, T, device=DEVICE).masked_fill(key_padding("random", B, T), float("-inf"))
    seed = torch.tensor([1234]) if dropout > 0 else None
    leaves = [t.to(dtype).requires_grad_() for t in (x, down, up, b)]
    return (*leaves, kpm, seed, H, g, True, dropout, 1.0 / math.sqrt(dh))


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["plain", "dropout"])
def test_opcheck(dropout):
    """The Triton paths' op (the interpreter is a mode of Triton: one op for both)."""
    _require_kernels(torch.empty(1, 1, 1, device=DEVICE))
    torch.library.opcheck(torch.ops.mlra.mlra_attention_triton_fwd.default, _op_args(dropout=dropout))


def test_torch_compile_fullgraph_no_graph_break():
    B, T, H, g, r, dh = 2, 24, 2, 2, 8, 32
    x, down, up, b, go = make_inputs(B, T, H, g, r, dh)
    mask = key_padding("random", B, T)
    _require_kernels(x.float())
    w_o = torch.randn(H * dh, H * dh, dtype=torch.float64, device=DEVICE) * 0.1

    def layer(x, down, up, b):
        y = mlra_kernels.mlra_attention(x, down, up, b, num_heads=H, latent_groups=g, key_padding_mask=mask)
        return torch.nn.functional.linear(y, w_o.to(y.dtype)) + x

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    ins = [t.float() for t in (x, down, up, b)]
    a = run_case(lambda *t, key_padding_mask=None: compiled(*t), ins, torch.float32, go, None)
    e = run_case(lambda *t, key_padding_mask=None: layer(*t), ins, torch.float32, go, None)
    for u, v in zip(a, e):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_torch_compile_autocast_dropout_same_seed():
    B, T, H, g, r, dh = 1, 20, 2, 1, 8, 32
    x, down, up, b, go = make_inputs(B, T, H, g, r, dh)
    _require_kernels(x.bfloat16())
    leaves = [t.float().requires_grad_() for t in (x, down, up, b)]

    def f(x, down, up, b):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            y = mlra_kernels.mlra_attention(x, down, up, b, num_heads=H, dropout_p=0.1)
        return (y.float() * go.float()).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(11)
    loss = compiled(*leaves)
    loss.backward()
    grads = [t.grad.clone() for t in leaves]
    torch.manual_seed(11)
    assert compiled(*leaves).item() == loss.item()
    torch.manual_seed(11)
    assert f(*leaves).item() == loss.item(), "aot_eager draws the same seed as eager"
    assert all(torch.isfinite(g_).all() and g_.abs().sum() > 0 for g_ in grads)


@pytest.mark.parametrize("path", ["kernels", "torch-cpu", "torch"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x-fp32", "x-bf16"])
def test_autocast_bf16(x_dtype, path, monkeypatch):
    """Under autocast the fp32 weights (and x, whether fp32 or already bf16, as after an nn.Linear)
    run in bf16; output and every gradient stay within the bound of torch's own bf16 error."""
    B, T, H, g, r, dh = 1, 21, 2, 1, 16, 32
    x, down, up, b, go = make_inputs(B, T, H, g, r, dh)
    if path == "kernels":
        _require_kernels(x.bfloat16())
    else:
        monkeypatch.setenv("MLRA_BACKEND", path)
        assert kernel_path(x.bfloat16()) == path
    ins = [x, down, up, b]
    leaves = [x.to(x_dtype).requires_grad_()] + [t.float().requires_grad_() for t in ins[1:]]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = mlra_kernels.mlra_attention(*leaves, num_heads=H)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out, leaves, go.bfloat16())
    assert [t.dtype for t in grads] == [x_dtype] + [torch.float32] * 3
    exact = run_case(mlra_attention_reference, ins, torch.float64, go, None, num_heads=H)
    low = run_case(mlra_attention_reference, ins, torch.bfloat16, go, None, num_heads=H)
    for name, a, lo, ex in zip(["out", "dx", "ddown", "dup", "dbias"], [out, *grads], low, exact):
        assert_close_rel(name, a, lo, ex)


def test_general_attn_mask_warns_and_runs_the_torch_path():
    B, T, H, g, r, dh = 2, 9, 2, 1, 8, 16
    x, down, up, b, go = make_inputs(B, T, H, g, r, dh)
    am = torch.randn(T, T, dtype=torch.float64, device=DEVICE)
    _WARNED.difference_update({k for k in _WARNED if k.startswith("mlra-path:")})
    with pytest.warns(UserWarning, match="runs the 'torch' path: a general attn_mask is not fused"):
        out = mlra_kernels.mlra_attention(x.float(), down.float(), up.float(), b.float(), num_heads=H, attn_mask=am.float())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mlra_kernels.mlra_attention(x.float(), down.float(), up.float(), b.float(), num_heads=H, attn_mask=am.float())
    ref = mlra_attention_reference(x, down, up, b, num_heads=H, attn_mask=am)
    assert (out.double() - ref).abs().max() < 1e-4


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(num_heads=3), "num_heads"),
        (dict(latent_groups=3), "latent_groups"),
        (dict(down="bad_shape"), "down must be"),
        (dict(up="bad_dtype"), "dtype"),
        (dict(bias="bad_shape"), "bias must be"),
        (dict(key_padding_mask="bad_shape"), "key_padding_mask"),
        (dict(attn_mask="bad_shape"), "attn_mask"),
        (dict(dropout_p=1.0), "dropout_p"),
    ],
    ids=["heads", "groups", "down", "dtype", "bias", "kpm", "attn_mask", "dropout"],
)
def test_argument_errors(change, match):
    x, down, up, b, _ = make_inputs(1, 5, 2, 2, 4, 8, device="cpu")
    kw = dict(num_heads=2, latent_groups=2)
    args = dict(x=x, down=down, up=up, bias=b)
    for k, v in change.items():
        if v == "bad_shape":
            args[k] = torch.zeros(3, 3, dtype=torch.float64) if k in ("down", "bias") else torch.zeros(2, 2, dtype=torch.bool)
        elif v == "bad_dtype":
            args[k] = args[k].float()
        elif k in args:
            args[k] = v
        else:
            kw[k] = v
    key_args = {k: args.pop(k) for k in ("key_padding_mask", "attn_mask") if k in args}
    with pytest.raises((ValueError, TypeError), match=match):
        mlra_kernels.mlra_attention(args["x"], args["down"], args["up"], args["bias"], **kw, **key_args)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(x=[[0.0]]), TypeError, "x must be a Tensor, got list"),
        (dict(down=None), TypeError, "down must be a Tensor, got NoneType"),
        (dict(up=1.0), TypeError, "up must be a Tensor, got float"),
        (dict(bias="b"), TypeError, "bias must be a Tensor or None, got str"),
        (dict(key_padding_mask=[[False] * 5]), TypeError, "key_padding_mask must be a Tensor or None"),
        (dict(key_padding_mask=torch.zeros(1, 5, dtype=torch.int64)), TypeError,
         "only bool and floating types of key_padding_mask are supported, got torch.int64"),
        (dict(attn_mask=torch.zeros(5, 5, dtype=torch.uint8)), TypeError,
         "only bool and floating types of attn_mask are supported, got torch.uint8"),
        (dict(attn_mask=torch.zeros(5, 5, dtype=torch.bool, device="meta")), ValueError,
         "attn_mask is on meta but x is on cpu"),
        (dict(key_padding_mask=torch.zeros(1, 5, dtype=torch.bool, device="meta")), ValueError,
         "key_padding_mask is on meta but x is on cpu"),
    ],
    ids=["x-list", "down-none", "up-float", "bias-str", "kpm-list", "kpm-int", "attn-uint8", "attn-device",
         "kpm-device"],
)
def test_argument_type_and_device_errors(change, exc, match):
    """Non-tensors are named, integer masks are refused (not added to the scores as 0/1), as in
    nn.MultiheadAttention, and masks must be on x's device."""
    x, down, up, b, _ = make_inputs(1, 5, 2, 2, 4, 8, device="cpu")
    args = dict(x=x, down=down, up=up, bias=b, key_padding_mask=None, attn_mask=None)
    args.update(change)
    with pytest.raises(exc, match=match):
        mlra_kernels.mlra_attention(
            args["x"], args["down"], args["up"], args["bias"], num_heads=2, latent_groups=2,
            key_padding_mask=args["key_padding_mask"], attn_mask=args["attn_mask"],
        )


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(scale=0.0), ValueError, "scale must be a positive finite float .*got 0.0"),
        (dict(scale=-0.5), ValueError, "scale must be a positive finite float .*got -0.5"),
        (dict(scale=float("nan")), ValueError, "scale must be a positive finite float .*got nan"),
        (dict(scale=float("inf")), ValueError, "scale must be a positive finite float .*got inf"),
        (dict(scale="0.1"), TypeError, "scale must be a positive float or None, got '0.1' \\(str\\)"),
        (dict(scale=torch.ones(2)), TypeError, "scale must be a positive float or None, got .* \\(Tensor\\)"),
        (dict(num_heads="2"), TypeError, "num_heads must be a positive int, got '2' \\(str\\)"),
        (dict(num_heads=None), TypeError, "num_heads must be a positive int, got None"),
        (dict(num_heads=2.0), TypeError, "num_heads must be a positive int, got 2.0 \\(float\\)"),
        (dict(latent_groups=True), TypeError, "latent_groups must be a positive int, got True"),
        (dict(dropout_p="0.1"), TypeError, "dropout_p must be a float in \\[0, 1\\), got '0.1'"),
        (dict(dropout_p=None), TypeError, "dropout_p must be a float in \\[0, 1\\), got None"),
        (dict(dropout_p=-0.1), ValueError, "dropout_p must be in \\[0, 1\\), got -0.1"),
        (dict(causal="yes"), TypeError, "causal must be a bool, got 'yes'"),
    ],
    ids=["scale0", "scale-neg", "scale-nan", "scale-inf", "scale-str", "scale-tensor", "heads-str", "heads-none",
         "heads-float", "groups-bool", "dropout-str", "dropout-none", "dropout-neg", "causal-str"],
)
def test_scalar_arguments_are_checked_before_use(kw, exc, match):
    """A non-finite or non-positive scale is an error (torch's fused CPU attention returns NaN for 0 or
    a negative scale at T >= 16); wrong types are named, not a comparison error from inside."""
    x, down, up, b, _ = make_inputs(1, 20, 2, 1, 4, 8, device="cpu")
    args = dict(num_heads=2, latent_groups=1)
    args.update(kw)
    with pytest.raises(exc, match=match):
        mlra_kernels.mlra_attention(x.float(), down.float(), up.float(), b.float(), **args)


def test_integral_scalars_of_other_types_are_accepted():
    import numpy as np

    x, down, up, b, _ = make_inputs(1, 20, 2, 1, 4, 8, device="cpu")
    ins = [t.float() for t in (x, down, up, b)]
    expected = mlra_kernels.mlra_attention(*ins, num_heads=2, scale=0.25)
    got = mlra_kernels.mlra_attention(*ins, num_heads=np.int64(2), latent_groups=np.int32(1), scale=np.float32(0.25))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_fwd_variant_choice(monkeypatch):
    monkeypatch.setenv("MLRA_FWD_VARIANT", "auto")
    assert launcher.fwd_variant(8, 64) == "absorbed" and launcher.fwd_variant(192, 64) == "rebuild"
    monkeypatch.setenv("MLRA_FWD_VARIANT", "absorbed")
    assert launcher.fwd_variant(512, 64) == "rebuild", "the absorbed kernel holds at most r = 256"
    monkeypatch.setenv("MLRA_FWD_VARIANT", "fastest")
    with pytest.raises(ValueError, match="MLRA_FWD_VARIANT"):
        launcher.fwd_variant(8, 64)


def test_factors_from_dense_exact_at_full_rank():
    d, H = 32, 4
    gen = torch.Generator().manual_seed(3)
    mha = torch.nn.MultiheadAttention(d, H, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.randn(3 * d, d, generator=gen, dtype=torch.float64) / math.sqrt(d))
        mha.in_proj_bias.copy_(torch.randn(3 * d, generator=gen, dtype=torch.float64) * 0.1)
    down, up, bias = mlra_kernels.ops.mlra.factors_from_dense(mha.in_proj_weight, mha.in_proj_bias, num_heads=H, rank=d)
    x = torch.randn(2, 7, d, generator=gen, dtype=torch.float64)
    causal = torch.triu(torch.ones(7, 7, dtype=torch.bool), 1)
    want, _ = mha(x, x, x, attn_mask=causal, need_weights=False)
    got = mlra_kernels.mlra_attention(x, down, up, bias, num_heads=H)
    got = torch.nn.functional.linear(got, mha.out_proj.weight, mha.out_proj.bias)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
