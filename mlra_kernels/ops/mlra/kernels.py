"""Triton kernels for MLRA attention: forward, and the FlashAttention-2 style backward.

The per-head q, k and v tiles are rebuilt on chip from the latents ``c [B, T, 3, g, r]`` and the
up-projections ``up [3, H·d_h, r]`` (``q = c_Q · B_Qᵀ + b_Q``); they are never written to memory.

Scores are kept in base-2 units (``s · log2(e)``) so that the softmax uses ``exp2``; the stored
log-sum-exp is in natural-log units. A query row whose keys are all masked gets ``lse = +inf``,
which makes its probabilities exactly zero in the backward.

Imported through ``launcher.kernels()``, in the mode of Triton's own library; ``INTERPRET`` is that mode.
"""

import triton
import triton.language as tl

from mlra_kernels.ops.mlra import tuning
from mlra_kernels.ops.mlra.config import triton_interpreted

INTERPRET = triton_interpreted()

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _autotuned(kernel):
    """Autotuning over ``tuning.configs``, keyed by ``tuning.KEY``, pruned by ``kernel``'s ``tuning.prune`` rules."""
    prune = {"early_config_prune": tuning.pruner(kernel)}
    return triton.autotune(configs=tuning.configs(INTERPRET), key=tuning.KEY, prune_configs_by=prune)


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``a · b (+ acc)`` in fp32. ``UPCAST`` feeds fp32 operands instead (exact for bf16 inputs): the
    interpreter's bf16 ``tl.dot`` is wrong, and products of bf16 values are exact in fp32 anyway."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PREC)
    return out


@triton.jit
def _span(start, BLOCK: tl.constexpr, n):
    """Offsets ``start + [0, BLOCK)`` and which of them are below ``n``."""
    o = start + tl.arange(0, BLOCK)
    return o, o < n


@triton.jit
def _program(H, HPG):
    """This program's ``(token block, b·H + h, batch b, head h, latent group of h)``: axis 0 runs over token
    blocks, axis 1 over (batch, head); int64, for stride arithmetic."""
    i_t = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    return i_t, i_bh, i_b, i_h, i_h // HPG


@triton.jit
def _head_cols(X, i_b, i_h, o_t, o_d, stride_b, stride_t, DH):
    """Pointers ``[len(o_t), BD]`` to head ``i_h``'s columns of tokens ``o_t`` in a ``[B, T, H·d_h]`` tensor."""
    return X + i_b * stride_b + o_t[:, None] * stride_t + i_h * DH + o_d[None, :]


@triton.jit
def _head_bias(p_bias, i_h, DH, o_d, m_d, HAS_BIAS: tl.constexpr):
    """Head ``i_h``'s slice ``[BD]`` (fp32) of one projection's bias ``p_bias``, or 0.0 without bias."""
    b_bias = 0.0
    if HAS_BIAS:
        b_bias = tl.load(p_bias + i_h * DH + o_d, mask=m_d, other=0.0).to(tl.float32)
    return b_bias


@triton.jit
def _rebuild_tile(
    p_c, stride_ct, p_w, o_t, m_t, o_d, m_d, R,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """``c[o_t, :R] · W[o_d, :R]ᵀ`` in fp32: one projection of one head for a tile of tokens."""
    b_acc = tl.full([ROWS, BLOCK_D], 0.0, dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        o_r = r0 + tl.arange(0, BLOCK_R)
        m_r = o_r < R
        b_c = tl.load(p_c + o_t[:, None] * stride_ct + o_r[None, :], mask=m_t[:, None] & m_r[None, :], other=0.0)  # [ROWS, BR]
        b_w = tl.load(p_w + o_d[None, :] * R + o_r[:, None], mask=m_d[None, :] & m_r[:, None], other=0.0)  # [BR, BD]
        b_acc = _dot(b_c, b_w, b_acc, PREC, UPCAST)
    return b_acc  # [ROWS, BD]


@triton.jit
def _with_bias(b_x, p_bias, i_h, DH, o_d, m_d, HAS_BIAS: tl.constexpr):
    """``b_x [rows, BD]`` plus head ``i_h``'s slice of one projection's bias ``p_bias``, when there is one."""
    if HAS_BIAS:
        b_x += _head_bias(p_bias, i_h, DH, o_d, m_d, HAS_BIAS)[None, :]
    return b_x


@triton.jit
def _rebuild_kv(
    p_c, stride_ct, p_w, b_bv, o_n, m_n, o_d, m_d, R, GR, D, dtype: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """One head's K and V tiles ``[BN, BD]``, V with its bias ``b_bv``. The K bias is left out: it adds the
    same value to every score of a query row."""
    b_k = _rebuild_tile(p_c + GR, stride_ct, p_w + D * R, o_n, m_n, o_d, m_d, R, BLOCK_N, BLOCK_D, BLOCK_R, PREC, UPCAST)
    b_v = _rebuild_tile(p_c + 2 * GR, stride_ct, p_w + 2 * D * R, o_n, m_n, o_d, m_d, R, BLOCK_N, BLOCK_D, BLOCK_R, PREC, UPCAST)
    if HAS_BIAS:
        b_v += b_bv[None, :]
    return b_k.to(dtype), b_v.to(dtype)


@triton.jit
def _key_end(i_m, T, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """Where the keys that query block ``i_m`` attends end: after its last row when causal."""
    if CAUSAL:
        end_n = tl.minimum((i_m + 1) * BLOCK_M, T)
    else:
        end_n = T
    return end_n


@triton.jit
def _scores(b_q, b_k, qk_scale, p_kpm, o_n, m_n, HAS_KPM: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``q · kᵀ`` scaled by ``qk_scale`` (log2 units) plus the additive key padding of keys ``o_n``
    (``p_kpm``: its row), unmasked: ``[BM, BN]``."""
    b_s = _dot(b_q, tl.trans(b_k), None, PREC, UPCAST) * qk_scale
    if HAS_KPM:
        b_s += tl.load(p_kpm + o_n, mask=m_n, other=0.0)[None, :] * 1.4426950408889634
    return b_s


@triton.jit
def _score_mask(o_m, o_n, T, CAUSAL: tl.constexpr):
    """Which (query, key) pairs may be attended: in range, and causal when asked."""
    m_s = (o_n[None, :] < T) & (o_m[:, None] >= 0)
    if CAUSAL:
        m_s = m_s & (o_n[None, :] <= o_m[:, None])
    return m_s


@triton.jit
def _dropout_keep(seed, i_bh, o_m, o_n, T, dropout_p):
    """Counter-based keep mask; the counter is the flat index of (b·H + h, i, j) in int64."""
    o_rng = (i_bh * T + o_m[:, None].to(tl.int64)) * T + o_n[None, :].to(tl.int64)
    return tl.rand(seed, o_rng) >= dropout_p


@triton.jit
def _softmax_step(b_s, b_mi, b_li, seed, i_bh, o_m, o_n, T, dropout_p, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr):
    """One key block of the online softmax of scores ``b_s [BM, BN]``: ``(p, alpha, m, l)``. ``p`` (after
    dropout) is relative to the new running max ``m`` (to 0 while a row's max is -inf), ``alpha`` rescales
    what was summed before, and ``l`` sums ``p`` before dropout."""
    b_s = tl.where(_score_mask(o_m, o_n, T, CAUSAL), b_s, float("-inf"))
    b_mnew = tl.maximum(b_mi, tl.max(b_s, 1))
    b_mref = tl.where(b_mnew == float("-inf"), 0.0, b_mnew)
    b_alpha = tl.exp2(b_mi - b_mref)
    b_p = tl.exp2(b_s - b_mref[:, None])  # [BM, BN]
    b_li = b_li * b_alpha + tl.sum(b_p, 1)
    if DROPOUT:
        b_keep = _dropout_keep(seed, i_bh, o_m, o_n, T, dropout_p)
        b_p = tl.where(b_keep, b_p / (1.0 - dropout_p), 0.0)
    return b_p, b_alpha, b_mnew, b_li


@triton.jit
def _store_out(O, LSE, b_o, b_mi, b_li, i_b, i_h, i_bh, o_m, m_m, o_d, m_d, stride_ob, stride_ot, T, DH):
    """Write a query block's output ``[BM, BD]`` (in ``O``'s dtype) and its log-sum-exp ``[BM]`` in
    natural-log units from the running max and sum (log2 units): +inf for a row whose keys are all masked."""
    m_live = b_li > 0.0
    b_lse = tl.where(m_live, (b_mi + tl.log2(tl.where(m_live, b_li, 1.0))) * 0.6931471805599453, float("inf"))
    p_o = _head_cols(O, i_b, i_h, o_m, o_d, stride_ob, stride_ot, DH)
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    tl.store(LSE + i_bh * T + o_m, b_lse, mask=m_m)


@triton.jit
def _bwd_rows(DO, LSE, DELTA, i_b, i_h, i_bh, o_m, m_m, o_d, m_d, stride_ob, stride_ot, T, DH):
    """A query block's ``dO [BM, BD]``, log-sum-exp (log2 units) and ``delta [BM]``."""
    p_do = _head_cols(DO, i_b, i_h, o_m, o_d, stride_ob, stride_ot, DH)
    b_do = tl.load(p_do, mask=m_m[:, None] & m_d[None, :], other=0.0)
    b_lse = tl.load(LSE + i_bh * T + o_m, mask=m_m, other=float("inf")) * 1.4426950408889634
    b_delta = tl.load(DELTA + i_bh * T + o_m, mask=m_m, other=0.0)
    return b_do, b_lse, b_delta


@triton.jit
def _bwd_tile(
    b_s, b_v, b_do, b_lse, seed, i_bh, o_m, o_n, T, dropout_p,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """``(P, P after dropout, dP after dropout)``, each ``[BM, BN]``, of a (query block, key block) from its
    unmasked scores ``b_s`` (log2 units)."""
    b_p = tl.exp2(b_s - b_lse[:, None])
    b_p = tl.where(_score_mask(o_m, o_n, T, CAUSAL), b_p, 0.0)  # [BM, BN]
    b_dp = _dot(b_do, tl.trans(b_v), None, PREC, UPCAST)  # [BM, BN]
    b_pd = b_p
    if DROPOUT:
        b_keep = _dropout_keep(seed, i_bh, o_m, o_n, T, dropout_p)
        b_pd = tl.where(b_keep, b_p / (1.0 - dropout_p), 0.0)
        b_dp = tl.where(b_keep, b_dp / (1.0 - dropout_p), 0.0)
    return b_p, b_pd, b_dp


@_autotuned("rebuild")
@triton.jit(do_not_specialize=["T", "T_BUCKET", "seed"])
def _mlra_fwd_kernel(
    C, UP, BIAS, KPM, O, LSE,
    stride_cb, stride_ct, stride_ob, stride_ot,
    T, T_BUCKET, H, HPG, R, DH, D, GR,
    scale, seed, dropout_p,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_m, i_bh, i_b, i_h, i_g = _program(H, HPG)
    dtype = O.dtype.element_ty
    qk_scale = scale * 1.4426950408889634
    o_m, m_m = _span(i_m * BLOCK_M, BLOCK_M, T)
    o_d, m_d = _span(0, BLOCK_D, DH)
    p_c = C + i_b * stride_cb + i_g * R
    p_w = UP + i_h * DH * R
    b_q = _rebuild_tile(p_c, stride_ct, p_w, o_m, m_m, o_d, m_d, R, BLOCK_M, BLOCK_D, BLOCK_R, PREC, UPCAST)
    b_q = _with_bias(b_q, BIAS, i_h, DH, o_d, m_d, HAS_BIAS).to(dtype)  # [BM, BD]
    b_bv = _head_bias(BIAS + 2 * D, i_h, DH, o_d, m_d, HAS_BIAS)  # [BD]

    b_mi = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_li = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    b_acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    for n0 in range(0, _key_end(i_m, T, BLOCK_M, CAUSAL), BLOCK_N):
        o_n, m_n = _span(n0, BLOCK_N, T)
        b_k, b_v = _rebuild_kv(p_c, stride_ct, p_w, b_bv, o_n, m_n, o_d, m_d, R, GR, D, dtype,
                               BLOCK_N, BLOCK_D, BLOCK_R, PREC, UPCAST, HAS_BIAS)  # [BN, BD]
        b_s = _scores(b_q, b_k, qk_scale, KPM + i_b * T, o_n, m_n, HAS_KPM, PREC, UPCAST)
        b_p, b_alpha, b_mi, b_li = _softmax_step(b_s, b_mi, b_li, seed, i_bh, o_m, o_n, T, dropout_p, CAUSAL, DROPOUT)
        b_acc = b_acc * b_alpha[:, None] + _dot(b_p.to(dtype), b_v, None, PREC, UPCAST)

    b_lsafe = tl.where(b_li > 0.0, b_li, 1.0)  # [BM]; 1 for a row whose keys are all masked
    _store_out(O, LSE, b_acc / b_lsafe[:, None], b_mi, b_li, i_b, i_h, i_bh, o_m, m_m, o_d, m_d, stride_ob, stride_ot, T, DH)


@_autotuned("absorbed")
@triton.jit(do_not_specialize=["T", "T_BUCKET", "seed"])
def _mlra_fwd_absorbed_kernel(
    C, UP, BIAS, KPM, O, LSE,
    stride_cb, stride_ct, stride_ob, stride_ot,
    T, T_BUCKET, H, HPG, R, DH, D, GR,
    scale, seed, dropout_p,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_RF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Attention on the latent: ``s = (q·B_K) c_Kᵀ`` and ``O = (P c_V)·B_Vᵀ + b_V``; same outputs as
    ``_mlra_fwd_kernel``. Each key block costs ``4·BM·BN·r`` instead of ``4·BN·d_h·(BM + r)``."""
    i_m, i_bh, i_b, i_h, i_g = _program(H, HPG)
    dtype = O.dtype.element_ty
    qk_scale = scale * 1.4426950408889634
    o_m, m_m = _span(i_m * BLOCK_M, BLOCK_M, T)
    o_d, m_d = _span(0, BLOCK_D, DH)
    o_r, m_r = _span(0, BLOCK_RF, R)
    p_c = C + i_b * stride_cb + i_g * R
    p_w = UP + i_h * DH * R
    b_q = _rebuild_tile(p_c, stride_ct, p_w, o_m, m_m, o_d, m_d, R, BLOCK_M, BLOCK_D, BLOCK_R, PREC, UPCAST)
    b_q = _with_bias(b_q, BIAS, i_h, DH, o_d, m_d, HAS_BIAS)  # [BM, BD]
    b_wk = tl.load(p_w + D * R + o_d[:, None] * R + o_r[None, :], mask=m_d[:, None] & m_r[None, :], other=0.0)  # [BD, RF]
    b_qk = _dot(b_q.to(dtype), b_wk, None, PREC, UPCAST).to(dtype)  # [BM, RF]

    b_mi = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_li = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    b_ld = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    b_acc = tl.full([BLOCK_M, BLOCK_RF], 0.0, dtype=tl.float32)
    for n0 in range(0, _key_end(i_m, T, BLOCK_M, CAUSAL), BLOCK_N):
        o_n, m_n = _span(n0, BLOCK_N, T)
        m_c = m_n[:, None] & m_r[None, :]
        b_ck = tl.load(p_c + GR + o_n[:, None] * stride_ct + o_r[None, :], mask=m_c, other=0.0)  # [BN, RF]
        b_cv = tl.load(p_c + 2 * GR + o_n[:, None] * stride_ct + o_r[None, :], mask=m_c, other=0.0)  # [BN, RF]
        b_s = _scores(b_qk, b_ck, qk_scale, KPM + i_b * T, o_n, m_n, HAS_KPM, PREC, UPCAST)
        b_p, b_alpha, b_mi, b_li = _softmax_step(b_s, b_mi, b_li, seed, i_bh, o_m, o_n, T, dropout_p, CAUSAL, DROPOUT)
        b_ld = b_ld * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + _dot(b_p.to(dtype), b_cv, None, PREC, UPCAST)

    b_lsafe = tl.where(b_li > 0.0, b_li, 1.0)  # [BM]; 1 for a row whose keys are all masked
    b_wv = tl.load(p_w + 2 * D * R + o_d[None, :] * R + o_r[:, None], mask=m_d[None, :] & m_r[:, None], other=0.0)  # [RF, BD]
    b_o = _dot((b_acc / b_lsafe[:, None]).to(dtype), b_wv, None, PREC, UPCAST)  # [BM, BD]
    if HAS_BIAS:
        # Rows of P sum to 1 (0 for a fully masked row); with dropout, to the kept mass.
        b_o += (b_ld / b_lsafe)[:, None] * _head_bias(BIAS + 2 * D, i_h, DH, o_d, m_d, HAS_BIAS)[None, :]
    _store_out(O, LSE, b_o, b_mi, b_li, i_b, i_h, i_bh, o_m, m_m, o_d, m_d, stride_ob, stride_ot, T, DH)


@triton.jit(do_not_specialize=["T"])
def _mlra_bwd_preprocess_kernel(
    O, DO, DELTA, stride_ob, stride_ot, T, H, DH,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``delta[b, h, i] = Σ_d dO·O`` over one head (= Σ_j P_ij dP_ij), in fp32."""
    i_m, i_bh, i_b, i_h, _ = _program(H, 1)
    o_m, m_m = _span(i_m * BLOCK_M, BLOCK_M, T)
    o_d = tl.arange(0, BLOCK_D)
    m_md = m_m[:, None] & (o_d < DH)[None, :]
    o_tile = i_b * stride_ob + o_m[:, None] * stride_ot + i_h * DH + o_d[None, :]
    b_o = tl.load(O + o_tile, mask=m_md, other=0.0).to(tl.float32)  # [BM, BD]
    b_do = tl.load(DO + o_tile, mask=m_md, other=0.0).to(tl.float32)  # [BM, BD]
    tl.store(DELTA + i_bh * T + o_m, tl.sum(b_o * b_do, 1), mask=m_m)


@_autotuned("bwd")
@triton.jit(do_not_specialize=["T", "T_BUCKET", "seed"])
def _mlra_bwd_dkdv_kernel(
    C, UP, BIAS, KPM, DO, LSE, DELTA, DQKV,
    stride_cb, stride_ct, stride_ob, stride_ot, stride_gb, stride_gt,
    T, T_BUCKET, H, HPG, R, DH, D, GR,
    scale, seed, dropout_p,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_n, i_bh, i_b, i_h, i_g = _program(H, HPG)
    dtype = DO.dtype.element_ty
    qk_scale = scale * 1.4426950408889634
    o_n, m_n = _span(i_n * BLOCK_N, BLOCK_N, T)
    o_d, m_d = _span(0, BLOCK_D, DH)
    p_c = C + i_b * stride_cb + i_g * R
    p_w = UP + i_h * DH * R
    b_k = _rebuild_tile(p_c + GR, stride_ct, p_w + D * R, o_n, m_n, o_d, m_d, R, BLOCK_N, BLOCK_D, BLOCK_R, PREC, UPCAST)
    b_v = _rebuild_tile(p_c + 2 * GR, stride_ct, p_w + 2 * D * R, o_n, m_n, o_d, m_d, R, BLOCK_N, BLOCK_D, BLOCK_R, PREC, UPCAST)
    b_bq = _head_bias(BIAS, i_h, DH, o_d, m_d, HAS_BIAS)  # [BD]
    b_v = _with_bias(b_v, BIAS + 2 * D, i_h, DH, o_d, m_d, HAS_BIAS)
    b_k = b_k.to(dtype)  # [BN, BD]
    b_v = b_v.to(dtype)  # [BN, BD]
    if HAS_KPM:
        b_kpm = tl.load(KPM + i_b * T + o_n, mask=m_n, other=0.0) * 1.4426950408889634  # [BN]

    b_dk = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    b_dv = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    if CAUSAL:
        start_m = ((i_n * BLOCK_N) // BLOCK_M) * BLOCK_M
    else:
        start_m = 0
    for m0 in range(start_m, T, BLOCK_M):
        o_m, m_m = _span(m0, BLOCK_M, T)
        b_q = _rebuild_tile(p_c, stride_ct, p_w, o_m, m_m, o_d, m_d, R, BLOCK_M, BLOCK_D, BLOCK_R, PREC, UPCAST)
        if HAS_BIAS:
            b_q += b_bq[None, :]
        b_q = b_q.to(dtype)  # [BM, BD]
        b_do, b_lse, b_delta = _bwd_rows(DO, LSE, DELTA, i_b, i_h, i_bh, o_m, m_m, o_d, m_d, stride_ob, stride_ot, T, DH)
        b_s = _dot(b_q, tl.trans(b_k), None, PREC, UPCAST) * qk_scale  # [BM, BN]
        if HAS_KPM:
            b_s += b_kpm[None, :]
        b_p, b_pd, b_dp = _bwd_tile(b_s, b_v, b_do, b_lse, seed, i_bh, o_m, o_n, T, dropout_p, CAUSAL, DROPOUT, PREC, UPCAST)
        b_dv = _dot(tl.trans(b_pd.to(dtype)), b_do, b_dv, PREC, UPCAST)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dk = _dot(tl.trans(b_ds.to(dtype)), b_q, b_dk, PREC, UPCAST)

    b_dk = b_dk * scale
    p_g = _head_cols(DQKV, i_b, i_h, o_n, o_d, stride_gb, stride_gt, DH)
    m_g = m_n[:, None] & m_d[None, :]
    tl.store(p_g + D, b_dk.to(dtype), mask=m_g)
    tl.store(p_g + 2 * D, b_dv.to(dtype), mask=m_g)


@_autotuned("bwd")
@triton.jit(do_not_specialize=["T", "T_BUCKET", "seed"])
def _mlra_bwd_dq_kernel(
    C, UP, BIAS, KPM, DO, LSE, DELTA, DQKV,
    stride_cb, stride_ct, stride_ob, stride_ot, stride_gb, stride_gt,
    T, T_BUCKET, H, HPG, R, DH, D, GR,
    scale, seed, dropout_p,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_m, i_bh, i_b, i_h, i_g = _program(H, HPG)
    dtype = DO.dtype.element_ty
    qk_scale = scale * 1.4426950408889634
    o_m, m_m = _span(i_m * BLOCK_M, BLOCK_M, T)
    o_d, m_d = _span(0, BLOCK_D, DH)
    p_c = C + i_b * stride_cb + i_g * R
    p_w = UP + i_h * DH * R
    b_q = _rebuild_tile(p_c, stride_ct, p_w, o_m, m_m, o_d, m_d, R, BLOCK_M, BLOCK_D, BLOCK_R, PREC, UPCAST)
    b_q = _with_bias(b_q, BIAS, i_h, DH, o_d, m_d, HAS_BIAS).to(dtype)  # [BM, BD]
    b_bv = _head_bias(BIAS + 2 * D, i_h, DH, o_d, m_d, HAS_BIAS)  # [BD]
    b_do, b_lse, b_delta = _bwd_rows(DO, LSE, DELTA, i_b, i_h, i_bh, o_m, m_m, o_d, m_d, stride_ob, stride_ot, T, DH)

    b_dq = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    for n0 in range(0, _key_end(i_m, T, BLOCK_M, CAUSAL), BLOCK_N):
        o_n, m_n = _span(n0, BLOCK_N, T)
        b_k, b_v = _rebuild_kv(p_c, stride_ct, p_w, b_bv, o_n, m_n, o_d, m_d, R, GR, D, dtype,
                               BLOCK_N, BLOCK_D, BLOCK_R, PREC, UPCAST, HAS_BIAS)  # [BN, BD]
        b_s = _scores(b_q, b_k, qk_scale, KPM + i_b * T, o_n, m_n, HAS_KPM, PREC, UPCAST)
        b_p, _, b_dp = _bwd_tile(b_s, b_v, b_do, b_lse, seed, i_bh, o_m, o_n, T, dropout_p, CAUSAL, DROPOUT, PREC, UPCAST)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq = _dot(b_ds.to(dtype), b_k, b_dq, PREC, UPCAST)

    b_dq = b_dq * scale
    p_g = _head_cols(DQKV, i_b, i_h, o_m, o_d, stride_gb, stride_gt, DH)
    tl.store(p_g, b_dq.to(dtype), mask=m_m[:, None] & m_d[None, :])


@triton.jit
def _mlra_dropout_mask_kernel(KEEP, T, seed, dropout_p, BLOCK: tl.constexpr):
    """Materialise the keep mask ``[B·H, T, T]`` that the attention kernels draw (for tests)."""
    i_m = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    o_m = i_m * BLOCK + tl.arange(0, BLOCK)
    for n0 in range(0, T, BLOCK):
        o_n = n0 + tl.arange(0, BLOCK)
        b_keep = _dropout_keep(seed, i_bh, o_m, o_n, T, dropout_p)  # [BLOCK, BLOCK]
        m_s = (o_m[:, None] < T) & (o_n[None, :] < T)
        tl.store(KEEP + (i_bh * T + o_m[:, None]) * T + o_n[None, :], b_keep.to(tl.int8), mask=m_s)
