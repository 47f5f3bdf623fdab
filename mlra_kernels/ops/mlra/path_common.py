"""What several prefill paths share: head views, and attention on the latents (the absorbed form,
DESIGN.md): each head's query ``q̃_h = c_Q·M_h + β_h`` with ``M_h = B_Q,hᵀ·B_K,h``, its keys and values
its group's latents, and ``O_h = Z_h·B_V,hᵀ + b_V,h``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# torch's fused CPU attention runs heads narrower than 16 no faster than 16-wide ones, so the CPU pads
# narrower latents with zero columns, which change neither the scores nor Z (docs/paths.md).
CPU_LATENT_MIN_WIDTH = 16


# torch's fused CPU attention (flash-style, no T×T scores) and its backward.
cpu_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
cpu_attention_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def latent_width(r: int, device: torch.device) -> int:
    """The head width at which attention on the latents runs: ``r``, padded up to 16 on the CPU."""
    return max(r, CPU_LATENT_MIN_WIDTH) if device.type == "cpu" else r


def heads(t: Tensor, num_heads: int) -> Tensor:
    """``[B, T, H·d_h]`` to ``[B, H, T, d_h]``, token-major (a view)."""
    B, T, d = t.shape
    return t.view(B, T, num_heads, d // num_heads).transpose(1, 2)


def merge(t: Tensor) -> Tensor:
    """``[B, H, T, d_h]`` to ``[B, T, H·d_h]``, contiguous."""
    B, H, T, dh = t.shape
    return t.transpose(1, 2).reshape(B, T, H * dh).contiguous()


def absorbed_weights(up: Tensor, bias: Optional[Tensor], num_heads: int) -> tuple[Tensor, Optional[Tensor]]:
    """``M_h = B_Q,hᵀ·B_K,h`` ``[H, r, r]`` and ``β_h = b_Q,hᵀ·B_K,h`` ``[H, r]`` (None without a bias)."""
    H, r = num_heads, up.shape[2]
    dh = up.shape[1] // H
    up_q, up_k = up[0].view(H, dh, r), up[1].view(H, dh, r)
    m = torch.bmm(up_q.transpose(1, 2), up_k)
    beta = torch.bmm(bias[:H * dh].view(H, 1, dh), up_k).view(H, r) if bias is not None else None
    return m, beta


def m_by_group(m: Tensor, g: int) -> Tensor:
    """``M_h`` ``[H, r, r]`` as ``[g, r, (H/g)·r]``: a group's heads side by side in the columns, so that
    one batched GEMM of a group's latent gives every head's absorbed query."""
    H, r = m.shape[0], m.shape[1]
    return m.view(g, H // g, r, r).permute(0, 2, 1, 3).reshape(g, r, H // g * r)


def query_latents(c: Tensor, g: int) -> Tensor:
    """The Q latents of ``c`` ``[B, T, 3·g·r]`` as ``[g, B·T, r]`` (a view)."""
    B, T, w3 = c.shape
    return c.reshape(B * T, 3, g, w3 // (3 * g))[:, 0].transpose(0, 1)


def absorbed_query(c: Tensor, m: Tensor, beta: Optional[Tensor], g: int, width: int) -> Tensor:
    """``q̃`` ``[B, H, T, width]`` (token-major in memory, zero beyond ``r``) from the latents ``c``
    ``[B, T, 3·g·r]``."""
    B, T, _ = c.shape
    H, r = m.shape[0], m.shape[1]
    hpg, N = H // g, B * T
    c_q, m_g = query_latents(c, g), m_by_group(m, g)  # [g, N, r], [g, r, (head, r)]
    if beta is None:
        q = torch.bmm(c_q, m_g)
    else:
        q = torch.baddbmm(beta.reshape(g, 1, hpg * r), c_q, m_g)  # [g, N, (head, r)]
    q = q.transpose(0, 1).reshape(N, H, r)
    if width == r:
        return q.view(B, T, H, r).transpose(1, 2)
    out = c.new_zeros(N, H, width)
    out[..., :r] = q
    return out.view(B, T, H, width).transpose(1, 2)


def latent_heads(c: Tensor, p: int, num_heads: int, g: int, width: int) -> Tensor:
    """Projection ``p``'s latents (1 = K, 2 = V) as each head's ``[B, H, T, width]`` (its group's latent,
    zero beyond ``r``): a view of ``c`` when every head has its own group and no padding is needed."""
    B, T, w3 = c.shape
    r = w3 // (3 * g)
    hpg = num_heads // g
    lat = c.view(B, T, 3, g, 1, r)[:, :, p]  # [B, T, g, 1, r]
    if hpg == 1 and width == r:
        return lat.reshape(B, T, num_heads, r).transpose(1, 2)
    out = c.new_zeros(B, T, g, hpg, width)
    out[..., :r] = lat
    return out.view(B, T, num_heads, width).transpose(1, 2)


def absorbed_qkv(c: Tensor, up: Tensor, bias: Optional[Tensor], num_heads: int, g: int,
                 width: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(q̃, k, v)`` of attention on the latents, each ``[B, H, T, width]``."""
    m, beta = absorbed_weights(up, bias, num_heads)
    k, v = (latent_heads(c, p, num_heads, g, width) for p in (1, 2))
    return absorbed_query(c, m, beta, g, width), k, v


def lift(z: Tensor, up: Tensor, bias: Optional[Tensor], r: int) -> Tensor:
    """``O [B, T, H·d_h]``: each head's ``Z_h`` ``[B, H, T, ≥r]`` lifted by ``B_V,hᵀ``, plus the V bias."""
    B, H, T, _ = z.shape
    D = up.shape[1]
    dh = D // H
    z_h = z[..., :r].permute(1, 0, 2, 3).reshape(H, B * T, r)
    up_v = up[2].view(H, dh, r).transpose(1, 2)  # [H, r, d_h]
    if bias is None:
        o = torch.bmm(z_h, up_v)
    else:
        o = torch.baddbmm(bias[2 * D:].view(H, 1, dh), z_h, up_v)  # [H, N, d_h]
    return o.transpose(0, 1).reshape(B, T, D)


def latent_is_narrow(rank: Optional[int], head_dim: Optional[int], device_type: str = "cpu") -> bool:
    """Attention on the latents does less work than on the heads when the latent is at most half a head.
    On the CPU a latent narrower than 16 counts as 16: torch's CPU attention runs narrower heads no
    faster, so the CPU path pads them to 16 (no GPU measurement says the same of SDPA's CUDA backends)."""
    if rank is None or head_dim is None:
        return False
    return 2 * (max(rank, 16) if device_type == "cpu" else rank) <= head_dim


def register_fused_cpu_autograd(fwd, bwd, saved) -> None:
    """Autograd for a fused CPU path: ``fwd(x, down, up, bias, num_heads, latent_groups, causal, scale)``
    returns ``o`` and what its backward reads; ``saved(inputs, outputs)`` picks the tensors to keep, and the
    backward runs ``bwd(grad_o, *kept, num_heads, latent_groups, causal, scale) -> (dx, ddown, dup, dbias)``."""

    def setup_context(ctx, inputs, output):
        x, down, up, bias, *args = inputs
        ctx.save_for_backward(*saved(inputs, output))
        ctx.set_materialize_grads(False)  # only o gets a gradient: no zeros filled for the others
        ctx.args, ctx.has_bias, ctx.o_shape = tuple(args), bias is not None, (*x.shape[:2], up.shape[1])

    def backward(ctx, grad_o, *_):
        kept = ctx.saved_tensors
        if grad_o is None:
            grad_o = kept[0].new_zeros(ctx.o_shape)
        dx, ddown, dup, dbias = bwd(grad_o, *kept, *ctx.args)
        return dx, ddown, dup, (dbias if ctx.has_bias else None), None, None, None, None

    fwd.register_autograd(backward, setup_context=setup_context)


def factor_grads_fake(x: Tensor, down: Tensor, up: Tensor):
    """What a path's backward op returns, as fakes: ``(dx, ddown, dup, dbias [3·H·d_h])``."""
    return torch.empty_like(x), torch.empty_like(down), torch.empty_like(up), x.new_empty((3 * up.shape[1],))
