"""Public functional call: ``mlra_kernels.mlra_attention``."""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch
from torch import Tensor

from mlra_kernels.ops.mlra import reference as ref
from mlra_kernels.ops.mlra.op import mlra_attention_fwd, warn_once

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_types(x, down, up, bias, key_padding_mask, attn_mask) -> None:
    for name, t in (("x", x), ("down", down), ("up", up)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    for name, t in (("bias", bias), ("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
    for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        if m is not None and m.dtype != torch.bool and not m.is_floating_point():
            raise TypeError(f"only bool and floating types of {name} are supported, got {m.dtype}")


def _check_scalars(num_heads: Any, latent_groups: Any, causal: Any, dropout_p: Any, scale: Any) -> None:
    """Types and ranges of the non-tensor arguments, before anything compares or converts them."""
    for name, v in (("num_heads", num_heads), ("latent_groups", latent_groups)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be a positive int, got {v!r} ({type(v).__name__})")
    if not isinstance(causal, (bool, numbers.Integral)):
        raise TypeError(f"causal must be a bool, got {causal!r} ({type(causal).__name__})")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {dropout_p!r} ({type(dropout_p).__name__})")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a positive float or None, got {scale!r} ({type(scale).__name__})")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float (default 1/sqrt(d_h)), got {scale}")


def _autocast(x, down, up, bias):
    """Cast the floating inputs (not float64, as autocast leaves it) to the autocast dtype when autocast
    is enabled for ``x``'s device; the caller's fp32 leaves then get fp32 gradients through the cast."""
    dev = x.device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return x, down, up, bias
    dt = torch.get_autocast_dtype(dev)

    def cast(t):
        if t is None or not t.is_floating_point() or t.dtype == torch.float64:
            return t
        return t.to(dt)

    return cast(x), cast(down), cast(up), cast(bias)


def _check(x, down, up, bias, num_heads, latent_groups, key_padding_mask, attn_mask, dropout_p) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be a [B, T, d] tensor, got shape {tuple(x.shape)}")
    B, T, d = x.shape
    if T < 1 or B < 1:
        raise ValueError(f"x must have B >= 1 and T >= 1, got shape {tuple(x.shape)}")
    if x.dtype not in _KERNEL_DTYPES + (torch.float64,):
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if num_heads < 1 or d % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide the model width d={d}")
    if latent_groups < 1 or num_heads % latent_groups:
        raise ValueError(f"latent_groups={latent_groups} must divide num_heads={num_heads}")
    if up.dim() != 3 or up.shape[0] != 3 or up.shape[1] != d:
        raise ValueError(f"up must be [3, d={d}, r], got {tuple(up.shape)}")
    r = up.shape[2]
    if not 1 <= r <= d:
        raise ValueError(f"the rank r={r} (up.shape[-1]) must be between 1 and d={d}")
    if down.shape != (3 * latent_groups * r, d):
        raise ValueError(f"down must be [3·g·r, d] = [{3 * latent_groups * r}, {d}], got {tuple(down.shape)}")
    if bias is not None and bias.shape != (3 * d,):
        raise ValueError(f"bias must be [3·d] = [{3 * d}], got {tuple(bias.shape)}")
    for name, t in (("down", down), ("up", up), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; they must match (or use autocast)")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, T):
            raise ValueError(f"key_padding_mask must be [B, T] = [{B}, {T}], got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != x.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but x is on {x.device}")
    if attn_mask is not None:
        if attn_mask.shape not in ((T, T), (B * num_heads, T, T)):
            raise ValueError(
                f"attn_mask must be [T, S] = [{T}, {T}] or [B·H, T, S] = [{B * num_heads}, {T}, {T}], "
                f"got {tuple(attn_mask.shape)}"
            )
        if attn_mask.device != x.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but x is on {x.device}")


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
    """Multi-head Low-Rank self-attention; returns the concatenated head outputs ``[B, T, d]``.

    For each projection ``P`` in (q, k, v): the latent ``c_P = x · A_Pᵀ`` (``g·r`` wide), then per head
    ``P_h = c_P[group(h)] · B_{P,h}ᵀ + b_{P,h}``, then softmax attention with scale ``1/sqrt(d_h)``. The
    output projection ``W_O`` is not applied. On CUDA the per-head q, k, v never reach memory.

    Args:
        x: ``[B, T, d]`` input (float32, float16 or bfloat16; float64 runs the reference). ``x``,
            ``down``, ``up`` and ``bias`` must share one dtype, except under ``torch.autocast``, which
            first casts them to its dtype (float64 excepted, as autocast does).
        down: ``[3·g·r, d]`` stacked down-projections ``A_Q; A_K; A_V`` in ``nn.Linear`` layout
            (``c = x @ down.T``); inside one projection the ``g`` groups are consecutive blocks of ``r`` rows.
        up: ``[3, d, r]``; ``up[p, h·d_h:(h+1)·d_h]`` is ``B_{P,h}`` (``[d_h, r]``). Head ``h`` reads latent
            group ``h // (H // g)``.
        bias: ``[3·d]`` or None, ordered q, k, v like ``nn.MultiheadAttention.in_proj_bias``.
        num_heads: ``H``; must divide ``d``.
        latent_groups: ``g``; must divide ``H``. ``g = 1`` is the paper's form (``W_P = up[p] @ A_P``).
        causal: mask keys after the query (default True).
        key_padding_mask: ``[B, T]``, bool (True = padding, not attended) or float (added to the scores).
        attn_mask: ``[T, T]`` or ``[B·H, T, T]``, bool (True = masked) or float additive, as in
            ``nn.MultiheadAttention``. A general mask runs the pure-torch reference (with a warning).
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

    Converting weights (``g = 1``, rank ``r``): the dense q/k/v weight ``W`` (``[3·d, d]``, ``nn.Linear``
    layout) is ``nn.MultiheadAttention.in_proj_weight`` or GPT-2's ``c_attn.weight.T`` (``Conv1D`` stores
    ``[d, 3·d]``); the bias is ``in_proj_bias`` or ``c_attn.bias`` unchanged. ``factors_from_dense``
    builds ``down`` and ``up`` from ``W`` by truncated SVD, exact when ``r = d``.

    Paths and switches: CUDA tensors run the Triton kernels. CPU tensors run plain torch (the GEMMs,
    then torch's fused CPU attention; the pure-torch reference with key padding, dropout, float64 or
    T < 16), or the Triton kernels under the interpreter when ``TRITON_INTERPRET=1`` was set before
    ``triton`` was imported. ``MLRA_FWD_VARIANT=auto|rebuild|absorbed`` picks the forward kernel (q/k/v rebuilt
    from latent tiles on chip, or attention on the latent); ``MLRA_AUTOTUNE=0`` skips autotuning.

    Example::

        >>> import torch, mlra_kernels
        >>> B, T, d, H, r = 2, 16, 64, 4, 16
        >>> x = torch.randn(B, T, d)
        >>> down, up = torch.randn(3 * r, d) * 0.1, torch.randn(3, d, r) * 0.1
        >>> mlra_kernels.mlra_attention(x, down, up, num_heads=H).shape
        torch.Size([2, 16, 64])
    """
    _check_types(x, down, up, bias, key_padding_mask, attn_mask)
    _check_scalars(num_heads, latent_groups, causal, dropout_p, scale)
    num_heads, latent_groups, causal, dropout_p = int(num_heads), int(latent_groups), bool(causal), float(dropout_p)
    x, down, up, bias = _autocast(x, down, up, bias)
    _check(x, down, up, bias, num_heads, latent_groups, key_padding_mask, attn_mask, dropout_p)
    dh = x.shape[-1] // num_heads
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(dh)

    if attn_mask is not None:
        if not torch.compiler.is_compiling():
            warn_once(
                "attn_mask",
                "mlra_attention: a general attn_mask is not fused into the Triton kernel; this call runs the "
                "pure-torch reference (T×T scores in memory). Causal and key_padding_mask are fused.",
            )
        return ref.mlra_attention_reference(
            x, down, up, bias, num_heads=num_heads, latent_groups=latent_groups, causal=causal,
            key_padding_mask=key_padding_mask, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale,
        )

    kpm = None
    if key_padding_mask is not None:
        if key_padding_mask.dtype == torch.bool:
            kpm = torch.zeros(key_padding_mask.shape, dtype=torch.float32, device=x.device)
            kpm = kpm.masked_fill(key_padding_mask, float("-inf"))
        else:
            kpm = key_padding_mask.detach().to(torch.float32).contiguous()
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64) if dropout_p > 0.0 else None
    o, _ = mlra_attention_fwd(
        x, down, up, bias, kpm, seed, num_heads, latent_groups, bool(causal), float(dropout_p), scale
    )
    return o


def factors_from_dense(
    weight: Tensor, bias: Optional[Tensor] = None, *, num_heads: int, rank: int, latent_groups: int = 1
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(down [3·g·r, d], up [3, d, r], bias)`` from a dense q/k/v weight ``[3·d, d]`` by truncated SVD.

    Each group's block of rows ``W_P[group rows]`` (``[d/g, d]``) is factored as ``U·S·Vᵀ``; its
    up-rows are ``U_r·sqrt(S_r)`` and its down-block is ``sqrt(S_r)·V_rᵀ``. Exact when ``rank`` reaches
    the rank of every block (``rank = d`` with ``g = 1``). A weight on the meta device gives
    uninitialised factors on the meta device.
    """
    d = weight.shape[1]
    if weight.shape != (3 * d, d):
        raise ValueError(f"weight must be [3·d, d], got {tuple(weight.shape)}")
    g, r = latent_groups, rank
    if num_heads % g or d % num_heads:
        raise ValueError(f"latent_groups={g} must divide num_heads={num_heads}, which must divide d={d}")
    if weight.is_meta:  # shapes only (a model built with empty weights): nothing to factorise yet
        meta = dict(device=weight.device, dtype=weight.dtype)
        return torch.empty(3 * g * r, d, **meta), torch.empty(3, d, r, **meta), bias
    w = weight.detach().double().view(3, g, d // g, d)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # [3, g, d/g, k], [3, g, k], [3, g, k, d]
    k = s.shape[-1]
    if r > k:
        pad = r - k
        u = torch.nn.functional.pad(u, (0, pad))
        s = torch.nn.functional.pad(s, (0, pad))
        vh = torch.nn.functional.pad(vh, (0, 0, 0, pad))
    root = s[..., :r].sqrt()
    up = (u[..., :r] * root[..., None, :]).reshape(3, d, r)
    down = (root[..., None] * vh[..., :r, :]).reshape(3 * g * r, d)
    return down.to(weight.dtype), up.to(weight.dtype), bias
