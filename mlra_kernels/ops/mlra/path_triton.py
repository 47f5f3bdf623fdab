"""The ``"triton"`` and ``"triton-interpreter"`` prefill paths: the fused Triton kernels (``launcher``,
``kernels``), on CUDA tensors or, under ``TRITON_INTERPRET=1``, on CPU tensors. The forward keeps only
``o`` and the log-sum-exp; the backward recomputes the latents with one GEMM, and no ``T×T`` matrix or
per-head q, k, v ever reaches memory."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mlra_kernels.ops.mlra import layout


def _launcher():
    # Imported at the first call: launcher imports backend, which imports this module for its table.
    from mlra_kernels.ops.mlra import launcher

    return launcher


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.contiguous() if t is not None else None


@torch.library.custom_op("mlra::mlra_attention_triton_fwd", mutates_args=())
def mlra_attention_triton_fwd(
    x: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor], kpm: Optional[Tensor], seed: Optional[Tensor],
    num_heads: int, latent_groups: int, causal: bool, dropout_p: float, scale: float,
) -> tuple[Tensor, Tensor]:
    """``(o [B, T, H·d_h], lse [B, H, T] fp32)``. ``kpm``: additive fp32 ``[B, T]``; ``seed``: ``[1]``
    int64, given with dropout."""
    launcher = _launcher()
    launcher.check_interpreter_once()
    return launcher.mlra_fwd(
        layout.latents(x, down), up.contiguous(), _contiguous(bias), kpm, num_heads=num_heads,
        latent_groups=latent_groups, causal=causal, scale=scale, dropout_p=dropout_p,
        seed=int(seed.item()) if seed is not None else 0,
    )


@mlra_attention_triton_fwd.register_fake
def _(x, down, up, bias, kpm, seed, num_heads, latent_groups, causal, dropout_p, scale):
    B, T, _ = x.shape
    return x.new_empty((B, T, up.shape[1])), x.new_empty((B, num_heads, T), dtype=torch.float32)


@torch.library.custom_op("mlra::mlra_attention_triton_bwd", mutates_args=())
def mlra_attention_triton_bwd(
    grad_o: Tensor, x: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor], kpm: Optional[Tensor],
    seed: Optional[Tensor], o: Tensor, lse: Tensor, num_heads: int, latent_groups: int, causal: bool,
    dropout_p: float, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, ddown, dup, dbias [3·H·d_h])`` from the forward's ``o`` and ``lse``."""
    B, T, _ = x.shape
    D = up.shape[1]
    c = layout.latents(x, down)
    dqkv = _launcher().mlra_bwd_qkv(
        c, up.contiguous(), _contiguous(bias), kpm, o, lse, grad_o.contiguous(), num_heads=num_heads,
        latent_groups=latent_groups, causal=causal, scale=scale, dropout_p=dropout_p,
        seed=int(seed.item()) if seed is not None else 0,
    )
    return layout.factor_grads(dqkv.view(B * T, 3, D).unbind(1), c, x, down, up, latent_groups)


@mlra_attention_triton_bwd.register_fake
def _(grad_o, x, down, up, bias, kpm, seed, o, lse, num_heads, latent_groups, causal, dropout_p, scale):
    return torch.empty_like(x), torch.empty_like(down), torch.empty_like(up), x.new_empty((3 * up.shape[1],))


def _setup_context(ctx, inputs, output):
    x, down, up, bias, kpm, seed, num_heads, latent_groups, causal, dropout_p, scale = inputs
    o, lse = output
    ctx.save_for_backward(x, down, up, bias, kpm, seed, o, lse)
    ctx.set_materialize_grads(False)  # lse gets no gradient: no zeros filled for it
    ctx.args = (num_heads, latent_groups, causal, dropout_p, scale)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_o, grad_lse):
    x, down, up, bias, kpm, seed, o, lse = ctx.saved_tensors
    if grad_o is None:
        grad_o = torch.zeros_like(o)
    dx, ddown, dup, dbias = mlra_attention_triton_bwd(grad_o, x, down, up, bias, kpm, seed, o, lse, *ctx.args)
    return dx, ddown, dup, (dbias if ctx.has_bias else None), None, None, None, None, None, None, None


mlra_attention_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention(x: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor], kpm: Optional[Tensor],
              attn_mask: Optional[Tensor], num_heads: int, latent_groups: int, causal: bool, dropout_p: float,
              scale: float) -> Tensor:
    """``o [B, T, H·d_h]``; ``attn_mask`` is None on this path (``backend.choose``). With dropout, the seed
    is drawn from torch's default CPU generator."""
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64) if dropout_p > 0.0 else None
    return mlra_attention_triton_fwd(x, down, up, bias, kpm, seed, num_heads, latent_groups, causal, dropout_p,
                                     scale)[0]
