"""The ``"torch-cpu"`` prefill path: the latent GEMMs, then torch's fused CPU attention on the heads.
The forward keeps q, k, v and the latents for the backward, as unfused attention does: on a CPU the
step is compute-bound, and recomputing them would cost more than the memory saves."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mlra_kernels.ops.mlra import layout
from mlra_kernels.ops.mlra import path_common as common


@torch.library.custom_op("mlra::mlra_attention_torch_cpu_fwd", mutates_args=())
def mlra_attention_torch_cpu_fwd(
    x: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor], num_heads: int, latent_groups: int, causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(o [B, T, H·d_h], lse [B, H, T] fp32, qkv [3·g, B·T, H·d_h/g], c [B, T, 3·g·r])``: ``qkv`` is
    ``layout.qkv_buffer`` of the latents ``c``."""
    B, T, _ = x.shape
    c = layout.latents(x, down)
    qkv = layout.qkv_buffer(c, up, bias, latent_groups)
    q, k, v = layout.heads_of(qkv, B, T, num_heads, latent_groups)
    o, lse = common.cpu_attention(q, k, v, 0.0, causal, scale=scale)
    return common.merge(o), lse.float().contiguous(), qkv, c


@mlra_attention_torch_cpu_fwd.register_fake
def _(x, down, up, bias, num_heads, latent_groups, causal, scale):
    B, T, _ = x.shape
    D, g = up.shape[1], latent_groups
    return (x.new_empty((B, T, D)), x.new_empty((B, num_heads, T), dtype=torch.float32),
            x.new_empty((3 * g, B * T, D // g)), x.new_empty((B, T, down.shape[0])))


@torch.library.custom_op("mlra::mlra_attention_torch_cpu_bwd", mutates_args=())
def mlra_attention_torch_cpu_bwd(
    grad_o: Tensor, x: Tensor, down: Tensor, up: Tensor, o: Tensor, lse: Tensor, qkv: Tensor, c: Tensor,
    num_heads: int, latent_groups: int, causal: bool, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, ddown, dup, dbias [3·H·d_h])`` from the forward's ``o``, ``lse``, ``qkv`` and ``c``."""
    B, T, _ = x.shape
    D = up.shape[1]
    q, k, v = layout.heads_of(qkv, B, T, num_heads, latent_groups)
    do_h, o_h = common.heads(grad_o.contiguous(), num_heads), common.heads(o.contiguous(), num_heads)
    grads = common.cpu_attention_backward(do_h, q, k, v, o_h, lse, 0.0, causal, scale=scale)
    dqkv = [t.transpose(1, 2).reshape(B * T, D) for t in grads]  # token-major: views, no copy
    return layout.factor_grads(dqkv, c, x, down, up, latent_groups)


@mlra_attention_torch_cpu_bwd.register_fake
def _(grad_o, x, down, up, o, lse, qkv, c, num_heads, latent_groups, causal, scale):
    return common.factor_grads_fake(x, down, up)


# Kept for the backward: x, the weights, o, lse, q/k/v and the latents.
common.register_fused_cpu_autograd(mlra_attention_torch_cpu_fwd, mlra_attention_torch_cpu_bwd,
                                   lambda inputs, out: (*inputs[:3], *out))


def attention(x: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor], kpm: Optional[Tensor],
              attn_mask: Optional[Tensor], num_heads: int, latent_groups: int, causal: bool, dropout_p: float,
              scale: float) -> Tensor:
    """``o [B, T, H·d_h]``; no key padding, mask or dropout reaches this path (``backend.choose``)."""
    return mlra_attention_torch_cpu_fwd(x, down, up, bias, num_heads, latent_groups, causal, scale)[0]
