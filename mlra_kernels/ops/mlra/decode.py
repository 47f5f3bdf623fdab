"""The decoding variant: a few new tokens attending the latent KV cache, in the absorbed form.

A decode step never needs K or V: with ``q̃_h = q_h · B_{K,h}`` (``r`` wide) the scores are
``q̃_h · c_Kᵀ`` (the K bias adds the same value to every key of a query and drops out of the softmax),
and the output is ``(P · c_V) · B_{V,h}ᵀ + b_{V,h}``. All heads of a latent group attend the group's
cached latents as one batched product, so each cached number is read once per step, not once per head.

The caller keeps the cache: it stores :func:`~mlra_kernels.ops.mlra.layout.kv_latents` of the new
tokens, then passes everything cached (the new tokens included) to :func:`mlra_decode`. A group-major
cache (``[B, g, S, r]``) is read in place; a token-major one (``[B, S, g·r]``) is read through a
strided view, which torch's attention may copy first.

Two implementations of the attention on the latents, chosen per call by
:func:`mlra_kernels.ops.mlra.backend.choose_decode` (``kernel_path(x, op="decode")`` says which and why):

- ``"triton"`` (CUDA, the default there) / ``"triton-interpreter"`` (CPU, when forced): the split-KV
  kernel of ``decode_kernels``, through the ``mlra::mlra_decode_attn`` custom op (so ``torch.compile``
  traces it). Its grid depends on the cache capacity, not on ``cache_seqlens``: with a preallocated cache
  and ``cache_seqlens`` a step can be captured in a CUDA graph. Forward only; causal, key padding and
  ``cache_seqlens`` are fused.
- ``"cpu-kernel"`` (CPU fp32 and bf16 tensors, the default there; a bf16 cache is read as it is, the
  arithmetic is fp32): the C++ split-KV kernel of the compiled
  extension (``csrc/decode/decode_cpu.cpp``), through the ``mlra::mlra_decode_attn_cpu`` custom op. It
  scores every row of a group against each cached latent while that latent is in the core's cache, splits
  the positions across threads (one sequence still uses every core) and fuses causal masking, key padding
  and ``cache_seqlens``, like the CUDA kernel.
- ``"torch"``: torch's SDPA on the latents with one additive mask (CPU and GPU): a general ``attn_mask``,
  dropout, ``need_weights``, gradients, float64, and on the CPU float16 run here.
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mlra_kernels._warnings import warn_once
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


# Whether the compiled extension loaded: empty before the first try, then [True] or [False] (a build that
# is present but cannot load is tried once, not at every step).
_EXTENSION_LOADS: list = []


def _extension_loads() -> bool:
    if not _EXTENSION_LOADS:
        from mlra_kernels import _ext

        why = None
        try:
            _ext.load()
        except _ext.ExtensionNotAvailableError as err:
            why = str(err)
        else:
            if not hasattr(torch.ops.mlra, "latent_decode_cpu"):  # a _C built from older sources
                why = (f"mlra_kernels._C has no mlra::latent_decode_cpu: it was built from older sources; run "
                       f"`{_ext.BUILD_COMMAND}` in the source checkout")
        _EXTENSION_LOADS.append(why is None)
        if why is not None:
            warn_once("decode-cpu-kernel-missing", f"mlra_decode: the C++ decode kernel is not available ({why}); "
                      "running torch's SDPA on the latents instead, which is slower.")
    return _EXTENSION_LOADS[0]


# Whether the loaded extension has the whole-step op (a _C built before it has only the attention).
_STEP_OP: list = []
_STEP_OP_NAME = "latent_decode_step_cpu"


def step_op_loads() -> bool:
    """Whether ``mlra::latent_decode_step_cpu`` (a layer's whole CPU step in one call) is there; a build
    without it warns once: the step then runs op by op from Python, which costs more per layer."""
    if not _STEP_OP:
        ok = _extension_loads() and hasattr(torch.ops.mlra, _STEP_OP_NAME)
        _STEP_OP.append(ok)
        if _EXTENSION_LOADS[0] and not ok:
            from mlra_kernels import _ext

            warn_once("decode-step-op-missing", "the CPU decode step runs op by op from Python: mlra_kernels._C has "
                      f"no mlra::latent_decode_step_cpu (built from older sources; run `{_ext.BUILD_COMMAND}`).")
    return _STEP_OP[0]


@torch.library.custom_op("mlra::mlra_decode_attn_cpu", mutates_args=())
def mlra_decode_attn_cpu(
    q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], lengths: Optional[Tensor], t_new: int, causal: bool,
    scale: float,
) -> Tensor:
    """``Z [B, g, M, r]`` from ``q̃ [B, g, M, r]`` and the caches ``[B, g, S, r]`` (fp32 or bf16 CPU tensors
    of one dtype, unit stride in ``r``) by the C++ split-KV kernel ``mlra::latent_decode_cpu`` of the compiled extension;
    ``kpm``: additive fp32 ``[B, S]``; ``lengths``: int32 or int64 ``[B]``. Without a loadable extension
    it warns once and computes the same with torch's SDPA and decode's masks."""
    if _extension_loads():
        return torch.ops.mlra.latent_decode_cpu(q, k, v, kpm, lengths, t_new, causal, scale)
    B, g, M, _ = q.shape
    H, S = M // t_new * g, k.shape[2]
    mask = masks.grouped(masks.combine(B, H, t_new, S, causal=causal, key_padding_mask=kpm, attn_mask=None,
                                       dtype=q.dtype, device=q.device, empty_rows="average", lengths=lengths),
                         H, g, t_new, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).contiguous()


@mlra_decode_attn_cpu.register_fake
def _(q, k, v, kpm, lengths, t_new, causal, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _cpu_decode_attention(q, k, v, kpm, lengths, t_new: int, causal: bool, scale: float) -> Tensor:
    """The ``"cpu-kernel"`` path's ``Z``: in eager mode the C++ op itself (a decode step is short, and the
    custom op's Python dispatch costs about as much as a small layer's attention), under
    ``torch.compile`` the custom op, which the compiler sees as one opaque call."""
    if lengths is not None and lengths.dtype not in (torch.int32, torch.int64):
        lengths = lengths.to(torch.int32)  # the kernel reads int32 or int64 lengths
    if not torch.compiler.is_compiling() and _extension_loads():
        return torch.ops.mlra.latent_decode_cpu(q, k, v, kpm, lengths, t_new, causal, scale)
    return mlra_decode_attn_cpu(q, k, v, kpm, lengths, t_new, causal, scale)


def _check_lengths(cache_seqlens: Optional[Tensor], B: int, t: int, S: int, device: torch.device) -> None:
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
    if device.type != "cpu" or B == 0 or torch.compiler.is_compiling():
        return  # on a GPU the check would wait for the device: the kernel clamps instead (see mlra_decode)
    lengths = cache_seqlens.tolist()  # B numbers: cheaper than a reduction
    if min(lengths) < t or max(lengths) > S:
        b = next(i for i, n in enumerate(lengths) if not t <= n <= S)
        bad = lengths[b]
        raise ValueError(f"cache_seqlens[{b}] = {bad} is outside [t, S] = [{t}, {S}]: each sequence's length counts "
                         "its cached positions, the t new tokens included, and cannot exceed the cache's S positions")


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

    Paths (``kernel_path(x, op="decode")`` and ``explain`` say which and why): on CUDA the split-KV
    Triton kernel, on CPU float32 and bfloat16 tensors the C++ split-KV kernel, unless a general
    ``attn_mask``, dropout, ``need_weights`` or gradients ask for the torch path (warned once); float16
    and float64 on the CPU run the torch path (the Triton kernel runs on CPU tensors under ``TRITON_INTERPRET=1`` with
    ``use_backend("triton-interpreter")``). ``MLRA_BACKEND=torch`` forces the torch path.

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
    B, t, _ = x.shape
    r, D = up.shape[2], up.shape[1]  # D = H·d_h: d for a whole layer's heads
    dh = D // H
    k, v = _grouped_caches(x, cache_k, cache_v, B, g, r)
    S = k.shape[2]
    if v.shape[2] != S or S < t:
        raise ValueError(f"cache_k and cache_v must hold the same S >= t={t} positions, got {S} and {v.shape[2]}")
    if key_padding_mask is not None and key_padding_mask.shape != (B, S):
        raise ValueError(f"key_padding_mask must be [B, S] = [{B}, {S}], got {tuple(key_padding_mask.shape)}")
    if attn_mask is not None and not (
        attn_mask.shape == (t, S)
        or (attn_mask.dim() == 4 and attn_mask.shape[0] in (1, B) and attn_mask.shape[1] in (1, H)
            and attn_mask.shape[2:] == (t, S))
    ):
        raise ValueError(f"attn_mask must be [t, S] or [B | 1, 1 | H, t, S] with t={t}, S={S}, "
                         f"got {tuple(attn_mask.shape)}")
    _check_lengths(cache_seqlens, B, t, S, x.device)
    s = float(scale) if scale is not None else 1.0 / math.sqrt(dh)
    needs_grad = torch.is_grad_enabled() and any(
        t_.requires_grad for t_ in (x, down, up, bias, k, v, key_padding_mask) if t_ is not None)
    choice = backend.choose_decode(x, attn_mask=attn_mask, dropout_p=float(dropout_p), need_weights=need_weights,
                                   needs_grad=needs_grad)
    backend.warn_if_slow(choice, "mlra_decode")

    hpg = H // g
    up_q, b_q = layout.projection(up, bias, 0)
    up_v, b_v = layout.projection(up, bias, 2)
    # Heads first with the batch in the rows, so that no weight is copied once per sequence (a matmul
    # broadcast over B would copy each head's B_Q, B_K and B_V: megabytes per step at GPT-2 widths).
    q = layout.expand_rows(layout.latents(x, down[:g * r]).reshape(B * t, g * r), up_q, b_q, H, g)  # [H, B·t, d_h]
    q_abs = torch.bmm(q, up[1].view(H, dh, r))  # q̃ = q · B_K, [H, B·t, r]
    q_abs = q_abs.view(g, hpg, B, t, r).permute(2, 0, 1, 3, 4).reshape(B, g, hpg * t, r)
    weights = None
    if choice.path in backend.DECODE_KERNELS:
        z = latent_attention(choice.path, q_abs, k, v, t=t, scale=s, causal=causal, key_padding_mask=key_padding_mask,
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


# --- A layer's whole decode step on pre-multiplied weights ----------------------------------------------
#
# A step reads every weight once for a token or two, so at small batches the weights cost as much as the
# cache. Products of the factors that a step would otherwise compute per token can be formed once:
# - the query side: q̃_h = x·D_{Q,j(h)}ᵀ·M_h + β_h, so the rows M_hᵀ·D_{Q,j} [r, d] of every head give q̃
#   from x by one GEMM ([H·r, d]), instead of c_Q = x·D_Qᵀ ([g·r, d]) and then M ([H, r, r]);
# - the output side: W_O·o + b_O = Σ_h (W_{O,h}·B_{V,h})·Z_h + (W_O·b_V + b_O), so one [d, H·r] matrix
#   replaces B_V ([d, r]) and W_O ([d, d]).
# Each fold is taken where it reads fewer numbers (fold_rules); at g = H both are (GPT-2 small, r = 16:
# 2.4 MB instead of 4.2 MB per layer in fp32, W_O included), at g = 1, r = d/4 neither. The query rows and the
# c_K, c_V rows of D share one GEMM.


def fold_rules(d: int, num_heads: int, latent_groups: int, rank: int) -> tuple[bool, bool]:
    """``(fold_query, fold_output)``: whether the pre-multiplied query rows (``H·r·d`` numbers against
    ``g·r·d + H·r²``) and output matrix (``H·r·d`` against ``d·r + d²``) are the smaller reads."""
    H, g, r = num_heads, latent_groups, rank
    return H * r * d <= g * r * d + H * r * r, H * r * d <= d * r + d * d


class StepWeights(NamedTuple):
    """The weights of a layer's decode step (:func:`step_weights`), read by :func:`step_latents`,
    :func:`step_output` and the C++ whole-step op ``mlra::latent_decode_step_cpu``."""

    num_heads: int
    latent_groups: int
    rank: int
    w_in: Tensor  # [H·r (folded q̃) or g·r (c_Q), then 2·g·r (c_K, c_V), d]
    b_in: Optional[Tensor]  # [rows of w_in]: β on folded query rows, zero elsewhere; None without a bias
    # Every matrix is stored as the rows of its outputs ([outputs, inputs], nn.Linear's layout), so that a
    # step streams each row once for all its tokens.
    m: Optional[Tensor]  # [g, (H/g)·r, r]: M_hᵀ of a group's heads stacked (query not folded)
    beta: Optional[Tensor]  # [g, (H/g)·r] (query not folded, with a bias)
    w_v: Optional[Tensor]  # [H, d_h, r] = B_{V,h} (output not folded)
    b_v: Optional[Tensor]  # [H, d_h] (output not folded, with a bias)
    w_out: Tensor  # [d, H·r] (W_{O,h}·B_{V,h} side by side, folded) or W_O [d, d]
    b_out: Optional[Tensor]  # [d]


@torch.no_grad()
def step_weights(
    down: Tensor, up: Tensor, bias: Optional[Tensor], out_weight: Tensor, out_bias: Optional[Tensor], *,
    num_heads: int, latent_groups: int, dtype: Optional[torch.dtype] = None,
) -> StepWeights:
    """The pre-multiplied weights of a layer's decode step: the MLRA factors and the output projection
    ``W_O`` ``[d, d]`` (``nn.Linear`` layout) with its bias. Products are formed in float32 (float64 for
    float64 weights) and stored in ``dtype`` (default: ``down``'s). Form them again after the weights
    change: they are a copy."""
    H, g = int(num_heads), int(latent_groups)
    d, r = up.shape[1], up.shape[2]
    dh, hpg, gr = d // H, H // g, g * r
    if tuple(out_weight.shape) != (d, d):
        raise ValueError(f"out_weight must be W_O [d, d] = [{d}, {d}], got {tuple(out_weight.shape)}")
    store = dtype if dtype is not None else down.dtype
    work = torch.float64 if down.dtype == torch.float64 else torch.float32
    down_w, up_w = down.to(work), up.to(work)
    bias_w = bias.to(work) if bias is not None else None
    w_o = out_weight.to(work)
    fold_q, fold_o = fold_rules(d, H, g, r)
    from mlra_kernels.ops.mlra.prefill import _absorbed_weights, _m_by_group

    m, beta = _absorbed_weights(up_w, bias_w, H)  # [H, r, r], [H, r]
    m_g, beta_g, b_in = None, None, None
    if fold_q:
        d_q = down_w[:gr].view(g, 1, r, d).expand(g, hpg, r, d).reshape(H, r, d)  # each head's group rows
        q_rows = torch.bmm(m.transpose(1, 2), d_q).reshape(H * r, d)  # M_hᵀ·D_{Q,j}
        if beta is not None:
            b_in = torch.cat([beta.reshape(H * r), beta.new_zeros(2 * gr)])
    else:
        q_rows = down_w[:gr]
        m_g = _m_by_group(m, g).transpose(1, 2)
        beta_g = beta.reshape(g, hpg * r) if beta is not None else None
    w_in = torch.cat([q_rows, down_w[gr:]])
    b_v = bias_w[2 * d:] if bias_w is not None else None
    b_out = out_bias.to(work) if out_bias is not None else None
    w_v = up_w[2].view(H, dh, r)  # B_{V,h}
    if fold_o:
        w_out = torch.bmm(w_o.view(d, H, dh).transpose(0, 1), w_v).transpose(0, 1).reshape(d, H * r)
        if b_v is not None:
            b_out = w_o @ b_v + (b_out if b_out is not None else 0.0)
        w_vh, b_vh = None, None
    else:
        w_out, w_vh = w_o, w_v
        b_vh = b_v.view(H, dh) if b_v is not None else None

    def cast(t):
        return t.to(store).contiguous() if t is not None else None

    return StepWeights(H, g, r, cast(w_in), cast(b_in), cast(m_g), cast(beta_g), cast(w_vh), cast(b_vh),
                       cast(w_out), cast(b_out))


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
    d = H * o.shape[-1]
    return F.linear(o.view(H, B, t, -1).permute(1, 2, 0, 3).reshape(B, t, d), w.w_out, w.b_out)


def latent_attention(
    path: str, q_abs: Tensor, k: Tensor, v: Tensor, *, t: int, scale: float, causal: bool = True,
    key_padding_mask: Optional[Tensor] = None, cache_seqlens: Optional[Tensor] = None,
) -> Tensor:
    """``Z [B, g, M, r]`` by one of the decode kernels (``path``: ``"cpu-kernel"``, ``"triton"`` or
    ``"triton-interpreter"``, as :func:`~mlra_kernels.ops.mlra.backend.choose_decode` chose) from
    ``q̃ [B, g, M, r]`` and the caches ``[B, g, S, r]``; inputs as :func:`mlra_decode` checks them."""
    kpm = masks.kernel_key_padding(key_padding_mask)
    if path == "cpu-kernel":
        if k.stride(-1) != 1 or v.stride(-1) != 1:  # a token-major cache of one latent column per group
            k, v = k.contiguous(), v.contiguous()
        return _cpu_decode_attention(q_abs, k, v, kpm, cache_seqlens, t, bool(causal), scale)
    if path in ("triton", "triton-interpreter"):
        return mlra_decode_attn(q_abs, k, v, kpm, cache_seqlens, t, bool(causal), scale)
    raise ValueError(f"latent_attention runs the decode kernels {backend.DECODE_KERNELS}, got path {path!r}")


def _stamp(t: Optional[Tensor]) -> Optional[tuple]:
    """What identifies a weight's contents without reading them: the tensor itself (weakly), its storage
    and its version counter (inference tensors have none)."""
    if t is None:
        return None
    return weakref.ref(t), t.data_ptr(), None if t.is_inference() else t._version


def _stamp_matches(stamp: Optional[tuple], t: Optional[Tensor]) -> bool:
    if stamp is None or t is None:
        return stamp is None and t is None
    ref, ptr, version = stamp
    return ref() is t and ptr == t.data_ptr() and version == (None if t.is_inference() else t._version)


class StepWeightsMemo:
    """One layer's :class:`StepWeights`, formed again when a weight changes.

    A hit needs, for each weight, the same tensor with the same storage and version counter: an in-place
    update (an optimizer step, ``load_state_dict``) or a replaced parameter forms them again. The layer
    clears the memo at each prefill (so every ``generate()`` forms them afresh: writes that move no version
    counter, through ``.data``, a numpy view or to an inference tensor, are seen from the next prefill on)
    and in ``_apply`` (``.to()``, ``.half()``). Caches of one layer share it (two continuations of one
    prefix form the weights once). ``formed`` counts how often the weights were formed. Pickling keeps only
    that count: the weights are formed again after unpickling."""

    def __init__(self) -> None:
        self._stamps: tuple = ()
        self._weights: Optional[StepWeights] = None
        self.formed = 0

    def clear(self) -> None:
        self._weights, self._stamps = None, ()

    def __getstate__(self) -> dict:
        return {"formed": self.formed}  # weak references cannot be pickled; the weights are a derived copy

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self.formed = state.get("formed", 0)

    def get(self, down: Tensor, up: Tensor, bias: Optional[Tensor], out_weight: Tensor, out_bias: Optional[Tensor], *,
            num_heads: int, latent_groups: int, out_weight_transposed: bool = False) -> StepWeights:
        """``out_weight_transposed``: ``out_weight`` is ``[d_in, d_out]`` (a Hugging Face ``Conv1D``)."""
        tensors = (down, up, bias, out_weight, out_bias)
        hit = self._weights is not None and all(_stamp_matches(s, t) for s, t in zip(self._stamps, tensors))
        if not hit:
            w_o = out_weight.t() if out_weight_transposed else out_weight
            self._weights = step_weights(down, up, bias, w_o, out_bias, num_heads=num_heads, latent_groups=latent_groups)
            self._stamps = tuple(_stamp(t) for t in tensors)
            self.formed += 1
        return self._weights


def _plain_tensor(t: Optional[Tensor]) -> bool:
    return t is None or type(t) in (torch.Tensor, torch.nn.Parameter)


def _not_plain(layer: torch.nn.Module, layer_type: type) -> Optional[str]:
    """Why a decode step that reads ``layer``'s ``weight`` and ``bias`` instead of calling it would skip
    something (None: it would not): ``layer`` must be exactly ``layer_type``, with its class's ``forward``,
    plain tensor weights and no forward hook (its own or global)."""
    from torch.nn.modules import module as nn_module

    if type(layer) is not layer_type:
        return f"is a {type(layer).__name__}, not a plain {layer_type.__name__}"
    if "forward" in vars(layer):
        return f"is a {layer_type.__name__} whose forward was replaced on the instance"
    if layer._forward_hooks or layer._forward_pre_hooks:
        return f"is a {layer_type.__name__} with forward hooks"
    if getattr(nn_module, "_global_forward_hooks", None) or getattr(nn_module, "_global_forward_pre_hooks", None):
        return "would run global module forward hooks"
    for name in ("weight", "bias"):
        if not _plain_tensor(getattr(layer, name, None)):
            return f"has a {name} of type {type(getattr(layer, name)).__name__}"
    return None


def decode_path(x: Tensor, qkv: torch.nn.Module, *, dropout_p: float, need_weights: bool = False) -> str:
    """The path ``mlra_decode`` takes for a layer's step on ``x`` (the same choice it makes itself), the
    factors ``qkv`` (``down``, ``up``, ``bias``) counted for gradients."""
    grad = torch.is_grad_enabled() and (
        x.requires_grad or any(t.requires_grad for t in (qkv.down, qkv.up, qkv.bias) if t is not None))
    return backend.kernel_path(x, dropout_p=dropout_p, op="decode", need_weights=need_weights, requires_grad=grad)


def step_plan(x: Tensor, qkv: torch.nn.Module, out_layer: torch.nn.Module, out_layer_type: type, *, owner: str,
              dropout_p: float, training: bool, need_weights: bool = False) -> tuple[str, bool]:
    """``(path, fused)`` for a layer's decode step: :func:`decode_path`, and whether the step runs on the
    layer's step weights (``out_layer``, its ``W_O``, folded in). It does on a decode kernel path in eager
    evaluation mode without autocast, with ``x`` in the weights' dtype, with no gradient wanted for
    ``out_layer``, outside CUDA graph capture (a graph would keep the products of the weights it was
    captured with), and with ``out_layer`` a plain ``out_layer_type`` (a subclass, a wrapper, a replaced
    ``forward`` or a hook would be skipped: that case warns once and calls ``out_layer``). Otherwise ``mlra_decode`` runs, then
    ``out_layer``. The fused step checks the cache's dtype, device and shape as ``mlra_decode`` does."""
    path = decode_path(x, qkv, dropout_p=dropout_p, need_weights=need_weights)
    if path not in backend.DECODE_KERNELS or not step_runs_fused(x, qkv.down, training):
        return path, False
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return path, False
    if torch.is_grad_enabled() and any(p.requires_grad for p in out_layer.parameters()):
        return path, False  # the step weights are products without a graph
    why = _not_plain(out_layer, out_layer_type)
    if why is not None:
        warn_once(f"decode-step-{owner}-out-layer-{why}",
                  f"{owner}: its output projection {why}; so that it runs as it is, a decode step calls it after "
                  "mlra_decode instead of running on the pre-multiplied step weights (slower: more weights read, "
                  "more calls).")
        return path, False
    return path, True


def check_step_caches(x: Tensor, cache_k: Tensor, cache_v: Tensor, latent_groups: int, rank: int) -> None:
    """The checks :func:`mlra_decode` makes of the caches, for a step that attends them without it."""
    _grouped_caches(x, cache_k, cache_v, x.shape[0], int(latent_groups), int(rank))


def step_runs_fused(x: Tensor, weight: Tensor, training: bool) -> bool:
    """The mode part of :func:`step_plan`: eager (a compiled step traces ``mlra_decode``, whose products
    the compiler keeps in its graph), evaluation mode, no autocast, and ``x`` in the weights' dtype
    (otherwise ``mlra_decode`` runs, and says what is wrong with the inputs)."""
    return (not training and not torch.compiler.is_compiling() and not torch.is_autocast_enabled(x.device.type)
            and x.dtype == weight.dtype)
