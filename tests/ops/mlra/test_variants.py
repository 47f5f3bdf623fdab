"""The decoding and dense variants, the backend choice, the layout helpers and MLRAProjection, against
the float64 oracle."""

import warnings

import pytest
import torch

import mlra_kernels
from mlra_kernels._warnings import _WARNED
from mlra_kernels.nn import MLRAProjection, MLRAttention
from mlra_kernels.ops.mlra import (
    dense_from_factors, explain, factorize, kernel_path, kv_latents, mlra_attention, mlra_attention_dense,
    mlra_decode, use_backend,
)
from mlra_kernels.ops.mlra import dense as dense_mod
from mlra_kernels.ops.mlra.reference import attention_reference, mlra_attention_reference, mlra_qkv_reference
from tests.helpers import assert_within_torch_error


def _inputs(B=2, T=11, H=4, g=2, r=8, dh=8, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    d = H * dh
    x = torch.randn(B, T, d, generator=gen, dtype=torch.float64)
    down = torch.randn(3 * g * r, d, generator=gen, dtype=torch.float64) / d ** 0.5
    up = torch.randn(3, d, r, generator=gen, dtype=torch.float64) / r ** 0.5
    bias = torch.randn(3 * d, generator=gen, dtype=torch.float64) * 0.2
    return [t.to(dtype) for t in (x, down, up, bias)]


@pytest.mark.parametrize("H,g,r", [(4, 1, 12), (4, 2, 8), (4, 4, 4)], ids=["g1-r12", "g2", "gH"])
@pytest.mark.parametrize("t", [1, 3])
def test_decode_on_the_latent_cache_matches_the_full_forward(H, g, r, t):
    x, down, up, bias = _inputs(H=H, g=g, r=r)
    full = mlra_attention_reference(x, down, up, bias, num_heads=H, latent_groups=g, causal=True)
    c_k, c_v = kv_latents(x, down, g)
    assert c_k.shape == (2, 11, g * r)
    out, weights = mlra_decode(x[:, -t:], down, up, bias, cache_k=c_k, cache_v=c_v, num_heads=H, latent_groups=g)
    assert weights is None
    torch.testing.assert_close(out, full[:, -t:], rtol=1e-12, atol=1e-12)
    g_k, g_v = kv_latents(x, down, g, group_major=True)  # the layout a cache reads in place
    assert g_k.shape == (2, g, 11, r) and torch.equal(g_k.transpose(1, 2).reshape(2, 11, g * r), c_k)
    out_g, _ = mlra_decode(x[:, -t:], down, up, bias, cache_k=g_k, cache_v=g_v, num_heads=H, latent_groups=g)
    torch.testing.assert_close(out_g, out, rtol=0, atol=0)


def test_decode_masks_and_weights_match_the_oracle():
    B, T, H, g, r, dh = 2, 9, 4, 2, 8, 8
    x, down, up, bias = _inputs(B, T, H, g, r, dh)
    c_k, c_v = kv_latents(x, down, g)
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[1, :3] = True
    q, k, v = mlra_qkv_reference(x, down, up, bias, num_heads=H, latent_groups=g)
    t = 4
    o, w = attention_reference(q[:, :, -t:], k, v, causal=True, key_padding_mask=kpm, need_weights=True)
    out, weights = mlra_decode(x[:, -t:], down, up, bias, cache_k=c_k, cache_v=c_v, num_heads=H,
                               latent_groups=g, key_padding_mask=kpm, need_weights=True)
    torch.testing.assert_close(out, o.transpose(1, 2).reshape(B, t, H * dh), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weights, w, rtol=1e-12, atol=1e-12)
    # A per-head additive 4-D mask, as Hugging Face models pass it, means the same as the oracle's.
    extra = torch.randn(B, H, t, T, dtype=torch.float64)
    o2, _ = attention_reference(q[:, :, -t:], k, v, causal=True, attn_mask=extra.reshape(B * H, t, T))
    out2, _ = mlra_decode(x[:, -t:], down, up, bias, cache_k=c_k, cache_v=c_v, num_heads=H, latent_groups=g,
                          attn_mask=extra)
    torch.testing.assert_close(out2, o2.transpose(1, 2).reshape(B, t, H * dh), rtol=1e-12, atol=1e-12)


def test_decode_low_precision_within_torch_error():
    x, down, up, bias = _inputs(B=3, T=40, H=4, g=1, r=16, dh=16)
    exact = mlra_attention_reference(x, down, up, bias, num_heads=4, causal=True)[:, -1:]
    low = mlra_attention_reference(*(t.bfloat16() for t in (x, down, up, bias)), num_heads=4, causal=True)[:, -1:]
    xb, db, ub, bb = (t.bfloat16() for t in (x, down, up, bias))
    c_k, c_v = kv_latents(xb, db, 1)
    got, _ = mlra_decode(xb[:, -1:], db, ub, bb, cache_k=c_k, cache_v=c_v, num_heads=4)
    assert_within_torch_error(got, low, exact, "decode bf16 error")


def test_decode_rejects_a_bad_cache():
    x, down, up, bias = _inputs()
    c_k, c_v = kv_latents(x, down, 2)
    with pytest.raises(ValueError, match=r"cache_k must be \[B, g, S, r\] = \[2, 2, S, 8\] or \[B, S, g·r\]"):
        mlra_decode(x, down, up, bias, cache_k=c_k[..., :8], cache_v=c_v, num_heads=4, latent_groups=2)
    with pytest.raises(ValueError, match="the same S >= t=11"):
        mlra_decode(x, down, up, bias, cache_k=c_k[:, :5], cache_v=c_v[:, :5], num_heads=4, latent_groups=2)
    with pytest.raises(TypeError, match="cache_v is torch.float32 but x is torch.float64"):
        mlra_decode(x, down, up, bias, cache_k=c_k, cache_v=c_v.float(), num_heads=4, latent_groups=2)


def test_dense_variant_cross_attention_and_weights():
    B, T, S, H, g, r, dh = 2, 5, 7, 4, 2, 8, 8
    x, down, up, bias = _inputs(B, T, H, g, r, dh)
    mem = torch.randn(B, S, H * dh, dtype=torch.float64)
    out, weights = mlra_attention_dense(x, mem, mem, down, up, bias, num_heads=H, latent_groups=g, need_weights=True)
    d, gr = H * dh, g * r
    q = mlra_qkv_reference(x, down, up, bias, num_heads=H, latent_groups=g)[0]
    _, k, v = mlra_qkv_reference(mem, down, up, bias, num_heads=H, latent_groups=g)
    o, w = attention_reference(q, k, v, causal=False, need_weights=True)
    torch.testing.assert_close(out, o.transpose(1, 2).reshape(B, T, d), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weights, w, rtol=1e-12, atol=1e-12)
    assert gr == down.shape[0] // 3


def test_backend_override_is_public_and_the_backward_keeps_the_forward_path(monkeypatch):
    x, down, up, bias = _inputs(T=20, dtype=torch.float32)
    assert kernel_path(x) in ("torch-cpu", "triton-interpreter")
    calls = []
    real = dense_mod.attention_grads
    monkeypatch.setattr(dense_mod, "attention_grads", lambda *a, **k: calls.append(1) or real(*a, **k))
    leaves = [t.clone().requires_grad_() for t in (x, down, up, bias)]
    with use_backend("torch"):
        assert kernel_path(x) == "torch" and explain(x) == "torch: forced by MLRA_BACKEND / use_backend"
        out = mlra_attention(*leaves, num_heads=4, latent_groups=2)
    out.square().sum().backward()  # outside the block: still the forward's path
    assert calls == [1]
    monkeypatch.setenv("MLRA_BACKEND", "torch")
    assert kernel_path(x) == "torch"
    monkeypatch.setenv("MLRA_BACKEND", "fast")
    with pytest.raises(ValueError, match="MLRA_BACKEND must be one of auto, sdpa, triton, .*; got 'fast'"):
        kernel_path(x)
    monkeypatch.delenv("MLRA_BACKEND")
    with use_backend("triton"), pytest.raises(RuntimeError, match="'triton' was forced .* needs CUDA tensors"):
        mlra_attention(x, down, up, bias, num_heads=4, latent_groups=2)
    with pytest.raises(ValueError, match="use_backend: path must be one of"):
        with use_backend("cudnn"):
            pass


def test_a_slow_path_warns_once_and_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, down, up, bias = _inputs(T=20, dtype=torch.float32)
    kpm = torch.zeros(2, 20, dtype=torch.bool)
    _WARNED.difference_update({k for k in _WARNED if k.startswith("mlra-path:")})
    with pytest.warns(UserWarning, match="runs the 'torch' path: key padding on the CPU"):
        mlra_attention(x, down, up, bias, num_heads=4, latent_groups=2, key_padding_mask=kpm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mlra_attention(x, down, up, bias, num_heads=4, latent_groups=2, key_padding_mask=kpm)
        mlra_attention(x, down, up, bias, num_heads=4, latent_groups=2)  # the fast path says nothing


@pytest.mark.parametrize("g", [1, 2])
def test_factorize_is_exact_at_full_rank_and_reports_the_error(g):
    torch.manual_seed(0)
    d, H = 16, 4
    w = torch.randn(3 * d, d, dtype=torch.float64)
    down, up, errors = factorize(w, num_heads=H, rank=d, latent_groups=g)
    assert max(errors.values()) < 1e-12
    torch.testing.assert_close(dense_from_factors(down, up, H, g), w, rtol=1e-12, atol=1e-12)
    if g == 1:  # keywords as factorize takes them, latent_groups=1 by default
        torch.testing.assert_close(dense_from_factors(down, up, num_heads=H), w, rtol=1e-12, atol=1e-12)
    _, _, low = factorize(w, num_heads=H, rank=3, latent_groups=g)
    assert set(low) == {"q", "k", "v"} and all(0.1 < e < 1 for e in low.values())
    meta = factorize(w.to("meta"), num_heads=H, rank=4, latent_groups=g)
    assert meta.down.is_meta and meta.down.shape == (3 * g * 4, d) and meta.errors is None


def test_projection_module_holds_the_factors_for_every_model():
    torch.manual_seed(0)
    w, b = torch.randn(48, 16, dtype=torch.float64), torch.randn(48, dtype=torch.float64)
    proj = MLRAProjection.from_dense(w, b, num_heads=4, rank=16, latent_groups=2)
    assert max(proj.svd_error.values()) < 1e-12 and torch.equal(proj.bias, b)
    torch.testing.assert_close(proj.dense_weight(), w, rtol=1e-12, atol=1e-12)
    fresh = MLRAProjection(64, 4)
    assert fresh.rank == 16 and torch.count_nonzero(fresh.bias) == 0
    assert abs(fresh.down.std().item() - 0.02) < 0.003
    with pytest.raises(ValueError, match=r"the dense Q/K/V weight must be \[3·d, d\] = \[48, 16\]"):
        proj.load_dense_(torch.randn(16, 16))


def test_mlrattention_loads_a_state_dict_with_the_earlier_flat_names():
    m = MLRAttention(16, 4, rank=4)
    old = {k.replace("qkv.down", "down_proj_weight").replace("qkv.up", "up_proj_weight")
           .replace("qkv.bias", "in_proj_bias"): v.clone() for k, v in m.state_dict().items()}
    assert "down_proj_weight" in old
    fresh = MLRAttention(16, 4, rank=4)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.down_proj_weight, m.down_proj_weight) and torch.equal(fresh.in_proj_bias, m.in_proj_bias)


def test_public_names_reach_the_variants():
    assert mlra_kernels.mlra_decode is mlra_decode and mlra_kernels.kernel_path is kernel_path
    assert mlra_kernels.mlra_attention_dense is mlra_attention_dense


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_torch_path_dropout_backward_in_every_dtype(dtype):
    """The torch path's dropout keep mask takes the probabilities' dtype (a float32 one broke half
    precision and cost float64 its exactness)."""
    x, down, up, bias = _inputs(T=20, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x, down, up, bias)]
    with use_backend("torch"):
        torch.manual_seed(3)
        out = mlra_attention(*leaves, num_heads=4, latent_groups=2, dropout_p=0.2)
    loss = out.square().sum() if dtype == torch.float64 else out.float().square().sum()
    grads = torch.autograd.grad(loss, leaves)
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)
    if dtype == torch.float64:  # against autograd through the same dropout mask, drawn again from the seed
        from mlra_kernels.ops.mlra import path_torch

        torch.manual_seed(3)
        seed = int(torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).item())
        keep = path_torch.dropout_keep_cpu(2, 4, 20, 0.2, seed)
        ref_leaves = [t.clone().requires_grad_() for t in (x, down, up, bias)]
        ref = mlra_attention_reference(*ref_leaves, num_heads=4, latent_groups=2, dropout_p=0.2, dropout_mask=keep)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for g, e in zip(grads, torch.autograd.grad(ref.square().sum(), ref_leaves)):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_decode_under_autocast_matches_the_fp32_step():
    x, down, up, bias = _inputs(T=12, dtype=torch.float32)
    c_k, c_v = kv_latents(x, down, 2, group_major=True)
    ref, _ = mlra_decode(x[:, -1:], down, up, bias, cache_k=c_k, cache_v=c_v, num_heads=4, latent_groups=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a_k, a_v = kv_latents(x, down, 2, group_major=True)  # bf16 latents, fp32 weights
        assert a_k.dtype == torch.bfloat16
        got, _ = mlra_decode(x[:, -1:], down, up, bias, cache_k=a_k, cache_v=a_v, num_heads=4, latent_groups=2)
        mixed, _ = mlra_decode(x[:, -1:], down, up, bias, cache_k=c_k, cache_v=c_v, num_heads=4, latent_groups=2)
    assert got.dtype == mixed.dtype == torch.bfloat16
    for out in (got, mixed):
        assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_generate_under_autocast():
    from mlra_kernels.models import GPT2, GPT2Config

    torch.manual_seed(0)
    m = GPT2(GPT2Config(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=32, attention="mlra")).eval()
    idx = torch.randint(0, 61, (2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.generate(idx, 4, temperature=0)
    assert out.shape == (2, 9) and torch.equal(out[:, :5], idx)


def test_a_learned_attn_mask_gets_its_gradient():
    x, down, up, bias = _inputs(T=9)
    pos_bias = (torch.randn(9, 9, dtype=torch.float64) * 0.1).requires_grad_()
    leaves = [t.clone().requires_grad_() for t in (x, down, up, bias)]
    out = mlra_attention(*leaves, num_heads=4, latent_groups=2, causal=True, attn_mask=pos_bias)
    ref_mask = pos_bias.detach().clone().requires_grad_()
    ref_leaves = [t.clone().requires_grad_() for t in (x, down, up, bias)]
    ref = mlra_attention_reference(*ref_leaves, num_heads=4, latent_groups=2, causal=True, attn_mask=ref_mask)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    (g_mask,) = torch.autograd.grad(out.square().sum(), pos_bias)
    (e_mask,) = torch.autograd.grad(ref.square().sum(), ref_mask)
    torch.testing.assert_close(g_mask, e_mask, rtol=1e-10, atol=1e-12)
    assert g_mask.abs().sum() > 0


def test_dense_variant_checks_its_arguments():
    x, down, up, bias = _inputs()
    with pytest.raises(TypeError, match="key must be a Tensor, got list"):
        mlra_attention_dense(x, [1], x, down, up, bias, num_heads=4, latent_groups=2)
    with pytest.raises(ValueError, match=r"key and value must both be \[B, S, d\]"):
        mlra_attention_dense(x, x[:, :, :8], x, down, up, bias, num_heads=4, latent_groups=2)
    with pytest.raises(TypeError, match="num_heads must be a positive int"):
        mlra_attention_dense(x, x, x, down, up, bias, num_heads="4", latent_groups=2)


def test_cuda_choice_without_a_gpu():
    """What a CUDA call picks, from the tensor's metadata alone: SDPA's composition unless key padding
    asks for the kernels' zero output on fully masked queries."""
    from types import SimpleNamespace

    from mlra_kernels.ops.mlra import backend

    x = SimpleNamespace(dtype=torch.bfloat16, is_cuda=True, device=torch.device("cuda"), shape=(2, 1024, 768))
    wide = backend._auto(x, None, 0.0, None, 192, 64)
    narrow = backend._auto(x, None, 0.1, None, 16, 64)
    assert wide.path == narrow.path == "sdpa" and "on the latents" in narrow.reason and "latents" not in wide.reason
    if backend.triton_available():
        assert backend._auto(x, torch.zeros(2, 1024), 0.0, None, 192, 64).path == "triton"


@pytest.mark.parametrize("r", [4, 16], ids=["latent", "heads"])
def test_sdpa_path_dropout_and_compile(r):
    x, down, up, bias = _inputs(T=24, r=r, dtype=torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, down, up, bias)]

    def f(*t):
        return mlra_attention(*t, num_heads=4, latent_groups=2).square().sum()

    with use_backend("sdpa"):
        f(*leaves).backward()
        eager = [t.grad.clone() for t in leaves]
        for t in leaves:
            t.grad = None
        torch._dynamo.reset()
        torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves).backward()
        for a, e in zip((t.grad for t in leaves), eager):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
        torch.manual_seed(5)
        a = mlra_attention(x, down, up, bias, num_heads=4, latent_groups=2, dropout_p=0.3)
        torch.manual_seed(5)
        b = mlra_attention(x, down, up, bias, num_heads=4, latent_groups=2, dropout_p=0.3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same seed, the same dropout
    plain = mlra_attention(x, down, up, bias, num_heads=4, latent_groups=2)
    assert not torch.allclose(a, plain)
