"""The dense variant: attention with the ``T×S`` scores in memory, in plain torch.

It serves what the fused kernels do not: cross-attention (query, key and value from different
inputs), the attention weights (``need_weights``), general ``attn_mask``s, float64, and, on the CPU,
key padding and dropout. Its public call :func:`mlra_attention_dense` is differentiable by autograd;
the prefill variant's ``"torch"`` path uses :func:`attention_lse` and its hand-written
:func:`attention_grads`, which keep only ``O`` and the log-sum-exp for the backward, as the kernels do.

Masks follow ``nn.MultiheadAttention`` (:mod:`~mlra_kernels.ops.mlra.masks`); a query whose keys are all
masked outputs zeros (``nn.MultiheadAttention`` gives NaN there).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from mlra_kernels.ops.mlra import layout, masks


def _probabilities(q: Tensor, k: Tensor, scale: float, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Softmax ``p`` ``[B, H, T, S]`` (zeros on a fully masked row) and ``lse`` ``[B, H, T]`` (``+inf`` there)."""
    scores = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    dead = torch.isneginf(scores.amax(dim=-1, keepdim=True))
    p = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    lse = torch.logsumexp(scores.float(), dim=-1).masked_fill(dead.squeeze(-1), float("inf"))
    return p, lse


def attention_lse(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, bias: Optional[Tensor], dropout_p: float,
    keep: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """``(o [B, H, T, d_h], lse [B, H, T] fp32)``; ``keep`` is the boolean dropout keep mask."""
    p, lse = _probabilities(q, k, scale, bias)
    if dropout_p > 0.0:
        p = p * keep / (1.0 - dropout_p)
    return p @ v, lse.float()


def attention_grads(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, *, scale: float, bias: Optional[Tensor], dropout_p: float,
    keep: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of :func:`attention_lse` for the output gradient ``do`` ``[B, H, T, d_h]``."""
    p, _ = _probabilities(q, k, scale, bias)
    scale_keep = keep.to(p.dtype) / (1.0 - dropout_p) if dropout_p > 0.0 else None
    pd = p * scale_keep if scale_keep is not None else p
    dv = pd.transpose(-1, -2) @ do
    dp = do @ v.transpose(-1, -2)
    if scale_keep is not None:
        dp = dp * scale_keep
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    return (ds @ k) * scale, (ds.transpose(-1, -2) @ q) * scale, dv


def mlra_attention_dense(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    down: Tensor,
    up: Tensor,
    bias: Optional[Tensor] = None,
    *,
    num_heads: int,
    latent_groups: int = 1,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    need_weights: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """MLRA attention of ``query`` over ``key``/``value`` with the scores in memory (autograd backward).

    Args:
        query: ``[B, T, d]``; key, value: ``[B, S, d]`` (the same tensor as ``query`` for self-attention).
        down, up, bias: the MLRA factors (layout in ``mlra_kernels.ops.mlra.layout``, a whole layer's or a
            subset of whole latent groups of its heads): q is projected from ``query``, k from ``key`` and v
            from ``value``.
        num_heads, latent_groups: ``H`` and ``g``.
        causal: mask keys after each query (queries aligned to the end of the keys).
        key_padding_mask: ``[B, S]``; attn_mask: ``[T, S]`` or ``[B·H, T, S]``; bool (True = masked) or
            float (added to the scores).
        dropout_p: dropout on the attention probabilities (torch's default generator).
        scale: score scale; default ``1/sqrt(d_h)``, ``d_h = up.shape[1] // num_heads``.
        need_weights: also return the weights ``[B, H, T, S]`` (after dropout, as
            ``nn.MultiheadAttention`` returns them).

    Returns:
        ``(out [B, T, H·d_h], weights or None)``: the head outputs, concatenated, before ``W_O``.
    """
    layout.check_types(query, down, up, bias, key_padding_mask, attn_mask)
    for name, t in (("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    layout.check_scalars(num_heads, latent_groups, causal, dropout_p, scale)
    H, g = int(num_heads), int(latent_groups)
    is_self = query is key and key is value
    query, key, value, down, up, bias = layout.autocast(query, key, value, down, up, bias)
    layout.check_factors(query, down, up, bias, H, g, x_name="query")
    B, T, d = query.shape
    if key.shape != value.shape or key.dim() != 3 or key.shape[0] != B or key.shape[2] != d:
        raise ValueError(f"key and value must both be [B, S, d] = [{B}, S, {d}], got {tuple(key.shape)} and "
                         f"{tuple(value.shape)}")
    S = key.shape[1]
    layout.check_masks(query, H, key_padding_mask, attn_mask, keys=S)
    D = up.shape[1]  # H·d_h: d for a whole layer's heads
    s = float(scale) if scale is not None else 1.0 / math.sqrt(D // H)
    if is_self:
        q, k, v = layout.heads_token_major(layout.latents(query, down), up, bias, H, g)
    else:
        rows = down.shape[0] // 3
        q, k, v = (
            layout.expand(layout.latents(t, down[p * rows:(p + 1) * rows]), *layout.projection(up, bias, p), H, g)
            for p, t in enumerate((query, key, value))
        )
    mask = masks.combine(B, H, T, S, causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                         dtype=q.dtype, device=q.device, empty_rows="zeros")
    p, _ = _probabilities(q, k, s, mask)
    if dropout_p > 0.0:
        p = p * (torch.rand(p.shape, device=p.device) >= dropout_p) / (1.0 - dropout_p)
    o = (p @ v).transpose(1, 2).reshape(B, T, D)
    return o, (p if need_weights else None)
