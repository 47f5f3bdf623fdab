"""``MLRAttention``: Multi-head Low-Rank Attention as a drop-in for ``nn.MultiheadAttention``."""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from mlra_kernels._mask_memo import memo_by_tensor
from mlra_kernels._warnings import warn_once
from mlra_kernels.nn.projection import MLRAProjection, move_flat_factors
from mlra_kernels.ops.mlra import masks, mlra_attention, mlra_attention_dense
from mlra_kernels.ops.mlra.layout import factorize

# Why a call left the fused op, and how to get it back: one warning per reason and process, through
# the package's `warn_once` (its keys are in `mlra_kernels._warnings._WARNED`).
_UNFUSED_REASONS = {
    "cross-attention": (
        "MLRAttention: cross-attention (query, key and value are not one tensor) runs the unfused "
        "dense path (mlra_attention_dense); the fused MLRA op covers self-attention, where query, key and "
        "value are the same tensor."
    ),
    "need_weights": (
        "MLRAttention was called with need_weights=True (nn.MultiheadAttention's default): the "
        "attention weights exist only on the unfused dense path (mlra_attention_dense), which is slower and keeps a "
        "[B, H, T, S] matrix. Pass need_weights=False to use the fused MLRA op."
    ),
    "attn_mask": (
        "MLRAttention: an attn_mask that is not the causal mask runs the unfused dense path "
        "([B, H, T, S] scores in memory). The fused MLRA op takes the causal mask (pass is_causal=True "
        "with it) and key_padding_mask; express padding as key_padding_mask to use it."
    ),
}


def _warn_unfused(reason: str) -> None:
    # stacklevel 6: warn_once, this function, forward, Module._call_impl, Module._wrapped_call_impl, caller.
    warn_once(f"MLRAttention:{reason}", _UNFUSED_REASONS[reason], stacklevel=6)


def _compare_causal(mask: Tensor, size: int) -> bool:
    upper = torch.ones(size, size, dtype=torch.bool, device=mask.device).triu_(1)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, upper))
    expected = torch.zeros(size, size, dtype=mask.dtype, device=mask.device).masked_fill_(upper, float("-inf"))
    return bool(torch.equal(mask, expected))


def _is_causal_mask(mask: Tensor, size: int) -> bool:
    """True when ``mask`` is exactly the square causal mask of ``size`` (bool or additive float).

    The answer is memoised per mask tensor (see ``mlra_kernels._mask_memo``): a stack of layers given
    one mask compares it once, not once per layer.
    """
    if mask.dim() != 2 or mask.shape != (size, size):
        return False
    return memo_by_tensor(("causal", size), mask, lambda: _compare_causal(mask, size))


class InputShapeError(ValueError, AssertionError):
    """A wrong input shape: a ValueError that is also the AssertionError ``nn.MultiheadAttention`` raises."""


def _check_mask_dtype(mask: Optional[Tensor], name: str) -> None:
    if mask is not None and mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")


class MLRAttention(nn.Module):
    r"""Multi-head Low-Rank Attention, a drop-in replacement for :class:`torch.nn.MultiheadAttention`.

    Each of the Q, K and V projections is factorised into a down-projection ``A_P`` (``[g·r, d]``)
    and a per-head up-projection ``B_{P,h}`` (``[d_h, r]``), see DESIGN.md. The output projection
    ``out_proj`` stays a full-rank linear layer, as in ``nn.MultiheadAttention``.

    Args:
        embed_dim: model width ``d``.
        num_heads: number of heads ``H``; must divide ``embed_dim``.
        rank: rank ``r`` of each latent group, ``1 <= rank <= embed_dim``. Default
            :func:`default_rank`: ``embed_dim // 4``.
        latent_groups: number of latent groups ``g``; must divide ``num_heads``. ``g = 1`` is the
            paper's form (``W_P = B_P·A_P``), ``g = H`` gives every head its own factors.
        dropout: dropout on the attention probabilities (training only).
        bias: add the Q/K/V bias ``in_proj_bias`` (``[3·d]``) and the ``out_proj`` bias.
        batch_first: inputs and outputs are ``[B, T, d]`` instead of ``[T, B, d]``.

    Attributes:
        down_proj_weight: ``[3·g·r, d]``, ``A_Q; A_K; A_V`` in ``nn.Linear`` layout.
        up_proj_weight: ``[3, d, r]``, ``up[p, h·d_h:(h+1)·d_h]`` is ``B_{P,h}``.
        in_proj_bias: ``[3·d]`` or ``None``, ordered q, k, v like ``nn.MultiheadAttention``; it may be
            assigned as there (a ``[3·d]`` Parameter or tensor, or ``None`` to remove it).
        out_proj: ``nn.Linear(d, d)``.

    ``forward`` takes and returns exactly what ``nn.MultiheadAttention.forward`` does. Self-attention
    (``query is key is value``) with ``need_weights=False`` and no mask, a causal mask (given as
    ``is_causal=True`` or detected) or a key padding mask runs the fused ``mlra_attention`` op.
    Cross-attention, other attention masks and ``need_weights=True`` run the unfused ``mlra_attention_dense``, with
    one warning per reason and process. Under ``torch.compile`` a causal ``attn_mask`` is recognised
    only through ``is_causal=True`` (comparing the mask's values would break the graph).
    One difference: a query whose keys are all masked outputs zeros, where
    ``nn.MultiheadAttention`` outputs NaN.

    Example::

        >>> attn = MLRAttention(64, 4, rank=16, batch_first=True)
        >>> x = torch.randn(2, 10, 64)
        >>> mask = nn.Transformer.generate_square_subsequent_mask(10)
        >>> y, _ = attn(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
        >>> y.shape
        torch.Size([2, 10, 64])
    """

    __constants__ = ["batch_first"]
    # True where cross-attention is what the module is for (set by replace_mha on a decoder layer's
    # multihead_attn, after saying once that it runs the dense path): its calls do not warn again.
    _cross_attention_expected = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        rank: Optional[int] = None,
        latent_groups: int = 1,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        factory = {"device": device, "dtype": dtype}
        self.qkv = MLRAProjection(embed_dim, num_heads, rank, latent_groups, bias=bias, **factory)
        self.embed_dim = embed_dim
        self.kdim = embed_dim
        self.vdim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.rank = self.qkv.rank
        self.latent_groups = latent_groups
        self.dropout = dropout
        self.batch_first = batch_first
        # No dense in_proj_weight exists; False keeps nn.TransformerEncoder(Layer) off its fused fast
        # path, which would read in_proj_weight directly instead of calling this module.
        self._qkv_same_embed_dim = False
        self.register_parameter("in_proj_weight", None)
        self.register_parameter("q_proj_weight", None)
        self.register_parameter("k_proj_weight", None)
        self.register_parameter("v_proj_weight", None)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()
        self._register_load_state_dict_pre_hook(
            partial(move_flat_factors, ("down_proj_weight", "up_proj_weight", "in_proj_bias")))

    # The factors live in ``qkv`` (an MLRAProjection); these names follow nn.MultiheadAttention's.
    @property
    def down_proj_weight(self) -> nn.Parameter:
        return self.qkv.down

    @property
    def up_proj_weight(self) -> nn.Parameter:
        return self.qkv.up

    @property
    def in_proj_bias(self) -> Optional[nn.Parameter]:
        return self.qkv.bias

    @in_proj_bias.setter
    def in_proj_bias(self, value: Optional[Tensor]) -> None:
        """Set (a ``[3·d]`` Parameter, used as is, or tensor, wrapped in one) or remove (``None``) the Q/K/V bias."""
        d, ref = self.embed_dim, self.qkv.down
        if value is None:
            self.qkv.bias = None
            return
        if not isinstance(value, Tensor):
            raise TypeError(f"MLRAttention: in_proj_bias must be a [3·d] = [{3 * d}] tensor or None, "
                            f"got {type(value).__name__}")
        if tuple(value.shape) != (3 * d,):
            raise ValueError(f"MLRAttention: in_proj_bias must have shape [3·d] = [{3 * d}] (the q, k and v biases, "
                             f"embed_dim={d}), got {list(value.shape)}")
        if value.dtype != ref.dtype:
            raise TypeError(f"MLRAttention: in_proj_bias has dtype {value.dtype} but the module's parameters are "
                            f"{ref.dtype}")
        if value.device != ref.device:
            raise ValueError(f"MLRAttention: in_proj_bias is on {value.device} but the module's parameters are on "
                             f"{ref.device}")
        self.qkv.bias = value if isinstance(value, nn.Parameter) else nn.Parameter(value)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "in_proj_bias" and "qkv" in self.__dict__.get("_modules", {}):
            # nn.Module.__setattr__ would register a Parameter under this name; the bias lives in qkv.
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    @property
    def svd_error(self) -> Optional[dict[str, float]]:
        """Relative Frobenius error of each projection after :meth:`from_mha` (``{"q", "k", "v"}``)."""
        return self.qkv.svd_error

    def _reset_parameters(self) -> None:
        # GPT-2's N(0, 0.02) for every factor (DESIGN.md: the variance argument relies on it).
        self.qkv.reset_parameters()
        nn.init.normal_(self.out_proj.weight, std=0.02)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, rank={self.rank}, "
            f"latent_groups={self.latent_groups}, dropout={self.dropout}, batch_first={self.batch_first}"
        )

    @classmethod
    def from_mha(
        cls, mha: nn.MultiheadAttention, rank: Optional[int] = None, latent_groups: int = 1
    ) -> "MLRAttention":
        """Convert a (trained) ``nn.MultiheadAttention`` by truncated SVD of each projection.

        Each projection ``W_P`` (``[d, d]``), or with ``g`` latent groups each block of ``d/g`` rows
        (the heads of one group), is factorised as ``U Σ Vᵀ`` and truncated to ``rank``:
        ``B = U√Σ``, ``A = √ΣVᵀ``. This is the best rank-``r`` approximation in Frobenius norm, and it
        is exact when ``rank = embed_dim``. Biases and ``out_proj`` are copied. The relative error
        ``‖W_P − B·A‖_F / ‖W_P‖_F`` of each projection is stored in ``svd_error`` and logged.

        Args:
            mha: the module to convert. ``kdim``/``vdim`` different from ``embed_dim``,
                ``add_bias_kv`` and ``add_zero_attn`` are not supported.
            rank: rank per latent group; default :func:`default_rank`.
            latent_groups: number of latent groups ``g``.

        Example::

            >>> mha = nn.MultiheadAttention(32, 4)
            >>> mlra = MLRAttention.from_mha(mha, rank=32)
            >>> max(mlra.svd_error.values()) < 1e-5
            True
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        if not mha._qkv_same_embed_dim:
            raise ValueError(
                "from_mha needs kdim == vdim == embed_dim (a packed in_proj_weight); got "
                f"embed_dim={mha.embed_dim}, kdim={mha.kdim}, vdim={mha.vdim}"
            )
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("from_mha does not support add_bias_kv=True or add_zero_attn=True")
        weight = mha.in_proj_weight
        out = cls(
            mha.embed_dim,
            mha.num_heads,
            rank=rank,
            latent_groups=latent_groups,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            batch_first=mha.batch_first,
            device=weight.device,
            dtype=weight.dtype,
        )
        out.load_dense_(weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias)
        out.train(mha.training)
        return out

    @torch.no_grad()
    def load_dense_(
        self,
        in_proj_weight: Tensor,
        in_proj_bias: Optional[Tensor] = None,
        out_proj_weight: Optional[Tensor] = None,
        out_proj_bias: Optional[Tensor] = None,
    ) -> dict[str, float]:
        """Set the factors from dense ``[3·d, d]`` Q/K/V weights by truncated SVD; returns ``svd_error``."""
        d = self.embed_dim
        if tuple(in_proj_weight.shape) != (3 * d, d):
            raise ValueError(f"in_proj_weight must be [3·d, d] = [{3 * d}, {d}], got {list(in_proj_weight.shape)}")
        errors = self.qkv.load_dense_(in_proj_weight, in_proj_bias)
        if out_proj_weight is not None:
            self.out_proj.weight.copy_(out_proj_weight)
        if self.out_proj.bias is not None:
            if out_proj_bias is None:
                self.out_proj.bias.zero_()
            else:
                self.out_proj.bias.copy_(out_proj_bias)
        return errors

    def dense_in_proj_weight(self) -> Tensor:
        """The dense ``[3·d, d]`` Q/K/V weight that the factors represent (``B_P·A_P`` per head)."""
        return self.qkv.dense_weight()

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """Same arguments, shapes and return value as :meth:`torch.nn.MultiheadAttention.forward`.

        Args:
            query: ``[L, E]`` unbatched, ``[L, N, E]`` or, with ``batch_first``, ``[N, L, E]``.
            key, value: ``[S, E]``, ``[S, N, E]`` or ``[N, S, E]``.
            key_padding_mask: ``[N, S]`` (``[S]`` unbatched), bool (``True`` = ignore) or float (added).
            need_weights: also return the attention weights (dense path; see the class doc).
            attn_mask: ``[L, S]`` or ``[N·H, L, S]``, bool (``True`` = not allowed) or float (added).
            average_attn_weights: average the returned weights over heads.
            is_causal: hint that ``attn_mask`` is the causal mask; ``attn_mask`` is then required.

        Returns:
            ``(attn_output, attn_weights)``: output shaped like ``query``; weights ``[N, L, S]``
            (averaged) or ``[N, H, L, S]``, without ``N`` when unbatched, or ``None``.
        """
        self._check_inputs(query, key, value)
        is_self = query is key and key is value
        is_batched = self._shape_check(query, key, value, key_padding_mask, attn_mask)
        _check_mask_dtype(key_padding_mask, "key_padding_mask")
        _check_mask_dtype(attn_mask, "attn_mask")
        if key_padding_mask is not None and attn_mask is not None and key_padding_mask.dtype != attn_mask.dtype:
            warnings.warn(
                "Support for mismatched key_padding_mask and attn_mask is deprecated. Use same type for both instead.",
                stacklevel=4,
            )
            # As nn.MultiheadAttention: a bool mask becomes -inf in the query's dtype, a float one is kept.
            if key_padding_mask.dtype == torch.bool:
                key_padding_mask = masks.additive(key_padding_mask, query.dtype, empty_rows="zeros")
            if attn_mask.dtype == torch.bool:
                attn_mask = masks.additive(attn_mask, query.dtype, empty_rows="zeros")
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                "method `generate_square_subsequent_mask` to create this mask."
            )

        # To [B, T, E].
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, T, E = query.shape
        S = key.shape[1]
        if E != self.embed_dim:
            raise InputShapeError(
                f"was expecting embedding dimension of {self.embed_dim}, but got {E}: the last dimension of query "
                f"must be the module's embed_dim={self.embed_dim}")
        if key.shape != value.shape:
            raise InputShapeError(f"key shape {key.shape} does not match value shape {value.shape}")
        if key.shape[0] != B or key.shape[2] != self.embed_dim:
            raise InputShapeError(
                f"key must be [batch={B}, S, embed_dim={self.embed_dim}] in [B, S, E] order, got {list(key.shape)}"
            )
        self._mask_shape_check(B, T, S, key_padding_mask, attn_mask)

        causal = False
        if is_self and attn_mask is not None:
            # Under torch.compile only the is_causal hint counts: comparing the mask is data-dependent.
            if is_causal or (not torch.compiler.is_compiling() and _is_causal_mask(attn_mask, T)):
                causal, attn_mask = True, None
        dropout_p = self.dropout if self.training else 0.0

        down, up, bias, H, g = self.qkv.op_factors()  # under tensor parallelism, this rank's heads
        if is_self and not need_weights and attn_mask is None:
            out = mlra_attention(
                query, down, up, bias, num_heads=H, latent_groups=g, causal=causal,
                key_padding_mask=key_padding_mask, dropout_p=dropout_p,
            )
            weights = None
        else:
            if not torch.compiler.is_compiling():
                if not is_self and not self._cross_attention_expected:
                    _warn_unfused("cross-attention")
                if need_weights:
                    _warn_unfused("need_weights")
                if is_self and attn_mask is not None:
                    _warn_unfused("attn_mask")
            if H != self.num_heads and (need_weights or (attn_mask is not None and attn_mask.dim() == 3)):
                raise NotImplementedError("MLRAttention under tensor parallelism: need_weights=True and a per-head "
                                          "[B·H, T, S] attn_mask are not supported (each rank holds some heads)")
            out, weights = mlra_attention_dense(
                query, key, value, down, up, bias, num_heads=H,
                latent_groups=g, causal=causal, key_padding_mask=key_padding_mask,
                attn_mask=attn_mask, dropout_p=dropout_p, need_weights=need_weights,
            )
        out = self.out_proj(out)

        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            out = out.squeeze(0)
            if weights is not None:
                weights = weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _check_inputs(self, query: Any, key: Any, value: Any) -> None:
        """Types, dtypes and devices of the inputs, with errors that name them (not the op's ``x``)."""
        param = self.down_proj_weight
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"MLRAttention: {name} must be a Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(
                    f"MLRAttention: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}"
                )
            if t.device != param.device:
                raise ValueError(
                    f"MLRAttention: {name} is on {t.device} but the module's parameters are on {param.device}; "
                    "move one of them (module.to(device))"
                )
            if t.dtype != param.dtype and not torch.is_autocast_enabled(t.device.type):
                raise TypeError(
                    f"MLRAttention: {name} has dtype {t.dtype} but the module's parameters are {param.dtype}; "
                    "convert the module (module.to(dtype)) or run under torch.autocast"
                )

    def _shape_check(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """``nn.MultiheadAttention``'s input checks, with its messages; True for a batched (3-D) query."""
        if query.dim() not in (2, 3):
            raise AssertionError(
                f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query tensor"
            )
        batched = query.dim() == 3
        kind, n = ("batched (3-D)", 3) if batched else ("unbatched (2-D)", 2)
        if key.dim() != n or value.dim() != n:
            raise AssertionError(
                f"For {kind} `query`, expected `key` and `value` to be {n}-D"
                f" but found {key.dim()}-D and {value.dim()}-D tensors respectively"
            )
        if key_padding_mask is not None and key_padding_mask.dim() != n - 1:
            raise AssertionError(
                f"For {kind} `query`, expected `key_padding_mask` to be `None` or {n - 1}-D"
                f" but found {key_padding_mask.dim()}-D tensor instead"
            )
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise AssertionError(
                f"For {kind} `query`, expected `attn_mask` to be `None`, 2-D or 3-D"
                f" but found {attn_mask.dim()}-D tensor instead"
            )
        if not batched and attn_mask is not None and attn_mask.dim() == 3:
            expected = (self.num_heads, query.shape[0], key.shape[0])
            if attn_mask.shape != expected:
                raise AssertionError(f"Expected `attn_mask` shape to be {expected} but got {attn_mask.shape}")
        return batched

    def _mask_shape_check(self, B, T, S, key_padding_mask, attn_mask) -> None:
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, S):
            raise AssertionError(
                f"Expected key_padding_mask of shape [batch, source length] = [{B}, {S}], "
                f"but got {list(key_padding_mask.shape)}"
            )
        if attn_mask is not None:
            if attn_mask.dim() == 2 and attn_mask.shape != (T, S):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(T, S)}.")
            if attn_mask.dim() == 3 and attn_mask.shape != (B * self.num_heads, T, S):
                raise RuntimeError(
                    f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                    f"{(B * self.num_heads, T, S)}."
                )


def factorize_in_proj(
    in_proj_weight: Tensor, rank: int, latent_groups: int = 1, num_heads: Optional[int] = None
) -> tuple[Tensor, Tensor, Optional[dict[str, float]]]:
    """``(down, up, errors)`` of a dense ``[3·d, d]`` Q/K/V weight: ``mlra_kernels.ops.mlra.factorize``
    under its earlier name and argument order (``num_heads`` defaults to ``latent_groups``)."""
    return tuple(factorize(in_proj_weight, num_heads=num_heads or latent_groups, rank=rank,
                           latent_groups=latent_groups))
