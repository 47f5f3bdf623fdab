"""Hugging Face transformers: convert a GPT-2 to MLRA, load it back, and a TEV ``TrainerCallback``.

Supports the transformers releases ``SUPPORTED_TRANSFORMERS`` (``>=5.0,<6``, the range of the optional
extra: ``pip install mlra-kernels[transformers]``); ``.ci/run`` tests the oldest and the newest. An older
release is refused with what it lacks; a newer one warns once.

docs/huggingface.md says what the converted attention supports (attention implementations, caches, masks,
``output_attentions``, compile, checkpointing) and what it leaves dense.
"""

from __future__ import annotations

import inspect
import os
from functools import partial
from typing import Any, Optional

import torch
from torch import Tensor, nn

from mlra_kernels._mask_memo import memo_by_tensor
from mlra_kernels._warnings import warn_once
from mlra_kernels.nn.fold import ClearsStepMemo, foldable_output
from mlra_kernels.nn.projection import MLRAProjection, move_flat_factors
from mlra_kernels.ops.mlra import StepWeightsMemo, decode_step, kv_latents, mlra_attention, mlra_decode
from mlra_kernels.ops.mlra.layout import check_config, default_rank

try:
    import transformers
    from transformers import TrainerCallback
except ImportError as _err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "mlra_kernels.integrations.transformers needs the transformers package: pip install transformers"
    ) from _err

from transformers.cache_utils import EncoderDecoderCache
from transformers.models.gpt2 import modeling_gpt2
from transformers.pytorch_utils import Conv1D


_INITS = ("svd", "random")

# The releases this integration supports: the "transformers" extra of setup.py declares the same range.
SUPPORTED_TRANSFORMERS = ">=5.0,<6"
_MIN_TRANSFORMERS, _MAX_TRANSFORMERS = (5, 0), (6, 0)


def _causal_padding(mask: Any, batch: int, length: int) -> tuple[bool, Optional[Tensor]]:
    """``_inspect_mask``, memoised per mask tensor: ``GPT2Model`` hands every layer the same mask, so it
    is read on the host (one device sync) once per forward, not once per layer (under
    ``torch.inference_mode`` once per layer: inference tensors cannot be memoised).

    Under ``torch.compile`` a mask tensor is not read at all (that would break the graph): the layer
    takes the dense attention, which applies the mask as given.
    """
    if not isinstance(mask, Tensor):
        return _inspect_mask(mask, batch, length)
    if torch.compiler.is_compiling():
        return False, None
    return memo_by_tensor(("gpt2-causal-padding", batch, length), mask, lambda: _inspect_mask(mask, batch, length))


def _inspect_mask(mask: Any, batch: int, length: int) -> tuple[bool, Optional[Tensor]]:
    """Whether ``mask`` is causal attention with (optional) key padding, and that padding.

    ``mask`` is what ``GPT2Model`` hands its attention layers for a prefill: None, or a ``[B | 1, 1, T, S]``
    mask (``S = T``, or ``S > T`` for a preallocated cache, whose slots after ``T`` must all be masked), boolean (True = attend) or additive float (0 = attend, a large negative number or -inf =
    masked). Returns ``(True, None)`` for None or a purely causal mask, ``(True, key_padding_mask)``
    (``[B, T]`` bool, True = padding) when the mask is exactly ``causal & ~key_padding_mask``, and
    ``(False, None)`` for anything else. The last query's row gives the padding, since under the causal
    mask it sees every key; one comparison over the ``T × T`` mask checks the rest.
    """
    if mask is None:
        return True, None
    if (
        not isinstance(mask, Tensor) or mask.dim() != 4 or mask.shape[1] != 1
        or mask.shape[0] not in (1, batch) or mask.shape[2] != length or mask.shape[3] < length
    ):
        return False, None
    m = mask[:, 0]
    if m.dtype == torch.bool:
        allowed, odd = m, None
    elif m.is_floating_point():
        allowed = m == 0
        odd = ~(allowed | (m <= torch.finfo(m.dtype).min / 2))  # a bias that is neither 0 nor "masked"
    else:
        return False, None
    # A preallocated cache (StaticCache) hands a prefill [.., T, S] with S > T: its unwritten slots
    # T..S-1 must be masked for every query.
    beyond = allowed[:, :, length:]
    allowed = allowed[:, :, :length]
    keep = allowed[:, -1, :]  # [B | 1, T]: True = a real (non-padding) key
    causal = torch.ones(length, length, dtype=torch.bool, device=m.device).tril()
    mismatch = allowed != (causal & keep[:, None, :])
    if odd is not None:
        mismatch = mismatch | odd[:, :, :length]
        beyond = beyond | odd[:, :, length:]
    mismatch = mismatch.any() | beyond.any()
    general, no_padding = torch.stack([mismatch, keep.all()]).tolist()  # one host sync
    if general:
        return False, None
    if no_padding:
        return True, None
    return True, (~keep).expand(batch, length).contiguous()


def _check_args(rank: Any, latent_groups: Any, init: Any, embed_dim: int, num_heads: int) -> tuple[int, int]:
    """Validate the conversion arguments; returns ``(rank, latent_groups)`` as plain ints."""
    if rank is None:
        raise TypeError("rank must be a positive int, got None")
    _, _, rank, latent_groups = check_config(embed_dim, num_heads, rank, latent_groups)
    if not isinstance(init, str) or init not in _INITS:
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    return rank, latent_groups


class MLRAGPT2Attention(ClearsStepMemo, modeling_gpt2.GPT2Attention):
    """GPT-2 self-attention with MLRA Q/K/V projections; the output projection ``c_proj`` is kept.

    A ``GPT2Attention`` subclass, so that transformers treats it as one (it records its attention
    weights for ``output_attentions`` and initialises ``c_proj`` the same way), but its ``c_attn`` is
    replaced by ``qkv``, an :class:`~mlra_kernels.nn.MLRAProjection` (``qkv.down`` ``[3·g·r, d]``,
    ``qkv.up`` ``[3, d, r]``, ``qkv.bias`` ``[3·d]``); ``c_proj`` is the original ``Conv1D``. The module
    keeps the training / evaluation mode of the layer it replaces. Its forward calls the public ops:
    ``mlra_attention`` where it can, ``decode_step`` with a cache, ``mlra_decode`` otherwise.
    """

    def __init__(self, attn: nn.Module, rank: int, latent_groups: int = 1, init: str = "svd") -> None:
        nn.Module.__init__(self)  # not GPT2Attention.__init__: that would build a dense c_attn
        if getattr(attn, "is_cross_attention", False):
            raise ValueError("MLRAGPT2Attention replaces self-attention only")
        d, H = attn.embed_dim, attn.num_heads
        rank, latent_groups = _check_args(rank, latent_groups, init, d, H)
        for name in _COPIED_ATTRIBUTES:
            if hasattr(attn, name):
                setattr(self, name, getattr(attn, name))
        for name, buf in attn.named_buffers(recurse=False):  # e.g. the causal-mask buffer of older releases
            self.register_buffer(name, buf, persistent=name not in attn._non_persistent_buffers_set)
        # Releases with that buffer apply it in their eager attention on top of the mask they are given.
        causal_buffer = getattr(attn, "bias", None)
        self._eager_adds_causal = isinstance(causal_buffer, Tensor) and causal_buffer.dtype == torch.bool
        self.config = attn.config
        self.layer_idx = attn.layer_idx
        self.embed_dim, self.num_heads, self.head_dim = d, H, d // H
        self.rank, self.latent_groups = rank, latent_groups
        self.scaling = getattr(attn, "scaling", None)
        # Releases before the attribute applied GPT-2's scaling flags in their eager attention only; their
        # sdpa path used 1/sqrt(d_h) whatever the flags (``_scale`` keeps both).
        self._flags_only_in_eager = self.scaling is None
        if self.scaling is None:
            self.scaling = (d // H) ** -0.5 if attn.scale_attn_weights else 1.0
            if attn.scale_attn_by_inverse_layer_idx:
                self.scaling /= float(attn.layer_idx + 1)
        self.is_causal = True
        self.is_cross_attention = False
        self.attn_dropout = attn.attn_dropout
        self.resid_dropout = attn.resid_dropout
        self.c_proj = attn.c_proj
        w, b = attn.c_attn.weight, attn.c_attn.bias  # Conv1D: [d, 3·d], y = x @ w + b
        self.qkv = MLRAProjection(d, H, rank, latent_groups, bias=b is not None, device=w.device, dtype=w.dtype)
        if init == "svd":
            self.qkv.load_dense_(w.detach().t(), b.detach() if b is not None else None)
        self._step_memo = StepWeightsMemo()  # a decode step's pre-multiplied weights, c_proj included
        self.train(attn.training)
        self._register_load_state_dict_pre_hook(partial(move_flat_factors, ("down", "up", "qkv_bias")))

    @property
    def svd_error(self) -> Optional[dict[str, float]]:
        """Relative Frobenius error of each projection after ``init="svd"`` (None otherwise)."""
        return self.qkv.svd_error

    def _scale(self) -> float:
        if self._flags_only_in_eager and self.config._attn_implementation != "eager":
            return self.head_dim ** -0.5
        return self.scaling

    def _eager_causal(self) -> bool:
        return self._eager_adds_causal and self.config._attn_implementation == "eager"

    @staticmethod
    def _warn_general_mask(mask: Any) -> None:
        what = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        warn_once(
            "hf-general-mask",
            f"MLRAGPT2Attention: the attention mask ({what}) is not causal attention with key padding, so "
            "the fused mlra_attention is not used; this layer runs mlra_decode over the latents (the "
            "T×S scores in memory).",
        )

    def forward(
        self,
        hidden_states: Tensor,
        cache: Optional[Any] = None,
        attention_mask: Optional[Tensor] = None,
        encoder_hidden_states: Optional[Tensor] = None,
        encoder_attention_mask: Optional[Tensor] = None,
        output_attentions: Optional[bool] = False,
        *,
        past_key_values: Optional[Any] = None,
        cache_position: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """``GPT2Attention.forward``: the cache arrives as ``cache`` (transformers >= 5.24) or
        ``past_key_values`` (earlier 5.x releases, which also pass ``cache_position``)."""
        if encoder_hidden_states is not None:
            raise ValueError("MLRAGPT2Attention is self-attention; cross-attention stays a GPT2Attention")
        B, T, d = hidden_states.shape
        qkv = self.qkv
        dropout = self.attn_dropout.p if self.training else 0.0
        cache = cache if cache is not None else past_key_values
        if isinstance(cache, EncoderDecoderCache):
            cache = cache.self_attention_cache
        want_weights = _attentions_requested(output_attentions)
        cached = _cached_length(cache, self.layer_idx)  # read once: a StaticCache computes it from its keys
        if cache is not None:
            self._check_cache(cache, B, cached)
        nothing_cached = _nothing_cached(cached, T)
        if cache is not None and not torch.compiler.is_compiling() and (
                nothing_cached or _empty_on_the_host(cached)):
            self._step_memo.clear()  # a prefill: the steps that follow form the step weights afresh
        if not want_weights and nothing_cached:
            # Nothing cached for this layer: training, evaluation, or the prefill of generate().
            fused, key_padding_mask = _causal_padding(attention_mask, B, T)
            if fused:
                out = mlra_attention(
                    hidden_states, qkv.down, qkv.up, qkv.bias, num_heads=self.num_heads,
                    latent_groups=self.latent_groups, causal=True, key_padding_mask=key_padding_mask,
                    dropout_p=dropout, scale=self._scale(),
                )
                if cache is not None:
                    # The op keeps its latents on chip; the cache gets c_K, c_V from one more GEMM.
                    _cache_update(cache, *kv_latents(hidden_states, qkv.down, self.latent_groups, group_major=True),
                                  self.layer_idx, cache_position)
                return self.resid_dropout(self.c_proj(out)), None
            if not torch.compiler.is_compiling():
                self._warn_general_mask(attention_mask)

        one_row = _is_one_row_per_sequence(attention_mask, B, T)
        attn_mask, key_padding_mask, lengths = _as_masked(attention_mask), None, None
        if one_row:
            # A decode step's mask is key padding, with the lengths the token sees: the form the kernels fuse.
            key_padding_mask, lengths = _step_padding(attention_mask, B, True)
            attn_mask = None
        causal = attention_mask is None or self._eager_causal()
        if cache is not None:
            fold = None
            if not want_weights and attn_mask is None:
                fold = foldable_output(self.c_proj, Conv1D, owner="MLRAGPT2Attention", training=self.training,
                                       transposed=True)
            out, weights = decode_step(
                hidden_states, qkv.down, qkv.up, qkv.bias, num_heads=self.num_heads, latent_groups=self.latent_groups,
                cache=lambda c_k, c_v: _cache_update(cache, c_k, c_v, self.layer_idx, cache_position),
                out_proj=self.c_proj, out_weights=fold, memo=self._step_memo, scale=self._scale(), causal=causal,
                attn_mask=attn_mask, key_padding_mask=key_padding_mask, cache_seqlens=lengths, dropout_p=dropout,
                need_weights=want_weights)
            return (self.resid_dropout(out) if self.training else out), weights  # dropout: identity in eval mode

        c_k, c_v = kv_latents(hidden_states, qkv.down, self.latent_groups, group_major=True)  # 2 × [B, g, T, r]
        out, weights = mlra_decode(
            hidden_states, qkv.down, qkv.up, qkv.bias, cache_k=c_k, cache_v=c_v, num_heads=self.num_heads,
            latent_groups=self.latent_groups, causal=causal, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
            cache_seqlens=lengths, scale=self._scale(), dropout_p=dropout, need_weights=want_weights,
        )
        return self.resid_dropout(self.c_proj(out)), weights

    def _check_cache(self, cache: Any, batch: int, cached: Any) -> None:
        """Refuse a cache this layer cannot read, before anything is written to it or read from it: one whose
        slots for this layer are not latents ``[B, g, S, r]`` of this model's shape, or one written by a
        dense GPT-2 whose per-head keys ``[B, H, S, d_h]`` have that very shape (``rank = d_h`` and
        ``latent_groups = H``; told apart by the mark the converted layers leave on the cache layers they
        write, :func:`_cache_update`). A layer allocated for another shape that holds nothing yet is
        allocated again by the update that follows."""
        layer = _cache_layer(cache, self.layer_idx)
        if layer is None:
            return
        g, r, H, dh = self.latent_groups, self.rank, self.num_heads, self.head_dim
        where = f"MLRAGPT2Attention (layer {self.layer_idx})"  # the messages are formed only to raise
        expected = "latents c_K, c_V as [B, g, S, r] = [{}, {}, S, {}] (g = latent_groups, r = rank)"
        fix = ("start from a fresh cache (no past_key_values, or a new DynamicCache or StaticCache) or pass the "
               "cache that this converted model returned")
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if not isinstance(t, Tensor) or t.dim() != 4:
                continue
            if (t.shape[0], t.shape[1], t.shape[3]) != (batch, g, r):
                if not torch.compiler.is_compiling() and not getattr(layer, _LATENT_MARK, False) and (
                        int(cached) if isinstance(cached, Tensor) else cached) == 0:
                    # Allocated ahead for another shape but never written (transformers allocates a StaticCache
                    # with per-head shapes for a chunked prefill): the update allocates it again for the latents.
                    layer.is_initialized = False
                    return
                origin = ("the per-head layout [B, H, S, d_h] of a dense (unconverted) GPT-2's cache, which a "
                          "converted model cannot read" if (t.shape[1], t.shape[3]) == (H, dh) else
                          "a cache written by another model (a dense GPT-2, or one converted with another rank or "
                          "latent_groups) or for another batch size")
                raise ValueError(f"{where}: the cache holds {name} of shape {list(t.shape)} for this layer, but this "
                                 f"model keeps its {expected.format(batch, g, r)} there. That is {origin}: {fix}.")
        if (g, r) == (H, dh) and not getattr(layer, _LATENT_MARK, False) and not torch.compiler.is_compiling():
            n = int(cached) if isinstance(cached, Tensor) else cached
            if n > 0:
                raise ValueError(
                    f"{where}: the cache holds {n} positions for this layer that no converted layer wrote: it comes "
                    f"from a dense (unconverted) GPT-2, whose per-head keys and values [B, H, S, d_h] "
                    f"({list(layer.keys.shape)}) have the shape of this model's latents (rank = d_h = {dh}, "
                    f"latent_groups = H = {H}). A converted model keeps the {expected.format(batch, g, r)} in its "
                    "cache, not per-head "
                    f"keys and values, so it cannot read a dense model's cache: {fix}.")


def _as_masked(mask: Optional[Tensor]) -> Optional[Tensor]:
    """A transformers attention mask (bool: True = attend; float: added) in the ops' convention
    (bool: True = masked; float: added); other objects pass through to the op's type check."""
    if isinstance(mask, Tensor) and mask.dtype == torch.bool:
        return ~mask
    return mask


def _is_one_row_per_sequence(mask: Any, batch: int, length: int) -> bool:
    """Whether ``mask`` is ``[B | 1, 1, 1, S]`` (bool or float) for one new token. Added to that token's scores,
    such a mask is key padding, whatever its values: the causal mask, left padding and a ``StaticCache``'s
    unwritten slots of a decode step all are. Decided from the shape alone, so no host read and no
    data-dependent branch under ``torch.compile``."""
    return (
        isinstance(mask, Tensor) and length == 1 and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1
        and mask.shape[0] in (1, batch) and (mask.dtype == torch.bool or mask.is_floating_point())
    )


def _step_padding(mask: Tensor, batch: int, with_lengths: bool) -> tuple[Tensor, Optional[Tensor]]:
    """``(key_padding_mask [B, S], cache_seqlens [B] or None)`` of a decode step's one-row mask, memoised per
    mask outside compile (every layer gets the same one). ``with_lengths``: for the kernel, which then
    skips the keys after the last one the token sees (a ``StaticCache``'s unwritten slots); the torch path
    would mask them all the same, so it is not given the extra work."""
    def compute():
        kpm = _as_masked(mask[:, 0, 0, :]).expand(batch, mask.shape[-1])
        return kpm, (_seen_lengths(kpm) if with_lengths else None)

    if torch.compiler.is_compiling():
        return compute()
    return memo_by_tensor(("gpt2-step-padding", batch, with_lengths), mask, compute)


def _seen_lengths(key_padding_mask: Tensor) -> Tensor:
    """int32 ``[B]``: one past the last key each sequence's new token sees, read on the device. The keys
    after it are masked, so leaving them out changes nothing; a row that sees no key keeps all ``S``
    (its output, the average of every value, is defined over them)."""
    kpm = key_padding_mask
    S = kpm.shape[-1]
    seen = ~kpm if kpm.dtype == torch.bool else kpm > torch.finfo(kpm.dtype).min / 2
    last = (seen * torch.arange(1, S + 1, device=kpm.device)).amax(dim=-1)  # 0: no key seen
    return torch.where(last > 0, last, S).to(torch.int32)


# Plain attributes of GPT2Attention that transformers reads.
_COPIED_ATTRIBUTES = (
    "split_size", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
)


def _cache_update(cache: Any, c_k: Tensor, c_v: Tensor, layer_idx: int, cache_position: Optional[Tensor]):
    """Write the group-major latents ``[B, g, T, r]`` into the cache's key/value slots (a cache layer sees
    ``g`` heads of width ``r``); returns everything cached, ``[B, g, S, r]``. Releases before 5.x's
    positional cache layers need ``cache_position`` (a ``StaticCache`` writes there); later ones track
    positions themselves."""
    args = ({"cache_position": cache_position},) if cache_position is not None else ()
    out = cache.update(c_k, c_v, layer_idx, *args)
    layer = _cache_layer(cache, layer_idx)
    if layer is not None and not getattr(layer, _LATENT_MARK, False):
        setattr(layer, _LATENT_MARK, True)  # its slots hold latents (MLRAGPT2Attention._check_cache)
    return out


# Set on a cache layer (``cache.layers[i]``) that a converted layer wrote: it holds latents. A cropped,
# reordered or reset layer keeps the mark (those act on the same layer object).
_LATENT_MARK = "_mlra_latents"


def _cache_layer(cache: Any, layer_idx: int) -> Any:
    """``cache.layers[layer_idx]`` once it has been written (None before, or for a cache without layers)."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers) or not getattr(layers[layer_idx], "is_initialized", True):
        return None
    return layers[layer_idx]


def _cached_length(cache: Any, layer_idx: int) -> Any:
    """What ``cache`` holds for ``layer_idx``: 0 for no cache or a layer never written, else its
    ``get_seq_length`` (an int, or a tensor for a ``StaticCache``)."""
    if cache is None:
        return 0
    layers = getattr(cache, "layers", None)
    if layers is not None and (layer_idx >= len(layers) or not getattr(layers[layer_idx], "is_initialized", True)):
        return 0
    return cache.get_seq_length(layer_idx)


def _nothing_cached(n: Any, length: int) -> bool:
    """Whether the cached length ``n`` (:func:`_cached_length`) provably is 0, decided without a
    data-dependent branch under ``torch.compile``. A ``StaticCache`` layer reports its length as a tensor:
    read on the host for a prefill (``length > 1``) outside compile, and taken as "something cached"
    otherwise; the dense path that follows is exact in both cases."""
    if isinstance(n, Tensor):
        if length == 1 or torch.compiler.is_compiling():
            return False
        return int(n) == 0
    return n == 0


def _empty_on_the_host(n: Any) -> bool:
    """A ``StaticCache`` length tensor on the CPU that is 0 (a one-token prompt after ``reset()``, which
    :func:`_nothing_cached` does not read); on a GPU the length is not read (a sync)."""
    return isinstance(n, Tensor) and n.device.type == "cpu" and int(n) == 0


try:  # transformers >= 5.10 collects attention weights with forward hooks while this holds a collector
    from transformers.utils.output_capturing import _active_collector as _ATTENTION_COLLECTOR
except ImportError:  # earlier releases pass output_attentions to the layer
    _ATTENTION_COLLECTOR = None


def _attentions_requested(output_attentions: Optional[bool]) -> bool:
    """Whether the caller asked for the attention weights: the layer argument of earlier releases, or the
    output collector of later ones (they no longer pass ``output_attentions`` down to the layers)."""
    if output_attentions:
        return True
    if _ATTENTION_COLLECTOR is None:
        return False
    collected = _ATTENTION_COLLECTOR.get()
    return bool(collected) and "attentions" in collected


def _version_tuple(version: str) -> tuple[int, int]:
    parts = (version.split(".") + ["0"])[:2]
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)


def _check_transformers_version(version: Optional[str] = None) -> None:
    """Refuse a transformers release this integration cannot work with, saying what is missing and which
    releases work; warn once for a release newer than the tested range."""
    version = version or transformers.__version__
    supported = f"transformers{SUPPORTED_TRANSFORMERS}"
    fix = f"install a supported release: pip install '{supported}'"
    if _version_tuple(version) < _MIN_TRANSFORMERS:
        raise ImportError(
            f"convert_gpt2 supports {supported}; found transformers {version}, whose GPT-2 attention has no "
            f"Cache API (cache layers that hold the latent KV cache): {fix}"
        )
    params = inspect.signature(modeling_gpt2.GPT2Attention.forward).parameters
    if "cache" not in params and "past_key_values" not in params:
        raise ImportError(
            f"convert_gpt2 supports {supported}; found transformers {version}, whose GPT2Attention.forward "
            f"takes neither `cache` nor `past_key_values` (its arguments: {', '.join(params)}): {fix}"
        )
    if _version_tuple(version) >= _MAX_TRANSFORMERS:
        warn_once(
            "hf-untested-version",
            f"convert_gpt2 is tested with {supported}; found transformers {version}. If the converted model "
            f"misbehaves, {fix}",
        )


def convert_gpt2(model: nn.Module, rank: Optional[int] = None, latent_groups: int = 1, init: str = "svd") -> nn.Module:
    """Replace the self-attention of a Hugging Face GPT-2 with MLRA, in place; returns ``model``.

    Args:
        model: a ``GPT2LMHeadModel``, ``GPT2Model`` or any model with a ``transformer.h`` /
            ``h`` list of ``GPT2Block``. Its weights may be on the meta device (``init_empty_weights``,
            the construction phase of ``from_pretrained``): the factors are then meta tensors too.
        rank: rank per latent group, an int in ``[1, n_embd]``; default ``max(1, n_embd // 4)``.
        latent_groups: number of latent groups ``g``, a positive int that divides ``n_head``.
        init: ``"svd"`` factorises the trained ``c_attn`` (a ``Conv1D``, ``[d, 3·d]``) by truncated SVD,
            exact at ``rank = n_embd``; ``"random"`` draws the factors from N(0, 0.02) and zeroes the
            Q/K/V bias. ``c_proj`` is kept in both cases.

    The relative error of each projection is stored as ``block.attn.svd_error`` (None on the meta
    device). Each new attention module keeps the training / evaluation mode of the one it replaces.
    The model's config records ``mlra_rank`` and ``mlra_latent_groups``, so that a saved model loads
    back with :func:`from_pretrained`. Its ``save_pretrained`` also writes each layer's dense ``c_attn``
    (the product of the factors), so the folder loads with plain ``GPT2LMHeadModel.from_pretrained`` too,
    as the equivalent dense GPT-2 (its load report lists the factors as unexpected keys). The model's
    class becomes a subclass of its own, of the same name, that does this. Forward hooks on a replaced
    attention layer are registered again on its replacement (handles to the old ones no longer remove
    them). See the module docstring for what the converted attention supports.

    Example::

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100))
        >>> hf = convert_gpt2(hf, rank=64)
        >>> out = hf.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    """
    _check_transformers_version()
    body = getattr(model, "transformer", model)
    blocks = getattr(body, "h", None)
    if blocks is None or not all(isinstance(b, modeling_gpt2.GPT2Block) for b in blocks):
        raise TypeError(f"model must be a transformers GPT-2 (with GPT2Block layers), got {type(model).__name__}")
    if rank is None:
        rank = default_rank(body.config.n_embd)
    # Checked before any block is replaced, so a bad argument leaves the model untouched.
    rank, latent_groups = _check_args(rank, latent_groups, init, body.config.n_embd, body.config.n_head)
    for block in blocks:
        if isinstance(block.attn, MLRAGPT2Attention):
            raise ValueError("the model is already converted to MLRA")
        attn = MLRAGPT2Attention(block.attn, rank, latent_groups, init)
        _move_forward_hooks(block.attn, attn)
        block.attn = attn
    cfg = model.config
    cfg.mlra_rank, cfg.mlra_latent_groups = rank, latent_groups
    if isinstance(model, transformers.PreTrainedModel) and type(model) not in _LOADERS.values():
        model.__class__ = _loader_class(type(model))  # its save_pretrained also writes the dense c_attn
    return model


def _move_forward_hooks(old: nn.Module, new: nn.Module) -> None:
    """Register on ``new`` the forward hooks and forward pre-hooks of ``old``, the module it replaces.

    Releases of transformers that collect ``output_attentions`` with forward hooks (those with
    ``transformers.utils.output_capturing``) install them once per model, at its first forward that asks
    for an output, and then mark the model as hooked (``_output_capturing_hooks_installed``): a module
    that replaced a hooked one would never get them, and its weights would not be collected. Earlier
    releases patch ``forward`` for the duration of each call and leave nothing on the module. Hooks a
    user registered on the attention module move with it too."""
    for hook_id, hook in old._forward_pre_hooks.items():
        new.register_forward_pre_hook(hook, with_kwargs=hook_id in old._forward_pre_hooks_with_kwargs)
    for hook_id, hook in old._forward_hooks.items():
        new.register_forward_hook(hook, with_kwargs=hook_id in old._forward_hooks_with_kwargs,
                                  always_call=hook_id in getattr(old, "_forward_hooks_always_called", {}))


_LOADERS: dict[type, type] = {}


def _loader_class(cls: type) -> type:
    """``cls`` (a transformers GPT-2 model class) whose constructor converts to MLRA from the config, so
    that ``from_pretrained`` builds the MLRA parameters before it loads them."""
    if cls not in _LOADERS:

        def __init__(self, config, *args, **kwargs):
            cls.__init__(self, config, *args, **kwargs)
            convert_gpt2(self, rank=config.mlra_rank, latent_groups=config.mlra_latent_groups, init="random")

        def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
            state_dict = dict(self.state_dict() if state_dict is None else state_dict)
            state_dict.update(_dense_qkv(self, state_dict))
            return cls.save_pretrained(self, save_directory, *args, state_dict=state_dict, **kwargs)

        def __reduce_ex__(self, protocol):  # the class is made here at run time: pickle its base instead
            return _new_converted, (cls,), self.__getstate__()

        save_pretrained.__doc__ = _SAVE_DOC
        # The dense c_attn that save_pretrained writes beside the factors is for plain transformers only.
        ignore = list(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or []) + [r"attn\.c_attn\.(weight|bias)$"]
        _LOADERS[cls] = type(cls.__name__, (cls,), {
            "__init__": __init__, "save_pretrained": save_pretrained, "__reduce_ex__": __reduce_ex__,
            "__module__": __name__,
            "_keys_to_ignore_on_load_unexpected": ignore,
        })
    return _LOADERS[cls]


def _new_converted(base: type) -> nn.Module:
    """An empty instance of the converted class of ``base`` (unpickling; the state is set after)."""
    cls = _loader_class(base)
    return cls.__new__(cls)


_SAVE_DOC = """``save_pretrained`` of transformers, with each converted layer's dense Q/K/V projection (``c_attn``,
the product of its factors) saved beside the factors, so that the folder also loads, as the equivalent
dense GPT-2, with plain ``GPT2LMHeadModel.from_pretrained``; :func:`from_pretrained` loads the factors."""


@torch.no_grad()
def _dense_qkv(model: nn.Module, state_dict: dict) -> dict:
    """``{"<layer>.c_attn.weight": [d, 3·d], "<layer>.c_attn.bias": [3·d]}`` of every converted layer whose
    factors ``state_dict`` holds: the dense projection of the factors in ``state_dict`` (which may differ from
    the live parameters: sharded, cast, or edited), in ``Conv1D``'s layout and the factors' dtype."""
    from mlra_kernels.ops.mlra.layout import dense_from_factors

    dense = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        down, up = state_dict.get(f"{prefix}qkv.down"), state_dict.get(f"{prefix}qkv.up")
        if not isinstance(module, MLRAGPT2Attention) or down is None or up is None or down.is_meta:
            continue
        weight = dense_from_factors(down, up, module.num_heads, module.latent_groups)  # [3·d, d]
        dense[f"{prefix}c_attn.weight"] = weight.t().contiguous()
        bias = state_dict.get(f"{prefix}qkv.bias")
        dense[f"{prefix}c_attn.bias"] = bias.detach().clone() if bias is not None else down.new_zeros(weight.shape[0])
    return dense


def from_pretrained(path: Any, *args: Any, model_class: Optional[type] = None, **kwargs: Any) -> nn.Module:
    """Load a GPT-2 that was converted with :func:`convert_gpt2` and saved with ``save_pretrained``.

    Args:
        path: a folder (or hub id) written by ``model.save_pretrained``.
        model_class: the transformers class to load as; default the one the config names
            (``config.architectures``), else ``GPT2LMHeadModel``.
        *args, **kwargs: passed on to ``model_class.from_pretrained`` (``torch_dtype``, ``device_map``, ...).

    Returns an instance of a subclass of ``model_class`` whose attention layers are
    :class:`MLRAGPT2Attention` with the saved factors. A checkpoint that was not converted is refused
    (load it with transformers itself, then call ``convert_gpt2``).

    Example::

        >>> model.save_pretrained("gpt2-mlra")              # a model converted with convert_gpt2
        >>> model = from_pretrained("gpt2-mlra")
    """
    _check_transformers_version()
    if isinstance(path, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(path))  # transformers does not expand "~"
    if isinstance(path, str) and not os.path.isdir(path) and path.startswith(("/", ".")):
        # clearly a local path (a hub id is "name" or "org/name"): transformers would call it a bad repo id
        raise FileNotFoundError(f"path: no folder {path!r}; expected a folder written by save_pretrained "
                                "(or a hub id such as 'org/name')")
    config = kwargs.pop("config", None) or transformers.AutoConfig.from_pretrained(path)
    if getattr(config, "mlra_rank", None) is None or getattr(config, "mlra_latent_groups", None) is None:
        raise ValueError(
            f"{path}: the config has no mlra_rank / mlra_latent_groups, so the checkpoint was not saved from a "
            "converted model; load it with transformers and call convert_gpt2"
        )
    if model_class is None:
        names = getattr(config, "architectures", None) or ["GPT2LMHeadModel"]
        model_class = getattr(modeling_gpt2, names[0], None)
        if model_class is None:
            raise ValueError(f"{path}: config.architectures names {names[0]!r}, not a GPT-2 class; pass model_class")
    want_info = kwargs.pop("output_loading_info", False)
    loader = _loader_class(model_class)

    def load(**extra):
        model, info = loader.from_pretrained(path, *args, config=config, output_loading_info=True, **kwargs, **extra)
        return model, info, [k for k in info.get("missing_keys", ()) if ".attn.qkv." in f".{k}"]

    model, info, missing = load()
    if missing and "key_mapping" not in kwargs:
        # Saved before the factors moved into ``attn.qkv``: they are named attn.down / attn.up / attn.qkv_bias.
        model, info, missing = load(key_mapping={
            r"attn\.down$": "attn.qkv.down", r"attn\.up$": "attn.qkv.up", r"attn\.qkv_bias$": "attn.qkv.bias",
        })
    if missing:
        raise ValueError(f"{path}: the checkpoint holds no MLRA factors for {', '.join(sorted(missing)[:3])}"
                         f"{' ...' if len(missing) > 3 else ''}; it was not saved from a model converted with "
                         "convert_gpt2 at this rank and group count")
    return (model, info) if want_info else model


class TEVTrainerCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that logs µ_TEV / σ_TEV with a :class:`TEVMonitor`.

    Args:
        path: JSONL file (written by global rank 0 only).
        every: record every ``every`` optimizer steps.
        name: run name for the log header.
        mode: an existing ``path`` is refused (``"x"``, default), continued (``"a"``: a resumed run) or
            replaced (``"w"``); see :class:`~mlra_kernels.TEVMonitor`.

    A record carries the training loss that the Trainer logs at the record's own step (the mean over
    the logging window that ends there); at a step where the Trainer logs no loss, the record has no
    ``loss``. µ_TEV and σ_TEV (of the latest record) are also added to the Trainer's own logs
    (``tev_mean``, ``tev_std``) at its logging steps. TEV is read after the step's optimizer update;
    the record is written at the Trainer's log of that step, or before the next step begins.

    Under ``torch.distributed`` every process records, so that a sharded embedding (FSDP2's ``DTensor``) is
    merged over its ranks, and only global rank 0 writes the log; see :class:`~mlra_kernels.TEVMonitor`.

    Example::

        >>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[TEVTrainerCallback("runs/tev.jsonl")])
    """

    def __init__(self, path: Optional[str] = None, every: int = 10, name: Optional[str] = None,
                 mode: str = "x") -> None:
        self.path, self.every, self.name, self.mode = path, every, name, mode
        self.monitor = None
        # A step due for a record. The Trainer calls on_step_end before it logs that step, so the record
        # waits for that step's on_log; the weights do not change until the next step begins.
        self._due: Optional[int] = None

    def _record_due(self, loss=None) -> None:
        step, self._due = self._due, None
        if step is not None and self.monitor is not None:
            self.monitor.record(step, loss=loss)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from mlra_kernels.monitor import TEVMonitor, distributed_initialized

        if model is not None and (state.is_world_process_zero or distributed_initialized()):
            self.monitor = TEVMonitor(model, every=self.every, path=self.path, name=self.name, mode=self.mode)

    def on_step_begin(self, args, state, control, **kwargs):
        self._record_due()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._record_due()

    def on_step_end(self, args, state, control, **kwargs):
        self._record_due()
        if self.monitor is not None and state.global_step % self.every == 0:
            self._due = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._due is not None and logs is not None:
            if self._due == state.global_step and "loss" in logs:
                self._record_due(logs["loss"])
            elif self._due != state.global_step or not any(str(k).startswith("eval_") for k in logs):
                # An evaluation log may precede the step's training log (epoch logging): it waits for it.
                self._record_due()
        if self.monitor is not None and logs is not None and self.monitor.records:
            last = self.monitor.records[-1]
            logs.setdefault("tev_mean", last["tev_mean"])
            logs.setdefault("tev_std", last["tev_std"])

    def on_train_end(self, args, state, control, **kwargs):
        self._record_due()
        if self.monitor is not None:
            self.monitor.close()
