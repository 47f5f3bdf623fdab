"""The MLRA weight layout and everything that depends on it: latents, per-head expansion, dense ↔
factors, and the argument checks. Nothing else in the package re-implements these.

Layout (the contract shared by every path, module and integration):

- ``x``:    ``[B, T, d]``
- ``down``: ``[3·g·r, d]``, the stacked down-projections ``A_Q; A_K; A_V`` in ``nn.Linear`` layout, so
  ``c = x @ down.T``. Inside one projection the ``g`` groups are contiguous blocks of ``r`` rows.
- ``up``:   ``[3, H·d_h, r]``. ``up[p, h·d_h:(h+1)·d_h, :]`` is ``B_{P,h}`` (``[d_h, r]``). Head ``h``
  reads latent group ``h // (H // g)``, so the heads of one group are contiguous.
- ``bias``: ``[3·H·d_h]``, ordered like ``nn.MultiheadAttention.in_proj_bias`` (q, then k, then v).
- the output: ``[B, T, H·d_h]``, the heads' outputs side by side.

The head width is ``d_h = up.shape[1] // num_heads``. For the whole layer ``H·d_h = d``. An op also runs
**head-local** (tensor parallelism, DESIGN.md): given the factors of a subset of whole latent groups
(``g = 1``: any subset of the heads of the one group) — ``up`` and ``bias`` restricted to those heads,
``down`` to those groups' rows of each projection (``[3·g_loc·r, d]``), ``num_heads = H_loc``,
``latent_groups = g_loc`` — its output ``[B, T, H_loc·d_h]`` is those heads' columns of the whole op's, and
its factors' gradients the matching slices of the whole op's.

With ``g = 1`` the dense projection is ``W_P = up[p] @ down[p·r:(p+1)·r]``: the block
``in_proj_weight[p·d:(p+1)·d]`` of ``nn.MultiheadAttention``, or ``c_attn.weight.T`` of GPT-2.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

PROJECTIONS = ("q", "k", "v")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int, or a ``TypeError`` / ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def default_rank(embed_dim: int) -> int:
    """The default rank per latent group: ``max(1, embed_dim // 4)``.

    At ``g = 1`` this halves the parameters of the Q/K/V projections (``1.5·d²`` against ``3·d²``) and
    shrinks the per-token KV cache from ``2·d`` to ``d/2`` numbers, while keeping enough rank for the
    head dimension of common configurations (``d_h = 64`` with ``H >= 4``).
    """
    return max(1, embed_dim // 4)


def check_config(
    embed_dim: Any, num_heads: Any, rank: Any, latent_groups: Any, *, prefix: str = "",
    names: tuple[str, str] = ("embed_dim", "num_heads"),
) -> tuple[int, int, int, int]:
    """The one check of an MLRA configuration; returns ``(embed_dim, num_heads, rank, latent_groups)``
    as ints, ``rank=None`` taking :func:`default_rank`. ``prefix`` and ``names`` name the caller's own
    arguments (``GPT2Config.``, ``("n_embd", "n_head")``) in the messages."""
    d_name, h_name = names
    d = positive_int(prefix + d_name, embed_dim)
    H = positive_int(prefix + h_name, num_heads)
    if d % H:
        raise ValueError(f"{prefix}{h_name}={H} must divide {d_name}={d}")
    r = default_rank(d) if rank is None else positive_int(prefix + "rank", rank)
    if r > d:
        raise ValueError(f"{prefix}rank must be in [1, {d_name}={d}], got {r}")
    g = positive_int(prefix + "latent_groups", latent_groups)
    if H % g:
        raise ValueError(f"{prefix}latent_groups={g} must divide {h_name}={H}")
    return d, H, r, g


def check_types(x, down, up, bias, key_padding_mask, attn_mask) -> None:
    for name, t in (("x", x), ("down", down), ("up", up)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    for name, t in (("bias", bias), ("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
    for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        if m is not None and m.dtype != torch.bool and not m.is_floating_point():
            raise TypeError(f"only bool and floating types of {name} are supported, got {m.dtype}")


def check_scalars(num_heads: Any, latent_groups: Any, causal: Any, dropout_p: Any, scale: Any) -> None:
    """Types and ranges of the non-tensor arguments, before anything compares or converts them."""
    positive_int("num_heads", num_heads)
    positive_int("latent_groups", latent_groups)
    if not isinstance(causal, (bool, numbers.Integral)):
        raise TypeError(f"causal must be a bool, got {causal!r} ({type(causal).__name__})")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {dropout_p!r} ({type(dropout_p).__name__})")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a positive float or None, got {scale!r} ({type(scale).__name__})")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float (default 1/sqrt(d_h)), got {scale}")


def check_factors(x: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor], num_heads: int, latent_groups: int,
                  x_name: str = "x") -> None:
    """Shapes, dtypes and devices of the input ``[B, T, d]`` and the factors of ``num_heads`` heads of width
    ``d_h = up.shape[1] // num_heads`` (all of a layer's, or a subset of whole latent groups of them)."""
    if x.dim() != 3:
        raise ValueError(f"{x_name} must be a [B, T, d] tensor, got shape {tuple(x.shape)}")
    B, T, d = x.shape
    if T < 1 or B < 1:
        raise ValueError(f"{x_name} must have B >= 1 and T >= 1, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{x_name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if num_heads % latent_groups:
        raise ValueError(f"latent_groups={latent_groups} must divide num_heads={num_heads}")
    if up.dim() != 3 or up.shape[0] != 3:
        raise ValueError(f"up must be [3, H·d_h, r], got {tuple(up.shape)}")
    width = up.shape[1]  # H·d_h: d for the whole layer, less for a subset of its heads
    if width < 1 or width % num_heads:
        raise ValueError(f"up.shape[1]={width} must be a positive multiple of num_heads={num_heads} "
                         f"(up is [3, H·d_h, r]), got up of shape {tuple(up.shape)}")
    r = up.shape[2]
    if not 1 <= r <= d:
        raise ValueError(f"the rank r={r} (up.shape[-1]) must be between 1 and d={d}")
    if down.shape != (3 * latent_groups * r, d):
        raise ValueError(f"down must be [3·g·r, d] = [{3 * latent_groups * r}, {d}] (g={latent_groups}, r={r}, "
                         f"d={x_name}.shape[-1]), got {tuple(down.shape)}")
    if bias is not None and bias.shape != (3 * width,):
        raise ValueError(f"bias must be [3·H·d_h] = [{3 * width}] (H={num_heads}, d_h={width // num_heads}), "
                         f"got {tuple(bias.shape)}")
    for name, t in (("down", down), ("up", up), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {x_name} has {x.dtype}; they must match (or use autocast)")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}")


def check_masks(x: Tensor, num_heads: int, key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
                keys: Optional[int] = None) -> None:
    """``key_padding_mask`` ``[B, S]`` and ``attn_mask`` ``[T, S]`` / ``[B·H, T, S]`` against ``x``
    ``[B, T, d]``; ``S`` is ``keys`` (default ``T``)."""
    B, T, _ = x.shape
    S = T if keys is None else keys
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, S):
            raise ValueError(f"key_padding_mask must be [B, S] = [{B}, {S}], got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != x.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but x is on {x.device}")
    if attn_mask is not None:
        if attn_mask.shape not in ((T, S), (B * num_heads, T, S)):
            raise ValueError(
                f"attn_mask must be [T, S] = [{T}, {S}] or [B·H, T, S] = [{B * num_heads}, {T}, {S}], "
                f"got {tuple(attn_mask.shape)}"
            )
        if attn_mask.device != x.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but x is on {x.device}")


def autocast(x: Tensor, *tensors: Optional[Tensor]) -> tuple:
    """Cast the floating inputs (not float64, as autocast leaves it) to the autocast dtype when autocast
    is enabled for ``x``'s device; the caller's fp32 leaves then get fp32 gradients through the cast."""
    dev = x.device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return (x, *tensors)
    dt = torch.get_autocast_dtype(dev)

    def cast(t):
        if t is None or not t.is_floating_point() or t.dtype == torch.float64:
            return t
        return t.to(dt)

    return tuple(cast(t) for t in (x, *tensors))


def latents(x: Tensor, down: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``c = x · downᵀ``: ``[B, T, d]`` to the latents ``[B, T, 3·g·r]`` (or one projection's rows);
    ``out``: a contiguous ``[B, T, 3·g·r]`` tensor to write them into."""
    B, T, d = x.shape
    if out is not None:
        torch.mm(x.reshape(B * T, d), down.t(), out=out.view(B * T, down.shape[0]))
        return out
    return (x.reshape(B * T, d) @ down.t()).view(B, T, down.shape[0])


def heads_token_major(c: Tensor, up: Tensor, bias: Optional[Tensor], num_heads: int, g: int) -> list[Tensor]:
    """Per-head ``q, k, v`` from the latents ``c`` ``[B, T, 3·g·r]``, each ``[B, H, T, d_h]`` laid out
    token-major in memory (a transposed view of ``[B, T, H, d_h]``), the layout torch's CPU attention
    returns its output and gradients in; the bias is added inside the batched GEMM."""
    return heads_of(qkv_buffer(c, up, bias, g), c.shape[0], c.shape[1], num_heads, g)


def qkv_buffer(c: Tensor, up: Tensor, bias: Optional[Tensor], g: int, out: Optional[Tensor] = None) -> Tensor:
    """The per-head projections of the latents ``c`` ``[B, T, 3·g·r]`` as one ``[3·g, B·T, H·d_h/g]`` tensor
    (one batched GEMM over the (projection, group) blocks, bias included; written into ``out`` when
    given); :func:`heads_of` views it."""
    B, T, _ = c.shape
    d, r = up.shape[1], up.shape[2]
    P, k = 3 * g, d // g
    c_p = c.reshape(B * T, P, r).transpose(0, 1)  # [3·g, N, r]
    up_p = up.reshape(P, k, r).transpose(1, 2)  # [3·g, r, d/g]
    if bias is None:
        return torch.bmm(c_p, up_p, out=out)
    return torch.baddbmm(bias.view(P, 1, k), c_p, up_p, out=out)  # [3·g, N, d/g]


def heads_of(qkv: Tensor, B: int, T: int, num_heads: int, g: int) -> list[Tensor]:
    """``q, k, v`` ``[B, H, T, d_h]`` (token-major views where g = 1) of a :func:`qkv_buffer`."""
    k = qkv.shape[-1]
    dh = k * g // num_heads
    qkv = qkv.view(3, g, B, T, k)
    if g == 1:
        return [qkv[p, 0].view(B, T, num_heads, dh).transpose(1, 2) for p in range(3)]
    return [qkv[p].permute(1, 2, 0, 3).reshape(B, T, num_heads, dh).transpose(1, 2) for p in range(3)]


def expand(c: Tensor, up_p: Tensor, bias_p: Optional[Tensor], num_heads: int, g: int) -> Tensor:
    """One projection's latent ``c`` ``[B, S, g·r]`` to its heads ``[B, H, S, d_h]`` with the up-projection
    ``up_p`` ``[H·d_h, r]`` and bias ``bias_p`` ``[H·d_h]`` (or None)."""
    B, S, gr = c.shape
    d, r = up_p.shape
    H, dh, hpg = num_heads, d // num_heads, num_heads // g
    out = torch.matmul(c.view(B, S, g, r).transpose(1, 2), up_p.view(g, hpg * dh, r).transpose(1, 2))  # [B, g, S, ·]
    if bias_p is not None:
        out = out + bias_p.view(g, 1, hpg * dh)
    if hpg == 1:
        return out
    return out.view(B, g, S, hpg, dh).transpose(2, 3).reshape(B, H, S, dh)


def expand_rows(c: Tensor, up_p: Tensor, bias_p: Optional[Tensor], num_heads: int, g: int) -> Tensor:
    """:func:`expand` for a few tokens, heads first: latents ``c`` ``[N, g·r]`` (N rows of any batch) to
    ``[H, N, d_h]``, by one batched GEMM over the groups with the rows stacked. A matmul broadcast over
    the batch would copy the up-projection once per sequence, which costs more than a decode step's
    tokens do."""
    N = c.shape[0]
    d, r = up_p.shape
    H, dh, hpg = num_heads, d // num_heads, num_heads // g
    c_g, up_g = c.view(N, g, r).transpose(0, 1), up_p.view(g, hpg * dh, r).transpose(1, 2)
    if bias_p is None:
        out = torch.bmm(c_g, up_g)  # [g, N, hpg·d_h]
    else:
        out = torch.baddbmm(bias_p.view(g, 1, hpg * dh), c_g, up_g)
    if hpg == 1:
        return out
    return out.view(g, N, hpg, dh).transpose(1, 2).reshape(H, N, dh)


def projection(up: Tensor, bias: Optional[Tensor], p: int) -> tuple[Tensor, Optional[Tensor]]:
    """``(up[p] [H·d_h, r], its H·d_h bias entries or None)`` of projection ``p`` (0 = q, 1 = k, 2 = v)."""
    d = up.shape[1]
    return up[p], (bias[p * d:(p + 1) * d] if bias is not None else None)


def factor_grads(
    dqkv: Sequence[Tensor], c: Tensor, x: Tensor, down: Tensor, up: Tensor, g: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """From the per-head gradients of q, k and v (three ``[N, H·d_h]`` tensors whose rows may be strided)
    back to ``(dx, ddown, dup, dbias)``: per projection, batched GEMMs over its ``g`` groups, then one GEMM
    each for ``dx`` and ``ddown`` over all ``3·g·r`` latent columns."""
    B, T, d = x.shape
    width = up.shape[1]
    N, r, k = B * T, up.shape[-1], width // g
    c_n = c.reshape(N, 3, g, r)
    dc = c.new_empty(N, 3, g, r)
    dup = c.new_empty(3, width, r)
    dbias = c.new_empty(3, width)
    for p, dq in enumerate(dqkv):
        dq_g = dq.view(N, g, k).transpose(0, 1)  # [g, N, H·d_h/g], a view
        dc[:, p] = torch.bmm(dq_g, up[p].view(g, k, r)).transpose(0, 1)
        torch.bmm(dq_g.transpose(1, 2), c_n[:, p].transpose(0, 1), out=dup[p].view(g, k, r))
        torch.sum(dq, 0, out=dbias[p])
    dc_n = dc.view(N, 3 * g * r)
    dx = (dc_n @ down).view(B, T, d)
    ddown = dc_n.t() @ x.reshape(N, d)
    return dx, ddown, dup, dbias.view(3 * width)


def dense_from_factors(down: Tensor, up: Tensor, num_heads: int, latent_groups: int = 1) -> Tensor:
    """The dense ``[3·H·d_h, d]`` Q/K/V weight (``nn.Linear`` layout) that the factors represent: ``[3·d, d]``
    for a whole layer's."""
    width, r, g, d = up.shape[1], up.shape[2], latent_groups, down.shape[1]
    return torch.einsum(
        "pgor,pgri->pgoi", up.reshape(3, g, width // g, r), down.reshape(3, g, r, d)
    ).reshape(3 * width, d)


class Factors(NamedTuple):
    """``down [3·g·r, d]``, ``up [3, d, r]`` and the relative Frobenius error ``‖W_P − B·A‖_F / ‖W_P‖_F``
    of each projection (``{"q", "k", "v"}``; None on the meta device)."""

    down: Tensor
    up: Tensor
    errors: Optional[dict[str, float]]


@torch.no_grad()
def factorize(weight: Tensor, *, num_heads: int, rank: int, latent_groups: int = 1) -> Factors:
    """Truncated SVD of a dense ``[3·d, d]`` Q/K/V weight into MLRA factors, with the error it makes.

    Each group's block of rows ``W_P[group rows]`` (``[d/g, d]``) is factored in float64 as ``U·S·Vᵀ``;
    its up-rows are ``U_r·sqrt(S_r)`` and its down-block is ``sqrt(S_r)·V_rᵀ``, cast back to the weight's
    dtype. This is the best rank-``r`` approximation in Frobenius norm, exact when ``rank`` reaches the
    rank of every block (``rank = d`` with ``g = 1``). A weight on the meta device gives uninitialised
    factors on the meta device and no errors.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a [3·d, d] tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    d = weight.shape[1]
    if weight.shape != (3 * d, d):
        raise ValueError(f"weight must be [3·d, d], got {tuple(weight.shape)}")
    _, H, r, g = check_config(d, num_heads, rank, latent_groups, names=("d", "num_heads"))
    if weight.is_meta:
        meta = dict(device=weight.device, dtype=weight.dtype)
        return Factors(torch.empty(3 * g * r, d, **meta), torch.empty(3, d, r, **meta), None)
    w = weight.detach().double().view(3, g, d // g, d)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # [3, g, d/g, k], [3, g, k], [3, g, k, d]
    k = s.shape[-1]
    if r > k:
        pad = r - k
        u = torch.nn.functional.pad(u, (0, pad))
        s = torch.nn.functional.pad(s, (0, pad))
        vh = torch.nn.functional.pad(vh, (0, 0, 0, pad))
    root = s[..., :r].sqrt()
    up = (u[..., :r] * root[..., None, :]).reshape(3, d, r)
    down = (root[..., None] * vh[..., :r, :]).reshape(3 * g * r, d)
    down, up = down.to(weight.dtype), up.to(weight.dtype)
    w = w.view(3, d, d)  # the error of the factors as stored, in the weight's dtype
    approx = dense_from_factors(down.double(), up.double(), H, g).view(3, d, d)
    errors = {}
    for p, name in enumerate(PROJECTIONS):
        norm, err = w[p].norm(), (w[p] - approx[p]).norm()
        errors[name] = float(err / norm) if norm > 0 else float(err)
    return Factors(down, up, errors)


def factors_from_dense(
    weight: Tensor, bias: Optional[Tensor] = None, *, num_heads: int, rank: int, latent_groups: int = 1
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(down [3·g·r, d], up [3, d, r], bias)`` from a dense q/k/v weight ``[3·d, d]`` (``nn.Linear``
    layout) and its bias, by :func:`factorize` (which also reports the error)."""
    down, up, _ = factorize(weight, num_heads=num_heads, rank=rank, latent_groups=latent_groups)
    return down, up, bias


def kv_latents(x: Tensor, down: Tensor, latent_groups: int, *, group_major: bool = False) -> tuple[Tensor, Tensor]:
    """The latents ``c_K, c_V`` of ``x`` ``[B, T, d]``: what a latent KV cache stores. ``[B, T, g·r]``, or
    with ``group_major`` ``[B, g, T, r]`` (views), the layout in which a decode step reads each group's
    cached latents as one contiguous block. ``down`` ``[3·g·r, d]`` may be the rows of a subset of a
    layer's latent groups (``latent_groups`` = how many it holds): the latents are then those groups'."""
    gr = down.shape[0] // 3
    c = latents(x, down[gr:])
    c_k, c_v = c[..., :gr], c[..., gr:]
    if group_major:
        B, T, _ = x.shape
        g = latent_groups
        c_k, c_v = (t.reshape(B, T, g, gr // g).transpose(1, 2) for t in (c_k, c_v))
    return c_k, c_v
