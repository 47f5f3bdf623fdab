"""The prefill variant: causal (or full) self-attention over a whole sequence, for training and for the
prefill of generation. Its public call :func:`mlra_attention` checks its arguments, asks
``backend.choose`` for a path and runs that path's entry in ``backend.PREFILL_OPS``; each path is one
file ``path_<name>.py`` with its own custom ops (DESIGN.md, "The prefill op layer")."""

from __future__ import annotations

import math
from typing import Optional

from torch import Tensor

from mlra_kernels.ops.mlra import backend, dense, layout, masks


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
    (``mlra_kernels.ops.mlra.layout.factorize``) builds ``down`` and ``up`` from ``W`` by truncated SVD,
    exact when ``r = d``.

    Paths (``mlra_kernels.ops.mlra.backend``, which ``kernel_path()`` reports with its reason): CUDA
    tensors run cuBLAS GEMMs and SDPA's fastest backend (``"sdpa"``), the Triton kernels with key padding
    or when forced. CPU tensors run plain torch: the GEMMs, then torch's fused CPU attention
    (``"torch-cpu"``; on the latents where they are at most half a head wide, ``"torch-cpu-latent"``); the
    ``"torch"`` path with the ``T×T`` scores for key padding, dropout,
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
    kpm = masks.kernel_key_padding(key_padding_mask)
    if attn_mask is not None:
        attn_mask = attn_mask.detach()
    return backend.PREFILL_OPS[choice.path](x, down, up, bias, kpm, attn_mask, num_heads, latent_groups, causal,
                                            dropout_p, scale)
