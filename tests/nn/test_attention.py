"""MLRAttention against nn.MultiheadAttention: shapes, masks, is_causal rules, conversion by SVD."""

import warnings

import torch

import pytest  # noqa: E402
from torch import nn  # noqa: E402

import mlra_kernels.nn.attention as attention_mod  # noqa: E402
from mlra_kernels.nn import MLRAttention, default_rank  # noqa: E402
from mlra_kernels._warnings import _WARNED  # noqa: E402
from mlra_kernels.ops.mlra.reference import mlra_attention_reference  # noqa: E402
from tests.helpers import assert_within_torch_error  # noqa: E402

D, H = 32, 4
DT = torch.float64


def _mha(batch_first, seed=0, bias=True, dropout=0.0):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(D, H, batch_first=batch_first, bias=bias, dropout=dropout, dtype=DT)
    with torch.no_grad():  # non-zero biases so that every bias path is exercised
        for p in mha.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mha


def _inputs(batch_first, batched, T, S, cross, seed=1):
    g = torch.Generator().manual_seed(seed)
    B = 3
    shape_q = (B, T, D) if batch_first else (T, B, D)
    shape_k = (B, S, D) if batch_first else (S, B, D)
    if not batched:
        shape_q, shape_k = (T, D), (S, D)
    q = torch.randn(shape_q, generator=g, dtype=DT)
    if not cross:
        return q, q, q
    k = torch.randn(shape_k, generator=g, dtype=DT)
    v = torch.randn(shape_k, generator=g, dtype=DT)
    return q, k, v


def _masks(kind, B, T, S, batched, seed=2):
    """Masks that never mask a whole query row (nn.MultiheadAttention gives NaN there, MLRA zeros)."""
    g = torch.Generator().manual_seed(seed)
    kpm = attn = None
    is_causal = False
    if kind in ("causal_bool", "causal_float", "causal_hint", "causal_kpm"):
        attn = torch.ones(T, S, dtype=torch.bool).triu(1)
        if kind != "causal_bool":
            attn = torch.zeros(T, S, dtype=DT).masked_fill(attn, float("-inf"))
        is_causal = kind in ("causal_hint", "causal_kpm")
    if kind in ("kpm_bool", "kpm_float", "causal_kpm"):
        kpm = torch.rand(B, S, generator=g) < 0.3
        kpm[:, 0] = False
        if kind != "kpm_bool":
            kpm = torch.zeros(B, S, dtype=DT).masked_fill(kpm, float("-inf"))
    if kind == "attn_bool_2d":
        attn = torch.rand(T, S, generator=g) < 0.4
        attn[:, 0] = False
    if kind == "attn_float_3d":
        n = B * H if batched else H
        attn = torch.randn(n, T, S, generator=g, dtype=DT)
    if kind == "both_bool":
        attn = torch.rand(T, S, generator=g) < 0.3
        kpm = torch.rand(B, S, generator=g) < 0.3
        attn[:, 0] = False
        kpm[:, 0] = False
    if not batched and kpm is not None:
        kpm = kpm[0]
    return kpm, attn, is_causal


MASKS = ["none", "causal_bool", "causal_float", "causal_hint", "causal_kpm", "kpm_bool", "kpm_float",
         "attn_bool_2d", "attn_float_3d", "both_bool"]


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize(
    "batch_first,batched,cross,groups",
    [(True, True, False, 1), (False, True, False, 2), (True, False, False, 1), (False, True, True, 1),
     (True, True, True, 4)],
    ids=["bf-self", "seqfirst-self-g2", "unbatched-self", "seqfirst-cross", "bf-cross-g4"],
)
def test_full_rank_matches_mha(mask, batch_first, batched, cross, groups):
    T = 6
    S = 9 if cross else T
    if cross and mask.startswith("causal"):
        S = T  # a causal mask is square
    mha = _mha(batch_first).eval()
    mlra = MLRAttention.from_mha(mha, rank=D, latent_groups=groups).eval()
    q, k, v = _inputs(batch_first, batched, T, S, cross)
    kpm, attn, is_causal = _masks(mask, 3, T, S, batched)
    for need_weights in (True, False):
        for average in (True, False):
            kw = dict(key_padding_mask=kpm, attn_mask=attn, is_causal=is_causal,
                      need_weights=need_weights, average_attn_weights=average)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref_out, ref_w = mha(q, k, v, **kw)
                out, w = mlra(q, k, v, **kw)
            assert out.shape == ref_out.shape
            torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
            if need_weights:
                assert w.shape == ref_w.shape
                torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-10)
            else:
                assert w is None and ref_w is None


def test_training_mode_and_gradients_match_mha():
    mha = _mha(batch_first=True).train()
    mlra = MLRAttention.from_mha(mha, rank=D).train()
    x = torch.randn(2, 5, D, dtype=DT, requires_grad=True)
    mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=DT)
    ref, _ = mha(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
    (gx_ref,) = torch.autograd.grad(ref.square().sum(), x)
    out, _ = mlra(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-10)
    mlra(x, x, x, need_weights=False)[0].sum().backward()
    for name, p in mlra.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_bias_false_matches_mha():
    mha = _mha(batch_first=True, bias=False).eval()
    mlra = MLRAttention.from_mha(mha, rank=D)
    assert mlra.in_proj_bias is None and mlra.out_proj.bias is None
    x = torch.randn(2, 5, D, dtype=DT)
    torch.testing.assert_close(mlra(x, x, x, need_weights=False)[0], mha(x, x, x, need_weights=False)[0])


@pytest.fixture
def op_spy(monkeypatch):
    calls = []
    real = attention_mod.mlra_attention

    def spy(x, down, up, bias=None, **kw):
        calls.append(kw)
        return real(x, down, up, bias, **kw)

    monkeypatch.setattr(attention_mod, "mlra_attention", spy)
    return calls


@pytest.fixture
def fresh_warnings():
    """Forget which unfused-path warnings MLRAttention has given, so that each warns again once."""
    keys = {k for k in _WARNED if k.startswith("MLRAttention:")}
    _WARNED.difference_update(keys)
    yield
    _WARNED.difference_update({k for k in _WARNED if k.startswith("MLRAttention:")})
    _WARNED.update(keys)


def test_self_attention_takes_the_fused_op(op_spy, fresh_warnings):
    mlra = MLRAttention(D, H, rank=8, batch_first=True, dtype=DT).eval()
    x = torch.randn(2, 5, D, dtype=DT)
    y = torch.randn(2, 7, D, dtype=DT)
    causal_bool = torch.ones(5, 5, dtype=torch.bool).triu(1)
    kpm = torch.tensor([[False] * 5, [False, False, False, True, True]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused path does not warn
        mlra(x, x, x, need_weights=False)
        mlra(x, x, x, attn_mask=causal_bool, need_weights=False)  # detected causal
        mlra(x, x, x, attn_mask=causal_bool, is_causal=True, key_padding_mask=kpm, need_weights=False)
    assert [c["causal"] for c in op_spy] == [False, True, True]
    assert op_spy[2]["key_padding_mask"] is not None
    n = len(op_spy)
    with pytest.warns(UserWarning, match="need_weights=True"):
        mlra(x, x, x)
    with pytest.warns(UserWarning, match="cross-attention"):
        mlra(x, y, y, need_weights=False)
    with pytest.warns(UserWarning, match="attn_mask that is not the causal mask"):
        mlra(x, x, x, attn_mask=torch.rand(5, 5) < 0.2, need_weights=False)
    assert len(op_spy) == n


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m, x, y: m(x, x, x), "need_weights=True"),
        (lambda m, x, y: m(x, y, y, need_weights=False), "cross-attention"),
        (lambda m, x, y: m(x, x, x, attn_mask=torch.rand(4, 4) < 0.2, need_weights=False), "not the causal mask"),
    ],
    ids=["need_weights", "cross", "attn_mask"],
)
def test_unfused_path_warns_once_per_reason(call, match, fresh_warnings):
    mlra = MLRAttention(D, H, dtype=DT)
    x = torch.randn(4, 2, D, dtype=DT)
    y = torch.randn(6, 2, D, dtype=DT)
    with pytest.warns(UserWarning, match=match) as record:
        call(mlra, x, y)
    assert len(record) == 1, [str(w.message) for w in record]
    assert record[0].filename == __file__, "the warning points at the caller of the module"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(mlra, x, y)


def test_unfused_path_names_every_reason(fresh_warnings):
    mlra = MLRAttention(D, H, dtype=DT)
    x, y = torch.randn(4, 2, D, dtype=DT), torch.randn(6, 2, D, dtype=DT)
    with pytest.warns(UserWarning) as record:
        mlra(x, y, y)  # cross-attention with need_weights=True
    messages = " | ".join(str(w.message) for w in record)
    assert "need_weights=True" in messages and "cross-attention" in messages


def test_causal_mask_check_is_cached_per_mask(op_spy, monkeypatch):
    calls = []
    real = attention_mod._compare_causal
    monkeypatch.setattr(attention_mod, "_compare_causal", lambda m, n: calls.append(n) or real(m, n))
    mlra = MLRAttention(D, H, rank=8, batch_first=True, dtype=DT).eval()
    x = torch.randn(2, 5, D, dtype=DT)
    mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=DT)
    for _ in range(3):
        mlra(x, x, x, attn_mask=mask, need_weights=False)
    assert len(calls) == 1 and [c["causal"] for c in op_spy] == [True] * 3
    mask[0, 1] = 0.0  # in place: no longer causal, and the cached answer is dropped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = mlra(x, x, x, attn_mask=mask, need_weights=False)[0]
    assert len(calls) == 2 and len(op_spy) == 3
    mha_like = mlra_attention_reference(
        x, mlra.down_proj_weight, mlra.up_proj_weight, mlra.in_proj_bias, num_heads=H, causal=False, attn_mask=mask
    )
    torch.testing.assert_close(out, mlra.out_proj(mha_like))


@pytest.mark.parametrize("hint", [True, False], ids=["is_causal", "no-hint"])
def test_torch_compile_fullgraph_with_causal_mask(hint):
    """No data-dependent look at the mask under torch.compile: with is_causal=True the fused op runs,
    without the hint the mask is applied as given; both match eager."""
    mlra = MLRAttention(D, H, rank=8, batch_first=True)
    x = torch.randn(2, 6, D)
    mask = nn.Transformer.generate_square_subsequent_mask(6)

    def f(x):
        return mlra(x, x, x, attn_mask=mask, is_causal=hint, need_weights=False)[0]

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, want = compiled(xc), f(xe)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (gc,), (ge,) = torch.autograd.grad(got.square().sum(), xc), torch.autograd.grad(want.square().sum(), xe)
    torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-5)


def test_is_causal_hint_rules_match_mha():
    mha = _mha(batch_first=False)
    mlra = MLRAttention.from_mha(mha, rank=D)
    x = torch.randn(4, 2, D, dtype=DT)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint") as ref:
        mha(x, x, x, is_causal=True)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint") as err:
        mlra(x, x, x, is_causal=True)
    assert str(err.value) == str(ref.value)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m, x: m(x, x[0], x), "expected `key` and `value` to be 3-D"),
        (lambda m, x: m(x, x, x, attn_mask=torch.zeros(3, 3)), "shape of the 2D attn_mask"),
        (lambda m, x: m(x, x, x, attn_mask=torch.zeros(5, 4, 4)), "shape of the 3D attn_mask"),
        (lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool)), "key_padding_mask"),
        (lambda m, x: m(x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.int64)), "only bool and floating"),
        (lambda m, x: m(x[..., :8], x[..., :8], x[..., :8]), "embedding dimension of 32"),
    ],
    ids=["key-dim", "attn2d-shape", "attn3d-shape", "kpm-shape", "int-mask", "embed-dim"],
)
def test_bad_inputs_raise_clear_errors(call, match):
    mlra = MLRAttention(D, H)
    x = torch.randn(4, 2, D)
    with pytest.raises((AssertionError, RuntimeError), match=match):
        call(mlra, x)


def test_a_wrong_width_is_a_value_error_and_the_assertion_error_of_torch():
    with pytest.raises(ValueError, match="the last dimension of query must be the module's embed_dim=32") as err:
        MLRAttention(D, H)(*(torch.randn(4, 2, 8),) * 3)
    assert isinstance(err.value, AssertionError)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda m, x: m([[0.0]], x, x), TypeError, "MLRAttention: query must be a Tensor, got list"),
        (lambda m, x: m(x, x, None), TypeError, "MLRAttention: value must be a Tensor, got NoneType"),
        (lambda m, x: m(x.long(), x.long(), x.long()), TypeError,
         "MLRAttention: query must be float32, float16, bfloat16 or float64, got torch.int64"),
        (lambda m, x: m(x.half(), x.half(), x.half(), need_weights=False), TypeError,
         "MLRAttention: query has dtype torch.float16 but the module's parameters are torch.float32"),
        (lambda m, x: m(x, x.to("meta"), x), ValueError,
         "MLRAttention: key is on meta but the module's parameters are on cpu"),
    ],
    ids=["query-list", "value-none", "query-int", "query-half", "key-meta"],
)
def test_input_errors_name_the_users_argument(call, exc, match):
    mlra = MLRAttention(D, H)
    x = torch.randn(4, 2, D)
    with pytest.raises(exc, match=match):
        call(mlra, x)


def test_constructor_validation_and_default_rank():
    with pytest.raises(ValueError, match="rank must be in \\[1, embed_dim=32\\], got 33"):
        MLRAttention(32, 4, rank=33)
    with pytest.raises(ValueError, match="num_heads=4 must divide embed_dim=30"):
        MLRAttention(30, 4)
    with pytest.raises(ValueError, match="latent_groups=3 must divide num_heads=4"):
        MLRAttention(32, 4, latent_groups=3)
    with pytest.raises(TypeError, match="rank must be a positive int, got 8.0"):
        MLRAttention(32, 4, rank=8.0)
    with pytest.raises(TypeError, match="embed_dim must be a positive int, got '32'"):
        MLRAttention("32", 4)
    m = MLRAttention(64, 4)
    assert m.rank == default_rank(64) == 16
    assert m.down_proj_weight.shape == (3 * 16, 64) and m.up_proj_weight.shape == (3, 64, 16)
    m = MLRAttention(64, 4, rank=8, latent_groups=2)
    assert m.down_proj_weight.shape == (3 * 2 * 8, 64)


def test_default_init_is_gpt2_normal():
    torch.manual_seed(0)
    m = MLRAttention(256, 8, rank=64)
    for p in (m.down_proj_weight, m.up_proj_weight, m.out_proj.weight):
        assert abs(p.std().item() - 0.02) < 0.002 and abs(p.mean().item()) < 0.002
    assert torch.count_nonzero(m.in_proj_bias) == 0


@pytest.mark.parametrize("groups", [1, 2])
def test_low_rank_conversion_is_the_best_approximation(groups):
    mha = _mha(batch_first=True)
    r = 5
    mlra = MLRAttention.from_mha(mha, rank=r, latent_groups=groups)
    W = mha.in_proj_weight.detach()
    dense = mlra.dense_in_proj_weight().detach()
    rows = D // groups
    for p, name in enumerate("qkv"):
        Wp, approx = W[p * D:(p + 1) * D], torch.zeros(D, D, dtype=DT)
        best_sq = 0.0
        for j in range(groups):
            block = Wp[j * rows:(j + 1) * rows]
            U, s, Vh = torch.linalg.svd(block, full_matrices=False)
            approx[j * rows:(j + 1) * rows] = (U[:, :r] * s[:r]) @ Vh[:r]
            best_sq += s[r:].square().sum().item()
        torch.testing.assert_close(dense[p * D:(p + 1) * D], approx, rtol=1e-9, atol=1e-12)
        expected = (best_sq / Wp.square().sum().item()) ** 0.5
        assert mlra.svd_error[name] == pytest.approx(expected, rel=1e-9)
        assert 0.05 < mlra.svd_error[name] < 1.0
    full = MLRAttention.from_mha(mha, rank=D, latent_groups=groups)
    assert max(full.svd_error.values()) < 1e-12


def test_from_mha_rejects_unsupported_modules():
    with pytest.raises(ValueError, match="kdim == vdim == embed_dim"):
        MLRAttention.from_mha(nn.MultiheadAttention(D, H, kdim=16, vdim=16), rank=8)
    with pytest.raises(ValueError, match="add_bias_kv"):
        MLRAttention.from_mha(nn.MultiheadAttention(D, H, add_bias_kv=True), rank=8)
    with pytest.raises(TypeError, match="nn.MultiheadAttention"):
        MLRAttention.from_mha(nn.Linear(D, D), rank=8)


def test_dropout_is_active_in_training_only():
    mlra = MLRAttention(D, H, rank=8, dropout=0.5, batch_first=True, dtype=DT)
    x = torch.randn(2, 6, D, dtype=DT)
    mlra.eval()
    a = mlra(x, x, x, need_weights=False)[0]
    assert torch.equal(a, mlra(x, x, x, need_weights=False)[0])
    mlra.train()
    torch.manual_seed(0)
    b = mlra(x, x, x, need_weights=False)[0]
    assert not torch.allclose(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        _, w = mlra(x, x, x, average_attn_weights=False)
    # Returned weights are post-dropout like nn.MultiheadAttention's: entries are 0 or 2·p.
    assert (w == 0).any() and torch.isfinite(w).all()


KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kernels_active(x):
    from mlra_kernels.ops.mlra import kernel_path

    return kernel_path(x).startswith("triton")


@pytest.mark.parametrize("mask", ["none", "causal_hint", "causal_kpm", "kpm_bool"])
def test_fused_kernel_path_matches_mha(mask, monkeypatch):
    """float32 through the Triton kernels (GPU, or the interpreter with TRITON_INTERPRET=1 on CPU)."""
    if KERNEL_DEVICE == "cuda":
        monkeypatch.setenv("MLRA_BACKEND", "triton")  # the CUDA default is SDPA's composition
    x = torch.randn(2, 12, D, device=KERNEL_DEVICE)
    if not _kernels_active(x):
        pytest.skip("the Triton kernels are not active (no GPU, and TRITON_INTERPRET=1 was not set before import)")
    mha = _mha(batch_first=True).float().to(KERNEL_DEVICE).eval()
    mlra = MLRAttention.from_mha(mha, rank=D).to(KERNEL_DEVICE).eval()
    kpm, attn, is_causal = _masks(mask, 2, 12, 12, True)
    kpm, attn = [None if m is None else (m if m.dtype == torch.bool else m.float()).to(KERNEL_DEVICE)
                 for m in (kpm, attn)]
    kw = dict(key_padding_mask=kpm, attn_mask=attn, is_causal=is_causal, need_weights=False)
    xr = x.detach().requires_grad_()
    ref = mha(xr, xr, xr, **kw)[0]
    (g_ref,) = torch.autograd.grad(ref.square().sum(), xr)
    xk = x.detach().requires_grad_()
    out = mlra(xk, xk, xk, **kw)[0]
    (g,) = torch.autograd.grad(out.square().sum(), xk)
    torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(g, g_ref, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "need_weights"])
def test_autocast_after_linear_matches_mha(need_weights):
    """Under CPU autocast an nn.Linear hands MLRAttention a bf16 x while its weights stay fp32: the
    output is bf16 like nn.MultiheadAttention's, and its error against float64 is of the same order."""
    mha = _mha(batch_first=True).eval()
    mlra = MLRAttention.from_mha(mha, rank=D).eval()
    torch.manual_seed(3)
    lin = nn.Linear(D, D, dtype=DT)
    x = torch.randn(2, 12, D, dtype=DT)
    mask = nn.Transformer.generate_square_subsequent_mask(12, dtype=DT)
    kw = dict(need_weights=need_weights)
    exact = mha(lin(x), lin(x), lin(x), attn_mask=mask, is_causal=True, **kw)[0]
    mha.float(), mlra.float(), lin.float()
    xf, maskf = x.float(), mask.float()
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h = lin(xf)
        assert h.dtype == torch.bfloat16
        ref = mha(h, h, h, attn_mask=maskf, is_causal=True, **kw)[0]
        out = mlra(h, h, h, attn_mask=maskf, is_causal=True, **kw)[0]
    assert out.dtype == ref.dtype == torch.bfloat16
    assert_within_torch_error(out, ref, exact, "MLRAttention's bf16 error against nn.MultiheadAttention's")


def test_cross_attention_warning_states_what_runs(fresh_warnings):
    mlra = MLRAttention(D, H, dtype=DT)
    x, y = torch.randn(4, 2, D, dtype=DT), torch.randn(6, 2, D, dtype=DT)
    with pytest.warns(UserWarning, match="cross-attention") as record:
        mlra(x, y, y, need_weights=False)
    message = str(record[0].message)
    assert "dense path" in message and "self-attention" in message
    assert "call it as" not in message  # cross-attention has no fused form to switch to


def test_in_proj_bias_can_be_assigned_like_on_nn_multihead_attention():
    mha = _mha(batch_first=True).train()
    mlra = MLRAttention.from_mha(mha, rank=D).train()
    x = torch.randn(2, 5, D, dtype=DT)

    def agree():
        torch.testing.assert_close(mlra(x, x, x, need_weights=False)[0], mha(x, x, x, need_weights=False)[0])

    new = nn.Parameter(torch.randn(3 * D, dtype=DT))
    mha.in_proj_bias = nn.Parameter(new.detach().clone())
    mlra.in_proj_bias = new
    assert mlra.in_proj_bias is new and dict(mlra.named_parameters())["qkv.bias"] is new
    assert torch.equal(mlra.state_dict()["qkv.bias"], new)
    agree()
    mlra(x, x, x, need_weights=False)[0].sum().backward()
    assert new.grad is not None and new.grad.abs().sum() > 0
    plain = torch.randn(3 * D, dtype=DT)  # a plain tensor becomes the parameter
    mha.in_proj_bias, mlra.in_proj_bias = nn.Parameter(plain.clone()), plain
    assert isinstance(mlra.in_proj_bias, nn.Parameter) and torch.equal(mlra.in_proj_bias, plain)
    agree()
    mha.in_proj_bias = mlra.in_proj_bias = None  # no Q/K/V bias, as with bias=False
    assert mlra.in_proj_bias is None and "qkv.bias" not in mlra.state_dict()
    assert all(p is not None for p in mlra.parameters()) and len(list(mlra.parameters())) == 4
    agree()
    fresh = MLRAttention(D, H, rank=D, bias=True, batch_first=True, dtype=DT)
    fresh.in_proj_bias = None
    fresh.load_state_dict(mlra.state_dict())  # the state dicts now agree on the keys
    mlra.in_proj_bias = new  # and back
    assert "qkv.bias" in mlra.state_dict()
    for value, exc, match in [
        (torch.zeros(D, dtype=DT), ValueError, r"in_proj_bias must have shape \[3·d\] = \[96\].*got \[32\]"),
        (torch.zeros(3 * D, dtype=torch.float32), TypeError, r"in_proj_bias has dtype torch.float32.*float64"),
        ([0.0] * (3 * D), TypeError, r"in_proj_bias must be a \[3·d\] = \[96\] tensor or None, got list"),
    ]:
        with pytest.raises(exc, match=match):
            mlra.in_proj_bias = value
    assert mlra.in_proj_bias is new


def test_a_state_dict_with_the_factors_flat_on_the_layer_loads():
    """State dicts from before ``qkv`` held the factors name them on the layer itself."""
    torch.manual_seed(0)
    src, dst = MLRAttention(32, 4, rank=8), MLRAttention(32, 4, rank=8)
    flat = {k.replace("qkv.down", "down_proj_weight").replace("qkv.up", "up_proj_weight")
            .replace("qkv.bias", "in_proj_bias"): v for k, v in src.state_dict().items()}
    assert "down_proj_weight" in flat and "qkv.down" not in flat
    dst.load_state_dict(flat)
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), name
