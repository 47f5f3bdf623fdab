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
from mlra_kernels.ops.mlra import decode as decode_mod
from mlra_kernels.ops.mlra.decode import _additive_kpm, _torch_attention, mlra_decode_attn_cpu
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


def test_a_row_with_no_key_gives_zeros():
    """cache_seqlens 0 leaves a sequence no position: its rows are zeros, the others are unaffected."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(shape, generator=gen) for shape in ((2, 1, 4, 16), (2, 1, 50, 16), (2, 1, 50, 16)))
    lengths = torch.tensor([0, 50], dtype=torch.int32)
    z = mlra_decode_attn_cpu(q, k, v, None, lengths, 1, False, 0.25)
    assert (z[0] == 0).all()
    exact, _ = _torch_attention(q[1:].double(), k[1:].double(), v[1:].double(), 0.25, B=1, H=4, g=1, t=1,
                                causal=False, key_padding_mask=None, attn_mask=None, lengths=None, dropout_p=0.0,
                                need_weights=False)
    assert (z[1:].double() - exact).abs().max().item() < 1e-5


def test_the_splits_of_one_sequence_merge_exactly_enough():
    """One sequence, 2,000 positions and several threads' worth of splits: within fp32 rounding of float64."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(shape, generator=gen) for shape in ((1, 1, 8, 32), (1, 1, 2000, 32), (1, 1, 2000, 32)))
    got = mlra_decode_attn_cpu(q, k, v, None, None, 1, True, 0.2).double()
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

    monkeypatch.setattr(decode_mod, "_EXTENSION_LOADS", [])  # forget that it loaded before
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

    monkeypatch.setattr(decode_mod, "_EXTENSION_LOADS", [])
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
    kpm = _additive_kpm(padding(2, 40, "bool"))
    lengths = torch.tensor([40, 25], dtype=torch.int32)
    torch.library.opcheck(torch.ops.mlra.mlra_decode_attn_cpu.default, (q, k, v, kpm, lengths, 1, True, 0.25))

    B, t, S, H, g, r, dh = 2, 1, 30, 4, 1, 16, 16
    x, down, up, bias, c_k, c_v = (a.to(dtype) for a in decode_case(B, t, S, H, g, r, dh))

    def step(x, c_k, c_v):
        return mlra_decode(x, down, up, bias, cache_k=c_k, cache_v=c_v, num_heads=H, latent_groups=g)[0]

    with torch.no_grad():
        eager = step(x, c_k, c_v)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, c_k, c_v)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert backend.DECODE_KERNELS[-1] == "cpu-kernel"
