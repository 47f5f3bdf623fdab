"""Pure-PyTorch reference for Multi-head Low-Rank Attention (MLRA).

Written for clarity, not speed, and independent of the production code: tests and benchmarks compare
every path against it in float64, and no production path calls it. Gradients come from autograd.

Weight layouts (the contract of ``mlra_kernels.ops.mlra.layout``, restated here so that the oracle
does not lean on the code it checks):

- ``x``:    ``[B, T, d]``
- ``down``: ``[3·g·r, d]``, the stacked down-projections ``A_Q; A_K; A_V`` in ``nn.Linear`` layout,
  so ``c = x @ down.T``. Inside one projection the ``g`` groups are contiguous blocks of ``r`` rows.
- ``up``:   ``[3, H·d_h, r]`` (``H·d_h = d`` for a whole layer). ``up[p, h·d_h:(h+1)·d_h, :]`` is
  ``B_{P,h}`` (``[d_h, r]``). Head ``h`` reads latent group ``h // (H // g)``, so the heads of one group are
  contiguous. The head width is ``d_h = up.shape[1] // num_heads``.
- ``bias``: ``[3·H·d_h]``, ordered like ``nn.MultiheadAttention.in_proj_bias`` (q, then k, then v).

With ``g = 1`` the dense projection is ``W_P = up[p] @ down[p·r:(p+1)·r]``: a ``d×d`` matrix in
``nn.Linear`` layout, the same block ``in_proj_weight[p·d:(p+1)·d]`` holds in
``nn.MultiheadAttention``.

Masks follow ``nn.MultiheadAttention``: a boolean mask marks positions that may *not* be attended
(``True`` = masked), a float mask is added to the scores. A query row whose keys are all masked
outputs zeros (``nn.MultiheadAttention`` gives NaN there).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor


def mlra_dims(x: Tensor, down: Tensor, up: Tensor, num_heads: int, latent_groups: int):
    """Return ``(B, T, d, H, g, r, d_h)`` read from already validated arguments."""
    B, T, d = x.shape
    r = up.shape[-1]
    return B, T, d, num_heads, latent_groups, r, up.shape[1] // num_heads


def mlra_qkv_reference(
    x: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor], *, num_heads: int, latent_groups: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-head projections ``q, k, v``, each ``[B, H, T, d_h]``."""
    B, T, d, H, g, r, dh = mlra_dims(x, down, up, num_heads, latent_groups)
    c = (x @ down.t()).view(B, T, 3, g, r)  # [B, T, 3, g, r]
    up5 = up.view(3, g, H // g, dh, r)  # [3, g, H/g, d_h, r]
    qkv = torch.einsum("btpgr,pghdr->pbghtd", c, up5).reshape(3, B, H, T, dh)
    if bias is not None:
        qkv = qkv + bias.view(3, 1, H, 1, dh)
    return qkv[0], qkv[1], qkv[2]


def attention_bias_reference(
    B: int,
    H: int,
    T: int,
    S: int,
    *,
    causal: bool,
    key_padding_mask: Optional[Tensor],
    attn_mask: Optional[Tensor],
    dtype: torch.dtype,
    device: torch.device,
) -> Optional[Tensor]:
    """Combine every mask into one additive ``[B, H, T, S]`` bias (``-inf`` = masked), or ``None``."""
    bias = None

    def add(extra: Tensor) -> None:
        nonlocal bias
        bias = extra if bias is None else bias + extra

    def additive(mask: Tensor) -> Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    if causal:
        # Queries are aligned to the end of the keys (T <= S), as for a decoding step with a cache.
        i = torch.arange(T, device=device)[:, None] + (S - T)
        j = torch.arange(S, device=device)[None, :]
        add(additive(j > i).view(1, 1, T, S))
    if key_padding_mask is not None:
        add(additive(key_padding_mask).view(B, 1, 1, S))
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            add(additive(attn_mask).view(1, 1, T, S))
        else:
            add(additive(attn_mask).view(B, H, T, S))
    return bias


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Optional[float] = None,
    causal: bool = True,
    key_padding_mask: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    dropout_mask: Optional[Tensor] = None,
    need_weights: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """Softmax attention over ``[B, H, T, d_h]`` heads.

    Returns ``(out [B, H, T, d_h], weights [B, H, T, S] or None)``. ``dropout_mask`` (boolean,
    ``True`` = keep) overrides the random draw so that a test can replay a kernel's mask.
    """
    B, H, T, dh = q.shape
    S = k.shape[2]
    s = scale if scale is not None else 1.0 / math.sqrt(dh)
    scores = (q @ k.transpose(-1, -2)) * s  # [B, H, T, S]
    bias = attention_bias_reference(
        B, H, T, S, causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
        dtype=scores.dtype, device=scores.device,
    )
    if bias is not None:
        scores = scores + bias
    # A fully masked row outputs zeros instead of NaN.
    row_max = scores.amax(dim=-1, keepdim=True)
    dead = torch.isneginf(row_max)
    p = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    weights = p if need_weights else None
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(p) >= dropout_p
        p = p * dropout_mask / (1.0 - dropout_p)
    return p @ v, weights


def mlra_attention_reference(
    x: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor] = None, *, num_heads: int, latent_groups: int = 1,
    **attention: Any,
) -> Tensor:
    """MLRA self-attention, ``[B, T, d]`` in, ``[B, T, H·d_h]`` out (head outputs concatenated, before W_O):
    :func:`mlra_qkv_reference`, then :func:`attention_reference` with the keyword arguments ``attention``
    (``scale``, ``causal``, ``key_padding_mask``, ``attn_mask``, ``dropout_p``, ``dropout_mask``)."""
    if "need_weights" in attention:
        raise TypeError("mlra_attention_reference returns the output only; call attention_reference for the weights")
    B, T, _ = x.shape
    q, k, v = mlra_qkv_reference(x, down, up, bias, num_heads=num_heads, latent_groups=latent_groups)
    o, _ = attention_reference(q, k, v, **attention)
    return o.transpose(1, 2).reshape(B, T, -1)
