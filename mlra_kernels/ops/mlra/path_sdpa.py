"""The ``"sdpa"`` prefill path: the latent and up-projection GEMMs, then torch's
``scaled_dot_product_attention`` (on the latents where they are at most half a head wide), all
differentiated by autograd; no custom op."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from mlra_kernels.ops.mlra import layout, path_common


def attention(x: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor], kpm: Optional[Tensor],
              attn_mask: Optional[Tensor], num_heads: int, latent_groups: int, causal: bool, dropout_p: float,
              scale: float) -> Tensor:
    """``o [B, T, H·d_h]``; ``kpm`` and ``attn_mask`` are None on this path (``backend.choose``)."""
    B, T, _ = x.shape
    r, D = up.shape[2], up.shape[1]
    c = layout.latents(x, down)
    if path_common.latent_is_narrow(r, D // num_heads, x.device.type):
        q_abs, k, v = path_common.absorbed_qkv(c, up, bias, num_heads, latent_groups,
                                               path_common.latent_width(r, x.device))
        z = F.scaled_dot_product_attention(q_abs, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)
        return path_common.lift(z, up, bias, r)
    q, k, v = layout.heads_token_major(c, up, bias, num_heads, latent_groups)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)
    return o.transpose(1, 2).reshape(B, T, D)
