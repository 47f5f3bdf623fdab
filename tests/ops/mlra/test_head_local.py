"""Head-local MLRA ops: the factors of a subset of whole latent groups of a layer's heads (for g = 1, any
subset of its heads), as tensor parallelism gives each rank (DESIGN.md, "Scale").

Given the local factors (``up[:, cols]``, those groups' rows of ``down``, ``bias`` at ``cols`` of each
projection, ``num_heads = H_loc``, ``latent_groups = g_loc``), every op gives ``[.., H_loc·d_h]``: those
heads' columns of the whole op's output. Backward, with the whole op's upstream gradient zero outside the
local columns (and the local op's upstream gradient those columns of it): the whole op's ``dx`` equals
the local op's ``dx``, and the local factors' gradients equal the matching slices of the whole op's factor
gradients (the other groups' rows of ``down`` get zero). With the whole upstream gradient, ``dx`` is the
sum of the local ``dx`` over a partition of the heads (what a rank contributes to tensor parallelism's
all-reduce), and so is ``ddown`` at ``g = 1``, where every rank holds the one latent group's ``down``.

Expected values are the whole op's, in float64 on the exact ``"torch"`` path. float64 paths match them to
float64 rounding; float32 paths (``"torch-cpu"``, ``"torch-cpu-latent"``, the Triton kernels, the decode
kernels) stay within the rule of ``tests/helpers.py``: the error of torch's own float32 computation of the
whole op (the reference, or decode's torch path), times 3.
"""

import pytest
import torch

import mlra_kernels
from mlra_kernels import _ext
from mlra_kernels.ops.mlra import (
    backend, config, kernel_path, kv_latents, mlra_attention_dense, mlra_decode, use_backend,
)
from mlra_kernels.ops.mlra.reference import mlra_attention_reference
from tests.helpers import (
    DEVICE, assert_close_rel, assert_within_torch_error, decode_case, make_inputs, max_abs_score, run_case,
)

F64 = torch.float64

# id: (H, g, r, d_h, local heads). A subset holds whole latent groups; at g = 1 any heads of the one group.
SUBSETS = {
    "g1-heads12": (4, 1, 8, 8, (1, 2)),
    "g1-heads03": (4, 1, 10, 12, (0, 3)),
    "g2-group1": (4, 2, 8, 8, (2, 3)),
    "gH-head2": (4, 4, 8, 32, (2,)),
    "gH-heads13": (4, 4, 8, 32, (1, 3)),
}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.delenv("MLRA_BACKEND", raising=False)
    monkeypatch.setattr(config, "POISON_OUTPUTS", True)  # a kernel output element never written shows as NaN


def local_of(H, g, r, dh, heads):
    """``(cols, rows, g_loc)``: the local heads' output columns (of ``H·d_h``), their groups' rows of
    ``down`` (of ``3·g·r``) and how many groups they are."""
    hpg = H // g
    groups = sorted({h // hpg for h in heads})
    assert g == 1 or sorted(heads) == [j * hpg + i for j in groups for i in range(hpg)], "not whole groups"
    cols = torch.tensor([h * dh + i for h in heads for i in range(dh)])
    rows = torch.tensor([p * g * r + j * r + i for p in range(3) for j in groups for i in range(r)])
    return cols, rows, len(groups)


def local_factors(down, up, bias, cols, rows):
    D = up.shape[1]
    return down[rows], up[:, cols], (bias.view(3, D)[:, cols].reshape(-1) if bias is not None else None)


def slice_grads(whole, cols, rows):
    """The whole op's ``[out, dx, ddown, dup, (dbias)]`` cut to what the local op returns."""
    out, dx, ddown, dup, *dbias = whole
    D = dup.shape[1]
    return [out[..., cols], dx, ddown[rows], dup[:, cols], *(db.view(3, D)[:, cols].reshape(-1) for db in dbias)]


def attention(path, dtype, ins, go, H, g, device="cpu", **kw):
    """``[out, dx, ddown, dup, (dbias)]`` of ``mlra_attention`` on ``path`` in ``dtype``."""
    with use_backend(path):
        return run_case(mlra_kernels.mlra_attention, [t.to(device) if t is not None else None for t in ins], dtype,
                        go.to(device), None, num_heads=H, latent_groups=g, **kw)


def whole_and_local(name, bias, B=2, T=20, seed=0, device="cpu"):
    """float64 whole inputs, the local ones, the whole upstream gradient zero outside the local columns and
    its local columns."""
    H, g, r, dh, heads = SUBSETS[name]
    x, down, up, b, go = make_inputs(B, T, H, g, r, dh, bias=bias, seed=seed, device="cpu")
    cols, rows, g_loc = local_of(H, g, r, dh, heads)
    go_whole = torch.zeros_like(go)
    go_whole[..., cols] = go[..., cols]
    ins = [x, down, up, b]
    ins_loc = [x, *local_factors(down, up, b, cols, rows)]
    return dict(H=H, g=g, H_loc=len(heads), g_loc=g_loc, cols=cols, rows=rows, ins=ins, ins_loc=ins_loc,
                go_whole=go_whole, go_loc=go[..., cols].contiguous())


def check_exact(got, whole, c, what):
    names = ["out", "dx", "ddown", "dup", "dbias"]
    for n, a, e in zip(names, got, slice_grads(whole, c["cols"], c["rows"])):
        assert a.shape == e.shape, f"{what} {n}: {tuple(a.shape)} != {tuple(e.shape)}"
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"{what} {n}: {m}")
    others = torch.ones(whole[2].shape[0], dtype=torch.bool)
    others[c["rows"]] = False
    assert (whole[2][others] == 0).all(), f"{what}: other groups' rows of down got a gradient"


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("name", list(SUBSETS))
@pytest.mark.parametrize("path", ["torch", "sdpa"])
def test_prefill_float64_paths_give_the_whole_ops_columns(path, name, bias):
    """The exact paths in float64; at d_h = 32, r = 8 (the g = H subsets) "sdpa" attends on the latents."""
    c = whole_and_local(name, bias)
    whole = attention("torch", F64, c["ins"], c["go_whole"], c["H"], c["g"])
    got = attention(path, F64, c["ins_loc"], c["go_loc"], c["H_loc"], c["g_loc"])
    check_exact(got, whole, c, f"{path} {name}")


def check_float32(got, c, **ref_kw):
    """``got`` (float32, local) against the whole op's columns in float64, within 3x the float32 reference's
    error on those columns."""
    H, g = c["H"], c["g"]
    exact = slice_grads(attention("torch", F64, c["ins"], c["go_whole"], H, g), c["cols"], c["rows"])
    low = run_case(mlra_attention_reference, c["ins"], torch.float32, c["go_whole"], None, num_heads=H,
                   latent_groups=g, **ref_kw)
    low = slice_grads(low, c["cols"], c["rows"])
    smax = max_abs_score(*c["ins"], num_heads=H, latent_groups=g)
    for n, a, lo, ex in zip(["out", "dx", "ddown", "dup", "dbias"], got, low, exact):
        assert a.dtype == torch.float32 and a.shape == ex.shape, n
        assert_close_rel(n, a, lo, ex, score_max=0.0 if n == "out" else smax)


@pytest.mark.parametrize("name,bias", [("g1-heads03", True), ("g2-group1", False), ("gH-heads13", True),
                                       ("gH-head2", False)])
@pytest.mark.parametrize("path", ["torch-cpu", "torch-cpu-latent"])
def test_prefill_cpu_fused_paths(path, name, bias):
    c = whole_and_local(name, bias)
    got = attention(path, torch.float32, c["ins_loc"], c["go_loc"], c["H_loc"], c["g_loc"])
    check_float32(got, c)


@pytest.mark.parametrize("name,path", [("gH-heads13", "torch-cpu-latent"), ("g1-heads03", "torch-cpu")])
def test_the_default_cpu_path_reads_the_local_head_width(name, path, monkeypatch):
    """Without the interpreter, the choice reads d_h = up.shape[1] // num_heads: a g = H subset at d_h = 32,
    r = 8 attends on the latents, as the whole op does."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    c = whole_and_local(name, True)
    x, _, up, _ = (t.float() for t in c["ins_loc"])
    assert kernel_path(x, rank=up.shape[-1], head_dim=up.shape[1] // c["H_loc"]) == path
    got = attention("auto", torch.float32, c["ins_loc"], c["go_loc"], c["H_loc"], c["g_loc"])
    check_float32(got, c)


def _triton_kernel_path():
    pytest.importorskip("triton", reason="the Triton kernels need triton")
    if DEVICE == "cuda":
        return "triton"
    if not backend.triton_interpreted():  # pragma: no cover - conftest sets TRITON_INTERPRET before the import
        pytest.skip("triton was imported without TRITON_INTERPRET=1 on a CPU machine")
    return "triton-interpreter"


@pytest.mark.parametrize("variant", ["rebuild", "absorbed"])
@pytest.mark.parametrize("name,bias", [("g1-heads03", True), ("g2-group1", True), ("gH-head2", False)])
def test_prefill_triton_kernels(name, bias, variant, monkeypatch):
    """The forward kernels (q/k/v rebuilt on chip, or attention on the latents) and the backward kernels,
    at small shapes (T = 19: not a multiple of a tile)."""
    path = _triton_kernel_path()
    monkeypatch.setenv("MLRA_FWD_VARIANT", variant)
    c = whole_and_local(name, bias, B=1, T=19)
    got = attention(path, torch.float32, c["ins_loc"], c["go_loc"], c["H_loc"], c["g_loc"], device=DEVICE)
    check_float32([t.cpu() for t in got], c)


@pytest.mark.parametrize("H,g,parts", [(4, 1, [(0, 1), (2, 3)]), (4, 2, [(0, 1), (2, 3)]),
                                       (4, 4, [(0,), (1, 2), (3,)])], ids=["g1-tp2", "g2-tp2", "gH-tp3"])
def test_a_partition_of_the_heads_rebuilds_the_whole_op(H, g, parts):
    """Over a partition of the heads, the local outputs side by side are the whole output; with the whole
    upstream gradient the local dx add up to the whole dx (the all-reduce of tensor parallelism), the
    ddown add up at g = 1 (the one group's down, replicated) and fill disjoint rows at g > 1."""
    r, dh = 8, 8
    x, down, up, b, go = make_inputs(2, 20, H, g, r, dh, device="cpu")
    whole = attention("torch", F64, [x, down, up, b], go, H, g)
    out = torch.empty_like(whole[0])
    dx, ddown, dup, dbias = (torch.zeros_like(t) for t in whole[1:])
    for heads in parts:
        cols, rows, g_loc = local_of(H, g, r, dh, heads)
        loc = attention("torch", F64, [x, *local_factors(down, up, b, cols, rows)], go[..., cols].contiguous(),
                        len(heads), g_loc)
        out[..., cols] = loc[0]
        dx += loc[1]
        ddown[rows] += loc[2]
        dup[:, cols] = loc[3]
        dbias.view(3, -1)[:, cols] = loc[4].view(3, -1)
    for n, a, e in zip(["out", "dx", "ddown", "dup", "dbias"], [out, dx, ddown, dup, dbias], whole):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", ["g1-heads03", "g2-group1", "gH-heads13"])
def test_dense_cross_attention_and_weights(name):
    """``mlra_attention_dense`` with query, key and value apart: the local output, weights and gradients."""
    H, g, r, dh, heads = SUBSETS[name]
    cols, rows, g_loc = local_of(H, g, r, dh, heads)
    gen = torch.Generator().manual_seed(3)
    B, T, S, d = 2, 5, 9, H * dh
    q_in, k_in, v_in = (torch.randn(B, n, d, generator=gen, dtype=F64) for n in (T, S, S))
    _, down, up, b, _ = make_inputs(1, 1, H, g, r, dh, device="cpu")
    go = torch.randn(B, T, len(heads) * dh, generator=gen, dtype=F64)
    go_whole = torch.zeros(B, T, d, dtype=F64)
    go_whole[..., cols] = go

    def run(factors, nh, ng, grad_out):
        leaves = [t.clone().requires_grad_() for t in (q_in, k_in, v_in, *factors)]
        out, w = mlra_attention_dense(*leaves, num_heads=nh, latent_groups=ng, causal=True, need_weights=True)
        return [out, w, *torch.autograd.grad(out, leaves, grad_out)]

    whole = run((down, up, b), H, g, go_whole)
    got = run(local_factors(down, up, b, cols, rows), len(heads), g_loc, go)
    expected = [whole[0][..., cols], whole[1][:, list(heads)], *whole[2:5], whole[5][rows], whole[6][:, cols],
                whole[7].view(3, d)[:, cols].reshape(-1)]
    for n, a, e in zip(["out", "weights", "dq_in", "dk_in", "dv_in", "ddown", "dup", "dbias"], got, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")


# Decode: (B, t, S) per subset; t = 2 for one of them (several new tokens).
DECODE_SIZES = {"g1-heads12": (2, 1, 19), "g1-heads03": (1, 2, 23), "g2-group1": (2, 1, 17), "gH-head2": (2, 1, 21),
                "gH-heads13": (1, 2, 18)}


def decode_whole_and_local(name, bias):
    H, g, r, dh, heads = SUBSETS[name]
    B, t, S = DECODE_SIZES[name]
    x, down, up, b, c_k, c_v = decode_case(B, t, S, H, g, r, dh, seed=5)
    b = b if bias else None
    cols, rows, g_loc = local_of(H, g, r, dh, heads)
    groups = sorted({h // (H // g) for h in heads})
    whole = (x, down, up, b, c_k, c_v)
    local = (x, *local_factors(down, up, b, cols, rows), c_k[:, groups], c_v[:, groups])
    return dict(H=H, g=g, H_loc=len(heads), g_loc=g_loc, cols=cols, rows=rows, whole=whole, local=local)


def decode(path, dtype, case, H, g, token_major=False):
    x, down, up, bias, c_k, c_v = (t.to(dtype) if t is not None else None for t in case)
    if token_major:  # [B, S, g·r], read through a strided view
        B, _, S, r = c_k.shape
        c_k, c_v = (c.transpose(1, 2).reshape(B, S, g * r) for c in (c_k, c_v))
    with use_backend(path), torch.no_grad():
        return mlra_decode(x, down, up, bias, cache_k=c_k, cache_v=c_v, num_heads=H, latent_groups=g)[0]


def decode_exact_and_low(c, token_major=False):
    exact = decode("torch", F64, c["whole"], c["H"], c["g"], token_major)[..., c["cols"]]
    low = decode("torch", torch.float32, c["whole"], c["H"], c["g"], token_major)[..., c["cols"]]
    return exact, low


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("name", list(SUBSETS))
def test_decode_torch_path_float64(name, bias):
    c = decode_whole_and_local(name, bias)
    exact, _ = decode_exact_and_low(c)
    got = decode("torch", F64, c["local"], c["H_loc"], c["g_loc"])
    assert got.shape == exact.shape
    torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-12)


def test_decode_gradients_float64():
    """Decode's torch path is differentiable: the local factors' gradients are the whole op's slices."""
    c = decode_whole_and_local("g2-group1", True)
    H, g, cols, rows = c["H"], c["g"], c["cols"], c["rows"]
    x, up = c["whole"][0], c["whole"][2]
    B, t, _ = x.shape
    go = torch.randn(B, t, len(cols), generator=torch.Generator().manual_seed(9), dtype=F64)
    go_whole = torch.zeros(B, t, up.shape[1], dtype=F64)
    go_whole[..., cols] = go

    def grads(case, nh, ng, grad_out):
        leaves = [t_.clone().requires_grad_() for t_ in case[:4]]
        out, _ = mlra_decode(*leaves, cache_k=case[4], cache_v=case[5], num_heads=nh, latent_groups=ng)
        return torch.autograd.grad(out, leaves, grad_out)

    whole = grads(c["whole"], H, g, go_whole)
    got = grads(c["local"], c["H_loc"], c["g_loc"], go)
    expected = [whole[0], whole[1][rows], whole[2][:, cols], whole[3].view(3, -1)[:, cols].reshape(-1)]
    for n, a, e in zip(["dx", "ddown", "dup", "dbias"], got, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name,bias,token_major", [("g1-heads12", True, False), ("g1-heads03", False, True),
                                                   ("g2-group1", True, True), ("gH-head2", True, False),
                                                   ("gH-heads13", False, False)])
def test_decode_cpu_kernel(name, bias, token_major):
    """The C++ decode kernel (the float32 CPU default) sees only q̃ and the local groups' latents."""
    try:
        _ext.load()
    except _ext.ExtensionNotAvailableError as err:  # pragma: no cover - the test command builds it
        pytest.skip(f"the compiled extension is not available: {err}")
    c = decode_whole_and_local(name, bias)
    assert kernel_path(c["local"][0].float(), op="decode", requires_grad=False) == "cpu-kernel"
    exact, low = decode_exact_and_low(c, token_major)
    got = decode("auto", torch.float32, c["local"], c["H_loc"], c["g_loc"], token_major)
    assert got.shape == exact.shape and torch.isfinite(got).all()
    assert_within_torch_error(got, low, exact, what=f"C++ decode kernel, {name}")


@pytest.mark.parametrize("name,bias", [("g1-heads03", True), ("g2-group1", False), ("gH-heads13", True)])
def test_decode_triton_kernel(name, bias):
    path = _triton_kernel_path()
    c = decode_whole_and_local(name, bias)
    exact, low = decode_exact_and_low(c)
    local = tuple(t.to(DEVICE) if t is not None else None for t in c["local"])
    got = decode(path, torch.float32, local, c["H_loc"], c["g_loc"]).cpu()
    assert got.shape == exact.shape and torch.isfinite(got).all()
    assert_within_torch_error(got, low.cpu(), exact.cpu(), what=f"Triton decode kernel, {name}")


@pytest.mark.parametrize("name", ["g1-heads03", "g2-group1", "gH-heads13"])
def test_kv_latents_of_the_local_groups(name):
    H, g, r, dh, heads = SUBSETS[name]
    _, rows, g_loc = local_of(H, g, r, dh, heads)
    groups = sorted({h // (H // g) for h in heads})
    x, down, _, _, _ = make_inputs(2, 7, H, g, r, dh, device="cpu")
    k_whole, v_whole = kv_latents(x, down, g, group_major=True)
    k_loc, v_loc = kv_latents(x, down[rows], g_loc, group_major=True)
    torch.testing.assert_close(k_loc, k_whole[:, groups], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v_loc, v_whole[:, groups], rtol=1e-12, atol=1e-12)
    k_tok, v_tok = kv_latents(x, down[rows], g_loc)
    B, T = x.shape[:2]
    for loc, whole in ((k_tok, k_whole), (v_tok, v_whole)):
        torch.testing.assert_close(loc, whole[:, groups].transpose(1, 2).reshape(B, T, g_loc * r), rtol=1e-12,
                                   atol=1e-12)


def test_the_custom_ops_check_at_local_shapes():
    """The registered forward and backward (their fakes included) at a local width, H·d_h != d."""
    c = whole_and_local("g2-group1", True, B=1, T=20)
    x, down, up, b = (t.float() for t in c["ins_loc"])
    go, scalars, ops = c["go_loc"].float(), (c["H_loc"], c["g_loc"], True), torch.ops.mlra
    fwd = (x, down, up, b, None, None, None, *scalars, 0.0, 0.25)  # the "torch" path's op
    torch.library.opcheck(ops.mlra_attention_torch_fwd.default, fwd)
    o = ops.mlra_attention_torch_fwd(*fwd)
    assert o.shape == (1, 20, up.shape[1]) != x.shape
    torch.library.opcheck(ops.mlra_attention_torch_bwd.default, (go, *fwd))
    fwd = (x, down, up, b, *scalars, 0.25)  # the "torch-cpu" path's op
    torch.library.opcheck(ops.mlra_attention_torch_cpu_fwd.default, fwd)
    o, lse, qkv, c_ = ops.mlra_attention_torch_cpu_fwd(*fwd)
    assert o.shape == (1, 20, up.shape[1]) != x.shape
    torch.library.opcheck(ops.mlra_attention_torch_cpu_bwd.default, (go, x, down, up, o, lse, qkv, c_, *scalars, 0.25))


@pytest.mark.parametrize(
    "change,match",
    [
        ("up", r"up.shape\[1\]=15 must be a positive multiple of num_heads=2 \(up is \[3, H·d_h, r\]\)"),
        ("down", r"down must be \[3·g·r, d\] = \[24, 32\] \(g=1, r=8, d=(x|query).shape\[-1\]\), got \(48, 32\)"),
        ("bias", r"bias must be \[3·H·d_h\] = \[48\] \(H=2, d_h=8\), got \(96,\)"),
    ],
    ids=["up", "down", "bias"],
)
@pytest.mark.parametrize("op", ["attention", "dense", "decode"])
def test_bad_local_shapes_are_named(op, change, match):
    """A local factor that does not fit the others: the message names it, what it was and what it must be."""
    c = whole_and_local("g2-group1", True, B=1, T=4)
    x, down, up, b = c["ins_loc"]
    if change == "up":
        up = up[:, :15]
    elif change == "down":
        down = c["ins"][1]
    else:
        b = c["ins"][3]
    H, g = c["H_loc"], c["g_loc"]
    with pytest.raises(ValueError, match=match):
        if op == "attention":
            mlra_kernels.mlra_attention(x, down, up, b, num_heads=H, latent_groups=g)
        elif op == "dense":
            mlra_attention_dense(x, x, x, down, up, b, num_heads=H, latent_groups=g)
        else:
            cache = torch.zeros(1, g, 4, 8, dtype=F64)
            mlra_decode(x, down, up, b, cache_k=cache, cache_v=cache, num_heads=H, latent_groups=g)
