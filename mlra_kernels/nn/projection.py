"""``MLRAProjection``: the MLRA Q/K/V factors, the one module that holds them for every model."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor, nn

from mlra_kernels.ops.mlra import layout

logger = logging.getLogger(__name__)


class MLRAProjection(nn.Module):
    """The factorised Q/K/V projections of one attention layer (layout: ``mlra_kernels.ops.mlra.layout``).

    Args:
        embed_dim: model width ``d``.
        num_heads: heads ``H``; must divide ``embed_dim``.
        rank: rank ``r`` per latent group, in ``[1, embed_dim]``; default ``embed_dim // 4``.
        latent_groups: latent groups ``g``; must divide ``num_heads``.
        bias: hold the Q/K/V bias ``[3·d]``.

    Attributes:
        down: ``[3·g·r, d]``, ``A_Q; A_K; A_V`` in ``nn.Linear`` layout (``c = x @ down.T``).
        up: ``[3, d, r]``; ``up[p, h·d_h:(h+1)·d_h]`` is ``B_{P,h}``.
        bias: ``[3·d]`` (q, k, v, as ``nn.MultiheadAttention.in_proj_bias``) or None.

    It computes nothing itself: attention modules pass :meth:`op_factors` to the public ops.
    Initialisation is GPT-2's N(0, 0.02) for both factors and a zero bias (DESIGN.md: the variance
    argument relies on it); :meth:`load_dense_` sets the factors from a dense weight by truncated SVD.
    """

    # Set by mlra_kernels.distributed.MLRAProjectionParallel: the factors are then sharded by head.
    _tp = None

    def __init__(
        self, embed_dim: int, num_heads: int, rank: Optional[int] = None, latent_groups: int = 1,
        bias: bool = True, device=None, dtype=None, *, prefix: str = "",
        names: tuple[str, str] = ("embed_dim", "num_heads"),
    ) -> None:
        super().__init__()
        d, H, r, g = layout.check_config(embed_dim, num_heads, rank, latent_groups, prefix=prefix, names=names)
        self.embed_dim, self.num_heads, self.rank, self.latent_groups = d, H, r, g
        factory = {"device": device, "dtype": dtype}
        self.down = nn.Parameter(torch.empty(3 * g * r, d, **factory))
        self.up = nn.Parameter(torch.empty(3, d, r, **factory))
        self.bias = nn.Parameter(torch.empty(3 * d, **factory)) if bias else None
        #: Relative Frobenius error of each projection after :meth:`load_dense_` (``{"q", "k", "v"}``).
        self.svd_error: Optional[dict[str, float]] = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.down, std=0.02)
        nn.init.normal_(self.up, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def op_factors(self) -> tuple[Tensor, Tensor, Optional[Tensor], int, int]:
        """``(down, up, bias, num_heads, latent_groups)`` to hand the MLRA ops: the parameters themselves, or
        under tensor parallelism (:mod:`mlra_kernels.distributed`) this rank's local factors and counts."""
        if self._tp is None:
            return self.down, self.up, self.bias, self.num_heads, self.latent_groups
        return self._tp.local_factors(self)

    def _check_whole(self, what: str) -> None:
        if self._tp is not None:
            raise NotImplementedError(f"MLRAProjection.{what} needs the whole factors; under tensor parallelism each "
                                      "rank holds some heads: call it before parallelizing, or on a gathered copy")

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, rank={self.rank}, "
                f"latent_groups={self.latent_groups}, bias={self.bias is not None}")

    @torch.no_grad()
    def load_dense_(self, weight: Tensor, bias: Optional[Tensor] = None) -> Optional[dict[str, float]]:
        """Set the factors from a dense ``[3·d, d]`` Q/K/V weight (``nn.Linear`` layout) by truncated SVD,
        and the bias (zero when ``bias`` is None); returns and keeps ``svd_error`` (None on the meta device).
        """
        self._check_whole("load_dense_")
        d = self.embed_dim
        if not isinstance(weight, Tensor) or tuple(weight.shape) != (3 * d, d):
            shape = list(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise ValueError(f"the dense Q/K/V weight must be [3·d, d] = [{3 * d}, {d}], got {shape}")
        down, up, errors = layout.factorize(weight, num_heads=self.num_heads, rank=self.rank,
                                            latent_groups=self.latent_groups)
        self.down.copy_(down)
        self.up.copy_(up)
        if self.bias is not None:
            self.bias.zero_() if bias is None else self.bias.copy_(bias)
        self.svd_error = errors
        if errors is not None:
            logger.info(
                "MLRA conversion (d=%d, rank=%d, groups=%d): relative error q=%.3g k=%.3g v=%.3g",
                d, self.rank, self.latent_groups, errors["q"], errors["k"], errors["v"],
            )
        return errors

    @classmethod
    def from_dense(
        cls, weight: Tensor, bias: Optional[Tensor], *, num_heads: int, rank: Optional[int] = None,
        latent_groups: int = 1,
    ) -> "MLRAProjection":
        """A projection holding the truncated SVD of ``weight`` ``[3·d, d]`` (and ``bias`` ``[3·d]``)."""
        out = cls(weight.shape[1], num_heads, rank, latent_groups, bias=bias is not None,
                  device=weight.device, dtype=weight.dtype)
        out.load_dense_(weight, bias)
        return out

    def dense_weight(self) -> Tensor:
        """The dense ``[3·d, d]`` Q/K/V weight the factors represent (``B_P·A_P`` per head)."""
        self._check_whole("dense_weight")
        return layout.dense_from_factors(self.down, self.up, self.num_heads, self.latent_groups)


def move_flat_factors(names: tuple[str, str, str], state_dict, prefix, *args) -> None:
    """A ``load_state_dict`` pre-hook, bound to ``names`` with ``functools.partial``: factors saved flat on the
    layer as ``names`` (down, up, bias; state dicts from before ``qkv`` held them) move into ``qkv``."""
    for old, new in zip(names, ("qkv.down", "qkv.up", "qkv.bias")):
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
