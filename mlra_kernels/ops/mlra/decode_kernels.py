"""Split-KV Triton kernels for a decode step on the latent cache (flash-decoding), and their launcher.

A step attends ``q̃ [B, g, M, r]`` (``M = (H/g)·t``: the absorbed queries of a group's heads, ``t`` new
tokens each) to the group's cached latents ``c_K, c_V [B, g, S, r]``:

- ``_mlra_decode_fwd_kernel``: one program per (row block, sequence·group, split of the cache); each
  ``[BLOCK_N, r]`` tile is loaded once for all rows of the group; writes a normalised partial ``Z`` and
  its log-sum-exp (with one split, ``Z`` itself).
- ``_mlra_decode_merge_kernel``: merges the splits of each row by their log-sum-exp.

The grid depends on the capacity ``S``, ``B``, ``g`` and the SM count, never on the lengths (read from
device tensors), so a step can be captured in a CUDA graph. Masked keys score the lowest finite float,
as on ``mlra_decode``'s torch path (``masks.combine(empty_rows="average")``); positions at or past a
sequence's length are not read. Scores and partial log-sum-exps are in base-2 units (``exp2``).
Imported through ``launcher.kernels("decode_kernels")``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mlra_kernels.ops.mlra import config

LOG2E = 1.4426950408889634
# float32's lowest finite value: what a masked key scores (the torch path adds finfo.min).
LOWEST = -3.4028234663852886e38

# Splits shorter than this many keys cost more in the merge than they gain in parallelism.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 64


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``a · b`` in fp32. ``UPCAST`` feeds fp32 operands (exact for bf16): the interpreter's bf16
    ``tl.dot`` is wrong."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PREC)
    return out


@triton.jit
def _masked_scores(b_s, o_n, o_pos, p_kpm, m_n, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
    """Scores ``[BM, BN]`` (log2 units) with key padding added, masked keys at LOWEST (a NaN score stays
    NaN), and the keys past the split at -inf (they are not part of the sequence)."""
    if HAS_KPM:
        b_s += tl.load(p_kpm + o_n, mask=m_n, other=0.0)[None, :] * 1.4426950408889634
    b_s = tl.maximum(b_s, -3.4028234663852886e38, propagate_nan=tl.PropagateNan.ALL)
    if CAUSAL:
        b_s = tl.where((o_n[None, :] > o_pos[:, None]) & (b_s == b_s), -3.4028234663852886e38, b_s)
    return tl.where(m_n[None, :], b_s, float("-inf"))


@triton.jit(do_not_specialize=["S"])
def _mlra_decode_fwd_kernel(
    Q, K, V, KPM, LENS, Z, O_PART, LSE_PART,
    stride_qb, stride_qg, stride_qm,
    stride_kb, stride_kg, stride_ks,
    stride_vb, stride_vg, stride_vs,
    stride_pb,
    stride_zb, stride_zg, stride_zm,
    G, M, T_NEW, R, S, SPLIT_LEN, qk_scale,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_LENS: tl.constexpr, DIRECT: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One split of the cache for one block of a group's query rows. ``DIRECT`` (one split): write ``Z``
    in its dtype; else the fp32 partial ``O_PART [splits, B·G, M, BLOCK_R]`` and ``LSE_PART [splits, B·G, M]``."""
    i_m = tl.program_id(0).to(tl.int64)
    i_bg = tl.program_id(1).to(tl.int64)
    i_s = tl.program_id(2).to(tl.int64)
    i_b = i_bg // G
    i_g = i_bg % G
    n_bg = tl.num_programs(1).to(tl.int64)
    dtype = K.dtype.element_ty

    length = S
    if HAS_LENS:
        length = tl.minimum(tl.load(LENS + i_b).to(tl.int32), S)
    start = i_s * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, length)

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    o_r = tl.arange(0, BLOCK_R)
    m_r = o_r < R
    # Row m is head (m // t) of the group, new token (m % t): its position is length - t + m % t.
    o_pos = length - T_NEW + o_m % T_NEW

    p_q = Q + i_b * stride_qb + i_g * stride_qg + o_m[:, None] * stride_qm + o_r[None, :]
    b_q = tl.load(p_q, mask=m_m[:, None] & m_r[None, :], other=0.0)  # [BM, BR]
    p_k = K + i_b * stride_kb + i_g * stride_kg
    p_v = V + i_b * stride_vb + i_g * stride_vg
    p_kpm = KPM + i_b * stride_pb

    b_mi = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_li = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    b_acc = tl.full([BLOCK_M, BLOCK_R], 0.0, dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < end
        m_c = m_n[:, None] & m_r[None, :]
        b_k = tl.load(p_k + o_n[:, None] * stride_ks + o_r[None, :], mask=m_c, other=0.0)  # [BN, BR]
        b_v = tl.load(p_v + o_n[:, None] * stride_vs + o_r[None, :], mask=m_c, other=0.0)  # [BN, BR]
        b_s = _dot(b_q, tl.trans(b_k), PREC, UPCAST) * qk_scale  # [BM, BN]
        b_s = _masked_scores(b_s, o_n, o_pos, p_kpm, m_n, CAUSAL, HAS_KPM)
        # Every tile holds at least one key in range, so the new max is finite unless a score is NaN:
        # then the row's max is NaN, so that the row comes out NaN as through SDPA (tl.max skips NaN).
        b_nan = tl.max(tl.where(b_s != b_s, 1, 0), 1) > 0  # [BM]
        b_mnew = tl.where(b_nan, float("nan"), tl.maximum(b_mi, tl.max(b_s, 1), propagate_nan=tl.PropagateNan.ALL))
        b_alpha = tl.exp2(b_mi - b_mnew)
        b_p = tl.exp2(b_s - b_mnew[:, None])  # [BM, BN]
        b_li = b_li * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + _dot(b_p.to(dtype), b_v, PREC, UPCAST)
        b_mi = b_mnew

    m_live = b_li > 0.0
    b_lsafe = tl.where(m_live, b_li, 1.0)
    b_o = b_acc / b_lsafe[:, None]  # [BM, BR]
    if DIRECT:
        p_z = Z + i_b * stride_zb + i_g * stride_zg + o_m[:, None] * stride_zm + o_r[None, :]
        tl.store(p_z, b_o.to(Z.dtype.element_ty), mask=m_m[:, None] & m_r[None, :])
    else:
        o_row = (i_s * n_bg + i_bg) * M + o_m  # [BM], into [splits, B·G, M]
        tl.store(O_PART + o_row[:, None] * BLOCK_R + o_r[None, :], b_o, mask=m_m[:, None])
        tl.store(LSE_PART + o_row, tl.where(m_live, b_mi + tl.log2(b_lsafe), float("-inf")), mask=m_m)


@triton.jit
def _mlra_decode_merge_kernel(
    O_PART, LSE_PART, Z,
    stride_zb, stride_zg, stride_zm,
    G, M, R, N_SPLITS,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``Z = Σ_s w_s · O_s / Σ_s w_s`` with ``w_s = 2^(lse_s - max lse)``, for a block of rows; a split
    that held no key has ``lse = -inf`` and weight 0."""
    i_m = tl.program_id(0).to(tl.int64)
    i_bg = tl.program_id(1).to(tl.int64)
    n_bg = tl.num_programs(1).to(tl.int64)
    i_b = i_bg // G
    i_g = i_bg % G
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    o_r = tl.arange(0, BLOCK_R)

    b_mi = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_li = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    b_acc = tl.full([BLOCK_M, BLOCK_R], 0.0, dtype=tl.float32)
    for i_s in range(0, N_SPLITS):
        o_row = (i_s * n_bg + i_bg) * M + o_m
        b_lse = tl.load(LSE_PART + o_row, mask=m_m, other=float("-inf"))  # [BM]
        b_o = tl.load(O_PART + o_row[:, None] * BLOCK_R + o_r[None, :], mask=m_m[:, None], other=0.0)  # [BM, BR]
        b_mnew = tl.maximum(b_mi, b_lse)
        b_mref = tl.where(b_mnew == float("-inf"), 0.0, b_mnew)  # no split yet with a key: avoid -inf - -inf
        b_alpha = tl.exp2(b_mi - b_mref)
        b_w = tl.exp2(b_lse - b_mref)
        b_li = b_li * b_alpha + b_w
        b_acc = b_acc * b_alpha[:, None] + b_w[:, None] * b_o
        b_mi = b_mnew
    b_z = b_acc / tl.where(b_li > 0.0, b_li, 1.0)[:, None]
    p_z = Z + i_b * stride_zb + i_g * stride_zg + o_m[:, None] * stride_zm + o_r[None, :]
    tl.store(p_z, b_z.to(Z.dtype.element_ty), mask=m_m[:, None] & (o_r < R)[None, :])


# The launcher: shapes, strides and grid, no math.


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (int(n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_sizes(M: int, r: int) -> dict:
    """Tile sizes and warps for ``M`` query rows per group at rank ``r``. Not autotuned: a benchmark run
    inside a CUDA-graph capture would break it, and no GPU measurement has picked better ones yet. The
    row tile is kept to at most 8192 fp32 accumulators (no spills at r = 256); the key tile to 8 KB of
    bf16 latents (enough bytes in flight for a memory-bound step)."""
    block_r = _pow2(r)
    block_m = min(_pow2(M), max(16, 8192 // block_r), 64)
    block_n = max(16, min(128, 4096 // block_r))
    warps = 4 if block_m * block_r <= 4096 else 8
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=warps, num_stages=2)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """SMs of ``device`` (read once per device); a CPU (the interpreter) counts as 8."""
    if device.type != "cuda":
        return 8
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def plan(B: int, g: int, M: int, S: int, r: int, n_sm: int, num_splits: Optional[int] = None) -> dict:
    """The launch of one step: blocks, ``splits``, ``split_len`` and ``grid``, from the capacity ``S``
    (never the current length). Splits are added until about two programs per SM, each split holding at
    least ``MIN_KEYS_PER_SPLIT`` keys; ``num_splits`` overrides (tests)."""
    blocks = block_sizes(M, r)
    row_blocks = _cdiv(M, blocks["BLOCK_M"])
    if num_splits is None:
        wanted = _cdiv(2 * n_sm, B * g * row_blocks)
        num_splits = max(1, min(wanted, S // MIN_KEYS_PER_SPLIT, MAX_SPLITS))
    num_splits = max(1, min(int(num_splits), _cdiv(S, blocks["BLOCK_N"])))
    split_len = _cdiv(_cdiv(S, num_splits), blocks["BLOCK_N"]) * blocks["BLOCK_N"]
    num_splits = _cdiv(S, split_len)  # rounding the split up to whole tiles may leave fewer splits
    return dict(blocks, splits=num_splits, split_len=split_len, grid=(row_blocks, B * g, num_splits))


def _alloc(shape, dtype, device) -> Tensor:
    if config.POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    # The kernels index the latent dim with unit stride; a cache with another stride there is copied.
    return t if t.stride(-1) == 1 else t.contiguous()


def mlra_decode_attention(
    q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], lengths: Optional[Tensor], *,
    t_new: int, causal: bool, scale: float, num_splits: Optional[int] = None,
) -> Tensor:
    """``Z = softmax(s · q̃ c_Kᵀ + masks) · c_V``: ``[B, g, M, r]`` in ``q``'s dtype.

    ``q [B, g, M, r]`` (rows: head-major, ``t_new`` tokens per head), ``k, v [B, g, S, r]`` (any strides
    but the last), ``kpm``: additive fp32 ``[B, S]`` or None, ``lengths``: int ``[B]`` positions in use
    per sequence (the new tokens are the last ``t_new`` of them) or None for all ``S``.
    """
    from mlra_kernels.ops.mlra.config import triton_interpreted

    B, g, M, r = q.shape
    S = k.shape[2]
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if lengths is not None and lengths.dtype != torch.int32:
        lengths = lengths.to(torch.int32)  # one compiled variant (the one GPT2's cache and the HF layer pass)
    p = plan(B, g, M, S, r, sm_count(q.device), num_splits)
    z = _alloc((B, g, M, r), q.dtype, q.device)
    direct = p["splits"] == 1
    if direct:
        o_part = lse_part = z  # never touched
    else:
        o_part = _alloc((p["splits"], B * g, M, p["BLOCK_R"]), torch.float32, q.device)
        lse_part = _alloc((p["splits"], B * g, M), torch.float32, q.device)
    dummy = q
    _mlra_decode_fwd_kernel[p["grid"]](
        q, k, v, kpm if kpm is not None else dummy, lengths if lengths is not None else dummy, z, o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        kpm.stride(0) if kpm is not None else 0,
        z.stride(0), z.stride(1), z.stride(2),
        g, M, t_new, r, S, p["split_len"], scale * LOG2E,
        CAUSAL=bool(causal) and t_new > 1, HAS_KPM=kpm is not None, HAS_LENS=lengths is not None, DIRECT=direct,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=q.dtype == torch.bfloat16 and triton_interpreted(),
        BLOCK_M=p["BLOCK_M"], BLOCK_N=p["BLOCK_N"], BLOCK_R=p["BLOCK_R"],
        num_warps=p["num_warps"], num_stages=p["num_stages"],
    )
    if not direct:
        _mlra_decode_merge_kernel[p["grid"][:2]](
            o_part, lse_part, z, z.stride(0), z.stride(1), z.stride(2), g, M, r, p["splits"],
            BLOCK_M=p["BLOCK_M"], BLOCK_R=p["BLOCK_R"], num_warps=4,
        )
    return z
