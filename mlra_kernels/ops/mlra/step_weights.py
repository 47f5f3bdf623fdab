"""A layer's decode-step weights: products of the MLRA factors and ``W_O`` formed once, and their memo.

Which products are formed, and why, is in docs/paths.md ("Step weights"); :func:`fold_rules` decides.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from mlra_kernels.ops.mlra.path_common import absorbed_weights, m_by_group


def fold_rules(d: int, num_heads: int, latent_groups: int, rank: int,
               head_width: Optional[int] = None) -> tuple[bool, bool]:
    """``(fold_query, fold_output)``: whether the pre-multiplied query rows (``H·r·d`` numbers against
    ``g·r·d + H·r²``) and output matrix (``H·r·d`` against ``D·r + d·D``) are the smaller reads; ``d`` is
    the input width, ``D = H·d_h`` the heads' (default ``d``: a whole layer)."""
    H, g, r = num_heads, latent_groups, rank
    D = d if head_width is None else head_width
    return H * r * d <= g * r * d + H * r * r, H * r * d <= D * r + d * D


class StepWeights(NamedTuple):
    """The weights of a layer's decode step (:func:`step_weights`). Matrices are stored as the rows of
    their outputs (``nn.Linear``'s layout), so that a step streams each row once for all its tokens."""

    num_heads: int
    latent_groups: int
    rank: int
    w_in: Tensor  # [H·r (folded q̃) or g·r (c_Q), then 2·g·r (c_K, c_V), d]
    b_in: Optional[Tensor]  # [rows of w_in]: β on folded query rows, zero elsewhere; None without a bias
    m: Optional[Tensor]  # [g, (H/g)·r, r]: M_hᵀ of a group's heads stacked (query not folded)
    beta: Optional[Tensor]  # [g, (H/g)·r] (query not folded, with a bias)
    w_v: Optional[Tensor]  # [H, d_h, r] = B_{V,h} (output not folded)
    b_v: Optional[Tensor]  # [H, d_h] (output not folded, with a bias)
    w_out: Tensor  # [d, H·r] (W_{O,h}·B_{V,h} side by side, folded) or W_O [d, H·d_h]
    b_out: Optional[Tensor]  # [d]


@torch.no_grad()
def step_weights(
    down: Tensor, up: Tensor, bias: Optional[Tensor], out_weight: Tensor, out_bias: Optional[Tensor], *,
    num_heads: int, latent_groups: int, dtype: Optional[torch.dtype] = None,
) -> StepWeights:
    """The pre-multiplied weights of a decode step.

    Args:
        down, up, bias: the MLRA factors of a layer, or of a subset of whole latent groups of its heads
            (``up [3, H·d_h, r]``, those groups' rows of ``down``, ``bias [3·H·d_h]``).
        out_weight: ``W_O`` ``[d, d]`` (``nn.Linear`` layout), or for a subset of heads its columns of
            those heads, ``[d, H·d_h]`` (row-parallel: the subsets' outputs sum to the layer's).
        out_bias: ``b_O`` ``[d]`` or None; for subsets of heads give it to exactly one of them.
        num_heads, latent_groups: ``H`` and ``g`` of these factors.
        dtype: the stored dtype (default ``down``'s). Products are formed in float32 (float64 for float64
            weights). They are a copy: form them again after the weights change.
    """
    H, g = int(num_heads), int(latent_groups)
    d, D, r = down.shape[1], up.shape[1], up.shape[2]
    dh, hpg, gr = D // H, H // g, g * r
    if tuple(out_weight.shape) != (d, D):
        what = "W_O [d, d]" if D == d else "W_O's columns of these heads, [d, H·d_h]"
        raise ValueError(f"out_weight must be {what} = [{d}, {D}], got {tuple(out_weight.shape)}")
    store = dtype if dtype is not None else down.dtype
    work = torch.float64 if down.dtype == torch.float64 else torch.float32
    down_w, up_w = down.to(work), up.to(work)
    bias_w = bias.to(work) if bias is not None else None
    w_o = out_weight.to(work)
    fold_q, fold_o = fold_rules(d, H, g, r, D)
    m, beta = absorbed_weights(up_w, bias_w, H)  # [H, r, r], [H, r]
    m_g, beta_g, b_in = None, None, None
    if fold_q:
        d_q = down_w[:gr].view(g, 1, r, d).expand(g, hpg, r, d).reshape(H, r, d)  # each head's group rows
        q_rows = torch.bmm(m.transpose(1, 2), d_q).reshape(H * r, d)  # M_hᵀ·D_{Q,j}
        if beta is not None:
            b_in = torch.cat([beta.reshape(H * r), beta.new_zeros(2 * gr)])
    else:
        q_rows = down_w[:gr]
        m_g = m_by_group(m, g).transpose(1, 2)
        beta_g = beta.reshape(g, hpg * r) if beta is not None else None
    w_in = torch.cat([q_rows, down_w[gr:]])
    b_v = bias_w[2 * D:] if bias_w is not None else None
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
    update (an optimizer step, ``load_state_dict``) or a replaced parameter forms them again. The owner
    clears the memo at each prefill (writes that move no version counter, through ``.data``, a numpy view
    or to an inference tensor, are then seen from the next prefill on) and in ``_apply``. ``formed``
    counts how often the weights were formed; pickling keeps only that count.
    """

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

    def lookup(self, down: Tensor, up: Tensor, bias: Optional[Tensor], out_weight: Tensor,
               out_bias: Optional[Tensor], *, num_heads: int, latent_groups: int,
               out_weight_transposed: bool = False) -> Optional[StepWeights]:
        """The weights held for exactly these tensors and counts, or None."""
        w = self._weights
        if w is None or w.num_heads != num_heads or w.latent_groups != latent_groups:
            return None
        stamps = self._stamps
        if stamps[-1] != out_weight_transposed or not all(
                _stamp_matches(s, t) for s, t in zip(stamps, (down, up, bias, out_weight, out_bias))):
            return None
        return w

    def get(self, down: Tensor, up: Tensor, bias: Optional[Tensor], out_weight: Tensor, out_bias: Optional[Tensor], *,
            num_heads: int, latent_groups: int, out_weight_transposed: bool = False) -> StepWeights:
        """:func:`step_weights`, formed where the memo holds none for these tensors; ``out_weight_transposed``:
        ``out_weight`` is ``[H·d_h, d]`` (a Hugging Face ``Conv1D``)."""
        w = self.lookup(down, up, bias, out_weight, out_bias, num_heads=num_heads, latent_groups=latent_groups,
                        out_weight_transposed=out_weight_transposed)
        if w is None:
            w_o = out_weight.t() if out_weight_transposed else out_weight
            w = step_weights(down, up, bias, w_o, out_bias, num_heads=num_heads, latent_groups=latent_groups)
            self._weights = w
            self._stamps = tuple(_stamp(t) for t in (down, up, bias, out_weight, out_bias)) + (out_weight_transposed,)
            self.formed += 1
        return w
