"""The prefill variant: causal (or full) self-attention over a whole sequence, for training and for
the prefill of generation. Its public call is :func:`mlra_attention`.

Two ``torch.library`` custom ops, ``mlra::mlra_attention_fwd`` and ``mlra::mlra_attention_bwd``, each with
a fake (meta) implementation, so that ``torch.compile(fullgraph=True)`` traces through without a graph
break. The path (``mlra_kernels.ops.mlra.backend``) is chosen once per call and passed to both ops:

- ``"sdpa"`` (not through the custom ops: plain torch, differentiated by autograd): the GEMMs and torch's
  ``scaled_dot_product_attention`` on its fastest backend, the default on CUDA without key padding;
- ``"triton"`` / ``"triton-interpreter"``: the fused Triton kernels (``launcher``, ``kernels``);
- ``"torch-cpu"``: the latent GEMMs, then torch's fused CPU attention;
- ``"torch-cpu-latent"``: attention on the latents (absorbed scores and values, DESIGN.md) with torch's
  fused CPU attention at head width ``max(16, r)``, where the latent is at most half a head: each head's
  query is ``q̃_h = c_Q·M_h + β_h`` with ``M_h = B_Q,hᵀ·B_K,h``, its keys and values its group's latents,
  and ``O_h = Z_h·B_V,hᵀ + b_V,h``;
- ``"torch"``: the ``T×T`` scores in torch (``dense.attention_lse`` and its hand-written backward).

What the forward saves for the backward: ``x``, the weights, ``O`` and the log-sum-exp, and ``aux``:
nothing more on the Triton and torch paths (the latents are recomputed with one GEMM; no ``T×T`` matrix
and no per-head q/k/v are kept), the per-head q/k/v and the latents on ``"torch-cpu"`` (a CPU is
compute-bound: it keeps what unfused attention keeps), the latents and the latent-wide attention output
``Z`` on ``"torch-cpu-latent"``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mlra_kernels.ops.mlra import backend, dense, layout, masks


def _dropout_keep_cpu(B: int, H: int, T: int, dropout_p: float, seed: int) -> Tensor:
    """The torch path's keep mask ``[B, H, T, T]``: a CPU generator seeded with the call's seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((B, H, T, T), generator=gen) >= dropout_p


def _torch_inputs(c, up, bias, kpm, attn_mask, seed, num_heads, g, causal, dropout_p, x):
    """Per-head q, k, v, the additive mask and the dropout keep mask of the ``"torch"`` path."""
    B, T, _ = x.shape
    q, k, v = layout.heads_token_major(c, up, bias, num_heads, g)
    mask = masks.combine(B, num_heads, T, T, causal=causal, key_padding_mask=kpm, attn_mask=attn_mask,
                         dtype=q.dtype, device=q.device, empty_rows="zeros")
    keep = _dropout_keep_cpu(B, num_heads, T, dropout_p, seed).to(x.device) if dropout_p > 0.0 else None
    return q, k, v, mask, keep


# torch's fused CPU attention runs heads narrower than 16 slower than 16-wide ones (fp32, B = 2, H = 12,
# T = 1024: width 8 takes 19 ms forward and 61–68 ms backward, width 16 12–14 and 33–34 ms), so the CPU
# path pads narrower latents with zero columns, which change neither the scores nor Z.
CPU_LATENT_MIN_WIDTH = 16


def latent_width(r: int, device: torch.device) -> int:
    """The head width at which the latent attention runs: ``r``, padded up to 16 on the CPU."""
    return max(r, CPU_LATENT_MIN_WIDTH) if device.type == "cpu" else r


def _absorbed_weights(up: Tensor, bias: Optional[Tensor], num_heads: int) -> tuple[Tensor, Optional[Tensor]]:
    """``M_h = B_Q,hᵀ·B_K,h`` ``[H, r, r]`` and ``β_h = b_Q,hᵀ·B_K,h`` ``[H, r]`` (None without a bias), so
    that each head's absorbed query is ``q̃_h = c_Q·M_h + β_h`` and its score ``q̃_h·c_K``."""
    H, r = num_heads, up.shape[2]
    dh = up.shape[1] // H
    up_q, up_k = up[0].view(H, dh, r), up[1].view(H, dh, r)
    m = torch.bmm(up_q.transpose(1, 2), up_k)
    beta = torch.bmm(bias[:H * dh].view(H, 1, dh), up_k).view(H, r) if bias is not None else None
    return m, beta


def _m_by_group(m: Tensor, g: int) -> Tensor:
    """``M_h`` ``[H, r, r]`` as ``[g, r, (H/g)·r]``: each group's heads side by side in the columns, so that
    one batched GEMM of a group's latent gives every head's absorbed query."""
    H, r = m.shape[0], m.shape[1]
    return m.view(g, H // g, r, r).permute(0, 2, 1, 3).reshape(g, r, H // g * r)


def _query_latents(c: Tensor, g: int) -> Tensor:
    """The Q latents of ``c`` ``[B, T, 3·g·r]`` as ``[g, B·T, r]`` (a view)."""
    B, T, w3 = c.shape
    return c.reshape(B * T, 3, g, w3 // (3 * g))[:, 0].transpose(0, 1)


def _absorbed_query(c: Tensor, m: Tensor, beta: Optional[Tensor], g: int, width: int) -> Tensor:
    """``q̃`` ``[B, H, T, width]`` (token-major in memory, zero beyond ``r``) from the latents ``c``
    ``[B, T, 3·g·r]``: one batched GEMM over the groups, every head of a group in its columns."""
    B, T, _ = c.shape
    H, r = m.shape[0], m.shape[1]
    hpg, N = H // g, B * T
    c_q, m_g = _query_latents(c, g), _m_by_group(m, g)  # [g, N, r], [g, r, (head, r)]
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


def _latent_heads(c: Tensor, p: int, num_heads: int, g: int, width: int) -> Tensor:
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


def _lift(z: Tensor, up: Tensor, bias: Optional[Tensor], r: int) -> Tensor:
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


def _absorbed_attention(c: Tensor, up: Tensor, bias: Optional[Tensor], num_heads: int, g: int, width: int):
    """``(q̃, k, v)`` of attention on the latents, each ``[B, H, T, width]``."""
    m, beta = _absorbed_weights(up, bias, num_heads)
    k, v = (_latent_heads(c, p, num_heads, g, width) for p in (1, 2))
    return _absorbed_query(c, m, beta, g, width), k, v


def _absorbed_grads(grad_o, c, x, down, up, bias, z, lse, num_heads, g, causal, scale):
    """``(dx, ddown, dup, dbias)`` of the latent path, from torch's fused CPU attention's own backward.
    ``z`` is the forward's ``Z`` ``[B, H, T, width]``; ``q̃``, ``k``, ``v`` are rebuilt from ``c``."""
    B, T, d = x.shape
    H, r, width, D = num_heads, up.shape[2], z.shape[-1], up.shape[1]  # D = H·d_h, the output width
    dh, hpg, N = D // H, H // g, B * T
    m, beta = _absorbed_weights(up, bias, H)
    q_abs = _absorbed_query(c, m, beta, g, width)
    k, v = (_latent_heads(c, p, H, g, width) for p in (1, 2))
    do_h = grad_o.view(N, H, dh).transpose(0, 1)  # [H, N, d_h]
    up_q, up_k, up_v = (up[p].view(H, dh, r) for p in range(3))
    dz = torch.bmm(do_h, up_v)  # dO·B_V, [H, N, r]
    if width > r:
        dz_full = grad_o.new_zeros(N, H, width)
        dz_full[..., :r] = dz.transpose(0, 1)
        dz = dz_full.view(B, T, H, width).transpose(1, 2)
    else:
        dz = dz.transpose(0, 1).reshape(B, T, H, r).transpose(1, 2)
    dq_abs, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dz, q_abs, k, v, z, lse, 0.0, causal, scale=scale,
    )
    # The torch path's gradients come token-major ([B, T, H, width] in memory); these are views.
    dq_abs, dk, dv = (t.transpose(1, 2).reshape(N, H, width)[..., :r] for t in (dq_abs, dk, dv))
    z_h = z[..., :r].permute(1, 0, 2, 3).reshape(H, N, r)
    dup_v = torch.bmm(do_h.transpose(1, 2), z_h)  # [H, d_h, r]
    dq_g = dq_abs.reshape(N, g, hpg * r).transpose(0, 1)  # [g, N, (head, r)]
    c_q = _query_latents(c, g)  # [g, N, r]
    dm = torch.bmm(c_q.transpose(1, 2), dq_g).view(g, r, hpg, r).transpose(1, 2).reshape(H, r, r)
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
    dc[:, 0] = torch.bmm(dq_g, _m_by_group(m, g).transpose(1, 2)).transpose(0, 1)
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


def _heads(t: Tensor, num_heads: int) -> Tensor:
    """``[B, T, H·d_h]`` to ``[B, H, T, d_h]``, token-major (a view)."""
    B, T, d = t.shape
    return t.view(B, T, num_heads, d // num_heads).transpose(1, 2)


def _merge(t: Tensor) -> Tensor:
    """``[B, H, T, d_h]`` to ``[B, T, H·d_h]``, contiguous."""
    B, H, T, dh = t.shape
    return t.transpose(1, 2).reshape(B, T, H * dh).contiguous()


@torch.library.custom_op("mlra::mlra_attention_fwd", mutates_args=())
def mlra_attention_fwd(
    x: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor], kpm: Optional[Tensor], attn_mask: Optional[Tensor],
    seed: Optional[Tensor], num_heads: int, latent_groups: int, causal: bool, dropout_p: float, scale: float,
    path: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(o [B, T, H·d_h], lse [B, H, T] fp32, aux)`` (``H·d_h = up.shape[1]``). ``kpm`` is an additive fp32
    ``[B, T]`` key mask. ``aux`` is what the path's backward needs besides ``o`` and ``lse``: the latent path's latents and attention
    output ``Z`` (``[B, T, H, max(16, r)]``), the fused CPU path's ``q, k, v`` (``layout.qkv_buffer``) and latents, flattened
    into one tensor; empty for the others."""
    seed_i = int(seed.item()) if seed is not None else 0
    none = x.new_empty(0)
    if path == "torch-cpu":
        # q, k, v and the latents are kept for the backward (aux), as unfused attention keeps them: on a CPU,
        # compute and not memory bounds the step, and recomputing them would cost more than it saves.
        B, T, _ = x.shape
        n_qkv = 3 * B * T * up.shape[1]
        aux = x.new_empty(n_qkv + B * T * down.shape[0])
        c = layout.latents(x, down, out=aux[n_qkv:].view(B, T, down.shape[0]))
        buf = layout.qkv_buffer(c, up, bias, latent_groups, out=aux[:n_qkv].view(3 * latent_groups, B * T, -1))
        q, k, v = layout.heads_of(buf, B, T, num_heads, latent_groups)
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return _merge(o), lse.float().contiguous(), aux
    if path == "torch-cpu-latent":
        # The latents and Z are kept (aux): recomputing c would be one more GEMM as large as the forward's.
        B, T, _ = x.shape
        r = up.shape[2]
        width = latent_width(r, x.device)
        n_c = B * T * down.shape[0]
        aux = x.new_empty(n_c + B * T * num_heads * width)
        c = layout.latents(x, down, out=aux[:n_c].view(B, T, down.shape[0]))
        q_abs, k, v = _absorbed_attention(c, up, bias, num_heads, latent_groups, width)
        z, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q_abs, k, v, 0.0, causal, scale=scale)
        aux[n_c:].view(B, T, num_heads, width).copy_(z.transpose(1, 2))
        return _lift(z, up, bias, r).contiguous(), lse.float().contiguous(), aux
    c = layout.latents(x, down)
    if path in ("triton", "triton-interpreter"):
        from mlra_kernels.ops.mlra import launcher

        launcher.check_interpreter_once()
        o, lse = launcher.mlra_fwd(
            c, up.contiguous(), bias.contiguous() if bias is not None else None, kpm, num_heads=num_heads,
            latent_groups=latent_groups, causal=causal, scale=scale, dropout_p=dropout_p, seed=seed_i,
        )
        return o, lse, none
    q, k, v, mask, keep = _torch_inputs(c, up, bias, kpm, attn_mask, seed_i, num_heads, latent_groups, causal,
                                        dropout_p, x)
    o, lse = dense.attention_lse(q, k, v, scale=scale, bias=mask, dropout_p=dropout_p, keep=keep)
    return _merge(o), lse.contiguous(), none


@mlra_attention_fwd.register_fake
def _(x, down, up, bias, kpm, attn_mask, seed, num_heads, latent_groups, causal, dropout_p, scale, path):
    B, T, _ = x.shape
    D = up.shape[1]
    if path == "torch-cpu-latent":
        aux = x.new_empty((B * T * (down.shape[0] + num_heads * latent_width(up.shape[2], x.device)),))
    elif path == "torch-cpu":
        aux = x.new_empty((B * T * (3 * D + down.shape[0]),))
    else:
        aux = x.new_empty(0)
    return x.new_empty((B, T, D)), x.new_empty((B, num_heads, T), dtype=torch.float32), aux


@torch.library.custom_op("mlra::mlra_attention_bwd", mutates_args=())
def mlra_attention_bwd(
    grad_o: Tensor, x: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor], kpm: Optional[Tensor],
    attn_mask: Optional[Tensor], seed: Optional[Tensor], o: Tensor, lse: Tensor, aux: Tensor,
    num_heads: int, latent_groups: int, causal: bool, dropout_p: float, scale: float, path: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, ddown, dup, dbias)``; ``dbias`` is ``[3·H·d_h]`` even when there is no bias."""
    B, T, _ = x.shape
    D = up.shape[1]  # H·d_h: the output's width
    g = latent_groups
    seed_i = int(seed.item()) if seed is not None else 0
    grad_o = grad_o.contiguous()
    if path == "torch-cpu":  # q, k, v and the latents, as the forward kept them
        buf, c = aux[:3 * B * T * D].view(3 * g, B * T, D // g), aux[3 * B * T * D:].view(B, T, down.shape[0])
    elif path == "torch-cpu-latent":  # the latents and Z, as the forward kept them
        n_c = B * T * down.shape[0]
        c, z = aux[:n_c].view(B, T, down.shape[0]), aux[n_c:].view(B, T, num_heads, -1).transpose(1, 2)
        return _absorbed_grads(grad_o, c, x, down, up, bias, z, lse, num_heads, g, causal, scale)
    else:
        c = layout.latents(x, down)
    if path in ("triton", "triton-interpreter"):
        from mlra_kernels.ops.mlra import launcher

        dqkv = launcher.mlra_bwd_qkv(
            c, up.contiguous(), bias.contiguous() if bias is not None else None, kpm, o, lse, grad_o,
            num_heads=num_heads, latent_groups=g, causal=causal, scale=scale, dropout_p=dropout_p, seed=seed_i,
        )
        dqkv = dqkv.view(B * T, 3, D).unbind(1)
    elif path == "torch-cpu":
        q, k, v = layout.heads_of(buf, B, T, num_heads, g)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _heads(grad_o, num_heads), q, k, v, _heads(o.contiguous(), num_heads), lse, 0.0, causal, scale=scale,
        )
        dqkv = [t.transpose(1, 2).reshape(B * T, D) for t in grads]  # token-major: views, no copy
    else:
        q, k, v, mask, keep = _torch_inputs(c, up, bias, kpm, attn_mask, seed_i, num_heads, g, causal,
                                            dropout_p, x)
        grads = dense.attention_grads(_heads(grad_o, num_heads), q, k, v, scale=scale, bias=mask,
                                      dropout_p=dropout_p, keep=keep)
        dqkv = [t.transpose(1, 2).reshape(B * T, D) for t in grads]
    return layout.factor_grads(dqkv, c, x, down, up, g)


@mlra_attention_bwd.register_fake
def _(grad_o, x, down, up, bias, kpm, attn_mask, seed, o, lse, aux, num_heads, latent_groups, causal, dropout_p,
      scale, path):
    return torch.empty_like(x), torch.empty_like(down), torch.empty_like(up), x.new_empty((3 * up.shape[1],))


def _setup_context(ctx, inputs, output):
    x, down, up, bias, kpm, attn_mask, seed, num_heads, latent_groups, causal, dropout_p, scale, path = inputs
    o, lse, aux = output
    ctx.save_for_backward(x, down, up, bias, kpm, attn_mask, seed, o, lse, aux)
    ctx.set_materialize_grads(False)  # lse and aux get no gradient: do not fill zeros for them
    ctx.args = (num_heads, latent_groups, causal, dropout_p, scale, path)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_o, grad_lse, grad_aux):
    x, down, up, bias, kpm, attn_mask, seed, o, lse, aux = ctx.saved_tensors
    if grad_o is None:
        grad_o = torch.zeros_like(o)
    dx, ddown, dup, dbias = mlra_attention_bwd(grad_o, x, down, up, bias, kpm, attn_mask, seed, o, lse, aux,
                                               *ctx.args)
    return dx, ddown, dup, (dbias if ctx.has_bias else None), None, None, None, None, None, None, None, None, None


mlra_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _sdpa_composition(x, down, up, bias, num_heads: int, g: int, causal: bool, dropout_p: float, scale: float):
    """The ``"sdpa"`` path: the latent and up-projection GEMMs, then ``scaled_dot_product_attention`` (on
    the latents where they are at most half a head wide), all differentiated by autograd."""
    B, T, _ = x.shape
    r, D = up.shape[2], up.shape[1]
    dh = D // num_heads
    c = layout.latents(x, down)
    if backend.latent_is_narrow(r, dh, x.device.type):
        q_abs, k, v = _absorbed_attention(c, up, bias, num_heads, g, latent_width(r, x.device))
        z = F.scaled_dot_product_attention(q_abs, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)
        return _lift(z, up, bias, r)
    q, k, v = layout.heads_token_major(c, up, bias, num_heads, g)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)
    return o.transpose(1, 2).reshape(B, T, D)


def mlra_attention(
    x: Tensor,
    down: Tensor,
    up: Tensor,
    bias: Optional[Tensor] = None,
    *,
    num_heads: int,
    latent_groups: int = 1,
    causal: bool = True,
    key_padding_mask: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
) -> Tensor:
    """Multi-head Low-Rank self-attention; returns the concatenated head outputs ``[B, T, H·d_h]``
    (``[B, T, d]`` for a whole layer's heads).

    For each projection ``P`` in (q, k, v): the latent ``c_P = x · A_Pᵀ`` (``g·r`` wide), then per head
    ``P_h = c_P[group(h)] · B_{P,h}ᵀ + b_{P,h}``, then softmax attention with scale ``1/sqrt(d_h)``. The
    output projection ``W_O`` is not applied. On the Triton path the per-head q, k, v never reach memory.

    Args:
        x: ``[B, T, d]`` input (float32, float16 or bfloat16; float64 runs the exact torch path). ``x``,
            ``down``, ``up`` and ``bias`` must share one dtype, except under ``torch.autocast``, which
            first casts them to its dtype (float64 excepted, as autocast does).
        down: ``[3·g·r, d]`` stacked down-projections ``A_Q; A_K; A_V`` in ``nn.Linear`` layout
            (``c = x @ down.T``); inside one projection the ``g`` groups are consecutive blocks of ``r`` rows.
        up: ``[3, H·d_h, r]`` (``H·d_h = d`` for a whole layer); ``up[p, h·d_h:(h+1)·d_h]`` is ``B_{P,h}``
            (``[d_h, r]``). Head ``h`` reads latent group ``h // (H // g)``.
        bias: ``[3·H·d_h]`` or None, ordered q, k, v like ``nn.MultiheadAttention.in_proj_bias``.
        num_heads: ``H``; must divide ``up.shape[1]``, and the head width is ``d_h = up.shape[1] // H``.
        latent_groups: ``g``; must divide ``H``. ``g = 1`` is the paper's form (``W_P = up[p] @ A_P``).
        causal: mask keys after the query (default True).
        key_padding_mask: ``[B, T]``, bool (True = padding, not attended) or float (added to the scores).
        attn_mask: ``[T, T]`` or ``[B·H, T, T]``, bool (True = masked) or float additive, as in
            ``nn.MultiheadAttention``. A general mask runs the ``"torch"`` path (with a warning).
            Masks of other dtypes (integer) raise ``TypeError``.
        dropout_p: dropout on the attention probabilities (default 0). The seed is drawn from torch's
            default CPU generator, so ``torch.manual_seed`` makes a call repeatable.
        scale: score scale, a positive finite float; default ``1/sqrt(d_h)``.

    Raises:
        TypeError: a tensor argument that is not a tensor, a mask of an integer dtype, mismatched
            dtypes, or a non-tensor argument of the wrong type (``num_heads`` not an int, ``scale`` not
            a float, ...). ValueError: a shape, device or value out of range (``scale <= 0``, NaN or
            infinite; ``dropout_p`` outside ``[0, 1)``).

    A query whose keys are all masked outputs zeros. All of ``x``, ``down``, ``up`` and ``bias`` get
    gradients. The K bias cancels in the softmax, so its gradient is zero.

    Head-local (tensor parallelism): the factors of a subset of whole latent groups of a layer's heads
    (``g = 1``: any of its heads), as ``mlra_kernels.ops.mlra.layout`` describes, give those heads' columns
    of the layer's output, and the matching slices of its factors' gradients; ``dx`` is their part of the
    layer's ``dx`` (the sum over the subsets that cover the heads). Dropout draws its own mask per call.

    Converting weights (``g = 1``, rank ``r``): the dense q/k/v weight ``W`` (``[3·d, d]``, ``nn.Linear``
    layout) is ``nn.MultiheadAttention.in_proj_weight`` or GPT-2's ``c_attn.weight.T`` (``Conv1D`` stores
    ``[d, 3·d]``); the bias is ``in_proj_bias`` or ``c_attn.bias`` unchanged. ``factors_from_dense``
    (``mlra_kernels.ops.mlra.layout.factorize``) builds ``down`` and ``up`` from ``W`` by truncated SVD, exact when ``r = d``.

    Paths (``mlra_kernels.ops.mlra.backend``, which ``kernel_path()`` reports with its reason): CUDA
    tensors run cuBLAS GEMMs and SDPA's fastest backend (``"sdpa"``), the Triton kernels with key padding
    or when forced. CPU tensors run plain torch: the GEMMs, then torch's fused CPU
    attention (``"torch-cpu"``); the ``"torch"`` path with the ``T×T`` scores for key padding, dropout,
    float64 or T < 16; or the Triton kernels under the interpreter when ``TRITON_INTERPRET=1`` was set
    before ``triton`` was imported. A mode that keeps a call off the fast path warns once, saying why.
    Switches (``mlra_kernels.ops.mlra.config``): ``MLRA_BACKEND`` forces a path,
    ``MLRA_FWD_VARIANT=auto|rebuild|absorbed`` picks the forward kernel (q/k/v rebuilt from latent tiles
    on chip, or attention on the latent), ``MLRA_AUTOTUNE=0`` skips autotuning.

    Example::

        >>> import torch, mlra_kernels
        >>> B, T, d, H, r = 2, 16, 64, 4, 16
        >>> x = torch.randn(B, T, d)
        >>> down, up = torch.randn(3 * r, d) * 0.1, torch.randn(3, d, r) * 0.1
        >>> mlra_kernels.mlra_attention(x, down, up, num_heads=H).shape
        torch.Size([2, 16, 64])
    """
    layout.check_types(x, down, up, bias, key_padding_mask, attn_mask)
    layout.check_scalars(num_heads, latent_groups, causal, dropout_p, scale)
    num_heads, latent_groups, causal, dropout_p = int(num_heads), int(latent_groups), bool(causal), float(dropout_p)
    x, down, up, bias = layout.autocast(x, down, up, bias)
    layout.check_factors(x, down, up, bias, num_heads, latent_groups)
    layout.check_masks(x, num_heads, key_padding_mask, attn_mask)
    if attn_mask is not None and attn_mask.requires_grad:
        # A learned mask (a position bias) needs its gradient: the dense variant's autograd gives it.
        return dense.mlra_attention_dense(
            x, x, x, down, up, bias, num_heads=num_heads, latent_groups=latent_groups, causal=causal,
            key_padding_mask=key_padding_mask, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale,
        )[0]
    dh = up.shape[1] // num_heads
    choice = backend.choose(x, key_padding_mask=key_padding_mask, dropout_p=dropout_p, attn_mask=attn_mask,
                            rank=up.shape[-1], head_dim=dh)
    backend.warn_if_slow(choice)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(dh)
    if choice.path == "sdpa":
        return _sdpa_composition(x, down, up, bias, num_heads, latent_groups, causal, dropout_p, scale)
    kpm = masks.kernel_key_padding(key_padding_mask)
    if attn_mask is not None:
        attn_mask = attn_mask.detach()
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64) if dropout_p > 0.0 else None
    o, _, _ = mlra_attention_fwd(
        x, down, up, bias, kpm, attn_mask, seed, num_heads, latent_groups, causal, dropout_p, scale, choice.path
    )
    return o
