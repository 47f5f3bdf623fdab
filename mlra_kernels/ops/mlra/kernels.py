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
    return b_acc


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
    i_m = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    i_g = i_h // HPG
    dtype = O.dtype.element_ty
    qk_scale = scale * 1.4426950408889634

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < T
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < DH

    p_c = C + i_b * stride_cb + i_g * R
    p_w = UP + i_h * DH * R
    b_q = _rebuild_tile(p_c, stride_ct, p_w, o_m, m_m, o_d, m_d, R, BLOCK_M, BLOCK_D, BLOCK_R, PREC, UPCAST)  # [BM, BD]
    if HAS_BIAS:
        b_q += tl.load(BIAS + i_h * DH + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
        b_bv = tl.load(BIAS + 2 * D + i_h * DH + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_q = b_q.to(dtype)

    b_mi = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_li = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    b_acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)

    if CAUSAL:
        end_n = tl.minimum((i_m + 1) * BLOCK_M, T)
    else:
        end_n = T
    for n0 in range(0, end_n, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < T
        # The K bias is left out: it adds the same value to every score of a query row.
        b_k = _rebuild_tile(p_c + GR, stride_ct, p_w + D * R, o_n, m_n, o_d, m_d, R, BLOCK_N, BLOCK_D, BLOCK_R, PREC, UPCAST)
        b_v = _rebuild_tile(p_c + 2 * GR, stride_ct, p_w + 2 * D * R, o_n, m_n, o_d, m_d, R, BLOCK_N, BLOCK_D, BLOCK_R, PREC, UPCAST)
        if HAS_BIAS:
            b_v += b_bv[None, :]
        b_k = b_k.to(dtype)  # [BN, BD]
        b_v = b_v.to(dtype)  # [BN, BD]

        b_s = _dot(b_q, tl.trans(b_k), None, PREC, UPCAST) * qk_scale  # [BM, BN]
        if HAS_KPM:
            b_s += tl.load(KPM + i_b * T + o_n, mask=m_n, other=0.0)[None, :] * 1.4426950408889634
        b_s = tl.where(_score_mask(o_m, o_n, T, CAUSAL), b_s, float("-inf"))

        b_mnew = tl.maximum(b_mi, tl.max(b_s, 1))
        b_mref = tl.where(b_mnew == float("-inf"), 0.0, b_mnew)
        b_alpha = tl.exp2(b_mi - b_mref)
        b_p = tl.exp2(b_s - b_mref[:, None])  # [BM, BN]
        b_li = b_li * b_alpha + tl.sum(b_p, 1)
        if DROPOUT:
            b_keep = _dropout_keep(seed, i_bh, o_m, o_n, T, dropout_p)
            b_p = tl.where(b_keep, b_p / (1.0 - dropout_p), 0.0)
        b_acc = b_acc * b_alpha[:, None] + _dot(b_p.to(dtype), b_v, None, PREC, UPCAST)
        b_mi = b_mnew

    m_live = b_li > 0.0
    b_lsafe = tl.where(m_live, b_li, 1.0)
    b_o = b_acc / b_lsafe[:, None]
    b_lse = tl.where(m_live, (b_mi + tl.log2(b_lsafe)) * 0.6931471805599453, float("inf"))

    p_o = O + i_b * stride_ob + o_m[:, None] * stride_ot + i_h * DH + o_d[None, :]
    tl.store(p_o, b_o.to(dtype), mask=m_m[:, None] & m_d[None, :])
    tl.store(LSE + i_bh * T + o_m, b_lse, mask=m_m)


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
    i_m = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    i_g = i_h // HPG
    dtype = O.dtype.element_ty
    qk_scale = scale * 1.4426950408889634

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < T
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < DH
    o_r = tl.arange(0, BLOCK_RF)
    m_r = o_r < R

    p_c = C + i_b * stride_cb + i_g * R
    p_w = UP + i_h * DH * R
    b_q = _rebuild_tile(p_c, stride_ct, p_w, o_m, m_m, o_d, m_d, R, BLOCK_M, BLOCK_D, BLOCK_R, PREC, UPCAST)
    if HAS_BIAS:
        b_q += tl.load(BIAS + i_h * DH + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    b_wk = tl.load(p_w + D * R + o_d[:, None] * R + o_r[None, :], mask=m_d[:, None] & m_r[None, :], other=0.0)  # [BD, RF]
    b_qk = _dot(b_q.to(dtype), b_wk, None, PREC, UPCAST).to(dtype)  # [BM, RF]

    b_mi = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_li = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    b_ld = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    b_acc = tl.full([BLOCK_M, BLOCK_RF], 0.0, dtype=tl.float32)

    if CAUSAL:
        end_n = tl.minimum((i_m + 1) * BLOCK_M, T)
    else:
        end_n = T
    for n0 in range(0, end_n, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < T
        m_c = m_n[:, None] & m_r[None, :]
        b_ck = tl.load(p_c + GR + o_n[:, None] * stride_ct + o_r[None, :], mask=m_c, other=0.0)  # [BN, RF]
        b_cv = tl.load(p_c + 2 * GR + o_n[:, None] * stride_ct + o_r[None, :], mask=m_c, other=0.0)  # [BN, RF]

        b_s = _dot(b_qk, tl.trans(b_ck), None, PREC, UPCAST) * qk_scale  # [BM, BN]
        if HAS_KPM:
            b_s += tl.load(KPM + i_b * T + o_n, mask=m_n, other=0.0)[None, :] * 1.4426950408889634
        b_s = tl.where(_score_mask(o_m, o_n, T, CAUSAL), b_s, float("-inf"))

        b_mnew = tl.maximum(b_mi, tl.max(b_s, 1))
        b_mref = tl.where(b_mnew == float("-inf"), 0.0, b_mnew)
        b_alpha = tl.exp2(b_mi - b_mref)
        b_p = tl.exp2(b_s - b_mref[:, None])  # [BM, BN]
        b_li = b_li * b_alpha + tl.sum(b_p, 1)
        if DROPOUT:
            b_keep = _dropout_keep(seed, i_bh, o_m, o_n, T, dropout_p)
            b_p = tl.where(b_keep, b_p / (1.0 - dropout_p), 0.0)
        b_ld = b_ld * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + _dot(b_p.to(dtype), b_cv, None, PREC, UPCAST)
        b_mi = b_mnew

    m_live = b_li > 0.0
    b_lsafe = tl.where(m_live, b_li, 1.0)
    b_wv = tl.load(p_w + 2 * D * R + o_d[None, :] * R + o_r[:, None], mask=m_d[None, :] & m_r[:, None], other=0.0)  # [RF, BD]
    b_o = _dot((b_acc / b_lsafe[:, None]).to(dtype), b_wv, None, PREC, UPCAST)  # [BM, BD]
    if HAS_BIAS:
        # Rows of P sum to 1 (0 for a fully masked row); with dropout, to the kept mass.
        b_bv = tl.load(BIAS + 2 * D + i_h * DH + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_o += (b_ld / b_lsafe)[:, None] * b_bv[None, :]
    b_lse = tl.where(m_live, (b_mi + tl.log2(b_lsafe)) * 0.6931471805599453, float("inf"))

    p_o = O + i_b * stride_ob + o_m[:, None] * stride_ot + i_h * DH + o_d[None, :]
    tl.store(p_o, b_o.to(dtype), mask=m_m[:, None] & m_d[None, :])
    tl.store(LSE + i_bh * T + o_m, b_lse, mask=m_m)


@triton.jit(do_not_specialize=["T"])
def _mlra_bwd_preprocess_kernel(
    O, DO, DELTA, stride_ob, stride_ot, T, H, DH,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``delta[b, h, i] = Σ_d dO·O`` over one head (= Σ_j P_ij dP_ij), in fp32."""
    i_m = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < T
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
    i_n = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    i_g = i_h // HPG
    dtype = DO.dtype.element_ty
    qk_scale = scale * 1.4426950408889634

    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < T
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < DH

    p_c = C + i_b * stride_cb + i_g * R
    p_w = UP + i_h * DH * R
    b_k = _rebuild_tile(p_c + GR, stride_ct, p_w + D * R, o_n, m_n, o_d, m_d, R, BLOCK_N, BLOCK_D, BLOCK_R, PREC, UPCAST)
    b_v = _rebuild_tile(p_c + 2 * GR, stride_ct, p_w + 2 * D * R, o_n, m_n, o_d, m_d, R, BLOCK_N, BLOCK_D, BLOCK_R, PREC, UPCAST)
    if HAS_BIAS:
        b_bq = tl.load(BIAS + i_h * DH + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_v += tl.load(BIAS + 2 * D + i_h * DH + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
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
        o_m = m0 + tl.arange(0, BLOCK_M)
        m_m = o_m < T
        b_q = _rebuild_tile(p_c, stride_ct, p_w, o_m, m_m, o_d, m_d, R, BLOCK_M, BLOCK_D, BLOCK_R, PREC, UPCAST)
        if HAS_BIAS:
            b_q += b_bq[None, :]
        b_q = b_q.to(dtype)  # [BM, BD]
        p_do = DO + i_b * stride_ob + o_m[:, None] * stride_ot + i_h * DH + o_d[None, :]
        b_do = tl.load(p_do, mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
        b_lse = tl.load(LSE + i_bh * T + o_m, mask=m_m, other=float("inf")) * 1.4426950408889634
        b_delta = tl.load(DELTA + i_bh * T + o_m, mask=m_m, other=0.0)

        b_s = _dot(b_q, tl.trans(b_k), None, PREC, UPCAST) * qk_scale  # [BM, BN]
        if HAS_KPM:
            b_s += b_kpm[None, :]
        b_p = tl.exp2(b_s - b_lse[:, None])
        b_p = tl.where(_score_mask(o_m, o_n, T, CAUSAL), b_p, 0.0)  # [BM, BN]
        b_dp = _dot(b_do, tl.trans(b_v), None, PREC, UPCAST)  # [BM, BN]
        if DROPOUT:
            b_keep = _dropout_keep(seed, i_bh, o_m, o_n, T, dropout_p)
            b_pd = tl.where(b_keep, b_p / (1.0 - dropout_p), 0.0)
            b_dp = tl.where(b_keep, b_dp / (1.0 - dropout_p), 0.0)
        else:
            b_pd = b_p
        b_dv = _dot(tl.trans(b_pd.to(dtype)), b_do, b_dv, PREC, UPCAST)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dk = _dot(tl.trans(b_ds.to(dtype)), b_q, b_dk, PREC, UPCAST)

    b_dk = b_dk * scale
    p_g = DQKV + i_b * stride_gb + o_n[:, None] * stride_gt + i_h * DH + o_d[None, :]
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
    i_m = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    i_g = i_h // HPG
    dtype = DO.dtype.element_ty
    qk_scale = scale * 1.4426950408889634

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < T
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < DH

    p_c = C + i_b * stride_cb + i_g * R
    p_w = UP + i_h * DH * R
    b_q = _rebuild_tile(p_c, stride_ct, p_w, o_m, m_m, o_d, m_d, R, BLOCK_M, BLOCK_D, BLOCK_R, PREC, UPCAST)
    if HAS_BIAS:
        b_q += tl.load(BIAS + i_h * DH + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
        b_bv = tl.load(BIAS + 2 * D + i_h * DH + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_q = b_q.to(dtype)  # [BM, BD]
    p_do = DO + i_b * stride_ob + o_m[:, None] * stride_ot + i_h * DH + o_d[None, :]
    b_do = tl.load(p_do, mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
    b_lse = tl.load(LSE + i_bh * T + o_m, mask=m_m, other=float("inf")) * 1.4426950408889634
    b_delta = tl.load(DELTA + i_bh * T + o_m, mask=m_m, other=0.0)

    b_dq = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    if CAUSAL:
        end_n = tl.minimum((i_m + 1) * BLOCK_M, T)
    else:
        end_n = T
    for n0 in range(0, end_n, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < T
        b_k = _rebuild_tile(p_c + GR, stride_ct, p_w + D * R, o_n, m_n, o_d, m_d, R, BLOCK_N, BLOCK_D, BLOCK_R, PREC, UPCAST)
        b_v = _rebuild_tile(p_c + 2 * GR, stride_ct, p_w + 2 * D * R, o_n, m_n, o_d, m_d, R, BLOCK_N, BLOCK_D, BLOCK_R, PREC, UPCAST)
        if HAS_BIAS:
            b_v += b_bv[None, :]
        b_k = b_k.to(dtype)  # [BN, BD]
        b_v = b_v.to(dtype)  # [BN, BD]

        b_s = _dot(b_q, tl.trans(b_k), None, PREC, UPCAST) * qk_scale  # [BM, BN]
        if HAS_KPM:
            b_s += tl.load(KPM + i_b * T + o_n, mask=m_n, other=0.0)[None, :] * 1.4426950408889634
        b_p = tl.exp2(b_s - b_lse[:, None])
        b_p = tl.where(_score_mask(o_m, o_n, T, CAUSAL), b_p, 0.0)  # [BM, BN]
        b_dp = _dot(b_do, tl.trans(b_v), None, PREC, UPCAST)  # [BM, BN]
        if DROPOUT:
            b_keep = _dropout_keep(seed, i_bh, o_m, o_n, T, dropout_p)
            b_dp = tl.where(b_keep, b_dp / (1.0 - dropout_p), 0.0)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq = _dot(b_ds.to(dtype), b_k, b_dq, PREC, UPCAST)

    b_dq = b_dq * scale
    p_g = DQKV + i_b * stride_gb + o_m[:, None] * stride_gt + i_h * DH + o_d[None, :]
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
