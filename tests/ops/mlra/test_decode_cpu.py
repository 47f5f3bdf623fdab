"""The C++ split-KV decode kernel (``"cpu-kernel"``, the default of ``mlra_decode`` on float32 CPU tensors)
against decode's torch path and float64.

The caches hold the latents of a real sequence (``tests.helpers.decode_case``), the new tokens being its
last ``t`` (of ``cache_seqlens[b]`` where given). Tolerance: ``helpers.assert_within_torch_error``, the
kernel's error against float64 within 3x the fp32 torch path's own.
"""

import warnings

import pytest
import torch

from mlra_kernels import _ext, _warnings
from mlra_kernels.ops.mlra import backend, explain, kernel_path, mlra_decode, use_backend
from mlra_kernels.ops.mlra.decode import _torch_attention
from mlra_kernels.ops.mlra.masks import kernel_key_padding
from tests.helpers import DECODE_SHAPES, assert_within_torch_error, decode_case, padding, run_decode

try:
    _ext.load()
except _ext.ExtensionNotAvailableError as err:  # pragma: no cover - the test command builds it
    pytest.skip(f"the compiled extension is not available: {err}", allow_module_level=True)


def decode(path, dtype, case, **kw):
    return run_decode(path, dtype, case, device="cpu", **kw)


def check(case, **kw):
    assert kernel_path(case[0].float(), op="decode", requires_grad=False) == "cpu-kernel"
    exact = decode("torch", torch.float64, case, **kw)
    low = decode("torch", torch.float32, case, **kw)
    got = decode("auto", torch.float32, case, **kw)
    assert torch.isfinite(got).all()
    assert_within_torch_error(got, low, exact, what="C++ decode kernel error")


# The shapes of the CUDA kernel's tests, and more rows (H/g·t not a multiple of 4), widths and positions
# (several key blocks and splits).
SHAPES = {
    **DECODE_SHAPES,
    "g1-H6-S300-r20": (1, 1, 300, 6, 1, 20, 16),
    "g3-t1-S1500-r7": (2, 1, 1500, 6, 3, 7, 8),
    "g1-B1-S3000-r128": (1, 1, 3000, 8, 1, 128, 16),
}


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_torch_path(shape):
    B, t, S, H, g, r, dh = shape
    check(decode_case(B, t, S, H, g, r, dh), H=H, g=g)


BF16_SHAPES = {k: SHAPES[k] for k in ("g1-H6-S300-r20", "g3-t1-S1500-r7", "g1-B1-S3000-r128")}


@pytest.mark.parametrize("shape", list(BF16_SHAPES.values()), ids=list(BF16_SHAPES))
def test_bfloat16_caches_match_the_torch_path(shape):
    """bfloat16 caches are read as they are, with float32 arithmetic: within 3x the bf16 torch path's error."""
    B, t, S, H, g, r, dh = shape
    case = decode_case(B, t, S, H, g, r, dh)
    lengths = torch.tensor([S - 5 * i for i in range(B)])
    assert kernel_path(case[0].bfloat16(), op="decode", requires_grad=False) == "cpu-kernel"
    exact = decode("torch", torch.float64, case, H=H, g=g, lengths=lengths)
    low = decode("torch", torch.bfloat16, case, H=H, g=g, lengths=lengths)
    got = decode("auto", torch.bfloat16, case, H=H, g=g, lengths=lengths)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert_within_torch_error(got, low, exact, what="C++ decode kernel error (bf16)")


@pytest.mark.parametrize("r", [24, 7, 13])
def test_bfloat16_op_equals_float32_on_the_same_numbers(r):
    """The kernel on bf16 caches computes what it computes on their float32 values, to bf16's rounding
    of the output (one bf16 step: a float32 result next to a rounding midpoint may round either way)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 6, r, generator=gen).bfloat16()
    k, v = torch.randn(2, 2, 700, r, generator=gen).bfloat16(), torch.randn(2, 2, 700, r, generator=gen).bfloat16()
    lengths = torch.tensor([700, 333], dtype=torch.int32)
    got = torch.ops.mlra.latent_decode_cpu(q, k, v, None, lengths, 2, True, 0.2)
    ref = torch.ops.mlra.latent_decode_cpu(q.float(), k.float(), v.float(), None, lengths, 2, True, 0.2)
    assert got.dtype == torch.bfloat16
    step = 2.0 ** -7 * ref.abs().clamp_min(2.0 ** -20)  # a bf16 step at each value (8 significant bits)
    assert ((got.float() - ref).abs() <= step).all()
    assert (got == ref.bfloat16()).float().mean() > 0.99  # almost all round the same way


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_key_padding(kind):
    B, t, S, H, g, r, dh = 3, 1, 650, 4, 2, 16, 16
    check(decode_case(B, t, S, H, g, r, dh), H=H, g=g, kpm=padding(B, S, kind))


def test_non_contiguous_float_key_padding():
    B, t, S, H, g, r, dh = 2, 1, 40, 4, 2, 16, 16
    kpm = padding(B, 2 * S, "float").to(torch.float32)[:, ::2]
    assert not kpm.is_contiguous()
    check(decode_case(B, t, S, H, g, r, dh), H=H, g=g, kpm=kpm)


@pytest.mark.parametrize("t", [1, 2])
def test_unequal_lengths_with_padding(t):
    """Batched generation: each sequence uses its own prefix of one preallocated cache."""
    B, S, H, g, r, dh = 3, 900, 4, 1, 16, 16
    lengths = torch.tensor([900, 7, 410], dtype=torch.int32)
    case = decode_case(B, t, S, H, g, r, dh, lengths=lengths)
    check(case, H=H, g=g, lengths=lengths, kpm=padding(B, S, "bool", lengths))
    check(case, H=H, g=g, lengths=lengths.long())


def test_token_major_cache_and_no_causal():
    B, t, S, H, g, r, dh = 2, 2, 40, 4, 2, 16, 16
    case = decode_case(B, t, S, H, g, r, dh)
    check(case, H=H, g=g, token_major=True)
    check(case, H=H, g=g, causal=False)


def test_fully_masked_query_averages_its_values():
    B, t, S, H, g, r, dh = 2, 1, 30, 4, 1, 16, 16
    lengths = torch.tensor([20, 30])
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0] = True
    check(decode_case(B, t, S, H, g, r, dh, lengths=lengths), H=H, g=g, lengths=lengths, kpm=kpm)


def test_rows_whose_visible_keys_are_all_masked_average_like_the_torch_path():
    """Two new tokens: every key the first token sees is padding, in a sequence of 12 and in one that holds
    only the two new tokens. Both paths then average the values of all L positions."""
    B, t, S, H, g, r, dh = 2, 2, 12, 4, 2, 16, 16
    lengths = torch.tensor([12, 2])
    case = decode_case(B, t, S, H, g, r, dh)  # the new tokens' values do not matter here
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, :11] = True  # token 0 of sequence 0 sits at position 10 and sees positions 0-10, all padding
    kpm[1, 0] = True  # token 0 of sequence 1 sits at position 0
    check(case, H=H, g=g, lengths=lengths, kpm=kpm)
    check(case, H=H, g=g, lengths=lengths)


def test_lengths_of_any_integer_dtype():
    B, t, S, H, g, r, dh = 2, 1, 40, 4, 1, 16, 16
    lengths = torch.tensor([40, 17])
    case = decode_case(B, t, S, H, g, r, dh, lengths=lengths)
    for dt in (torch.int16, torch.int32, torch.int64, torch.uint8):
        check(case, H=H, g=g, lengths=lengths.to(dt))


def test_other_devices_take_the_torch_path():
    x = torch.empty(2, 1, 64, device="meta")
    assert kernel_path(x, op="decode") == "torch" and "meta tensors" in explain(x, op="decode")


BAD_LENGTHS = {"negative": -1, "zero": 0, "below-t": 1, "above-S": 55, "int32-max": 2**31 - 1}


@pytest.mark.parametrize("dtype,bad", [(dt, v) for dt in (torch.int32, torch.int64) for v in BAD_LENGTHS.values()]
                         + [(torch.int64, 2**40)],
                         ids=[f"{dt}-{k}" for dt in ("int32", "int64") for k in BAD_LENGTHS] + ["int64-2^40"])
def test_the_op_refuses_lengths_outside_t_new_to_S(dtype, bad):
    """A length below the new tokens or past the caches is an error naming the index, the value and the range
    (the op reads lengths on the CPU, where checking them costs nothing)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(shape, generator=gen) for shape in ((2, 1, 4, 16), (2, 1, 50, 16), (2, 1, 50, 16)))
    lengths = torch.tensor([50, bad], dtype=dtype)
    message = rf"lengths \(cache_seqlens\)\[1\] = {bad} is outside \[t_new, S\] = \[2, 50\]"
    with pytest.raises(RuntimeError, match=message):
        torch.ops.mlra.latent_decode_cpu(q, k, v, None, lengths, 2, True, 0.25)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.mlra.latent_decode_cpu(q, k, v, None, lengths, 2, False, 0.25)
    with pytest.raises(RuntimeError, match=r"the caches hold S=1 positions, fewer than the t_new=2 new tokens"):
        torch.ops.mlra.latent_decode_cpu(q, k[:, :, :1], v[:, :, :1], None, None, 2, True, 0.25)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -0.25, 0.0, 1e39],
                         ids=["nan", "inf", "negative", "zero", "past-fp32"])
def test_the_op_refuses_a_scale_that_is_not_positive_and_finite(scale):
    q, k = torch.randn(1, 1, 4, 16), torch.randn(1, 1, 10, 16)
    with pytest.raises(RuntimeError, match="scale must be a positive finite float32 number"):
        torch.ops.mlra.latent_decode_cpu(q, k, k, None, None, 1, True, scale)


def _qkv(S, seed=8):
    """q [2, 2, 6, 24] (t_new = 2: three heads per group), k and v [2, 2, S, 24]."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in ((2, 2, 6, 24), (2, 2, S, 24), (2, 2, S, 24))]


@pytest.mark.parametrize("huge", [1e30, 1e36])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_masked_keys_weigh_exactly_nothing(huge, dtype):
    """Values at padded positions (amid attended ones, and filling whole splits) and past a row's own token do
    not change its output by a single bit, however large; the torch path is exact there too."""
    S = 1500
    q, k, v = (a.to(dtype) for a in _qkv(S))
    kpm = torch.zeros(2, S)
    kpm[:, 3:1400:7] = float("-inf")  # scattered through every key block
    kpm[1, 500:1400] = float("-inf")  # whole splits of sequence 1
    lengths = torch.tensor([1500, 1450], dtype=torch.int32)
    base = torch.ops.mlra.latent_decode_cpu(q, k, v, kpm, lengths, 2, True, 0.3)
    noisy = v.clone()
    noisy[kpm.isinf().view(2, 1, S, 1).expand_as(v)] = huge
    noisy[1, :, 520:1380:3] = -huge
    got = torch.ops.mlra.latent_decode_cpu(q, k, noisy, kpm, lengths, 2, True, 0.3)
    assert torch.isfinite(got.float()).all() and torch.equal(got, base)
    # Causal: position 1499 of sequence 0 is after new token 0 (rows 0, 2, 4 of a group); token 1 reads it.
    late = v.clone()
    late[0, :, 1499] = huge
    got = torch.ops.mlra.latent_decode_cpu(q, k, late, kpm, lengths, 2, True, 0.3)
    assert torch.equal(got[:, :, 0::2], base[:, :, 0::2]) and torch.equal(got[1], base[1])
    exact, _ = _torch_attention(q.double(), k.double(), late.double(), 0.3, B=2, H=6, g=2, t=2, causal=True,
                                key_padding_mask=kpm.double(), attn_mask=None, lengths=lengths, dropout_p=0.0,
                                need_weights=False)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((got.double() - exact).abs() <= tol * exact.abs() + tol).all()


def test_huge_latents_at_padded_positions_decode_like_the_torch_path():
    B, t, S, H, g, r, dh = 2, 1, 300, 4, 2, 16, 16
    x, down, up, bias, c_k, c_v = decode_case(B, t, S, H, g, r, dh)
    kpm = padding(B, S, "bool")
    c_v = c_v.masked_fill(kpm.view(B, 1, S, 1), 1e36)
    check((x, down, up, bias, c_k, c_v), H=H, g=g, kpm=kpm)


@pytest.mark.parametrize("S", [40, 1500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_nan_query_row_comes_out_nan(S, dtype):
    """A NaN in a query row makes that row NaN, as SDPA's arithmetic does, and no other row."""
    q, k, v = _qkv(S)
    q[1, 0, 3, 5] = float("nan")
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    for lengths in (None, torch.tensor([S, S - 3])):
        z = torch.ops.mlra.latent_decode_cpu(q, k, v, None, lengths, 2, True, 0.3)
        nan = torch.zeros(z.shape, dtype=torch.bool)
        nan[1, 0, 3] = True
        assert torch.equal(z.isnan(), nan)


def test_a_nan_value_reaches_every_row_that_reads_it():
    """A NaN latent at a position below a sequence's length makes NaN every row that reads it, even a row for
    which it is masked (0 · NaN), as in decode's torch path."""
    q, k, v = _qkv(40)
    v[0, 1, 39, 2] = float("nan")  # the last position of sequence 0, group 1: new token 1, after token 0
    z = torch.ops.mlra.latent_decode_cpu(q, k, v, None, None, 2, True, 0.3)
    exact, _ = _torch_attention(q, k, v, 0.3, B=2, H=6, g=2, t=2, causal=True, key_padding_mask=None, attn_mask=None,
                                lengths=None, dropout_p=0.0, need_weights=False)
    assert z[0, 1, :, 2].isnan().all() and torch.equal(z.isnan(), exact.isnan())


def test_a_row_whose_scores_are_all_minus_infinity_is_nan():
    """Softmax's 0/0: a row that scores -inf against every key comes out NaN, the others as they were."""
    q, k, v = _qkv(300)
    base = torch.ops.mlra.latent_decode_cpu(q, k, v, None, None, 1, False, 0.3)
    q[0, 0, 1, 0] = float("-inf")
    k[0, 0, :, 0] = k[0, 0, :, 0].abs() + 0.5
    z = torch.ops.mlra.latent_decode_cpu(q, k, v, None, None, 1, False, 0.3)
    assert z[0, 0, 1].isnan().all()
    z[0, 0, 1], base[0, 0] = 0, z[0, 0]
    assert torch.equal(z, base)


@pytest.mark.parametrize("t", [1, 2])
def test_a_nan_in_a_new_token_is_nan_as_on_the_torch_path(t):
    B, S, H, g, r, dh = 2, 70, 4, 2, 16, 16
    x, *rest = decode_case(B, t, S, H, g, r, dh)
    x = x.clone()
    x[0, t - 1, 3] = float("nan")
    case = (x, *rest)
    for lengths in (None, torch.tensor([70, 64])):
        got = decode("auto", torch.float32, case, H=H, g=g, lengths=lengths)
        ref = decode("torch", torch.float32, case, H=H, g=g, lengths=lengths)
        assert got[0, t - 1].isnan().all() and torch.equal(got.isnan(), ref.isnan())
        torch.testing.assert_close(got.nan_to_num(), ref.nan_to_num(), rtol=1e-4, atol=1e-5)


def test_the_splits_of_one_sequence_merge_exactly_enough():
    """One sequence, 2,000 positions and several threads' worth of splits: within fp32 rounding of float64."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(shape, generator=gen) for shape in ((1, 1, 8, 32), (1, 1, 2000, 32), (1, 1, 2000, 32)))
    got = torch.ops.mlra.latent_decode_cpu(q, k, v, None, None, 1, True, 0.2).double()
    exact, _ = _torch_attention(q.double(), k.double(), v.double(), 0.2, B=1, H=8, g=1, t=1, causal=True,
                                key_padding_mask=None, attn_mask=None, lengths=None, dropout_p=0.0,
                                need_weights=False)
    assert (got - exact).abs().max().item() <= 16 * torch.finfo(torch.float32).eps * exact.abs().max().item()


def test_choice_and_its_reasons():
    x = torch.randn(2, 1, 64)
    assert kernel_path(x, op="decode") == "cpu-kernel" and "C++" in explain(x, op="decode")
    assert kernel_path(x.bfloat16(), op="decode") == "cpu-kernel" and "bfloat16" in explain(x.bfloat16(), op="decode")
    assert kernel_path(x.half(), op="decode") == "torch" and "float32 or bfloat16" in explain(x.half(), op="decode")
    assert kernel_path(x.double(), op="decode") == "torch"
    assert kernel_path(x, op="decode", need_weights=True) == "torch"
    assert kernel_path(x, op="decode", requires_grad=True) == "torch"
    with use_backend("torch"):
        assert kernel_path(x, op="decode") == "torch"


def test_gradients_take_the_torch_path_with_one_warning(monkeypatch):
    monkeypatch.setattr(_warnings, "_WARNED", set())
    B, t, S, H, g, r, dh = 2, 1, 20, 4, 1, 16, 16
    x, down, up, bias, c_k, c_v = (a.float() for a in decode_case(B, t, S, H, g, r, dh))
    x.requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = mlra_decode(x, down, up, bias, cache_k=c_k, cache_v=c_v, num_heads=H, latent_groups=g)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert sum("requires grad" in str(w.message) for w in caught) == 1


def test_without_a_loadable_extension_it_warns_and_computes_the_same(monkeypatch):
    B, t, S, H, g, r, dh = 2, 1, 60, 4, 2, 16, 16
    case = decode_case(B, t, S, H, g, r, dh)
    kpm = padding(B, S, "bool")
    expected = decode("auto", torch.float32, case, H=H, g=g, kpm=kpm)

    def missing():
        raise _ext.ExtensionNotAvailableError("mlra_kernels._C is stale")

    monkeypatch.setattr(_ext, "_DECODE_KERNEL", [])  # forget that it loaded before
    monkeypatch.setattr(_warnings, "_WARNED", set())
    calls = []
    monkeypatch.setattr(_ext, "load", lambda: calls.append(1) or missing())
    with pytest.warns(UserWarning, match="C\\+\\+ decode kernel is not available.*stale"):
        got = decode("auto", torch.float32, case, H=H, g=g, kpm=kpm)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    decode("auto", torch.float32, case, H=H, g=g, kpm=kpm)
    assert len(calls) == 1  # a build that cannot load is tried once, not at every step


def test_an_extension_built_from_older_sources_warns_and_computes_the_same(monkeypatch):
    """A _C that loads but predates the decode kernel (an editable install not rebuilt after a pull)."""
    B, t, S, H, g, r, dh = 2, 1, 30, 4, 1, 16, 16
    case = decode_case(B, t, S, H, g, r, dh)
    expected = decode("auto", torch.float32, case, H=H, g=g)

    class OldOps:  # torch.ops.mlra without the new op
        def __getattr__(self, name):
            if name == "latent_decode_cpu":
                raise AttributeError(name)
            return getattr(torch.ops.mlra, name)

    monkeypatch.setattr(_ext, "_DECODE_KERNEL", [])
    monkeypatch.setattr(_warnings, "_WARNED", set())
    real_ops = torch.ops.mlra
    monkeypatch.setattr(torch.ops, "mlra", OldOps())
    try:
        with pytest.warns(UserWarning, match="built from older sources"):
            got = decode("auto", torch.float32, case, H=H, g=g)
    finally:
        monkeypatch.setattr(torch.ops, "mlra", real_ops)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_op_rejects_what_it_cannot_read():
    q, k = torch.randn(1, 1, 4, 16), torch.randn(1, 1, 10, 16)
    with pytest.raises(RuntimeError, match="k must be float32 or bfloat16"):
        torch.ops.mlra.latent_decode_cpu(q, k.double(), k, None, None, 1, True, 0.25)
    with pytest.raises(RuntimeError, match="q, k and v must have one dtype"):
        torch.ops.mlra.latent_decode_cpu(q, k.bfloat16(), k.bfloat16(), None, None, 1, True, 0.25)
    strided = torch.randn(1, 1, 10, 32)[..., ::2]  # every other column: stride 2 in r
    with pytest.raises(RuntimeError, match="k must have a contiguous last dimension"):
        torch.ops.mlra.latent_decode_cpu(q, strided, k, None, None, 1, True, 0.25)
    with pytest.raises(RuntimeError, match="kpm must be a float32 CPU"):
        torch.ops.mlra.latent_decode_cpu(q, k, k, torch.zeros(1, 9), None, 1, True, 0.25)
    with pytest.raises(RuntimeError, match="t_new=3 must divide"):
        torch.ops.mlra.latent_decode_cpu(q, k, k, None, None, 3, True, 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck_and_compile(dtype):
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(shape, generator=gen).to(dtype) for shape in ((2, 2, 3, 16), (2, 2, 40, 16), (2, 2, 40, 16)))
    kpm = kernel_key_padding(padding(2, 40, "bool"))
    lengths = torch.tensor([40, 25], dtype=torch.int32)
    torch.library.opcheck(torch.ops.mlra.latent_decode_cpu.default, (q, k, v, kpm, lengths, 1, True, 0.25))

    B, t, S, H, g, r, dh = 2, 1, 30, 4, 1, 16, 16
    x, down, up, bias, c_k, c_v = (a.to(dtype) for a in decode_case(B, t, S, H, g, r, dh))

    def step(x, c_k, c_v):
        return mlra_decode(x, down, up, bias, cache_k=c_k, cache_v=c_v, num_heads=H, latent_groups=g)[0]

    with torch.no_grad():
        eager = step(x, c_k, c_v)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, c_k, c_v)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert backend.DECODE_KERNELS[-1] == "cpu-kernel"


def test_a_first_decode_under_compile_checks_the_extension_at_trace_time(monkeypatch):
    """Whether the C++ kernel loads is read while torch.compile traces (a constant of the process), so a
    process's first CPU decode compiles with fullgraph=True and calls mlra::latent_decode_cpu directly."""
    monkeypatch.setattr(_ext, "_DECODE_KERNEL", [])  # as in a fresh process
    B, t, S, H, g, r, dh = 2, 1, 30, 4, 2, 16, 16
    x, down, up, bias, c_k, c_v = (a.float() for a in decode_case(B, t, S, H, g, r, dh))

    def step(x, c_k, c_v):
        return mlra_decode(x, down, up, bias, cache_k=c_k, cache_v=c_v, num_heads=H, latent_groups=g)[0]

    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, c_k, c_v)
        assert _ext._DECODE_KERNEL == [True]
        torch.testing.assert_close(compiled, step(x, c_k, c_v), rtol=0, atol=0)
