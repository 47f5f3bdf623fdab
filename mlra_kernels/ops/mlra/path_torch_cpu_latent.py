"""The ``"torch-cpu-latent"`` prefill path: attention on the latents (``path_common``) with torch's fused
CPU attention at head width ``max(16, r)``, for latents at most half a head wide. The forward keeps the
latents and the attention output ``Z`` for the backward (recomputing ``c`` would be one more GEMM as
large as the forward's)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mlra_kernels.ops.mlra import layout
from mlra_kernels.ops.mlra.path_common import (
    absorbed_qkv, absorbed_query, absorbed_weights, cpu_attention, cpu_attention_backward, factor_grads_fake,
    latent_heads, latent_width, lift, m_by_group, query_latents, register_fused_cpu_autograd,
)


@torch.library.custom_op("mlra::mlra_attention_torch_cpu_latent_fwd", mutates_args=())
def mlra_attention_torch_cpu_latent_fwd(
    x: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor], num_heads: int, latent_groups: int, causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(o [B, T, H·d_h], lse [B, H, T] fp32, c [B, T, 3·g·r], z [B, T, H, max(16, r)])``: ``z`` is the
    attention output on the latents (zero beyond ``r``)."""
    r = up.shape[2]
    c = layout.latents(x, down)
    q_abs, k, v = absorbed_qkv(c, up, bias, num_heads, latent_groups, latent_width(r, x.device))
    z, lse = cpu_attention(q_abs, k, v, 0.0, causal, scale=scale)  # z: [B, H, T, width]
    return lift(z, up, bias, r).contiguous(), lse.float().contiguous(), c, z.transpose(1, 2).contiguous()


@mlra_attention_torch_cpu_latent_fwd.register_fake
def _(x, down, up, bias, num_heads, latent_groups, causal, scale):
    B, T, _ = x.shape
    width = latent_width(up.shape[2], x.device)
    return (x.new_empty((B, T, up.shape[1])), x.new_empty((B, num_heads, T), dtype=torch.float32),
            x.new_empty((B, T, down.shape[0])), x.new_empty((B, T, num_heads, width)))


def _grads(grad_o, c, x, down, up, bias, z, lse, num_heads, g, causal, scale):
    """``(dx, ddown, dup, dbias)`` from torch's fused CPU attention's own backward; ``z``
    ``[B, H, T, width]``; ``q̃``, ``k``, ``v`` are rebuilt from ``c``."""
    B, T, d = x.shape
    H, r, width, D = num_heads, up.shape[2], z.shape[-1], up.shape[1]  # D = H·d_h, the output width
    dh, hpg, N = D // H, H // g, B * T
    m, beta = absorbed_weights(up, bias, H)
    q_abs = absorbed_query(c, m, beta, g, width)
    k, v = (latent_heads(c, p, H, g, width) for p in (1, 2))
    do_h = grad_o.view(N, H, dh).transpose(0, 1)  # [H, N, d_h]
    up_q, up_k, up_v = (up[p].view(H, dh, r) for p in range(3))
    dz = torch.bmm(do_h, up_v)  # dO·B_V, [H, N, r]
    if width > r:
        dz_full = grad_o.new_zeros(N, H, width)
        dz_full[..., :r] = dz.transpose(0, 1)
        dz = dz_full.view(B, T, H, width).transpose(1, 2)
    else:
        dz = dz.transpose(0, 1).reshape(B, T, H, r).transpose(1, 2)
    dq_abs, dk, dv = cpu_attention_backward(dz, q_abs, k, v, z, lse, 0.0, causal, scale=scale)
    # Token-major gradients ([B, T, H, width] in memory): these are views.
    dq_abs, dk, dv = (t.transpose(1, 2).reshape(N, H, width)[..., :r] for t in (dq_abs, dk, dv))
    z_h = z[..., :r].permute(1, 0, 2, 3).reshape(H, N, r)
    dup_v = torch.bmm(do_h.transpose(1, 2), z_h)  # [H, d_h, r]
    dq_g = dq_abs.reshape(N, g, hpg * r).transpose(0, 1)  # [g, N, (head, r)]
    dm = torch.bmm(query_latents(c, g).transpose(1, 2), dq_g).view(g, r, hpg, r).transpose(1, 2).reshape(H, r, r)
    dup_q = torch.bmm(up_k, dm.transpose(1, 2))  # d/dB_Q of M = B_Qᵀ·B_K
    dup_k = torch.bmm(up_q, dm)
    if bias is not None:
        dbeta = dq_abs.sum(0)  # [H, r]
        db_q = torch.bmm(up_k, dbeta.unsqueeze(-1)).view(D)
        dup_k = dup_k + bias[:D].view(H, dh, 1) * dbeta.view(H, 1, r)
        dbias = torch.cat([db_q, db_q.new_zeros(D), grad_o.reshape(N, D).sum(0)])
    else:  # the returned bias gradient is unused
        dbias = grad_o.new_zeros(3 * D)
    dc = grad_o.new_empty(N, 3, g, r)
    dc[:, 0] = torch.bmm(dq_g, m_by_group(m, g).transpose(1, 2)).transpose(0, 1)
    if hpg == 1:  # a group per head: its latents' gradients are the head's own
        dc[:, 1], dc[:, 2] = dk.reshape(N, g, r), dv.reshape(N, g, r)
    else:
        dc[:, 1] = dk.reshape(N, g, hpg, r).sum(2)
        dc[:, 2] = dv.reshape(N, g, hpg, r).sum(2)
    dc_n = dc.view(N, 3 * g * r)
    dx = (dc_n @ down).view(B, T, d)
    ddown = dc_n.t() @ x.reshape(N, d)
    dup = torch.stack([dup_q.reshape(D, r), dup_k.reshape(D, r), dup_v.reshape(D, r)])
    return dx, ddown, dup, dbias


@torch.library.custom_op("mlra::mlra_attention_torch_cpu_latent_bwd", mutates_args=())
def mlra_attention_torch_cpu_latent_bwd(
    grad_o: Tensor, x: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor], lse: Tensor, c: Tensor, z: Tensor,
    num_heads: int, latent_groups: int, causal: bool, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, ddown, dup, dbias [3·H·d_h])`` from the forward's ``lse``, ``c`` and ``z``."""
    return _grads(grad_o.contiguous(), c, x, down, up, bias, z.transpose(1, 2), lse, num_heads, latent_groups,
                  causal, scale)


@mlra_attention_torch_cpu_latent_bwd.register_fake
def _(grad_o, x, down, up, bias, lse, c, z, num_heads, latent_groups, causal, scale):
    return factor_grads_fake(x, down, up)


# Kept for the backward: x, the weights, the bias, lse, the latents and Z (not o).
register_fused_cpu_autograd(mlra_attention_torch_cpu_latent_fwd, mlra_attention_torch_cpu_latent_bwd,
                            lambda inputs, out: (*inputs[:4], *out[1:]))


def attention(x: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor], kpm: Optional[Tensor],
              attn_mask: Optional[Tensor], num_heads: int, latent_groups: int, causal: bool, dropout_p: float,
              scale: float) -> Tensor:
    """``o [B, T, H·d_h]``; no key padding, mask or dropout reaches this path (``backend.choose``)."""
    return mlra_attention_torch_cpu_latent_fwd(x, down, up, bias, num_heads, latent_groups, causal, scale)[0]
