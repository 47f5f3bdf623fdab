"""mlra_kernels.ops.mlra.masks: every mask form, both empty-row rules, lengths, dtypes and the errors."""

import pytest
import torch

from mlra_kernels.ops.mlra import masks, mlra_decode, use_backend
from mlra_kernels.ops.mlra.reference import attention_bias_reference
from tests.helpers import decode_case

CPU = torch.device("cpu")
FLOATS = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", FLOATS.values(), ids=FLOATS.keys())
def test_additive_bool_under_each_rule(dtype):
    m = torch.rand(3, 5, generator=_gen()) < 0.4
    zeros = masks.additive(m, dtype, empty_rows="zeros")
    average = masks.additive(m, dtype, empty_rows="average")
    for out in (zeros, average):
        assert out.dtype == dtype and out.shape == m.shape
        assert torch.equal(out[~m], torch.zeros(int((~m).sum()), dtype=dtype))
    assert torch.isneginf(zeros[m]).all()
    assert (average[m] == torch.finfo(dtype).min).all()


@pytest.mark.parametrize("dtype", FLOATS.values(), ids=FLOATS.keys())
def test_additive_float_is_cast_and_clamped_under_average(dtype):
    m = torch.randn(4, 6, generator=_gen(), dtype=torch.float64) * 3
    m[0, 0], m[1, 1] = float("-inf"), -1e300
    zeros = masks.additive(m, dtype, empty_rows="zeros")
    assert zeros.dtype == dtype and torch.equal(zeros, m.to(dtype))
    average = masks.additive(m, dtype, empty_rows="average")
    lowest = torch.finfo(dtype).min
    assert average.dtype == dtype and torch.equal(average, m.to(dtype).clamp(min=lowest))
    assert average[0, 0] == lowest and torch.isfinite(average).all()


def test_additive_keeps_a_float_mask_of_the_same_dtype():
    m = torch.randn(2, 3)
    assert masks.additive(m, torch.float32, empty_rows="zeros") is m


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.int32], ids=str)
def test_integer_masks_are_a_type_error_naming_the_argument(dtype):
    m = torch.zeros(2, 4, dtype=dtype)
    with pytest.raises(TypeError, match="key_padding_mask.*" + str(dtype)):
        masks.additive(m, torch.float32, empty_rows="zeros", name="key_padding_mask")
    with pytest.raises(TypeError, match="key_padding_mask"):
        masks.kernel_key_padding(m)
    with pytest.raises(TypeError, match="key_padding_mask"):
        masks.combine(2, 1, 1, 4, causal=False, key_padding_mask=m, attn_mask=None, dtype=torch.float32,
                      device=CPU, empty_rows="zeros")
    with pytest.raises(TypeError, match="attn_mask"):
        masks.combine(2, 1, 3, 4, causal=False, key_padding_mask=None, attn_mask=torch.zeros(3, 4, dtype=dtype),
                      dtype=torch.float32, device=CPU, empty_rows="zeros")
    with pytest.raises(TypeError, match="attn_mask must be a Tensor or None, got list"):
        masks.additive([[True]], torch.float32, empty_rows="zeros", name="attn_mask")


def test_unknown_empty_rows_rule():
    with pytest.raises(ValueError, match="empty_rows must be one of zeros, average; got 'nan'"):
        masks.additive(torch.zeros(2, 2, dtype=torch.bool), torch.float32, empty_rows="nan")
    with pytest.raises(ValueError, match="empty_rows"):
        masks.combine(1, 1, 1, 1, causal=False, key_padding_mask=None, attn_mask=None, dtype=torch.float32,
                      device=CPU, empty_rows="average ")


def test_kernel_key_padding():
    assert masks.kernel_key_padding(None) is None
    m = torch.rand(3, 7, generator=_gen()) < 0.4
    out = masks.kernel_key_padding(m)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert torch.isneginf(out[m]).all() and (out[~m] == 0).all()
    f = torch.randn(7, 3, generator=_gen(1), dtype=torch.bfloat16).t().requires_grad_()  # [3, 7], strided
    out = masks.kernel_key_padding(f)
    assert out.dtype == torch.float32 and out.is_contiguous() and not out.requires_grad
    assert torch.equal(out, f.detach().float())
    with pytest.raises(ValueError, match=r"key_padding_mask must be \[B, S\], got \(3, 7, 1\)"):
        masks.kernel_key_padding(m.unsqueeze(-1))


@pytest.mark.parametrize("T, S", [(1, 1), (1, 6), (4, 4), (3, 7)], ids=lambda v: str(v))
def test_causal_mask_aligns_the_queries_to_the_end_of_the_keys(T, S):
    want = torch.ones(T, S, dtype=torch.bool).triu(S - T + 1)
    got = masks.causal_mask(T, S, device=CPU)
    assert got.dtype == torch.bool and got.shape == (1, 1, T, S) and torch.equal(got[0, 0], want)


def test_causal_mask_with_lengths():
    lengths = torch.tensor([2, 5, 4], dtype=torch.int32)
    got = masks.causal_mask(2, 6, device=CPU, lengths=lengths)
    assert got.shape == (3, 1, 2, 6)
    for b, L in enumerate(lengths.tolist()):
        for i in range(2):
            pos = L - 2 + i  # the query's position in its sequence
            assert torch.equal(got[b, 0, i], torch.arange(6) > pos)


def _forms(B, H, T, S, seed=0):
    """One bool attn_mask in each accepted form, all meaning ``full`` [B, H, T, S]."""
    gen = _gen(seed)
    full = torch.rand(B, H, T, S, generator=gen) < 0.3
    shared = torch.rand(T, S, generator=gen) < 0.3
    per_batch = torch.rand(B, 1, T, S, generator=gen) < 0.3
    return {
        "[T, S]": (shared, shared.expand(B, H, T, S)),
        "[B·H, T, S]": (full.reshape(B * H, T, S), full),
        "[B, H, T, S]": (full, full),
        "[B, 1, T, S]": (per_batch, per_batch.expand(B, H, T, S)),
        "[1, H, T, S]": (full[:1], full[:1].expand(B, H, T, S)),
        "[1, 1, T, S]": (shared.view(1, 1, T, S), shared.expand(B, H, T, S)),
    }


@pytest.mark.parametrize("form", list(_forms(2, 3, 4, 6)))
@pytest.mark.parametrize("rule", masks.EMPTY_ROWS)
def test_every_attn_mask_form_means_the_same(form, rule):
    B, H, T, S = 2, 3, 4, 6
    mask, meaning = _forms(B, H, T, S)[form]
    got = masks.combine(B, H, T, S, causal=False, key_padding_mask=None, attn_mask=mask, dtype=torch.float32,
                        device=CPU, empty_rows=rule)
    fill = float("-inf") if rule == "zeros" else torch.finfo(torch.float32).min
    want = torch.zeros(B, H, T, S).masked_fill(meaning, fill)
    assert torch.equal(got.expand(B, H, T, S), want)


@pytest.mark.parametrize("dtype", FLOATS.values(), ids=FLOATS.keys())
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_zeros_rule_matches_the_oracle(dtype, causal):
    """Under ``"zeros"`` the bias is the reference's (an oracle kept independent of this module)."""
    B, H, T, S = 2, 3, 4, 7
    gen = _gen(2)
    kpm_bool = torch.rand(B, S, generator=gen) < 0.3
    kpm_float = torch.randn(B, S, generator=gen, dtype=torch.float64).masked_fill(kpm_bool, float("-inf"))
    am_float = torch.randn(B * H, T, S, generator=gen, dtype=torch.float64)
    for kpm, am in ((kpm_bool, None), (kpm_float, am_float), (None, torch.rand(T, S, generator=gen) < 0.3)):
        kw = dict(causal=causal, key_padding_mask=kpm, attn_mask=am, dtype=dtype, device=CPU)
        got = masks.combine(B, H, T, S, empty_rows="zeros", **kw)
        want = attention_bias_reference(B, H, T, S, **kw)
        assert got.dtype == dtype
        torch.testing.assert_close(got.expand(B, H, T, S), want.expand(B, H, T, S), rtol=0, atol=0)


def test_fully_masked_row_under_each_rule():
    """A query with no key left: -inf under "zeros" (the path's softmax gives zeros), finfo.min under
    "average" (softmax averages the values), and positions past ``lengths`` -inf under both."""
    B, H, T, S = 2, 1, 2, 5
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0] = True  # sequence 0: every key masked
    lengths = torch.tensor([5, 3])
    for rule, fill in (("zeros", float("-inf")), ("average", torch.finfo(torch.float32).min)):
        bias = masks.combine(B, H, T, S, causal=True, key_padding_mask=kpm, attn_mask=None, dtype=torch.float32,
                             device=CPU, empty_rows=rule, lengths=lengths)
        assert bias.shape == (B, 1, T, S)
        assert (bias[0] == fill).all()
        # sequence 1 (length 3): queries at positions 1 and 2 see keys 0..1 and 0..2; keys 3, 4 are past it
        assert torch.equal(bias[1, 0, :, 3:], torch.full((T, 2), float("-inf")))
        assert (bias[1, 0, 0, :2] == 0).all() and bias[1, 0, 0, 2] == fill
        assert (bias[1, 0, 1, :3] == 0).all()
    p = torch.softmax(torch.randn(B, 1, T, S, generator=_gen()) + bias, dim=-1)
    assert torch.allclose(p[0], torch.full((1, T, S), 1 / S))  # "average": the row averages every position
    average_bool = masks.combine(B, H, T, S, causal=False, key_padding_mask=kpm, attn_mask=None,
                                 dtype=torch.float32, device=CPU, empty_rows="average", lengths=lengths)
    assert torch.isneginf(average_bool[1, 0, 0, 3:]).all() and not torch.isinf(average_bool[0]).any()


def test_average_rule_clamps_sums_of_finite_masks():
    """Two masks of finfo.min at one key sum to finfo.min, not -inf."""
    B, H, T, S = 1, 1, 1, 3
    kpm = torch.tensor([[True, False, False]])
    am = torch.tensor([[True, True, False]])
    bias = masks.combine(B, H, T, S, causal=False, key_padding_mask=kpm, attn_mask=am, dtype=torch.float16,
                         device=CPU, empty_rows="average")
    lowest = torch.finfo(torch.float16).min
    assert bias.dtype == torch.float16
    assert bias.flatten().tolist() == [lowest, lowest, 0.0]


def test_nothing_masked_is_none():
    # no mask; and one query at the end of the keys, which sees all of them, so causal masks nothing
    for T, causal in ((3, False), (1, True)):
        for rule in masks.EMPTY_ROWS:
            assert masks.combine(2, 2, T, 4, causal=causal, key_padding_mask=None, attn_mask=None,
                                 dtype=torch.float32, device=CPU, empty_rows=rule) is None
    got = masks.combine(2, 2, 1, 4, causal=True, key_padding_mask=None, attn_mask=None, dtype=torch.float32,
                        device=CPU, empty_rows="average", lengths=torch.tensor([4, 2]))
    assert got is not None and torch.isneginf(got[1, 0, 0, 2:]).all() and (got[0] == 0).all()


def test_combine_shape_errors_name_the_argument():
    kw = dict(causal=False, dtype=torch.float32, device=CPU, empty_rows="zeros")
    with pytest.raises(ValueError, match=r"key_padding_mask must be \[B, S\] = \[2, 5\], got \(5, 2\)"):
        masks.combine(2, 3, 4, 5, key_padding_mask=torch.zeros(5, 2, dtype=torch.bool), attn_mask=None, **kw)
    for bad in ((4, 4), (2, 4, 5), (2, 3, 4, 5, 1), (3, 3, 4, 5), (2, 2, 4, 5)):
        with pytest.raises(ValueError, match=r"attn_mask must be \[T, S\] = \[4, 5\].*got " + str(bad).replace(
                "(", r"\(").replace(")", r"\)")):
            masks.combine(2, 3, 4, 5, key_padding_mask=None, attn_mask=torch.zeros(bad, dtype=torch.bool), **kw)
    with pytest.raises(ValueError, match=r"lengths must be \[B\] = \[2\], got \(2, 1\)"):
        masks.combine(2, 3, 4, 5, key_padding_mask=None, attn_mask=None, lengths=torch.ones(2, 1, dtype=torch.int64),
                      **kw)


@pytest.mark.parametrize("shape", [(2, 1, 1, 6), (2, 1, 3, 6), (1, 4, 3, 6), (2, 4, 3, 6)], ids=str)
def test_grouped_layout(shape):
    """``[b, g, (H/g)·t, S]``: group j's rows are its heads' ``t`` rows, head by head."""
    H, g, t, S = 4, 2, 3, 6
    mask = torch.randn(shape, generator=_gen())
    got = masks.grouped(mask, H, g, t, S)
    full = mask.expand(shape[0], H, t, S)
    assert got.shape == (shape[0], g if shape[1] == H else 1, H // g * t, S)
    for j in range(got.shape[1]):
        assert torch.equal(got[:, j], full[:, j * (H // g):(j + 1) * (H // g)].reshape(shape[0], H // g * t, S))
    assert masks.grouped(None, H, g, t, S) is None


@pytest.mark.parametrize("form", ["key_padding_mask", "cache_seqlens"])
def test_decode_without_causal_several_tokens_one_mask_row(form):
    """mlra_decode's torch path, causal=False, t = 2: key padding (or lengths), a mask with one row per
    sequence, gives what the same mask written as a [B, 1, t, S] attn_mask gives."""
    B, t, S, H, g, r, dh = 2, 2, 9, 4, 2, 8, 8
    x, down, up, bias, c_k, c_v = decode_case(B, t, S, H, g, r, dh)
    padded = torch.zeros(B, S, dtype=torch.bool)
    padded[0, :3] = True
    kw = dict(key_padding_mask=padded) if form == "key_padding_mask" else dict(cache_seqlens=torch.tensor([6, 9]))
    rows = padded if form == "key_padding_mask" else torch.arange(S).view(1, S) >= torch.tensor([[6], [9]])
    run = dict(cache_k=c_k, cache_v=c_v, num_heads=H, latent_groups=g, causal=False)
    with use_backend("torch"), torch.no_grad():
        got, _ = mlra_decode(x, down, up, bias, **kw, **run)
        want, _ = mlra_decode(x, down, up, bias, attn_mask=rows.view(B, 1, 1, S).expand(B, 1, t, S), **run)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
