"""The ``"torch"`` prefill path: the ``T×T`` scores in torch (``dense.attention_lse``) and their
hand-written backward. It runs float64, general masks, and on the CPU key padding, dropout and short
sequences. The backward recomputes the latents, q, k, v and the scores: only the inputs are saved."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mlra_kernels.ops.mlra import dense, layout, masks
from mlra_kernels.ops.mlra.path_common import heads, merge


def dropout_keep_cpu(B: int, H: int, T: int, dropout_p: float, seed: int) -> Tensor:
    """The keep mask ``[B, H, T, T]`` (bool): a CPU generator seeded with the call's seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((B, H, T, T), generator=gen) >= dropout_p


def _inputs(c, up, bias, kpm, attn_mask, seed, num_heads, g, causal, dropout_p, x):
    """Per-head ``q, k, v`` ``[B, H, T, d_h]`` from the latents ``c``, the additive mask and the dropout
    keep mask."""
    B, T, _ = x.shape
    q, k, v = layout.heads_token_major(c, up, bias, num_heads, g)
    mask = masks.combine(B, num_heads, T, T, causal=causal, key_padding_mask=kpm, attn_mask=attn_mask,
                         dtype=q.dtype, device=q.device, empty_rows="zeros")
    keep = None
    if dropout_p > 0.0:
        keep = dropout_keep_cpu(B, num_heads, T, dropout_p, int(seed.item())).to(x.device)
    return q, k, v, mask, keep


@torch.library.custom_op("mlra::mlra_attention_torch_fwd", mutates_args=())
def mlra_attention_torch_fwd(
    x: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor], kpm: Optional[Tensor], attn_mask: Optional[Tensor],
    seed: Optional[Tensor], num_heads: int, latent_groups: int, causal: bool, dropout_p: float, scale: float,
) -> Tensor:
    """``o [B, T, H·d_h]``. ``kpm``: additive fp32 ``[B, T]``; ``seed``: ``[1]`` int64, given with dropout."""
    q, k, v, mask, keep = _inputs(layout.latents(x, down), up, bias, kpm, attn_mask, seed, num_heads, latent_groups,
                                  causal, dropout_p, x)
    o, _ = dense.attention_lse(q, k, v, scale=scale, bias=mask, dropout_p=dropout_p, keep=keep)
    return merge(o)


@mlra_attention_torch_fwd.register_fake
def _(x, down, up, bias, kpm, attn_mask, seed, num_heads, latent_groups, causal, dropout_p, scale):
    return x.new_empty((*x.shape[:2], up.shape[1]))


@torch.library.custom_op("mlra::mlra_attention_torch_bwd", mutates_args=())
def mlra_attention_torch_bwd(
    grad_o: Tensor, x: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor], kpm: Optional[Tensor],
    attn_mask: Optional[Tensor], seed: Optional[Tensor], num_heads: int, latent_groups: int, causal: bool,
    dropout_p: float, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, ddown, dup, dbias)``; ``dbias`` is ``[3·H·d_h]`` even without a bias."""
    B, T, _ = x.shape
    D = up.shape[1]
    c = layout.latents(x, down)
    q, k, v, mask, keep = _inputs(c, up, bias, kpm, attn_mask, seed, num_heads, latent_groups, causal, dropout_p, x)
    grads = dense.attention_grads(heads(grad_o.contiguous(), num_heads), q, k, v, scale=scale, bias=mask,
                                  dropout_p=dropout_p, keep=keep)
    dqkv = [t.transpose(1, 2).reshape(B * T, D) for t in grads]
    return layout.factor_grads(dqkv, c, x, down, up, latent_groups)


@mlra_attention_torch_bwd.register_fake
def _(grad_o, x, down, up, bias, kpm, attn_mask, seed, num_heads, latent_groups, causal, dropout_p, scale):
    return torch.empty_like(x), torch.empty_like(down), torch.empty_like(up), x.new_empty((3 * up.shape[1],))


def _setup_context(ctx, inputs, output):
    x, down, up, bias, kpm, attn_mask, seed, num_heads, latent_groups, causal, dropout_p, scale = inputs
    ctx.save_for_backward(x, down, up, bias, kpm, attn_mask, seed)
    ctx.args = (num_heads, latent_groups, causal, dropout_p, scale)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_o):
    x, down, up, bias, kpm, attn_mask, seed = ctx.saved_tensors
    dx, ddown, dup, dbias = mlra_attention_torch_bwd(grad_o, x, down, up, bias, kpm, attn_mask, seed, *ctx.args)
    return dx, ddown, dup, (dbias if ctx.has_bias else None), None, None, None, None, None, None, None, None


mlra_attention_torch_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention(x: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor], kpm: Optional[Tensor],
              attn_mask: Optional[Tensor], num_heads: int, latent_groups: int, causal: bool, dropout_p: float,
              scale: float) -> Tensor:
    """``o [B, T, H·d_h]``; with dropout, the seed is drawn from torch's default CPU generator."""
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64) if dropout_p > 0.0 else None
    return mlra_attention_torch_fwd(x, down, up, bias, kpm, attn_mask, seed, num_heads, latent_groups, causal,
                                    dropout_p, scale)
