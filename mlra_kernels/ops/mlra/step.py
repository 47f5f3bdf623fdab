"""``decode_step``: a layer's whole decode step on its latent cache, the output projection included.

It is a Python function, not a ``torch.library`` custom op: a step is short, and a custom op's Python
dispatch costs about as much as a small layer's whole step on the CPU. What it calls are registered ops
(the C++ ``mlra::latent_decode_step_cpu`` and ``mlra::latent_decode_cpu``, whose schemas declare the cache
writes, and the Triton ``mlra::mlra_decode_attn``), so ``torch.compile`` traces a step through it.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from mlra_kernels import _ext
from mlra_kernels.ops.mlra import backend, layout
from mlra_kernels.ops.mlra.decode import _check_lengths, _check_masks, _grouped_caches, decode_on, latent_attention
from mlra_kernels.ops.mlra.step_weights import StepWeights, StepWeightsMemo, step_weights


class LatentCache(NamedTuple):
    """A preallocated latent cache, written in place by :func:`decode_step`: the new tokens' ``c_K, c_V`` go
    to positions ``[pos, pos + t)`` of every sequence and ``seqlens`` grows by ``t``."""

    k: Tensor  # [B, g, capacity, r]
    v: Tensor  # [B, g, capacity, r], k's shape
    seqlens: Tensor  # int32 [B], on k's device: the positions filled, pos for every sequence
    pos: int  # the positions filled, on the host


class OutputProjection(NamedTuple):
    """The output projection's weights that :func:`decode_step` may fold into its step weights."""

    weight: Tensor  # W_O [d, H·d_h] (nn.Linear's layout), or [H·d_h, d] with transposed (a Conv1D)
    bias: Optional[Tensor]  # [d]
    transposed: bool = False


# A cache that writes itself: called with the new tokens' latents [B, g, t, r], returns everything cached.
CacheUpdate = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def decode_step(
    x: Tensor,
    down: Tensor,
    up: Tensor,
    bias: Optional[Tensor] = None,
    *,
    cache: Union[LatentCache, CacheUpdate],
    num_heads: int,
    latent_groups: int = 1,
    out_proj: Optional[Callable[[Tensor], Tensor]] = None,
    out_weights: Optional[OutputProjection] = None,
    memo: Optional[StepWeightsMemo] = None,
    scale: Optional[float] = None,
    causal: bool = True,
    key_padding_mask: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    cache_seqlens: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """One layer's decode step: the new tokens' latents into the cache, their attention over it, and the
    output projection. Returns ``(out, weights or None)``.

    The path is chosen once (:func:`~mlra_kernels.ops.mlra.backend.choose_decode`). On a decode kernel
    path, in eager mode without autocast, with ``x`` in the factors' dtype, ``out_weights`` given and no
    gradient wanted for them, the step runs on the pre-multiplied step weights
    (:func:`~mlra_kernels.ops.mlra.step_weights.step_weights`, kept in ``memo``): on the CPU in float32
    with a :class:`LatentCache`, causal and without key padding, as one call of the C++ op
    ``mlra::latent_decode_step_cpu``. Otherwise it runs :func:`~mlra_kernels.ops.mlra.kv_latents`, the
    cache write, ``mlra_decode`` on the chosen path and the output projection.

    Args:
        x: ``[B, t, d]`` new tokens.
        down, up, bias: the MLRA factors of the layer, or of a subset of whole latent groups of its heads
            (layout in ``mlra_kernels.ops.mlra.layout``: ``up [3, H·d_h, r]``, those groups' rows of
            ``down``, ``bias [3·H·d_h]``).
        cache: a :class:`LatentCache` (written in place; the caller counts the ``t`` positions on its
            host side), or a callable that writes the latents ``[B, g, t, r]`` into the caller's cache
            and returns everything cached, ``[B, g, S, r]`` each. Every argument is checked before the
            cache is written, so a refused call leaves a :class:`LatentCache` and its ``seqlens`` as they
            were; a callable cache's ``S`` is known only once it returns, and what depends on it (the
            masks' key positions, ``cache_seqlens``' values) is checked then. ``seqlens == pos`` is
            checked on the CPU; on a GPU the check would wait for the device, so it is the caller's
            contract there (as ``cache_seqlens`` is for :func:`mlra_decode`).
        num_heads, latent_groups: ``H`` and ``g`` of these factors.
        out_proj: applied to the head outputs ``[B, t, H·d_h]`` when the step does not fold them into
            ``W_O``; None: ``out_weights`` are applied (or, without them, the head outputs returned).
        out_weights: the weights of ``out_proj`` that the step may fold (None: it may not). For a subset
            of heads, ``W_O``'s columns of those heads (``[d, H·d_h]``): the subsets' outputs sum to the
            layer's. Give ``b_O`` to exactly one subset.
        memo: keeps the step weights between steps (cleared by the caller when the weights may have
            changed without a version counter moving); without one they are formed at every call.
        scale: score scale; default ``1/sqrt(d_h)``, ``d_h = up.shape[1] // num_heads``.
        causal, key_padding_mask, attn_mask, dropout_p, need_weights: as :func:`mlra_decode`; with a
            :class:`LatentCache` the masks' key positions are its capacity (``key_padding_mask [B, capacity]``,
            ``attn_mask [t, capacity]`` or ``[B | 1, 1 | H, t, capacity]``).
        cache_seqlens: ``[B]`` lengths of the sequences in the cache, the new tokens included, with a
            callable ``cache`` only (a :class:`LatentCache` brings its own ``seqlens``; giving both is
            an error).

    Example::

        >>> B, d, H, r, cap = 2, 64, 4, 16, 32
        >>> down, up = torch.randn(3 * r, d) * 0.1, torch.randn(3, d, r) * 0.1
        >>> w_o = torch.randn(d, d) * 0.1
        >>> k, v = torch.zeros(B, 1, cap, r), torch.zeros(B, 1, cap, r)
        >>> seqlens = torch.zeros(B, dtype=torch.int32)
        >>> out, _ = decode_step(torch.randn(B, 1, d), down, up, cache=LatentCache(k, v, seqlens, 0), num_heads=H,
        ...                      out_weights=OutputProjection(w_o, None), memo=StepWeightsMemo())
        >>> out.shape, seqlens.tolist()
        (torch.Size([2, 1, 64]), [1, 1])
    """
    layout.check_types(x, down, up, bias, key_padding_mask, attn_mask)
    buffers = isinstance(cache, LatentCache)
    if buffers and cache_seqlens is not None:
        raise ValueError("cache_seqlens is for a callable cache; a LatentCache counts its sequences in its own "
                         "seqlens: pass cache_seqlens=None")
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or down.requires_grad or up.requires_grad or (bias is not None and bias.requires_grad)
        or (key_padding_mask is not None and key_padding_mask.requires_grad)
        or (buffers and (cache.k.requires_grad or cache.v.requires_grad)))
    choice = backend.choose_decode(x, attn_mask=attn_mask, dropout_p=float(dropout_p), need_weights=need_weights,
                                   needs_grad=needs_grad)
    backend.warn_if_slow(choice, "mlra_decode")
    path = choice.path
    if out_weights is not None and path in backend.DECODE_KERNELS and _folds(x, down, out_weights):
        w = _weights(memo, x, down, up, bias, out_weights, num_heads, latent_groups, scale, causal, dropout_p)
        s = float(scale) if scale is not None else 1.0 / math.sqrt(up.shape[1] // w.num_heads)
        return _fused_step(path, x, w, cache, scale=s, causal=causal, key_padding_mask=key_padding_mask,
                           cache_seqlens=cache_seqlens), None

    layout.check_scalars(num_heads, latent_groups, causal, dropout_p, scale)
    H, g = int(num_heads), int(latent_groups)
    layout.check_factors(*layout.autocast(x, down, up, bias), H, g)
    if buffers:
        _check_latent_cache(x, cache, g, up.shape[2], H, key_padding_mask, attn_mask)
    else:
        _check_before_update(x, H, key_padding_mask, attn_mask, cache_seqlens)
    c_k, c_v = layout.kv_latents(x, down, g, group_major=True)  # [B, g, t, r] each
    k, v, lengths = _write(cache, c_k, c_v, cache_seqlens, attend_all=path in backend.DECODE_KERNELS)
    if buffers and k.shape[2] < cache.k.shape[2]:  # the filled part: the masks' positions too
        end = k.shape[2]
        key_padding_mask = key_padding_mask[:, :end] if key_padding_mask is not None else None
        attn_mask = attn_mask[..., :end] if attn_mask is not None else None
    x_, down_, up_, bias_, k, v = layout.autocast(x, down, up, bias, k, v)
    y, weights = decode_on(path, x_, down_, up_, bias_, cache_k=k, cache_v=v, num_heads=H, latent_groups=g,
                           causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask, scale=scale,
                           dropout_p=dropout_p, need_weights=need_weights, cache_seqlens=lengths,
                           caches_checked=buffers)  # by _check_latent_cache; a callable's return is not yet
    if out_proj is not None:
        return out_proj(y), weights
    if out_weights is not None:
        w_o = out_weights.weight.t() if out_weights.transposed else out_weights.weight
        return F.linear(y, w_o, out_weights.bias), weights
    return y, weights


def _folds(x: Tensor, down: Tensor, out: OutputProjection) -> bool:
    """Whether the step may run on step weights: eager (a compiled step traces the op by op path, whose
    products the compiler keeps in its graph), no autocast, ``x`` in the factors' dtype, no gradient wanted
    for ``W_O`` (the step weights are products without a graph), and not while a CUDA graph is captured
    (it would keep the products of the weights it was captured with)."""
    if torch.compiler.is_compiling() or x.dtype != down.dtype or torch.is_autocast_enabled(x.device.type):
        return False
    if torch.is_grad_enabled() and (out.weight.requires_grad or (out.bias is not None and out.bias.requires_grad)):
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _weights(memo, x, down, up, bias, out: OutputProjection, num_heads, latent_groups, scale, causal,
             dropout_p) -> StepWeights:
    """The step weights, from ``memo`` where it holds them for these tensors; the arguments are checked
    when they are formed (a memo hit is the same tensors, so the same shapes)."""
    if memo is not None:
        w = memo.lookup(down, up, bias, out.weight, out.bias, num_heads=num_heads, latent_groups=latent_groups,
                        out_weight_transposed=out.transposed)
        if w is not None:
            return w
    layout.check_scalars(num_heads, latent_groups, causal, dropout_p, scale)
    layout.check_factors(x, down, up, bias, int(num_heads), int(latent_groups))
    if memo is not None:
        return memo.get(down, up, bias, out.weight, out.bias, num_heads=int(num_heads),
                        latent_groups=int(latent_groups), out_weight_transposed=out.transposed)
    w_o = out.weight.t() if out.transposed else out.weight
    return step_weights(down, up, bias, w_o, out.bias, num_heads=int(num_heads), latent_groups=int(latent_groups))


def _fused_step(path: str, x: Tensor, w: StepWeights, cache, *, scale: float, causal: bool,
                key_padding_mask: Optional[Tensor], cache_seqlens: Optional[Tensor]) -> Tensor:
    """The step on the step weights: the C++ whole-step op where it applies, else one GEMM for q̃, c_K
    and c_V, the cache write, the kernel, and one GEMM (or two) for the output."""
    t = x.shape[1]
    if (path == "cpu-kernel" and isinstance(cache, LatentCache) and causal and key_padding_mask is None
            and x.dtype == torch.float32 and _ext.step_op_loads()):
        # Writes the latents at [pos, pos + t) and grows seqlens by t, after checking every argument itself.
        return torch.ops.mlra.latent_decode_step_cpu(
            x, w.w_in, w.b_in, w.m, w.beta, w.w_v, w.b_v, w.w_out, w.b_out, cache.k, cache.v, cache.seqlens,
            cache.pos, w.num_heads, scale)
    B, r = x.shape[0], w.rank
    if isinstance(cache, LatentCache):
        _check_latent_cache(x, cache, w.latent_groups, r, w.num_heads, key_padding_mask, None)
    else:
        _check_before_update(x, w.num_heads, key_padding_mask, None, cache_seqlens)
    q_abs, c_k, c_v = step_latents(x, w)
    k, v, lengths = _write(cache, c_k, c_v, cache_seqlens, attend_all=True)
    if not isinstance(cache, LatentCache):  # what the callable returned, as mlra_decode checks it
        k, v = _grouped_caches(x, k, v, B, w.latent_groups, r)
        _check_masks(key_padding_mask, None, B, w.num_heads, t, k.shape[2])
    z = latent_attention(path, q_abs, k, v, t=t, scale=scale, causal=causal, key_padding_mask=key_padding_mask,
                         cache_seqlens=lengths)
    return step_output(z, w, t)


def _check_latent_cache(x: Tensor, cache: LatentCache, g: int, r: int, num_heads: int,
                        key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor]) -> None:
    """Everything a step on ``cache`` reads or writes, before anything is written: its buffers
    ``[B, g, capacity, r]`` on ``x``'s device in its dtype (each cast as autocast casts them), the new
    positions within the capacity, ``seqlens`` int32 ``[B]`` (equal to ``pos``: checked on the CPU only,
    where reading it does not wait for a device), and the masks' key positions, the capacity. It runs at
    every step of every layer: the common case is a few comparisons, the messages are formed only to raise."""
    xs, device = x.shape, x.device
    B, t = xs[0], xs[1]
    k, v, seqlens, pos = cache
    ks = k.shape if isinstance(k, Tensor) else None
    if not (ks is not None and len(ks) == 4 and ks[0] == B and ks[1] == g and ks[3] == r
            and isinstance(v, Tensor) and v.shape == ks):
        for name, c in (("cache.k", k), ("cache.v", v)):
            if not (isinstance(c, Tensor) and c.dim() == 4 and c.shape[0] == B and c.shape[1] == g
                    and c.shape[3] == r):
                raise ValueError(f"{name} must be [B, g, capacity, r] = [{B}, {g}, capacity, {r}], "
                                 f"got {tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__}")
        raise ValueError(f"cache.v must have the shape of cache.k, {tuple(ks)}, got {tuple(v.shape)}")
    if k.device != device or v.device != device:
        name, c = ("cache.k", k) if k.device != device else ("cache.v", v)
        raise ValueError(f"{name} is on {c.device} but x is on {device}")
    if k.dtype != x.dtype or v.dtype != x.dtype:
        for name, c in (("cache.k", k), ("cache.v", v)):
            if _cast(x, c.dtype) != _cast(x, x.dtype):
                raise TypeError(f"{name} is {c.dtype} but x is {x.dtype}; they must match (or use autocast)")
    capacity = ks[2]
    if pos < 0 or pos + t > capacity:
        raise ValueError(f"the cache holds {capacity} positions; pos={pos} + t={t} new tokens do not fit")
    if not isinstance(seqlens, Tensor) or seqlens.dtype != torch.int32:
        got = seqlens.dtype if isinstance(seqlens, Tensor) else type(seqlens).__name__
        raise TypeError(f"cache.seqlens must be an int32 Tensor [B], got {got}")
    if seqlens.shape != (B,):
        raise ValueError(f"cache.seqlens must be [B] = [{B}], got {tuple(seqlens.shape)}")
    if seqlens.device != device:
        raise ValueError(f"cache.seqlens is on {seqlens.device} but x is on {device}")
    if x.is_cpu and not torch.compiler.is_compiling():
        lengths = seqlens.tolist()  # B numbers
        if lengths.count(pos) != B:
            b = next(i for i, n in enumerate(lengths) if n != pos)
            raise ValueError(f"seqlens[{b}] = {lengths[b]} differs from pos={pos}: the step writes the new tokens at "
                             "positions [pos, pos + t) of every sequence, so every sequence must hold pos positions")
    if key_padding_mask is not None or attn_mask is not None:
        _check_masks(key_padding_mask, attn_mask, B, num_heads, t, capacity, keys="capacity")


def _check_before_update(x: Tensor, num_heads: int, key_padding_mask: Optional[Tensor],
                         attn_mask: Optional[Tensor], cache_seqlens: Optional[Tensor]) -> None:
    """What a step with a callable cache can check before the callable writes: all but the key positions."""
    B, t = x.shape[0], x.shape[1]
    _check_masks(key_padding_mask, attn_mask, B, num_heads, t, None)
    if cache_seqlens is not None:
        _check_lengths(cache_seqlens, B, t, None, x.device)


def _cast(x: Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype that :func:`~mlra_kernels.ops.mlra.layout.autocast` gives a tensor of ``dtype`` for ``x``."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev) and dtype.is_floating_point and dtype != torch.float64:
        return torch.get_autocast_dtype(dev)
    return dtype


def _write(cache, c_k: Tensor, c_v: Tensor, cache_seqlens: Optional[Tensor], *,
           attend_all: bool) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Write the new latents ``[B, g, t, r]``; returns ``(k, v, lengths)`` to attend: a
    :class:`LatentCache`'s whole buffers with its seqlens for a kernel (``attend_all``), which skips the
    unused positions itself, or views of its filled part for the torch path; a callable cache's return."""
    if not isinstance(cache, LatentCache):
        k, v = cache(c_k, c_v)
        return k, v, cache_seqlens
    t, end = c_k.shape[2], cache.pos + c_k.shape[2]  # checked by _check_latent_cache
    cache.k.narrow(2, cache.pos, t).copy_(c_k)
    cache.v.narrow(2, cache.pos, t).copy_(c_v)
    cache.seqlens.add_(t)
    if attend_all:
        return cache.k, cache.v, cache.seqlens
    return cache.k.narrow(2, 0, end), cache.v.narrow(2, 0, end), None


def step_latents(x: Tensor, w: StepWeights) -> tuple[Tensor, Tensor, Tensor]:
    """``(q̃ [B, g, (H/g)·t, r], c_K [B, g, t, r], c_V [B, g, t, r])`` of the new tokens ``x`` ``[B, t, d]``
    (views where they can be): one GEMM for the query part and both latents."""
    B, t, d = x.shape
    H, g, r = w.num_heads, w.latent_groups, w.rank
    hpg, gr = H // g, g * r
    y = F.linear(x, w.w_in, w.b_in)  # [B, t, n_q + 2·g·r]
    n_q = y.shape[-1] - 2 * gr
    lat = y[..., n_q:].view(B, t, 2, g, r)
    c_k, c_v = lat[:, :, 0].transpose(1, 2), lat[:, :, 1].transpose(1, 2)
    if w.m is None:  # q̃ itself: [B, t, (group, head, r)]
        q = y[..., :n_q].view(B, t, g, hpg, r)
    else:
        c_q = y[..., :gr].reshape(B * t, g, r).transpose(0, 1)  # [g, B·t, r]
        m = w.m.transpose(1, 2)
        q = torch.bmm(c_q, m) if w.beta is None else torch.baddbmm(w.beta.unsqueeze(1), c_q, m)  # [g, B·t, (head, r)]
        q = q.view(g, B, t, hpg, r).permute(1, 2, 0, 3, 4)
    return q.permute(0, 2, 3, 1, 4).reshape(B, g, hpg * t, r), c_k, c_v


def step_output(z: Tensor, w: StepWeights, t: int) -> Tensor:
    """The layer's output ``[B, t, d]`` (``W_O`` and its bias applied) from ``Z`` ``[B, g, (H/g)·t, r]``."""
    B = z.shape[0]
    H, g, r = w.num_heads, w.latent_groups, w.rank
    z5 = z.view(B, g, H // g, t, r)
    if w.w_v is None:
        return F.linear(z5.permute(0, 3, 1, 2, 4).reshape(B, t, H * r), w.w_out, w.b_out)
    z_h = z5.permute(1, 2, 0, 3, 4).reshape(H, B * t, r)
    w_v = w.w_v.transpose(1, 2)
    o = torch.bmm(z_h, w_v) if w.b_v is None else torch.baddbmm(w.b_v.unsqueeze(1), z_h, w_v)  # [H, B·t, d_h]
    width = H * o.shape[-1]  # H·d_h
    return F.linear(o.view(H, B, t, -1).permute(1, 2, 0, 3).reshape(B, t, width), w.w_out, w.b_out)
