"""Every mask form, turned into what each path reads.

Masks follow ``nn.MultiheadAttention``: a bool mask is True where a key may *not* be attended, a float
mask is added to the scores. Forms: key padding ``[B, S]``; ``attn_mask`` ``[T, S]``, ``[B·H, T, S]`` or
``[B | 1, H | 1, T, S]``; causal, each query aligned to the end of the keys or of its sequence's
``lengths``; and, with ``lengths``, the cache positions at or past a sequence's length.

A query whose keys are all masked follows the caller's ``empty_rows`` rule:

- ``"zeros"``: masked scores are ``-inf``, and the path's softmax gives the row zeros (prefill, dense);
- ``"average"``: masked scores are ``finfo(dtype).min`` (float masks are clamped to it), so the row
  averages the values, as SDPA does (decode); positions past ``lengths`` stay ``-inf``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

EMPTY_ROWS = ("zeros", "average")


def _check_dtype(mask: Tensor, name: str) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"only bool and floating types of {name} are supported, got {mask.dtype}")


def _check_rule(empty_rows: str) -> None:
    if empty_rows not in EMPTY_ROWS:
        raise ValueError(f"empty_rows must be one of {', '.join(EMPTY_ROWS)}; got {empty_rows!r}")


def additive(mask: Tensor, dtype: torch.dtype, *, empty_rows: str, name: str = "mask") -> Tensor:
    """``mask`` as scores to add, in ``dtype`` and its shape: a bool mask gives 0 where False and, where
    True, ``-inf`` (``empty_rows="zeros"``) or ``finfo(dtype).min`` (``"average"``); a float mask is cast
    to ``dtype`` (and clamped to ``finfo(dtype).min`` under ``"average"``)."""
    _check_dtype(mask, name)
    _check_rule(empty_rows)
    if empty_rows == "zeros":
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)
    lowest = torch.finfo(dtype).min
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, lowest)
    return mask.to(dtype).clamp(min=lowest)


def kernel_key_padding(key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    """The key padding the Triton and C++ kernels read: fp32 ``[B, S]``, contiguous, detached, added to the
    scores (``-inf`` where a bool mask is True); None for None."""
    if key_padding_mask is None:
        return None
    _check_dtype(key_padding_mask, "key_padding_mask")
    if key_padding_mask.dim() != 2:
        raise ValueError(f"key_padding_mask must be [B, S], got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.dtype == torch.bool:
        return torch.zeros(key_padding_mask.shape, dtype=torch.float32, device=key_padding_mask.device).masked_fill(
            key_padding_mask, float("-inf"))
    return key_padding_mask.detach().to(torch.float32).contiguous()


def causal_mask(T: int, S: int, *, device: torch.device, lengths: Optional[Tensor] = None) -> Tensor:
    """Bool ``[1, 1, T, S]`` (``[B, 1, T, S]`` with ``lengths``): True where key ``j`` comes after query
    ``i``, which sits at position ``L - T + i`` (``L``: the sequence's length, ``S`` without ``lengths``)."""
    i, j = torch.arange(T, device=device), torch.arange(S, device=device)
    if lengths is None:
        return (j[None, :] > (S - T + i)[:, None]).view(1, 1, T, S)
    pos = lengths.view(-1, 1).to(torch.int64) - T + i.view(1, T)  # [B, T]
    return (j.view(1, 1, S) > pos.unsqueeze(-1)).unsqueeze(1)


def _attn_mask_4d(attn_mask: Tensor, B: int, H: int, T: int, S: int) -> Tensor:
    """``attn_mask`` viewed as ``[B | 1, H | 1, T, S]``."""
    shape = tuple(attn_mask.shape)
    if shape == (T, S):
        return attn_mask.view(1, 1, T, S)
    if shape == (B * H, T, S):
        return attn_mask.view(B, H, T, S)
    if attn_mask.dim() == 4 and shape[0] in (1, B) and shape[1] in (1, H) and shape[2:] == (T, S):
        return attn_mask
    raise ValueError(f"attn_mask must be [T, S] = [{T}, {S}], [B·H, T, S] = [{B * H}, {T}, {S}] or "
                     f"[B | 1, H | 1, T, S] with B={B}, H={H}, got {shape}")


def combine(
    B: int, H: int, T: int, S: int, *, causal: bool, key_padding_mask: Optional[Tensor],
    attn_mask: Optional[Tensor], dtype: torch.dtype, device: torch.device, empty_rows: str,
    lengths: Optional[Tensor] = None,
) -> Optional[Tensor]:
    """Every mask as one additive bias in ``dtype``, broadcastable to ``[B, H, T, S]``, or None when nothing
    is masked.

    Args:
        B, H, T, S: batch, heads, queries, keys.
        causal: mask the keys after each query (queries aligned to the end of the keys, or of ``lengths``).
        key_padding_mask: ``[B, S]``; attn_mask: ``[T, S]``, ``[B·H, T, S]`` or ``[B | 1, H | 1, T, S]``;
            bool (True = masked) or float (added).
        dtype, device: of the bias.
        empty_rows: ``"zeros"`` or ``"average"``, the rule for a query with no key left (module docstring).
        lengths: int ``[B]``, each sequence's length in the ``S`` positions; the positions past it are
            ``-inf`` under either rule.
    """
    _check_rule(empty_rows)
    if key_padding_mask is not None:
        _check_dtype(key_padding_mask, "key_padding_mask")
        if tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(f"key_padding_mask must be [B, S] = [{B}, {S}], got {tuple(key_padding_mask.shape)}")
    if attn_mask is not None:
        _check_dtype(attn_mask, "attn_mask")
        attn_mask = _attn_mask_4d(attn_mask, B, H, T, S)
    if lengths is not None and tuple(lengths.shape) != (B,):
        raise ValueError(f"lengths must be [B] = [{B}], got {tuple(lengths.shape)}")
    bias = None

    def add(extra: Tensor) -> None:
        nonlocal bias
        bias = extra if bias is None else bias + extra

    if causal and (T > 1 or lengths is not None):  # one query at the end of the keys sees them all
        add(additive(causal_mask(T, S, device=device, lengths=lengths), dtype, empty_rows=empty_rows))
    if key_padding_mask is not None:
        add(additive(key_padding_mask, dtype, empty_rows=empty_rows, name="key_padding_mask").view(B, 1, 1, S))
    if attn_mask is not None:
        add(additive(attn_mask, dtype, empty_rows=empty_rows, name="attn_mask"))
    if bias is not None and empty_rows == "average":
        bias = bias.clamp(min=torch.finfo(dtype).min)
    if lengths is not None:
        unused = torch.arange(S, device=device).view(1, S) >= lengths.view(B, 1)  # [B, S]
        add(torch.zeros((B, 1, 1, S), dtype=dtype, device=device).masked_fill(unused.view(B, 1, 1, S), float("-inf")))
    return bias


def grouped(mask: Optional[Tensor], H: int, g: int, t: int, S: int) -> Optional[Tensor]:
    """A ``[B | 1, H | 1, t, S]`` bias laid out for the grouped decode queries: ``[B | 1, g | 1, (H/g)·t, S]``."""
    if mask is None:
        return None
    b, h = mask.shape[0], mask.shape[1]
    if h == 1:  # the same mask for every head: repeat it over the heads of a group
        return mask.view(b, 1, 1, mask.shape[2], S).expand(b, 1, H // g, t, S).reshape(b, 1, H // g * t, S)
    return mask.expand(b, H, t, S).reshape(b, g, H // g * t, S)
