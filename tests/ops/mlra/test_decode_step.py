"""A layer's whole decode step on pre-multiplied weights (``step_weights.step_weights``): the Python step
(``step_latents`` / ``step_output``) in float64 against the reference attention followed by ``W_O``, and
the C++ whole-step op ``mlra::latent_decode_step_cpu`` in float32 against float64, within 3x the error of
the unfused float32 torch path (``mlra_decode`` then ``W_O``)."""

from typing import Callable, NamedTuple

import pytest
import torch
import torch.nn.functional as F

from mlra_kernels import _ext
from mlra_kernels.ops.mlra import (
    LatentCache, OutputProjection, StepWeightsMemo, decode_step, kv_latents, mlra_decode, use_backend,
)
from mlra_kernels.ops.mlra.decode import _torch_attention
from mlra_kernels.ops.mlra.step import step_latents, step_output
from mlra_kernels.ops.mlra.step_weights import fold_rules, step_weights
from mlra_kernels.ops.mlra.reference import mlra_attention_reference
from tests.helpers import assert_within_torch_error


def test_fold_rules_take_the_smaller_read():
    # GPT-2 small and the decode benchmark's layer: g = 1, r = d/4 folds nothing; g = H, g·r = d/4 folds both.
    assert fold_rules(768, 12, 1, 192) == (False, False)
    assert fold_rules(768, 12, 12, 16) == (True, True)
    assert fold_rules(512, 8, 1, 128) == (False, False)
    assert fold_rules(512, 8, 8, 16) == (True, True)
    assert fold_rules(64, 4, 1, 16) == (False, True)
    assert fold_rules(64, 4, 1, 48) == (True, False)


# (H, g, r) at d = 64, one per combination of folds (query, output).
FOLDS = {"none": (4, 1, 32), "output": (4, 1, 16), "query": (4, 1, 48), "query-g2": (4, 2, 32), "both": (4, 4, 8),
         "output-g2": (4, 2, 4)}


def layer_case(H, g, r, *, B=2, S=9, t=1, bias=True, seed=0):
    """float64 ``(seq [B, S + t, d], down, up, bias, w_o, b_o)``: the last ``t`` tokens are the step's."""
    gen = torch.Generator().manual_seed(seed)
    d = 64
    seq = torch.randn(B, S + t, d, generator=gen, dtype=torch.float64)
    down = torch.randn(3 * g * r, d, generator=gen, dtype=torch.float64) / d ** 0.5
    up = torch.randn(3, d, r, generator=gen, dtype=torch.float64) / r ** 0.5
    b = torch.randn(3 * d, generator=gen, dtype=torch.float64) * 0.2 if bias else None
    w_o = torch.randn(d, d, generator=gen, dtype=torch.float64) / d ** 0.5
    b_o = torch.randn(d, generator=gen, dtype=torch.float64) * 0.2 if bias else None
    return seq, down, up, b, w_o, b_o


def expected(case, H, g, t):
    seq, down, up, b, w_o, b_o = case
    o = mlra_attention_reference(seq, down, up, b, num_heads=H, latent_groups=g, causal=True)[:, -t:]
    return F.linear(o, w_o, b_o)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("fold", list(FOLDS))
def test_python_step_is_exact_in_float64(fold, t, bias):
    H, g, r = FOLDS[fold]
    case = layer_case(H, g, r, t=t, bias=bias)
    seq, down, up, b, w_o, b_o = case
    w = step_weights(down, up, b, w_o, b_o, num_heads=H, latent_groups=g)
    assert (w.m is None, w.w_v is None) == fold_rules(64, H, g, r)
    x = seq[:, -t:]
    q_abs, c_k, c_v = step_latents(x, w)
    old_k, old_v = kv_latents(seq[:, :-t], down, g, group_major=True)
    k, v = torch.cat([old_k, c_k], 2), torch.cat([old_v, c_v], 2)
    B = seq.shape[0]
    z, _ = _torch_attention(q_abs, k, v, (64 // H) ** -0.5, B=B, H=H, g=g, t=t, causal=True, key_padding_mask=None,
                            attn_mask=None, lengths=None, dropout_p=0.0, need_weights=False)
    torch.testing.assert_close(step_output(z, w, t), expected(case, H, g, t), rtol=1e-10, atol=1e-10)


def _step_op():
    try:
        _ext.load()
    except _ext.ExtensionNotAvailableError as err:  # pragma: no cover - the test command builds it
        pytest.skip(f"the compiled extension is not available: {err}")
    return torch.ops.mlra.latent_decode_step_cpu


def _run_op(case, H, g, r, t, capacity, dtype=torch.float32):
    """The C++ step on a cache of ``capacity`` positions holding the first S tokens' latents; returns
    ``(out, k_buf, v_buf, seqlens)``."""
    op = _step_op()
    seq, down, up, b, w_o, b_o = (c.to(dtype) if c is not None else None for c in case)
    B, S = seq.shape[0], seq.shape[1] - t
    w = step_weights(down, up, b, w_o, b_o, num_heads=H, latent_groups=g)
    k_buf = torch.full((B, g, capacity, r), 7.0, dtype=dtype)
    v_buf = torch.full((B, g, capacity, r), 7.0, dtype=dtype)
    old_k, old_v = kv_latents(seq[:, :S], down, g, group_major=True)
    k_buf[:, :, :S], v_buf[:, :, :S] = old_k, old_v
    seqlens = torch.full((B,), S, dtype=torch.int32)
    out = op(seq[:, S:], w.w_in, w.b_in, w.m, w.beta, w.w_v, w.b_v, w.w_out, w.b_out, k_buf, v_buf, seqlens, S, H,
             (64 // H) ** -0.5)
    return out, k_buf, v_buf, seqlens


def _unfused_fp32(case, H, g, t):
    """``mlra_decode`` (torch path) then ``W_O`` in float32: the error the fused op is held to."""
    seq, down, up, b, w_o, b_o = (c.float() if c is not None else None for c in case)
    c_k, c_v = kv_latents(seq, down, g, group_major=True)
    with use_backend("torch"), torch.no_grad():
        o, _ = mlra_decode(seq[:, -t:], down, up, b, cache_k=c_k, cache_v=c_v, num_heads=H, latent_groups=g)
    return F.linear(o, w_o, b_o)


@pytest.mark.parametrize("t", [1, 2])
@pytest.mark.parametrize("fold", list(FOLDS))
def test_step_op_matches_float64(fold, t):
    H, g, r = FOLDS[fold]
    case = layer_case(H, g, r, B=3, S=300, t=t)
    out, *_ = _run_op(case, H, g, r, t, capacity=320)
    assert_within_torch_error(out, _unfused_fp32(case, H, g, t), expected(case, H, g, t), what="decode step error")


@pytest.mark.parametrize("fold", ["none", "both"])
def test_step_op_with_more_rows_than_its_own_gemm_takes(fold):
    # B·t = 18 > 16 rows: the GEMMs go to at::bmm, writing the same strided outputs.
    H, g, r = FOLDS[fold]
    case = layer_case(H, g, r, B=9, S=40, t=2)
    out, *_ = _run_op(case, H, g, r, 2, capacity=48)
    assert_within_torch_error(out, _unfused_fp32(case, H, g, 2), expected(case, H, g, 2), what="decode step error")


def test_step_op_writes_the_new_latents_in_place_and_counts_them():
    H, g, r, t, S = 4, 2, 4, 2, 9
    case = layer_case(H, g, r, B=2, S=S, t=t, bias=False)
    _, k_buf, v_buf, seqlens = _run_op(case, H, g, r, t, capacity=16)
    c_k, c_v = kv_latents(case[0].float(), case[1].float(), g, group_major=True)
    torch.testing.assert_close(k_buf[:, :, :S + t], c_k)
    torch.testing.assert_close(v_buf[:, :, :S + t], c_v)
    assert (k_buf[:, :, S + t:] == 7).all() and (v_buf[:, :, S + t:] == 7).all()  # nothing past the new tokens
    assert seqlens.tolist() == [S + t, S + t]


def test_step_op_rejects_what_it_cannot_do():
    op = _step_op()
    H, g, r = 4, 4, 8
    seq, down, up, b, w_o, b_o = (c.float() for c in layer_case(H, g, r))
    w = step_weights(down, up, b, w_o, b_o, num_heads=H, latent_groups=g)
    buf = torch.zeros(2, g, 10, r)
    lens = torch.full((2,), 9, dtype=torch.int32)
    x = seq[:, -1:]
    args = (w.w_in, w.b_in, w.m, w.beta, w.w_v, w.b_v, w.w_out, w.b_out)
    with pytest.raises(RuntimeError, match=r"positions \[10, 11\) do not fit a cache of 10"):
        op(x, *args, buf, buf.clone(), lens, 10, H, 0.25)
    with pytest.raises(RuntimeError, match="seqlens must be a contiguous int32"):
        op(x, *args, buf, buf.clone(), lens.long(), 9, H, 0.25)
    with pytest.raises(RuntimeError, match="x must be a float32 CPU"):
        op(x.double(), *args, buf, buf.clone(), lens, 9, H, 0.25)
    with pytest.raises(RuntimeError, match=r"w_in must be \[64, 64\] for H=4, g=2, r=8, got \[96, 64\]"):
        op(x, *args, torch.zeros(2, 2, 10, r), torch.zeros(2, 2, 10, r), lens, 9, H, 0.25)


def test_step_weights_check_the_output_projection():
    seq, down, up, b, w_o, b_o = layer_case(4, 1, 16)
    with pytest.raises(ValueError, match=r"out_weight must be W_O \[d, d\] = \[64, 64\]"):
        step_weights(down, up, b, w_o[:32], b_o, num_heads=4, latent_groups=1)


def test_step_op_checks_every_weight_before_writing_the_cache():
    op = _step_op()
    H, g, r = FOLDS["none"]  # m and w_v present
    seq, down, up, b, w_o, b_o = (c.float() for c in layer_case(H, g, r))
    w = step_weights(down, up, b, w_o, b_o, num_heads=H, latent_groups=g)
    k_buf, v_buf = torch.zeros(2, g, 12, r), torch.zeros(2, g, 12, r)
    lens = torch.full((2,), 9, dtype=torch.int32)
    x = seq[:, -1:]
    narrow_m = w.m[:, :-r]  # as if built for fewer heads: the op would write past its query buffer
    with pytest.raises(RuntimeError, match=r"m must be a contiguous float32 CPU \[1, 128, 32\] tensor"):
        op(x, w.w_in, w.b_in, narrow_m.contiguous(), w.beta, w.w_v, w.b_v, w.w_out, w.b_out, k_buf, v_buf, lens, 9,
           H, 0.25)
    with pytest.raises(RuntimeError, match="b_v is given without w_v"):
        op(x, w.w_in, w.b_in, w.m, w.beta, None, w.b_v, w.w_out, w.b_out, k_buf, v_buf, lens, 9, H, 0.25)
    with pytest.raises(RuntimeError, match=r"x must hold at least one new token"):
        op(seq[:, :0], w.w_in, w.b_in, w.m, w.beta, w.w_v, w.b_v, w.w_out, w.b_out, k_buf, v_buf, lens, 9, H, 0.25)
    assert lens.tolist() == [9, 9] and (k_buf == 0).all() and (v_buf == 0).all()  # nothing was written


def _step_case(fold="none", B=2, capacity=12, S=9):
    """``(x [B, 1, 64], weights, k_buf, v_buf, seqlens)`` for a step at position ``S`` of a cache of ``capacity``."""
    H, g, r = FOLDS[fold]
    seq, down, up, b, w_o, b_o = (c.float() for c in layer_case(H, g, r, B=B, S=S))
    w = step_weights(down, up, b, w_o, b_o, num_heads=H, latent_groups=g)
    gen = torch.Generator().manual_seed(1)
    k_buf, v_buf = torch.randn(B, g, capacity, r, generator=gen), torch.randn(B, g, capacity, r, generator=gen)
    return seq[:, -1:], w, k_buf, v_buf, torch.full((B,), S, dtype=torch.int32)


def _weights(w):
    return (w.w_in, w.b_in, w.m, w.beta, w.w_v, w.b_v, w.w_out, w.b_out)


def _refused_untouched(match, x, w, k_buf, v_buf, seqlens, pos, num_heads=4, scale=0.25, weights=None):
    """The step raises ``match`` and leaves the caches and seqlens as they were."""
    before = (k_buf.clone(), v_buf.clone(), seqlens.clone())
    with pytest.raises(RuntimeError, match=match):
        _step_op()(x, *(weights or _weights(w)), k_buf, v_buf, seqlens, pos, num_heads, scale)
    assert all(torch.equal(a, b) for a, b in zip((k_buf, v_buf, seqlens), before))


def test_step_op_refuses_lengths_that_would_leave_the_cache_or_int32():
    x, w, k_buf, v_buf, seqlens = _step_case(capacity=10)
    seqlens[0] = 2**31 - 1  # seqlens += t would overflow int32
    _refused_untouched(r"seqlens\[0\] = 2147483647 cannot grow by the t=1 new tokens: a length must stay at most 10 "
                       r"\(the capacity of k_cache", x, w, k_buf, v_buf, seqlens, 9)
    seqlens[0], seqlens[1] = 9, 10  # checked for every sequence before anything is written
    _refused_untouched(r"seqlens\[1\] = 10 cannot grow .*; every sequence must hold pos=9 positions", x, w, k_buf,
                       v_buf, seqlens, 9)
    seqlens[1] = -1
    _refused_untouched(r"seqlens\[1\] = -1 is negative", x, w, k_buf, v_buf, seqlens, 9)


def test_step_op_refuses_lengths_that_differ_from_pos():
    x, w, k_buf, v_buf, seqlens = _step_case(capacity=12, S=9)
    seqlens[1] = 7  # sequence 1 would attend the new token as position 7 while it is written at 9
    _refused_untouched(r"seqlens\[1\] = 7 differs from pos=9", x, w, k_buf, v_buf, seqlens, 9)


def test_step_op_refuses_a_position_past_int64():
    x, w, k_buf, v_buf, seqlens = _step_case(capacity=10)
    pos = 2**63 - 1  # pos + t would overflow int64
    _refused_untouched(rf"pos={pos} with t=1 new tokens: positions \[{pos}, 2\^63 or more\) do not fit a cache of 10 "
                       r"positions", x, w, k_buf, v_buf, seqlens, pos)
    _refused_untouched(r"pos=-1 with t=1 new tokens: positions \[-1, 0\)", x, w, k_buf, v_buf, seqlens, -1)


@pytest.mark.parametrize("scale", [float("nan"), float("-inf"), -0.25, 0.0], ids=["nan", "-inf", "negative", "zero"])
def test_step_op_refuses_a_scale_that_is_not_positive_and_finite(scale):
    x, w, k_buf, v_buf, seqlens = _step_case()
    _refused_untouched("scale must be a positive finite float32 number", x, w, k_buf, v_buf, seqlens, 9, scale=scale)


def test_step_op_refuses_caches_that_share_memory():
    x, w, k_buf, v_buf, seqlens = _step_case()
    message = "k_cache and v_cache share memory: the step writes k_cache, v_cache and seqlens in place"
    _refused_untouched(message, x, w, k_buf, k_buf, seqlens, 9)  # one tensor for both
    _refused_untouched(message, x, w, k_buf[:, :, :10], k_buf[:, :, 2:], seqlens, 7)  # overlapping views
    flat = torch.randn(2 * 12 * 64 + 16)  # rows of 32 every 64 numbers, v's 16 after k's: half of each in the other
    k_rows, v_rows = (flat[o:o + 2 * 12 * 64].view(2, 1, 12, 64)[..., :32] for o in (0, 16))
    _refused_untouched(message, x, w, k_rows, v_rows, seqlens, 9)
    _refused_untouched("k_cache has elements that share memory", x, w, k_buf[:, :, :1].expand(2, 1, 12, 32), v_buf,
                       seqlens, 9)
    lengths_in_cache = k_buf.view(-1)[-2:].view(torch.int32)[:2]
    lengths_in_cache.fill_(9)
    _refused_untouched("k_cache and seqlens share memory", x, w, k_buf, v_buf, lengths_in_cache, 9)
    _refused_untouched("v_cache and x share memory", v_buf.view(2, 1, -1)[:, :, :64], w, k_buf, v_buf, seqlens, 9)
    w_out = w.w_out.clone()
    _refused_untouched("k_cache and w_out share memory", x, w, w_out.view(-1)[:768].view(2, 1, 12, 32), v_buf,
                       seqlens, 9, weights=_weights(w)[:-2] + (w_out, w.b_out))


def test_step_op_takes_k_and_v_side_by_side_in_one_buffer():
    """k = buf[..., :r], v = buf[..., r:]: views of one buffer whose elements are apart, as good as two buffers."""
    x, w, k_buf, v_buf, seqlens = _step_case()
    op = _step_op()
    buf = torch.cat([k_buf, v_buf], dim=3)
    lens = seqlens.clone()
    expected = op(x, *_weights(w), k_buf, v_buf, seqlens, 9, 4, 0.25)
    got = op(x, *_weights(w), buf[..., :32], buf[..., 32:], lens, 9, 4, 0.25)
    assert torch.equal(got, expected) and torch.equal(buf, torch.cat([k_buf, v_buf], dim=3))
    assert torch.equal(lens, seqlens)


def test_step_op_names_num_heads_when_it_does_not_match_the_weights():
    x, w, k_buf, v_buf, seqlens = _step_case("none")  # H = 4, g = 1, r = 32: m and w_v given
    _refused_untouched(r"num_heads=2 does not match m: m must be a contiguous float32 CPU \[1, 64, 32\] tensor "
                       r"\(\[g, \(num_heads/g\)·r, r\] for num_heads=2, g=1 and r=32 \(g, r: k_cache's\)\), got Float "
                       r"\[1, 128, 32\] on cpu; that is the shape for num_heads=4", x, w, k_buf, v_buf, seqlens, 9,
                       num_heads=2)
    w_v = w.w_v.reshape(2, 32, 32)  # B_V as if for 2 heads of 32
    _refused_untouched(r"num_heads=4 does not match w_v: .* got Float \[2, 32, 32\] on cpu; that is the shape for "
                       r"num_heads=2", x, w, k_buf, v_buf, seqlens, 9, weights=_weights(w)[:4] + (w_v, None, w.w_out,
                                                                                                   w.b_out))
    x, w, k_buf, v_buf, seqlens = _step_case("both")  # H = g = 4, r = 8: query and output folded
    _refused_untouched(r"w_in must be \[128, 64\] for H=8, g=4, r=8, got \[96, 64\] .*H is num_heads", x, w, k_buf,
                       v_buf, seqlens, 9, num_heads=8)
    _refused_untouched(r"num_heads=3 must be a positive multiple of the caches' g=4 latent groups", x, w, k_buf, v_buf,
                       seqlens, 9, num_heads=3)


def test_step_op_names_the_cache_that_does_not_match():
    x, w, k_buf, v_buf, seqlens = _step_case()
    _refused_untouched(r"v_cache must have the shape of k_cache, \[2, 1, 12, 32\], got \[2, 1, 11, 32\]", x, w, k_buf,
                       v_buf[:, :, :11], seqlens, 9)
    _refused_untouched(r"k_cache must be \[B, g, capacity, r\] with the B=2 sequences of x, got \[1, 1, 12, 32\]", x, w,
                       k_buf[:1], v_buf[:1], seqlens, 9)


@pytest.mark.parametrize("fold", ["none", "both"])
def test_step_op_gives_nan_for_a_nan_token_and_leaves_the_others(fold):
    x, w, k_buf, v_buf, seqlens = _step_case(fold)
    H = FOLDS[fold][0]
    op = _step_op()
    clean = op(x, *_weights(w), k_buf.clone(), v_buf.clone(), seqlens.clone(), 9, H, 0.25)
    x = x.clone()
    x[1, 0, 5] = float("nan")
    out = op(x, *_weights(w), k_buf, v_buf, seqlens, 9, H, 0.25)
    assert out[1].isnan().all() and torch.equal(out[0], clean[0])


# Head-local steps: (H, g, r, a partition of the heads into subsets of whole latent groups) at d = 64. At g = 1
# any heads of the one group (its down-projection whole on every subset). The output is folded into W_O at
# g = 1 and g = H; at g = 2, r = 32 it is not, so the C++ op reads d_h from W_O's columns.
HEAD_LOCAL = {"g1": (4, 1, 16, [(0, 2), (1, 3)]), "g2": (4, 2, 32, [(0, 1), (2, 3)]),
              "gH": (4, 4, 8, [(0, 3), (1,), (2,)])}


def _subset_of(case, H, g, r, heads):
    """``(down, up, bias, w_o, groups)`` of the heads ``heads``: their groups' rows of ``down``, their columns
    of ``up``, ``bias`` and ``W_O``, and the groups (the cache holds these groups' latents)."""
    seq, down, up, b, w_o, b_o = case
    d, dh, hpg = seq.shape[-1], seq.shape[-1] // H, H // g
    groups = sorted({h // hpg for h in heads})
    cols = torch.tensor([h * dh + i for h in heads for i in range(dh)])
    rows = torch.tensor([p * g * r + j * r + i for p in range(3) for j in groups for i in range(r)])
    return down[rows], up[:, cols], (b.view(3, d)[:, cols].reshape(-1) if b is not None else None), w_o[:, cols], groups


def _run_step(seq, t, down, up, b, w_o, b_o, H, g, r):
    """``decode_step`` of the last ``t`` tokens of ``seq`` over a cache (4 positions to spare) holding the
    others' latents; returns ``(out, k_buf, v_buf, seqlens)``."""
    B, S = seq.shape[0], seq.shape[1] - t
    capacity = S + t + 4
    k_buf = torch.full((B, g, capacity, r), 7.0, dtype=seq.dtype)
    v_buf = torch.full((B, g, capacity, r), 7.0, dtype=seq.dtype)
    k_buf[:, :, :S], v_buf[:, :, :S] = kv_latents(seq[:, :S], down, g, group_major=True)
    seqlens = torch.full((B,), S, dtype=torch.int32)
    with torch.no_grad():
        out, _ = decode_step(seq[:, S:], down, up, b, cache=LatentCache(k_buf, v_buf, seqlens, S), num_heads=H,
                             latent_groups=g, out_weights=OutputProjection(w_o, b_o), memo=StepWeightsMemo(),
                             scale=(64 // 4) ** -0.5)
    return out, k_buf, v_buf, seqlens


def _head_local_steps(case, H, g, r, parts, t):
    """The whole layer's step, and each subset's (the output bias given to the first subset only)."""
    seq, down, up, b, w_o, b_o = case
    whole = _run_step(seq, t, down, up, b, w_o, b_o, H, g, r)
    subsets = []
    for i, heads in enumerate(parts):
        d_s, u_s, b_s, w_s, groups = _subset_of(case, H, g, r, heads)
        g_loc = len(groups)
        subsets.append((groups, _run_step(seq, t, d_s, u_s, b_s, w_s, b_o if i == 0 else None, len(heads), g_loc, r)))
    return whole, subsets


def _check_local_caches(whole, subsets, S):
    _, k_all, v_all, _ = whole
    for groups, (_, k, v, seqlens) in subsets:
        assert seqlens.tolist() == [S] * seqlens.shape[0]
        torch.testing.assert_close(k[:, :, :S], k_all[:, groups, :S], rtol=0, atol=0)
        torch.testing.assert_close(v[:, :, :S], v_all[:, groups, :S], rtol=0, atol=0)
        assert (k[:, :, S:] == 7).all() and (v[:, :, S:] == 7).all()


@pytest.mark.parametrize("t", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", list(HEAD_LOCAL))
def test_head_local_steps_sum_to_the_whole_layers_in_float64(name, bias, t):
    """float64 runs decode's torch path: kv_latents, the cache write, mlra_decode and W_O's columns."""
    H, g, r, parts = HEAD_LOCAL[name]
    case = layer_case(H, g, r, B=2, S=9, t=t, bias=bias)
    whole, subsets = _head_local_steps(case, H, g, r, parts, t)
    torch.testing.assert_close(whole[0], expected(case, H, g, t), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sum(out for _, (out, *_) in subsets), whole[0], rtol=1e-10, atol=1e-10)
    _check_local_caches(whole, subsets, 9 + t)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", list(HEAD_LOCAL))
def test_head_local_step_weights_are_exact_in_float64(name, bias):
    """The step weights of each subset (W_O's columns of its heads) give its share of the layer's output."""
    H, g, r, parts = HEAD_LOCAL[name]
    t = 2
    case = layer_case(H, g, r, B=2, S=9, t=t, bias=bias)
    seq, b_o = case[0], case[5]
    B = seq.shape[0]
    total = 0.0
    for i, heads in enumerate(parts):
        d_s, u_s, b_s, w_s, groups = _subset_of(case, H, g, r, heads)
        H_loc, g_loc = len(heads), len(groups)
        w = step_weights(d_s, u_s, b_s, w_s, b_o if i == 0 else None, num_heads=H_loc, latent_groups=g_loc)
        q_abs, c_k, c_v = step_latents(seq[:, -t:], w)
        old_k, old_v = kv_latents(seq[:, :-t], d_s, g_loc, group_major=True)
        k, v = torch.cat([old_k, c_k], 2), torch.cat([old_v, c_v], 2)
        z, _ = _torch_attention(q_abs, k, v, (64 // H) ** -0.5, B=B, H=H_loc, g=g_loc, t=t, causal=True,
                                key_padding_mask=None, attn_mask=None, lengths=None, dropout_p=0.0, need_weights=False)
        total = total + step_output(z, w, t)
    torch.testing.assert_close(total, expected(case, H, g, t), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("python_step", [False, True], ids=["cpp-op", "python-step"])
@pytest.mark.parametrize("name", list(HEAD_LOCAL))
def test_head_local_steps_on_step_weights_in_float32(name, python_step, monkeypatch):
    """float32 on the CPU: the C++ whole-step op (or, without it, the Python step) of each subset; their sum
    within 3x the error of the unfused float32 torch path."""
    _step_op()
    if python_step:
        monkeypatch.setattr(_ext, "_STEP_OP", [False])
    H, g, r, parts = HEAD_LOCAL[name]
    case = layer_case(H, g, r, B=3, S=40, t=1)
    low = _unfused_fp32(case, H, g, 1)
    case32 = tuple(c.float() if c is not None else None for c in case)
    whole, subsets = _head_local_steps(case32, H, g, r, parts, 1)
    exact = expected(case, H, g, 1)
    assert_within_torch_error(whole[0], low, exact, what="whole layer's step")
    assert_within_torch_error(sum(out for _, (out, *_) in subsets), low, exact, what="sum of head-local steps")
    _check_local_caches(whole, subsets, 41)


def test_decode_step_masks_cover_the_latent_caches_capacity():
    """With a LatentCache, key padding covers the cache's capacity: the kernel reads the whole buffers, the
    torch path (float64) its filled part; both match mlra_decode over the sequence."""
    H, g, r, S, cap = 4, 2, 8, 9, 16
    seq, down, up, b, w_o, b_o = layer_case(H, g, r, B=2, S=S, t=1)
    kpm = torch.zeros(2, cap, dtype=torch.bool)
    kpm[0, 2], kpm[1, 5] = True, True
    c_k, c_v = kv_latents(seq, down, g, group_major=True)
    exact, _ = mlra_decode(seq[:, S:], down, up, b, cache_k=c_k, cache_v=c_v, num_heads=H, latent_groups=g,
                           key_padding_mask=kpm[:, :S + 1])
    for dtype in (torch.float64, torch.float32):
        k_buf, v_buf = torch.zeros(2, g, cap, r, dtype=dtype), torch.zeros(2, g, cap, r, dtype=dtype)
        k_buf[:, :, :S], v_buf[:, :, :S] = c_k[:, :, :S], c_v[:, :, :S]
        seqlens = torch.full((2,), S, dtype=torch.int32)
        out, _ = decode_step(seq[:, S:].to(dtype), down.to(dtype), up.to(dtype), b.to(dtype),
                             cache=LatentCache(k_buf, v_buf, seqlens, S), num_heads=H, latent_groups=g,
                             key_padding_mask=kpm)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol)
        assert seqlens.tolist() == [S + 1, S + 1]


# A refused decode_step leaves the cache as it was, on every path that can take the bad input: the C++ whole-step
# op (float32, folded W_O, no key padding), the Python step on the step weights (float32, folded W_O, a build
# without the whole-step op), op by op (float32 without out_weights: the C++ kernel) and the float64 torch path.
STEP_PATHS = {"cpp-op": (torch.float32, True), "python-step": (torch.float32, True),
              "op-by-op": (torch.float32, False), "torch-float64": (torch.float64, False)}
# What each path calls on a valid step: the whole-step op calls neither.
PATH_CALLS = {"cpp-op": [], "python-step": ["step_latents"], "op-by-op": ["decode_on"], "torch-float64": ["decode_on"]}
CAP, POS = 12, 5


def _path_spy(monkeypatch, path):
    """Selects ``path`` and records which of ``decode_on`` and ``step_latents`` a step calls."""
    from mlra_kernels.ops.mlra import step

    if path == "cpp-op":
        _step_op()
    monkeypatch.setattr(_ext, "_STEP_OP", [False] if path == "python-step" else [])
    calls = []
    for name in ("decode_on", "step_latents"):
        real = getattr(step, name)

        def spy(*args, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(*args, **kw)

        monkeypatch.setattr(step, name, spy)
    return calls


def _bad_step_case(path, seed=0):
    """``(x [2, 1, 64], call)``: ``call(x, k, v, seqlens, pos, **kw)`` runs decode_step on ``path`` with a
    ``LatentCache``; and valid buffers ``[2, 1, CAP, 16]`` with seqlens at ``POS``."""
    dtype, fold = STEP_PATHS[path]
    H, g, r = FOLDS["output"]
    seq, down, up, b, w_o, b_o = (c.to(dtype) for c in layer_case(H, g, r, B=2, S=POS, seed=seed))

    def call(x, k, v, seqlens, pos, **kw):
        with torch.no_grad():
            return decode_step(x, down, up, b, cache=LatentCache(k, v, seqlens, pos), num_heads=H, latent_groups=g,
                               out_weights=OutputProjection(w_o, b_o) if fold else None,
                               out_proj=None if fold else (lambda y: F.linear(y, w_o, b_o)), memo=StepWeightsMemo(),
                               **kw)[0]

    gen = torch.Generator().manual_seed(seed + 1)
    k = torch.randn(2, g, CAP, r, generator=gen, dtype=dtype)
    v = torch.randn(2, g, CAP, r, generator=gen, dtype=dtype)
    return seq[:, -1:], call, k, v, torch.full((2,), POS, dtype=torch.int32)


def _other_float(dtype):
    return torch.float64 if dtype == torch.float32 else torch.float32


class Bad(NamedTuple):
    change: Callable  # (x, k, v, seqlens) -> (x, k, v, seqlens, pos, keyword arguments)
    paths: list  # the paths that take it
    error: type  # the Python paths' error and its message
    message: str
    cpp_message: str = ""  # the C++ whole-step op's message (a RuntimeError), where it takes it


# The whole-step op takes neither key padding nor a callable cache, and a general attn_mask runs op by op.
PYTHON_PATHS = ["python-step", "op-by-op", "torch-float64"]
OP_BY_OP_PATHS = ["op-by-op", "torch-float64"]
BAD_STEPS = {
    "cache-of-other-groups": Bad(
        lambda x, k, v, s: (x, torch.randn(2, 2, CAP, 16, dtype=x.dtype), torch.randn(2, 2, CAP, 16, dtype=x.dtype),
                            s, POS, {}),
        list(STEP_PATHS), ValueError,
        r"cache.k must be \[B, g, capacity, r\] = \[2, 1, capacity, 16\], got \(2, 2, 12, 16\)",
        r"w_in must be \[96, 64\] for H=4, g=2, r=16, got \[48, 64\]"),
    "cache-of-another-batch": Bad(
        lambda x, k, v, s: (x[:1], k, v, s, POS, {}), list(STEP_PATHS), ValueError,
        r"cache.k must be \[B, g, capacity, r\] = \[1, 1, capacity, 16\], got \(2, 1, 12, 16\)",
        r"k_cache must be \[B, g, capacity, r\] with the B=1 sequences of x, got \[2, 1, 12, 16\]"),
    "v-of-another-capacity": Bad(
        lambda x, k, v, s: (x, k, v[:, :, :10], s, POS, {}), list(STEP_PATHS), ValueError,
        r"cache.v must have the shape of cache.k, \(2, 1, 12, 16\), got \(2, 1, 10, 16\)",
        r"v_cache must have the shape of k_cache, \[2, 1, 12, 16\], got \[2, 1, 10, 16\]"),
    "cache-of-another-dtype": Bad(
        lambda x, k, v, s: (x, k.to(_other_float(x.dtype)), v.to(_other_float(x.dtype)), s, POS, {}),
        list(STEP_PATHS), TypeError, r"cache.k is torch.float(32|64) but x is torch.float(32|64); they must match",
        r"k_cache must be float32, got Double"),
    "position-past-the-capacity": Bad(
        lambda x, k, v, s: (x, k, v, s.fill_(CAP), CAP, {}), list(STEP_PATHS), ValueError,
        r"the cache holds 12 positions; pos=12 \+ t=1 new tokens do not fit",
        r"pos=12 with t=1 new tokens: positions \[12, 13\) do not fit a cache of 12 positions"),
    "seqlens-that-differ-from-pos": Bad(
        lambda x, k, v, s: (x, k, v, torch.tensor([POS, 3], dtype=torch.int32), POS, {}), list(STEP_PATHS),
        ValueError, r"seqlens\[1\] = 3 differs from pos=5: the step writes the new tokens at positions \[pos, pos \+ t\)",
        r"seqlens\[1\] = 3 differs from pos=5"),
    "seqlens-past-pos": Bad(
        lambda x, k, v, s: (x, k, v, s + 1, POS, {}), list(STEP_PATHS), ValueError,
        r"seqlens\[0\] = 6 differs from pos=5", r"seqlens\[0\] = 6 differs from pos=5"),
    "int64-seqlens": Bad(
        lambda x, k, v, s: (x, k, v, s.long(), POS, {}), list(STEP_PATHS), TypeError,
        r"cache.seqlens must be an int32 Tensor \[B\], got torch.int64",
        r"seqlens must be a contiguous int32 CPU \[B\] = \[2\] tensor, got Long"),
    "seqlens-of-another-batch": Bad(
        lambda x, k, v, s: (x, k, v, s[:1], POS, {}), list(STEP_PATHS), ValueError,
        r"cache.seqlens must be \[B\] = \[2\], got \(1,\)",
        r"seqlens must be a contiguous int32 CPU \[B\] = \[2\] tensor, got Int \[1\]"),
    "short-key-padding": Bad(
        lambda x, k, v, s: (x, k, v, s, POS, {"key_padding_mask": torch.zeros(2, 6, dtype=torch.bool)}),
        PYTHON_PATHS, ValueError, r"key_padding_mask must be \[B, capacity\] = \[2, 12\], got \(2, 6\)"),
    "long-float-key-padding": Bad(
        lambda x, k, v, s: (x, k, v, s, POS, {"key_padding_mask": torch.zeros(2, 20)}),
        PYTHON_PATHS, ValueError, r"key_padding_mask must be \[B, capacity\] = \[2, 12\], got \(2, 20\)"),
    "key-padding-of-another-batch": Bad(
        lambda x, k, v, s: (x, k, v, s, POS, {"key_padding_mask": torch.zeros(1, CAP, dtype=torch.bool)}),
        PYTHON_PATHS, ValueError, r"key_padding_mask must be \[B, capacity\] = \[2, 12\], got \(1, 12\)"),
    "attn-mask-of-the-filled-length": Bad(
        lambda x, k, v, s: (x, k, v, s, POS, {"attn_mask": torch.zeros(1, POS + 1, dtype=torch.bool)}),
        OP_BY_OP_PATHS, ValueError,
        r"attn_mask must be \[t, capacity\] or \[B \| 1, 1 \| H, t, capacity\] with t=1, capacity=12, got \(1, 6\)"),
    "attn-mask-of-other-heads": Bad(
        lambda x, k, v, s: (x, k, v, s, POS, {"attn_mask": torch.zeros(2, 3, 1, CAP, dtype=torch.bool)}),
        OP_BY_OP_PATHS, ValueError, r"attn_mask must be \[t, capacity\] .* got \(2, 3, 1, 12\)"),
}


@pytest.mark.filterwarnings("ignore:mlra_decode runs the 'torch' path")  # a general attn_mask, on purpose
@pytest.mark.parametrize("name, path", [pytest.param(name, path, id=f"{name}-{path}")
                                        for name, bad in BAD_STEPS.items() for path in bad.paths])
def test_a_refused_step_leaves_the_latent_cache_as_it_was(name, path, monkeypatch):
    calls = _path_spy(monkeypatch, path)
    x, call, k, v, seqlens = _bad_step_case(path)
    before = [t.clone() for t in (k, v, seqlens)]
    call(x, k, v, seqlens, POS)  # the valid step runs on this path and writes
    assert calls == PATH_CALLS[path] and seqlens.tolist() == [POS + 1] * 2 and not torch.equal(k, before[0])
    bad = BAD_STEPS[name]
    x, k, v, seqlens, pos, kw = bad.change(x, *(t.clone() for t in before))
    untouched = [t.clone() for t in (k, v, seqlens)]
    error, message = (RuntimeError, "mlra::latent_decode_step_cpu: " + bad.cpp_message) if path == "cpp-op" else (
        bad.error, bad.message)
    with pytest.raises(error, match=message):
        call(x, k, v, seqlens, pos, **kw)
    for got, was in zip((k, v, seqlens), untouched):
        assert torch.equal(got, was)


@pytest.mark.parametrize("path", list(STEP_PATHS))
def test_cache_seqlens_beside_a_latent_cache_is_refused(path, monkeypatch):
    """A LatentCache counts its sequences itself: lengths given beside it would be ignored, so they are refused."""
    _path_spy(monkeypatch, path)
    x, call, k, v, seqlens = _bad_step_case(path)
    before = [t.clone() for t in (k, v, seqlens)]
    with pytest.raises(ValueError, match="cache_seqlens is for a callable cache; a LatentCache counts its sequences"):
        call(x, k, v, seqlens, POS, cache_seqlens=torch.full((2,), POS + 1, dtype=torch.int32))
    for got, was in zip((k, v, seqlens), before):
        assert torch.equal(got, was)


def _callable_cache(dtype, calls):
    """A callable cache holding ``POS`` positions: appends the new latents and returns them all (``[2, 1, S, 16]``)."""
    gen = torch.Generator().manual_seed(3)
    held = [torch.randn(2, 1, POS, 16, generator=gen, dtype=dtype) for _ in range(2)]

    def update(c_k, c_v):
        calls.append(c_k.shape[2])
        held[:] = [torch.cat([held[0], c_k], 2), torch.cat([held[1], c_v], 2)]
        return held[0], held[1]

    return update


# name: (the keyword arguments, the paths that take them, the error, its message); S = POS + 1 once written.
BAD_CALLABLE_STEPS = {
    "key-padding-of-another-batch": ({"key_padding_mask": torch.zeros(1, POS + 1, dtype=torch.bool)},
                                     PYTHON_PATHS, ValueError,
                                     r"key_padding_mask must be \[B, S\] = \[2, S\], got \(1, 6\)"),
    "key-padding-of-3-dims": ({"key_padding_mask": torch.zeros(2, 1, POS + 1)},
                              PYTHON_PATHS, ValueError,
                              r"key_padding_mask must be \[B, S\] = \[2, S\], got \(2, 1, 6\)"),
    "attn-mask-of-other-tokens": ({"attn_mask": torch.zeros(2, POS + 1, dtype=torch.bool)},
                                  OP_BY_OP_PATHS, ValueError,
                                  r"attn_mask must be \[t, S\] or \[B \| 1, 1 \| H, t, S\] with t=1, got \(2, 6\)"),
    "float-lengths": ({"cache_seqlens": torch.full((2,), POS + 1.0)}, PYTHON_PATHS,
                      TypeError, r"cache_seqlens must be an integer Tensor, got torch.float32"),
    "lengths-of-another-batch": ({"cache_seqlens": torch.full((3,), POS + 1)},
                                 PYTHON_PATHS, ValueError,
                                 r"cache_seqlens must be \[B\] = \[2\], got \(3,\)"),
}


def _callable_step(path, calls, **kw):
    dtype, fold = STEP_PATHS[path]
    H, g, r = FOLDS["output"]
    seq, down, up, b, w_o, b_o = (c.to(dtype) for c in layer_case(H, g, r, B=2, S=POS))
    with torch.no_grad():
        return decode_step(seq[:, -1:], down, up, b, cache=_callable_cache(dtype, calls), num_heads=H,
                           latent_groups=g, out_weights=OutputProjection(w_o, b_o) if fold else None,
                           out_proj=None if fold else (lambda y: F.linear(y, w_o, b_o)), memo=StepWeightsMemo(),
                           **kw)[0]


@pytest.mark.parametrize("name, path", [pytest.param(name, path, id=f"{name}-{path}")
                                        for name, (_, paths, _, _) in BAD_CALLABLE_STEPS.items() for path in paths])
def test_a_refused_step_does_not_call_a_callable_cache(name, path, monkeypatch):
    """A callable cache's S is known once it returns; what does not depend on it is checked before it writes."""
    spy = _path_spy(monkeypatch, path)
    calls = []
    _callable_step(path, calls)
    assert calls == [1] and spy == PATH_CALLS[path]
    kw, _, error, message = BAD_CALLABLE_STEPS[name]
    calls.clear()
    with pytest.raises(error, match=message):
        _callable_step(path, calls, **kw)
    assert calls == []


@pytest.mark.parametrize("path", PYTHON_PATHS)
def test_key_padding_must_cover_what_a_callable_cache_returns(path, monkeypatch):
    _path_spy(monkeypatch, path)
    calls = []
    for n in (POS, POS + 2):
        with pytest.raises(ValueError, match=rf"key_padding_mask must be \[B, S\] = \[2, 6\], got \(2, {n}\)"):
            _callable_step(path, calls, key_padding_mask=torch.zeros(2, n, dtype=torch.bool))
