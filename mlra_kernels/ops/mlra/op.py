"""The MLRA attention op: ``torch.library`` custom ops with autograd, and the device dispatch.

Two ops, ``mlra::mlra_attention_fwd`` and ``mlra::mlra_attention_bwd``, each with a fake (meta)
implementation, so that ``torch.compile(fullgraph=True)`` traces through without a graph break.

Paths, chosen inside the ops:

- CUDA tensors: the Triton kernels.
- CPU tensors with ``TRITON_INTERPRET=1``: the same Triton kernels under the Triton interpreter.
- CPU tensors otherwise: the latent GEMMs, then torch's fused CPU attention (``"torch-cpu"``); the
  pure-torch reference with key padding, dropout, float64 or fewer than 16 tokens (``"reference"``).

What the forward saves for the backward: ``x``, the weights, ``O`` and the log-sum-exp. The latents
are recomputed with one GEMM; no ``T×T`` matrix and no per-head q/k/v are kept.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch import Tensor

from mlra_kernels._warnings import _WARNED, warn_once  # noqa: F401  (_WARNED: tests reset keys)
from mlra_kernels.ops.mlra import reference as ref



def _use_triton(x: Tensor) -> bool:
    """True when this call should run the Triton kernels (compiled or interpreted)."""
    if x.dtype == torch.float64:
        return False
    if importlib.util.find_spec("triton") is None:
        if x.is_cuda:
            raise RuntimeError("mlra_attention on CUDA tensors needs Triton: pip install triton")
        return False
    from mlra_kernels.ops.mlra import launcher

    if launcher.interpret_requested():
        if launcher.triton_mode_interpreted():
            return True
        warn_once(
            "interpret-late",
            "TRITON_INTERPRET=1 was set after `triton` was imported; Triton reads it only at import, so "
            "mlra_attention keeps the normal path (reference on CPU). Set it before importing triton.",
        )
    return x.is_cuda


def kernel_path(x: Tensor, key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0) -> str:
    """Which path a call on ``x`` [B, T, d] takes: ``"triton"``, ``"triton-interpreter"``, ``"torch-cpu"``
    (torch's fused CPU attention) or ``"reference"``."""
    if not _use_triton(x):
        return "torch-cpu" if _cpu_flash_ok(x, key_padding_mask, dropout_p) else "reference"
    from mlra_kernels.ops.mlra import launcher

    return "triton-interpreter" if launcher.triton_mode_interpreted() else "triton"


def _dropout_mask_cpu(B: int, H: int, T: int, dropout_p: float, seed: int) -> Tensor:
    """The reference path's keep mask: a CPU generator seeded with the op's seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((B, H, T, T), generator=gen) >= dropout_p


def _cpu_flash_ok(x: Tensor, kpm: Optional[Tensor], dropout_p: float) -> bool:
    """Whether the CPU path can use torch's fused CPU attention (same math; no T x T matrix).

    Not with a key padding mask (a fully masked query must give zeros, not NaN), dropout (the
    reference draws its own mask from the op's seed), or float64 (the saved log-sum-exp is fp32, which
    would cost float64 its exactness in the backward). Nor below 16 tokens, where the reference costs
    nothing and is the more exact (at T = 1 the fused backward leaves fp32 noise in dq and dk, whose exact
    value is 0).
    """
    if x.device.type != "cpu" or x.dtype == torch.float64 or kpm is not None or dropout_p > 0.0:
        return False
    return x.dim() == 3 and x.shape[1] >= 16


def _latents(x: Tensor, down: Tensor) -> Tensor:
    B, T, d = x.shape
    return (x.reshape(B * T, d) @ down.t()).view(B, T, down.shape[0])  # [B, T, 3·g·r]


def _heads_token_major(c: Tensor, up: Tensor, bias: Optional[Tensor], num_heads: int, g: int) -> list[Tensor]:
    """Per-head ``q, k, v`` from the latents, each ``[B, H, T, d_h]`` laid out token-major in memory
    (a transposed view of ``[B, T, H, d_h]``), the layout torch's CPU attention returns its output and
    gradients in; the bias is added inside the batched GEMM."""
    B, T, _ = c.shape
    d, r = up.shape[1], up.shape[2]
    P, k, dh = 3 * g, d // g, d // num_heads
    c_p = c.view(B * T, P, r).transpose(0, 1)  # [3·g, N, r]
    up_p = up.reshape(P, k, r).transpose(1, 2)  # [3·g, r, d/g]
    if bias is None:
        qkv = torch.bmm(c_p, up_p)
    else:
        qkv = torch.baddbmm(bias.view(P, 1, k), c_p, up_p)  # [3·g, N, d/g]
    qkv = qkv.view(3, g, B, T, k)
    if g == 1:
        return [qkv[p, 0].view(B, T, num_heads, dh).transpose(1, 2) for p in range(3)]
    return [qkv[p].permute(1, 2, 0, 3).reshape(B, T, num_heads, dh).transpose(1, 2) for p in range(3)]


def _factor_grads(
    dqkv: Tensor, c: Tensor, x: Tensor, down: Tensor, up: Tensor, g: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """From the per-head gradients ``dqkv [N, 3, d]`` back to ``(dx, ddown, dup, dbias)``: batched GEMMs
    over the ``3·g`` (projection, group) blocks."""
    B, T, d = x.shape
    N, P, r, k = B * T, 3 * g, up.shape[-1], d // g
    dq_p = dqkv.view(N, P, k).transpose(0, 1)  # [3·g, N, d/g], a view
    dc = torch.bmm(dq_p, up.reshape(P, k, r))  # [3·g, N, r]
    dup = torch.bmm(dq_p.transpose(1, 2), c.view(N, P, r).transpose(0, 1)).view(3, d, r)
    dbias = dq_p.sum(1).reshape(3 * d)
    dc_n = dc.transpose(0, 1).reshape(N, P * r)  # [N, 3·g·r]
    dx = (dc_n @ down).view(B, T, d)
    ddown = dc_n.t() @ x.reshape(N, d)
    return dx, ddown, dup, dbias


@torch.library.custom_op("mlra::mlra_attention_fwd", mutates_args=())
def mlra_attention_fwd(
    x: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor], kpm: Optional[Tensor], seed: Optional[Tensor],
    num_heads: int, latent_groups: int, causal: bool, dropout_p: float, scale: float,
) -> tuple[Tensor, Tensor]:
    """``(o [B, T, d], lse [B, H, T] fp32)``. ``kpm`` is an additive fp32 ``[B, T]`` key mask."""
    B, T, _ = x.shape
    seed_i = int(seed.item()) if seed is not None else 0
    if _use_triton(x):
        from mlra_kernels.ops.mlra import launcher

        launcher.check_interpreter_once()
        up = up.contiguous()
        bias = bias.contiguous() if bias is not None else None
        return launcher.mlra_fwd(
            _latents(x, down), up, bias, kpm, num_heads=num_heads, latent_groups=latent_groups, causal=causal,
            scale=scale, dropout_p=dropout_p, seed=seed_i,
        )
    if _cpu_flash_ok(x, kpm, dropout_p):
        q, k, v = _heads_token_major(_latents(x, down), up, bias, num_heads, latent_groups)
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return o.transpose(1, 2).reshape(B, T, -1).contiguous(), lse.float().contiguous()
    keep = _dropout_mask_cpu(B, num_heads, T, dropout_p, seed_i).to(x.device) if dropout_p > 0.0 else None
    o, lse = ref.mlra_attention_lse_reference(
        x, down, up, bias, num_heads=num_heads, latent_groups=latent_groups, causal=causal,
        key_padding_mask=kpm, dropout_p=dropout_p, scale=scale, dropout_mask=keep,
    )
    return o.contiguous(), lse.contiguous()


@mlra_attention_fwd.register_fake
def _(x, down, up, bias, kpm, seed, num_heads, latent_groups, causal, dropout_p, scale):
    B, T, d = x.shape
    return x.new_empty((B, T, d)), x.new_empty((B, num_heads, T), dtype=torch.float32)


@torch.library.custom_op("mlra::mlra_attention_bwd", mutates_args=())
def mlra_attention_bwd(
    grad_o: Tensor, x: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor], kpm: Optional[Tensor],
    seed: Optional[Tensor], o: Tensor, lse: Tensor,
    num_heads: int, latent_groups: int, causal: bool, dropout_p: float, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, ddown, dup, dbias)``; ``dbias`` is ``[3·d]`` even when there is no bias."""
    B, T, d = x.shape
    g = latent_groups
    seed_i = int(seed.item()) if seed is not None else 0
    grad_o = grad_o.contiguous()
    c = _latents(x, down)
    if _use_triton(x):
        from mlra_kernels.ops.mlra import launcher

        up = up.contiguous()
        bias = bias.contiguous() if bias is not None else None
        dqkv = launcher.mlra_bwd_qkv(
            c, up, bias, kpm, o, lse, grad_o, num_heads=num_heads, latent_groups=g, causal=causal,
            scale=scale, dropout_p=dropout_p, seed=seed_i,
        )
    elif _cpu_flash_ok(x, kpm, dropout_p):
        q, k, v = _heads_token_major(c, up, bias, num_heads, g)

        def heads(t: Tensor) -> Tensor:  # [B, T, d] -> [B, H, T, d_h], token-major
            return t.view(B, T, num_heads, d // num_heads).transpose(1, 2)

        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            heads(grad_o), q, k, v, heads(o.contiguous()), lse, 0.0, causal, scale=scale,
        )
        dqkv = torch.stack([t.transpose(1, 2).reshape(B * T, d) for t in grads], dim=1)  # [N, 3, d]
    else:
        keep = _dropout_mask_cpu(B, num_heads, T, dropout_p, seed_i).to(x.device) if dropout_p > 0.0 else None
        dqkv = ref.mlra_qkv_grad_reference(
            grad_o, x, down, up, bias, num_heads=num_heads, latent_groups=g, causal=causal,
            key_padding_mask=kpm, dropout_p=dropout_p, scale=scale, dropout_mask=keep,
        )
    return _factor_grads(dqkv.reshape(B * T, 3, d), c, x, down, up, g)


@mlra_attention_bwd.register_fake
def _(grad_o, x, down, up, bias, kpm, seed, o, lse, num_heads, latent_groups, causal, dropout_p, scale):
    return torch.empty_like(x), torch.empty_like(down), torch.empty_like(up), x.new_empty((3 * x.shape[-1],))


def _setup_context(ctx, inputs, output):
    x, down, up, bias, kpm, seed, num_heads, latent_groups, causal, dropout_p, scale = inputs
    o, lse = output
    ctx.save_for_backward(x, down, up, bias, kpm, seed, o, lse)
    ctx.args = (num_heads, latent_groups, causal, dropout_p, scale)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_o, grad_lse):
    x, down, up, bias, kpm, seed, o, lse = ctx.saved_tensors
    dx, ddown, dup, dbias = mlra_attention_bwd(grad_o, x, down, up, bias, kpm, seed, o, lse, *ctx.args)
    return dx, ddown, dup, (dbias if ctx.has_bias else None), None, None, None, None, None, None, None


mlra_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
