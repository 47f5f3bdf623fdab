"""Public call: ``mlra_kernels.tev``."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .op import tev_partials
from .stats import TEVStats, all_reduce_partials, finalize

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _as_rows(rows, device: torch.device) -> Optional[Tensor]:
    if rows is None:
        return None
    if not isinstance(rows, Tensor):
        rows = torch.as_tensor(rows, dtype=torch.long)
    if rows.dtype == torch.bool:
        raise TypeError("tev: rows must hold row indices (int32 / int64); for a boolean mask pass mask.nonzero()[:, 0]")
    if rows.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tev: rows must be an int32 or int64 index tensor, got {rows.dtype}")
    if rows.dim() != 1:
        rows = rows.reshape(-1)
    if rows.numel() == 0:
        raise ValueError("tev: rows selects no rows")
    return rows.to(device, non_blocking=True)


def tev(
    weight: Union[Tensor, nn.Embedding],
    *,
    rows: Optional[Union[Tensor, Sequence[int]]] = None,
    unbiased: bool = False,
    per_token: bool = False,
    process_group=None,
) -> TEVStats:
    """Token Embedding Variability: µ_TEV and σ_TEV of an embedding matrix, in one streaming read.

    TEV_i is the population std of row i; µ_TEV and σ_TEV are their mean and std across rows
    (DESIGN.md). Each element is read once in its own dtype and accumulated in fp32 / fp64; rows and
    partial results merge with Welford / Chan. Runs the C++ kernel on the CPU and the CUDA kernel on a GPU.

    Args:
        weight: [V, d] float32 / float16 / bfloat16 tensor (any strides), or an ``nn.Embedding``.
        rows: optional [R] int32 / int64 indices of the rows to include (for example the tokens that
            occur in the data). Default: all V rows.
        unbiased: σ_TEV with the (R - 1) denominator instead of R. Default False.
        per_token: also return TEV_i of every selected row as a [R] float32 tensor. Default False.
        process_group: for a vocab-sharded embedding, the torch.distributed group over which the shards
            are spread. Each rank passes its own [V_rank, d] shard (and ``rows`` indexes that shard); the
            (count, mean, M2) partials are merged over the group, so every rank gets the statistics of the
            whole matrix. ``per_token`` stays local. Default None: no communication.

    Returns:
        TEVStats(mean, std, per_token, rows, nonfinite_rows). Rows holding NaN or Inf are left out of
        mean and std and counted in ``nonfinite_rows``; if every row is left out, mean and std are NaN.
        Rows of huge but finite values (whose squares overflow fp32) are counted: they are redone in fp64.

    Raises:
        ValueError: weight is not 2-D, or is empty. TypeError: unsupported dtype. IndexError: an entry of
        ``rows`` is outside [0, V). ImportError: the compiled extension is missing or stale.

    Example:
        >>> import torch, mlra_kernels
        >>> emb = torch.nn.Embedding(1000, 64)
        >>> s = mlra_kernels.tev(emb)
        >>> 0.9 < s.mean < 1.1 and s.rows == 1000 and s.nonfinite_rows == 0
        True
    """
    w = weight.weight if isinstance(weight, nn.Embedding) else weight
    if not isinstance(w, Tensor):
        raise TypeError(f"tev: weight must be a [V, d] tensor or an nn.Embedding, got {type(weight).__name__}")
    if w.dim() != 2:
        raise ValueError(f"tev: weight must be a 2-D [V, d] tensor, got {w.dim()}-D with shape {tuple(w.shape)}")
    if w.dtype not in _DTYPES:
        raise TypeError(f"tev: weight dtype must be float32, float16 or bfloat16, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"tev: weight is empty (shape {tuple(w.shape)}); TEV needs at least one row and one column")
    idx = _as_rows(rows, w.device)
    stats, pt = tev_partials(w.detach(), idx, per_token)
    if process_group is not None:
        stats = all_reduce_partials(stats, process_group)
    return finalize(stats, unbiased=unbiased, per_token=pt if per_token else None, n_vocab=w.shape[0])
