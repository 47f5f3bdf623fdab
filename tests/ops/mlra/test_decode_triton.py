"""The split-KV Triton decode kernel against the torch path of ``mlra_decode`` and float64.

On a CPU machine the kernel runs under the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest),
forced with ``use_backend("triton-interpreter")``; on a GPU it runs as the default ``"triton"`` path.
The caches hold the latents of a real sequence (``kv_latents``), the new tokens being its last ``t`` (of
``cache_seqlens[b]`` where given). Tolerance: ``helpers.assert_within_torch_error``, the kernel's error
against float64 within 3x the torch path's own in the same dtype.
"""

import types
import warnings

import pytest
import torch

pytest.importorskip("triton", reason="the decode kernel needs triton")

from mlra_kernels import _warnings  # noqa: E402
from mlra_kernels.ops.mlra import backend, config, explain, kernel_path, launcher  # noqa: E402
from mlra_kernels.ops.mlra import mlra_decode, use_backend  # noqa: E402
from mlra_kernels.ops.mlra.decode import _torch_attention  # noqa: E402
from mlra_kernels.ops.mlra.masks import kernel_key_padding  # noqa: E402
from mlra_kernels.ops.mlra.reference import mlra_attention_reference  # noqa: E402
from tests.helpers import (  # noqa: E402
    DECODE_SHAPES, DEVICE, DTYPES, assert_within_torch_error, decode_case, padding, run_decode,
)

if DEVICE == "cuda":
    KERNEL = "triton"
elif backend.triton_interpreted():
    KERNEL = "triton-interpreter"
else:  # pragma: no cover - conftest sets TRITON_INTERPRET before triton's import
    pytest.skip("triton was imported without TRITON_INTERPRET=1 on a CPU machine", allow_module_level=True)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(config, "POISON_OUTPUTS", True)  # an output element never written shows as NaN


def decode(path, dtype, case, **kw):
    return run_decode(path, dtype, case, device=DEVICE, **kw)


def check(dtype, case, **kw):
    exact = decode("torch", torch.float64, case, **kw)
    low = decode("torch", dtype, case, **kw)
    got = decode(KERNEL, dtype, case, **kw)
    assert torch.isfinite(got).all(), "non-finite output (an element never written?)"
    assert_within_torch_error(got, low, exact, what=f"decode kernel error ({dtype})")


SHAPES = DECODE_SHAPES


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_torch_path_fp32(shape):
    B, t, S, H, g, r, dh = shape
    check(torch.float32, decode_case(B, t, S, H, g, r, dh), H=H, g=g)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("shape", ["g1-B2-S37", "gH-B3-S70", "g2-t3-S45"])
def test_matches_torch_path_low_precision(shape, dtype):
    B, t, S, H, g, r, dh = SHAPES[shape]
    check(DTYPES[dtype], decode_case(B, t, S, H, g, r, dh), H=H, g=g)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_key_padding(kind, dtype):
    B, t, S, H, g, r, dh = 3, 1, 50, 4, 2, 16, 16
    check(DTYPES[dtype], decode_case(B, t, S, H, g, r, dh), H=H, g=g, kpm=padding(B, S, kind))


def test_non_contiguous_float_key_padding():
    """A float mask sliced out of a wider one (key stride 2) is read as the values it shows."""
    B, t, S, H, g, r, dh = 2, 1, 40, 4, 2, 16, 16
    wide = padding(B, 2 * S, "float").to(torch.float32)  # fp32 already, so no conversion makes it contiguous
    kpm = wide[:, ::2]
    assert not kpm.is_contiguous()
    check(torch.float32, decode_case(B, t, S, H, g, r, dh), H=H, g=g, kpm=kpm)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("t", [1, 2])
def test_unequal_lengths_with_padding(t, dtype):
    """Batched generation: each sequence uses its own prefix of one preallocated cache."""
    B, S, H, g, r, dh = 3, 90, 4, 1, 16, 16
    lengths = torch.tensor([90, 7, 41])
    case = decode_case(B, t, S, H, g, r, dh, lengths=lengths)
    check(DTYPES[dtype], case, H=H, g=g, lengths=lengths, kpm=padding(B, S, "bool", lengths))


def test_token_major_cache_and_no_causal():
    B, t, S, H, g, r, dh = 2, 2, 40, 4, 2, 16, 16
    case = decode_case(B, t, S, H, g, r, dh)
    check(torch.float32, case, H=H, g=g, token_major=True)
    check(torch.float32, case, H=H, g=g, causal=False)


def test_fully_masked_query_averages_its_values():
    """Every key of sequence 0 is padding: its output averages its values, as on the torch path."""
    B, t, S, H, g, r, dh = 2, 1, 30, 4, 1, 16, 16
    lengths = torch.tensor([20, 30])
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0] = True
    check(torch.float32, decode_case(B, t, S, H, g, r, dh, lengths=lengths), H=H, g=g, lengths=lengths, kpm=kpm)


def test_float64_torch_path_is_the_oracle():
    """The exact side of these tests: the float64 torch path equals the float64 reference attention."""
    B, t, S, H, g, r, dh = 2, 3, 21, 4, 2, 8, 16
    case = decode_case(B, t, S, H, g, r, dh, seed=3)
    gen = torch.Generator().manual_seed(3)
    seq = torch.randn(B, S, H * dh, generator=gen, dtype=torch.float64)  # the same draw as decode_case
    _, down, up, bias, _, _ = case
    exact = mlra_attention_reference(seq, down, up, bias, num_heads=H, latent_groups=g, causal=True)[:, -t:]
    got = decode("torch", torch.float64, case, H=H, g=g)
    assert (got - exact).abs().max().item() < 1e-12


def _kernel_z(q, k, v, kpm, lengths, t, num_splits):
    mod = launcher.kernels("decode_kernels")
    return mod.mlra_decode_attention(q, k, v, kpm, lengths, t_new=t, causal=True, scale=0.25, num_splits=num_splits)


def _exact_z(q, k, v, kpm, lengths, t):
    """Z in float64 by the torch path's attention (its masks), for the launcher-level tests."""
    B, g, M, _ = q.shape
    z, _ = _torch_attention(q.double(), k.double(), v.double(), 0.25, B=B, H=g * (M // t), g=g, t=t, causal=True,
                            key_padding_mask=kpm, attn_mask=None, lengths=lengths, dropout_p=0.0, need_weights=False)
    return z


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_split_merge(dtype):
    """1, 2 and 5 splits of the cache (several key tiles each, the last split partly past some lengths)
    give Z within the dtype's rounding of the float64 attention."""
    B, g, hpg, t, S, r = 2, 2, 2, 2, 1100, 16
    gen = torch.Generator().manual_seed(4)
    dt = DTYPES[dtype]
    q, k, v = (torch.randn(shape, generator=gen).to(DEVICE, dt) for shape in
               ((B, g, hpg * t, r), (B, g, S, r), (B, g, S, r)))
    lengths = torch.tensor([1100, 333], device=DEVICE)
    kpm = padding(B, S, "bool", lengths.cpu()).to(DEVICE)
    exact = _exact_z(q, k, v, kpm, lengths, t)
    zs = []
    for n in (1, 2, 5):
        mod = launcher.kernels("decode_kernels")
        assert mod.plan(B, g, hpg * t, S, r, 8, n)["splits"] == n
        z = _kernel_z(q, k, v, kernel_key_padding(kpm), lengths, t, n)
        assert torch.isfinite(z).all()
        err = (z.double() - exact).abs().max().item()
        assert err <= 8 * torch.finfo(dt).eps * exact.abs().max().item(), f"{n} splits: error {err:.3e}"
        zs.append(z.double())
    assert (zs[1] - zs[2]).abs().max().item() <= 4 * torch.finfo(dt).eps * exact.abs().max().item()


@pytest.mark.parametrize("splits", [1, 3])
def test_a_nan_query_row_comes_out_nan(splits):
    """A NaN in a new token makes its sequence's rows NaN, as through SDPA; the other sequence is unchanged."""
    B, g, hpg, t, S, r = 2, 1, 3, 1, 800, 16
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(shape, generator=gen).to(DEVICE) for shape in ((B, g, hpg * t, r), (B, g, S, r), (B, g, S, r)))
    lengths = torch.tensor([800, 500], device=DEVICE)
    clean = _kernel_z(q, k, v, None, lengths, t, splits)
    q[0, 0, 1, 5] = float("nan")
    z = _kernel_z(q, k, v, None, lengths, t, splits)
    assert z[0, 0, 1].isnan().all() and torch.equal(z[1], clean[1])
    assert torch.equal(z[0, 0, 0], clean[0, 0, 0])  # the rows without the NaN


def test_a_nan_key_masked_by_causality_still_makes_its_row_nan():
    """As the C++ kernel and the torch path's additive mask: a NaN score stays NaN where it is masked."""
    B, g, hpg, t, S, r = 1, 1, 2, 2, 300, 16
    gen = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(shape, generator=gen).to(DEVICE) for shape in ((B, g, hpg * t, r), (B, g, S, r), (B, g, S, r)))
    k[0, 0, S - 1, 0] = float("nan")  # the last key: masked for new token 0, seen by new token 1
    z = _kernel_z(q, k, v, None, None, t, 1)
    assert z.isnan().all(dim=-1).all()


def test_grid_depends_on_capacity_not_length(monkeypatch):
    """The launch of a step on one preallocated cache is the same whatever the lengths (CUDA graphs)."""
    mod = launcher.kernels("decode_kernels")
    seen = []
    real = mod.plan

    def record(*args, **kw):
        p = real(*args, **kw)
        seen.append((p["grid"], p["split_len"], p["BLOCK_N"]))
        return p

    monkeypatch.setattr(mod, "plan", record)
    B, t, S, H, g, r, dh = 2, 1, 600, 4, 1, 16, 16
    for lengths in (torch.tensor([3, 9]), torch.tensor([600, 257])):
        check(torch.float32, decode_case(B, t, S, H, g, r, dh, lengths=lengths), H=H, g=g, lengths=lengths)
    assert len(seen) == 2 and seen[0] == seen[1], seen
    assert seen[0][0][2] > 1, "this capacity should be split (the merge is on the tested path)"


def test_plan_is_fixed_by_shapes():
    mod = launcher.kernels("decode_kernels")
    p = mod.plan(1, 1, 12, 8192, 192, n_sm=132)
    assert p["splits"] * p["split_len"] >= 8192 and (p["splits"] - 1) * p["split_len"] < 8192
    assert p["grid"] == (1, 1, p["splits"]) and p["splits"] > 1
    # A batch that fills the GPU gets one split, so the kernel writes Z itself.
    assert mod.plan(64, 12, 1, 1024, 16, n_sm=132)["splits"] == 1


class _FakeCuda:
    """Stands in for CUDA new tokens on a CPU machine: the choice reads only these attributes."""

    is_cuda = True
    device = types.SimpleNamespace(type="cuda")
    requires_grad = False

    def __init__(self, dtype):
        self.dtype = dtype


def test_backend_choice_on_cuda():
    """On CUDA the kernel is the default decode path; the modes it lacks fall back with the reason."""
    c = backend.choose_decode(_FakeCuda(torch.bfloat16))
    assert c.path == "triton" and "split-KV" in c.reason and "CUDA graph" in c.reason and not c.slow
    for kw, why in ((dict(attn_mask=torch.zeros(1, 1)), "attn_mask"), (dict(dropout_p=0.1), "dropout"),
                    (dict(need_weights=True), "need_weights"), (dict(needs_grad=True), "grad")):
        c = backend.choose_decode(_FakeCuda(torch.float16), **kw)
        assert c.path == "torch" and why in c.reason and c.slow, (kw, c)
    c = backend.choose_decode(_FakeCuda(torch.float64))
    assert c.path == "torch" and "float64" in c.reason and not c.slow


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(_warnings, "_WARNED", set())
    c = backend.choose_decode(_FakeCuda(torch.float16), need_weights=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend.warn_if_slow(c, "mlra_decode")
        backend.warn_if_slow(c, "mlra_decode")
    assert len(caught) == 1 and "mlra_decode runs the 'torch' path: need_weights" in str(caught[0].message)


def test_kernel_path_and_explain_for_decode(monkeypatch):
    x = torch.randn(2, 1, 16)
    if DEVICE == "cpu":
        assert kernel_path(x, op="decode") == "cpu-kernel"  # the C++ kernel (tests/ops/mlra/test_decode_cpu.py)
        assert explain(x, op="decode").startswith("cpu-kernel: CPU float32 tensors")
        with use_backend("triton-interpreter"):
            assert kernel_path(x, op="decode") == "triton-interpreter"
    monkeypatch.setenv("MLRA_BACKEND", "torch")
    assert kernel_path(x.to(DEVICE), op="decode") == "torch"
    with pytest.raises(ValueError, match="op must be"):
        kernel_path(x, op="prefill")


def test_forced_kernel_refuses_what_it_cannot_do():
    B, t, S, H, g, r, dh = 1, 1, 8, 2, 1, 8, 8
    x, down, up, bias, c_k, c_v = (a.to(DEVICE, torch.float32) for a in decode_case(B, t, S, H, g, r, dh))
    kw = dict(cache_k=c_k, cache_v=c_v, num_heads=H)
    with use_backend(KERNEL):
        with pytest.raises(RuntimeError, match="need_weights"):
            mlra_decode(x, down, up, bias, need_weights=True, **kw)
        with pytest.raises(RuntimeError, match="forward only"):
            mlra_decode(x.requires_grad_(), down, up, bias, **kw)


def test_cache_seqlens_is_checked():
    B, t, S, H, g, r, dh = 2, 1, 8, 2, 1, 8, 8
    x, down, up, bias, c_k, c_v = (a.to(DEVICE, torch.float32) for a in decode_case(B, t, S, H, g, r, dh))
    kw = dict(cache_k=c_k, cache_v=c_v, num_heads=H)
    with pytest.raises(TypeError, match="cache_seqlens must be an integer Tensor"):
        mlra_decode(x, down, up, bias, cache_seqlens=torch.ones(B), **kw)
    with pytest.raises(ValueError, match=r"cache_seqlens must be \[B\] = \[2\]"):
        mlra_decode(x, down, up, bias, cache_seqlens=torch.ones(3, dtype=torch.int64), **kw)


def test_kernel_path_compiles_fullgraph(monkeypatch):
    """The kernel is a torch.library custom op: a decode step compiles without a graph break."""
    monkeypatch.setenv("MLRA_BACKEND", KERNEL)
    B, t, S, H, g, r, dh = 2, 1, 40, 2, 1, 8, 16
    x, down, up, bias, c_k, c_v = (a.to(DEVICE, torch.float32) for a in decode_case(B, t, S, H, g, r, dh))
    lengths = torch.tensor([40, 13], device=DEVICE)

    def step(x, c_k, c_v, lengths):
        return mlra_decode(x, down, up, bias, cache_k=c_k, cache_v=c_v, num_heads=H, cache_seqlens=lengths)[0]

    with torch.no_grad():
        eager = step(x, c_k, c_v, lengths)
        compiled = torch.compile(step, fullgraph=True)(x, c_k, c_v, lengths)
    torch.testing.assert_close(compiled, eager)
