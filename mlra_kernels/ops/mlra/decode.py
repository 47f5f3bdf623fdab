"""``mlra_decode``: new tokens attending the latent KV cache in the absorbed form (never K or V).

Its paths (:func:`~mlra_kernels.ops.mlra.backend.choose_decode`): the split-KV Triton kernel (CUDA; CPU tensors
under the interpreter, when forced) through the ``mlra::mlra_decode_attn`` custom op, the C++ split-KV kernel
``mlra::latent_decode_cpu`` (CPU float32 and bfloat16), and torch's SDPA on the latents. docs/paths.md says
what each fuses. A layer's whole step on its cache is :func:`~mlra_kernels.ops.mlra.step.decode_step`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mlra_kernels import _ext
from mlra_kernels.ops.mlra import backend, layout, masks


@torch.library.custom_op("mlra::mlra_decode_attn", mutates_args=())
def mlra_decode_attn(
    q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], lengths: Optional[Tensor], t_new: int, causal: bool,
    scale: float,
) -> Tensor:
    """``Z [B, g, M, r]`` from ``q̃ [B, g, M, r]`` and the caches ``[B, g, S, r]`` by the split-KV kernel;
    ``kpm``: additive fp32 ``[B, S]``; ``lengths``: int ``[B]``."""
    from mlra_kernels.ops.mlra import launcher

    launcher.check_interpreter_once()
    return launcher.kernels("decode_kernels").mlra_decode_attention(
        q, k, v, kpm, lengths, t_new=t_new, causal=causal, scale=scale)


@mlra_decode_attn.register_fake
def _(q, k, v, kpm, lengths, t_new, causal, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _check_lengths(cache_seqlens: Optional[Tensor], B: int, t: int, S: Optional[int], device: torch.device) -> None:
    """``cache_seqlens``: an integer ``[B]`` tensor on ``device``, each in ``[t, S]`` (read on the CPU only);
    ``S`` None: all but the values (a callable cache's ``S``, known once it returns)."""
    if cache_seqlens is None:
        return
    if not isinstance(cache_seqlens, Tensor):
        raise TypeError(f"cache_seqlens must be an integer Tensor [B] or None, got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype == torch.bool or cache_seqlens.is_floating_point() or cache_seqlens.is_complex():
        raise TypeError(f"cache_seqlens must be an integer Tensor, got {cache_seqlens.dtype}")
    if cache_seqlens.shape != (B,):
        raise ValueError(f"cache_seqlens must be [B] = [{B}], got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens is on {cache_seqlens.device} but x is on {device}")
    if S is None or device.type != "cpu" or B == 0 or torch.compiler.is_compiling():
        return  # on a GPU the check would wait for the device: the kernel clamps instead (see mlra_decode)
    lengths = cache_seqlens.tolist()  # B numbers: cheaper than a reduction
    if min(lengths) < t or max(lengths) > S:
        b = next(i for i, n in enumerate(lengths) if not t <= n <= S)
        bad = lengths[b]
        raise ValueError(f"cache_seqlens[{b}] = {bad} is outside [t, S] = [{t}, {S}]: each sequence's length counts "
                         "its cached positions, the t new tokens included, and cannot exceed the cache's S positions")


def _check_masks(key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor], B: int, H: int, t: int,
                 S: Optional[int], keys: str = "S") -> None:
    """``key_padding_mask [B, S]`` and ``attn_mask [t, S]`` or ``[B | 1, 1 | H, t, S]``; ``keys`` names ``S`` in
    the messages. ``S`` None: every size but the key positions' (a callable cache's, known once it returns)."""
    if key_padding_mask is not None and not (
        key_padding_mask.dim() == 2 and key_padding_mask.shape[0] == B and (S is None or key_padding_mask.shape[1] == S)
    ):
        raise ValueError(f"key_padding_mask must be [B, {keys}] = [{B}, {keys if S is None else S}], "
                         f"got {tuple(key_padding_mask.shape)}")
    if attn_mask is not None:
        a = attn_mask.shape
        if not ((len(a) == 2 or (len(a) == 4 and a[0] in (1, B) and a[1] in (1, H))) and a[-2] == t
                and (S is None or a[-1] == S)):
            raise ValueError(f"attn_mask must be [t, {keys}] or [B | 1, 1 | H, t, {keys}] with t={t}"
                             f"{'' if S is None else f', {keys}={S}'}, got {tuple(a)}")


def _grouped_caches(x: Tensor, cache_k: Tensor, cache_v: Tensor, B: int, g: int, r: int) -> tuple[Tensor, Tensor]:
    """The caches as ``[B, g, S, r]`` views, after checking their shape, device and dtype against ``x``."""
    grouped = []
    for name, c in (("cache_k", cache_k), ("cache_v", cache_v)):
        ok = isinstance(c, Tensor) and c.dim() in (3, 4) and c.shape[0] == B and (
            (c.dim() == 4 and c.shape[1] == g and c.shape[3] == r) or (c.dim() == 3 and c.shape[2] == g * r))
        if not ok:
            raise ValueError(f"{name} must be [B, g, S, r] = [{B}, {g}, S, {r}] or [B, S, g·r] = [{B}, S, {g * r}], "
                             f"got {tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__}")
        if c.device != x.device:
            raise ValueError(f"{name} is on {c.device} but x is on {x.device}")
        if c.dtype != x.dtype:
            raise TypeError(f"{name} is {c.dtype} but x is {x.dtype}; they must match (or use autocast)")
        grouped.append(c if c.dim() == 4 else c.view(B, c.shape[1], g, r).transpose(1, 2))  # [B, g, S, r]
    return grouped[0], grouped[1]


def mlra_decode(
    x: Tensor,
    down: Tensor,
    up: Tensor,
    bias: Optional[Tensor] = None,
    *,
    cache_k: Tensor,
    cache_v: Tensor,
    num_heads: int,
    latent_groups: int = 1,
    causal: bool = True,
    key_padding_mask: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    cache_seqlens: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Attention of the new tokens ``x`` over the latent cache: ``(out [B, t, H·d_h], weights or None)``.

    Args:
        x: ``[B, t, d]`` new tokens (one for a decode step; all of them for a prefill that wants the
            weights or a general mask).
        down, up, bias: the MLRA factors (layout in ``mlra_kernels.ops.mlra.layout``): a whole layer's, or
            a subset of whole latent groups of its heads (its output is then those heads' columns, and the
            caches hold those groups' latents).
        cache_k, cache_v: cached latents ``c_K, c_V``, the new tokens' included: ``[B, g, S, r]``
            (group-major, read as they are: ``kv_latents(..., group_major=True)`` gives this layout) or
            ``[B, S, g·r]``. Any strides: a view of a preallocated cache works.
        num_heads, latent_groups: ``H`` and ``g``.
        causal: the new tokens are the last ``t`` of the ``S`` positions (of ``cache_seqlens[b]`` when
            given) and see only the keys up to their own (default True). Pass False when ``attn_mask``
            says it all.
        key_padding_mask: ``[B, S]``, bool (True = padding) or float (added).
        attn_mask: ``[t, S]`` or ``[B | 1, 1 | H, t, S]``, bool (True = masked) or float (added).
        scale: score scale; default ``1/sqrt(d_h)``, ``d_h = up.shape[1] // num_heads``.
        dropout_p: dropout on the attention probabilities (torch's default generator).
        need_weights: also return the attention weights ``[B, H, t, S]`` (after dropout).
        cache_seqlens: ``[B]`` integer tensor or None: how many of the ``S`` cached positions each sequence
            uses, the new tokens included. ``t <= cache_seqlens[b] <= S`` is checked on the CPU; on a GPU the
            check would wait for the device, so the kernel clamps instead: it reads the first
            ``min(cache_seqlens[b], S)`` positions (none, and gives zeros, for a length of 0 or less; the
            lengths are read as int32, so larger values wrap). The
            new tokens are the last ``t`` of them; later positions are ignored. With it the caches can be
            the whole preallocated buffers, sequences can have unequal lengths, and on CUDA the kernel's
            grid stays the same from step to step (CUDA graphs).

    Paths (``kernel_path(x, op="decode")`` and ``explain`` say which and why; docs/paths.md): the split-KV
    Triton kernel on CUDA, the C++ split-KV kernel for float32 and bfloat16 CPU tensors, and the torch path
    for a general ``attn_mask``, dropout, ``need_weights`` or gradients (warned once), float16 and float64.

    Returns the head outputs, concatenated, before ``W_O``. A query with every key masked averages the
    values (no NaN), as the dense attention of Hugging Face models does. Differentiable (autograd).

    Example::

        >>> B, d, H, r = 2, 64, 4, 16
        >>> down, up = torch.randn(3 * r, d) * 0.1, torch.randn(3, d, r) * 0.1
        >>> x = torch.randn(B, 1, d)
        >>> c_k, c_v = kv_latents(x, down, 1, group_major=True)  # append to the cache, then attend all of it
        >>> out, _ = mlra_decode(x, down, up, cache_k=c_k, cache_v=c_v, num_heads=H)
        >>> out.shape
        torch.Size([2, 1, 64])
    """
    layout.check_types(x, down, up, bias, key_padding_mask, attn_mask)
    layout.check_scalars(num_heads, latent_groups, causal, dropout_p, scale)
    H, g = int(num_heads), int(latent_groups)
    if isinstance(cache_k, Tensor) and isinstance(cache_v, Tensor):
        x, down, up, bias, cache_k, cache_v = layout.autocast(x, down, up, bias, cache_k, cache_v)
    layout.check_factors(x, down, up, bias, H, g)
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t_, Tensor) and t_.requires_grad for t_ in (x, down, up, bias, cache_k, cache_v, key_padding_mask))
    choice = backend.choose_decode(x, attn_mask=attn_mask, dropout_p=float(dropout_p), need_weights=need_weights,
                                   needs_grad=needs_grad)
    backend.warn_if_slow(choice, "mlra_decode")
    return decode_on(choice.path, x, down, up, bias, cache_k=cache_k, cache_v=cache_v, num_heads=H, latent_groups=g,
                     causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask, scale=scale,
                     dropout_p=dropout_p, need_weights=need_weights, cache_seqlens=cache_seqlens)


def decode_on(
    path: str, x: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor], *, cache_k: Tensor, cache_v: Tensor,
    num_heads: int, latent_groups: int, causal: bool, key_padding_mask: Optional[Tensor],
    attn_mask: Optional[Tensor], scale: Optional[float], dropout_p: float, need_weights: bool,
    cache_seqlens: Optional[Tensor], caches_checked: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """:func:`mlra_decode` on ``path`` (one of ``backend.DECODE_PATHS``, chosen by the caller), with the
    factors already checked against ``x``; the caches, masks and lengths are checked here, unless
    ``caches_checked``: the caller checked them all, and the caches are ``[B, g, S, r]``."""
    H, g = num_heads, latent_groups
    B, t, _ = x.shape
    r, D = up.shape[2], up.shape[1]  # D = H·d_h: d for a whole layer's heads
    dh = D // H
    if caches_checked:
        k, v = cache_k, cache_v
    else:
        k, v = _grouped_caches(x, cache_k, cache_v, B, g, r)
        S = k.shape[2]
        if v.shape[2] != S or S < t:
            raise ValueError(f"cache_k and cache_v must hold the same S >= t={t} positions, got {S} and {v.shape[2]}")
        _check_masks(key_padding_mask, attn_mask, B, H, t, S)
        _check_lengths(cache_seqlens, B, t, S, x.device)
    s = float(scale) if scale is not None else 1.0 / math.sqrt(dh)
    hpg = H // g
    up_q, b_q = layout.projection(up, bias, 0)
    up_v, b_v = layout.projection(up, bias, 2)
    # Heads first with the batch in the rows, so that no weight is copied once per sequence (a matmul
    # broadcast over B would copy each head's B_Q, B_K and B_V: megabytes per step at GPT-2 widths).
    q = layout.expand_rows(layout.latents(x, down[:g * r]).reshape(B * t, g * r), up_q, b_q, H, g)  # [H, B·t, d_h]
    q_abs = torch.bmm(q, up[1].view(H, dh, r))  # q̃ = q · B_K, [H, B·t, r]
    q_abs = q_abs.view(g, hpg, B, t, r).permute(2, 0, 1, 3, 4).reshape(B, g, hpg * t, r)
    weights = None
    if path in backend.DECODE_KERNELS:
        z = latent_attention(path, q_abs, k, v, t=t, scale=s, causal=causal, key_padding_mask=key_padding_mask,
                             cache_seqlens=cache_seqlens)
    else:
        z, weights = _torch_attention(q_abs, k, v, s, B=B, H=H, g=g, t=t, causal=causal,
                                      key_padding_mask=key_padding_mask, attn_mask=attn_mask, lengths=cache_seqlens,
                                      dropout_p=dropout_p, need_weights=need_weights)
    # Z · B_Vᵀ per head, the batch in the rows again: [H, B·t, r] · [H, r, d_h].
    z_h = z.reshape(B, H, t, r).transpose(0, 1).reshape(H, B * t, r)
    up_vt = up_v.view(H, dh, r).transpose(1, 2)
    if b_v is None:
        out = torch.bmm(z_h, up_vt)  # [H, B·t, d_h]
    else:
        out = torch.baddbmm(b_v.view(H, 1, dh), z_h, up_vt)
    return out.view(H, B, t, dh).permute(1, 2, 0, 3).reshape(B, t, D), weights


def _torch_attention(q_abs, k, v, s, *, B, H, g, t, causal, key_padding_mask, attn_mask, lengths, dropout_p,
                     need_weights):
    """The ``"torch"`` path's ``(Z [B, g, (H/g)·t, r], weights or None)``: SDPA on the latents with one
    additive mask, or the scores in memory for dropout and the weights."""
    S = k.shape[2]
    mask = masks.grouped(masks.combine(B, H, t, S, causal=causal, key_padding_mask=key_padding_mask,
                                       attn_mask=attn_mask, dtype=q_abs.dtype, device=q_abs.device,
                                       empty_rows="average", lengths=lengths), H, g, t, S)
    weights = None
    if need_weights or dropout_p > 0.0:
        scores = (q_abs @ k.transpose(-1, -2)) * s  # [B, g, (H/g)·t, S]
        p = torch.softmax(scores + mask if mask is not None else scores, dim=-1)
        if dropout_p > 0.0:
            p = torch.nn.functional.dropout(p, dropout_p)
        if need_weights:  # Z from the returned weights themselves, so a gradient reaches them (retain_grad)
            weights = p.view(B, H, t, S)
            p = weights.view(p.shape)
        z = p @ v
    else:
        z = F.scaled_dot_product_attention(q_abs, k, v, attn_mask=mask, scale=s)  # [B, g, (H/g)·t, r]
    return z, weights


def latent_attention(
    path: str, q_abs: Tensor, k: Tensor, v: Tensor, *, t: int, scale: float, causal: bool = True,
    key_padding_mask: Optional[Tensor] = None, cache_seqlens: Optional[Tensor] = None,
) -> Tensor:
    """``Z [B, g, M, r]`` by one of the decode kernels (``path``: ``"cpu-kernel"``, ``"triton"`` or
    ``"triton-interpreter"``, as :func:`~mlra_kernels.ops.mlra.backend.choose_decode` chose) from
    ``q̃ [B, g, M, r]`` and the caches ``[B, g, S, r]``; inputs as :func:`mlra_decode` checks them. Without
    a loadable extension (warned once) the ``"cpu-kernel"`` path computes the same with torch's SDPA."""
    kpm = masks.kernel_key_padding(key_padding_mask)
    if path == "cpu-kernel":
        if cache_seqlens is not None and cache_seqlens.dtype not in (torch.int32, torch.int64):
            cache_seqlens = cache_seqlens.to(torch.int32)  # the kernel reads int32 or int64 lengths
        if not _ext.decode_kernel_loads():
            B, g, M, _ = q_abs.shape
            return _torch_attention(q_abs, k, v, scale, B=B, H=M // t * g, g=g, t=t, causal=causal,
                                    key_padding_mask=kpm, attn_mask=None, lengths=cache_seqlens, dropout_p=0.0,
                                    need_weights=False)[0].contiguous()
        if k.stride(-1) != 1 or v.stride(-1) != 1:  # a token-major cache of one latent column per group
            k, v = k.contiguous(), v.contiguous()
        return torch.ops.mlra.latent_decode_cpu(q_abs, k, v, kpm, cache_seqlens, t, bool(causal), scale)
    if path in ("triton", "triton-interpreter"):
        return mlra_decode_attn(q_abs, k, v, kpm, cache_seqlens, t, bool(causal), scale)
    raise ValueError(f"latent_attention runs the decode kernels {backend.DECODE_KERNELS}, got path {path!r}")
