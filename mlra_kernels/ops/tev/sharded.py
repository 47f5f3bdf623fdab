"""TEV of a DTensor: each rank reduces its local block, and only partials cross the network.

Mesh dims that split the columns (Shard(1)) merge per-row (count, mean, M2) partials, so that every row's
std is that of the whole row; mesh dims that split the rows (Shard(0)) merge the [5] partials over rows;
Replicate dims merge nothing. The matrix is never gathered.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .stats import all_reduce_partials, merge_row_partials, row_partials, rows_to_partials


def is_dtensor(w: Any) -> bool:
    """Whether ``w`` is a ``torch.distributed.tensor.DTensor`` (without importing that module when unused)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(w, mod.DTensor)


@dataclass(frozen=True)
class Layout:
    """How a [V, d] DTensor is spread: the groups to merge over, and where this rank's rows start."""

    local: Tensor  # [V_local, d_local] this rank's block
    row_groups: tuple  # ProcessGroups of the mesh dims that split the rows
    col_groups: tuple  # ProcessGroups of the mesh dims that split the columns
    row_offset: Optional[int]  # global index of local row 0; None when the local rows are not one range


def layout(w: Any, who: str = "tev") -> Layout:
    """Read the placements of the 2-D DTensor ``w``; raises on a placement whose TEV cannot be merged."""
    from torch.distributed.tensor import Shard

    mesh = w.device_mesh
    if mesh.get_coordinate() is None:
        raise ValueError(f"{who}: this rank is not in the weight's device mesh {mesh}; call it on the mesh's ranks")
    row_groups, col_groups, one_range = [], [], True
    for i, p in enumerate(w.placements):
        if p.is_replicate():
            continue
        if p.is_partial():
            raise ValueError(
                f"{who}: weight has a Partial placement on mesh dim {i} ({p}): its local blocks are terms of a "
                "pending reduction, not rows of the matrix; redistribute it to Shard or Replicate first"
            )
        strided = not isinstance(p, Shard) and hasattr(p, "split_factor")  # _StridedShard (FSDP2 over TP)
        dim = getattr(p, "dim", None)
        if not (isinstance(p, Shard) or strided) or dim not in (0, 1, -1, -2):
            raise TypeError(f"{who}: weight has a placement {p!r} on mesh dim {i} that TEV does not know how to merge")
        dim %= 2
        if dim == 0 and strided:
            one_range = False
        if mesh.size(i) > 1:
            (row_groups if dim == 0 else col_groups).append(mesh.get_group(i))
    local = w.to_local()
    offset = _row_offset(w, local) if one_range else None
    return Layout(local=local, row_groups=tuple(row_groups), col_groups=tuple(col_groups), row_offset=offset)


def _row_offset(w: Any, local: Tensor) -> Optional[int]:
    """Global index of the first local row, or None when torch's layout of the shards cannot be read."""
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
    except (ImportError, AttributeError, TypeError, ValueError, RuntimeError):  # torch's private helper changed:
        return None  # rows= and per_token are then refused, µ and σ still merge
    return int(offset[0]) if tuple(shape) == tuple(local.shape) else None


def check(w: Any, rows: bool, per_token: bool, who: str = "tev") -> Layout:
    """:func:`layout`, and a clear error when ``rows`` / ``per_token`` need local rows that are not one range."""
    lay = layout(w, who)
    if (rows or per_token) and lay.row_offset is None:
        what = "rows=" if rows else "per_token=True"
        raise ValueError(
            f"{who}: {what} needs each rank's rows to be one range of the matrix, but the placements "
            f"{tuple(w.placements)} spread them in strides (or torch does not say where they start); leave "
            f"{what.rstrip('=')} out for µ and σ of the whole matrix"
        )
    return lay


def dtensor_partials(
    w: Any, rows: Optional[Tensor], per_token: bool, kernel: bool, who: str = "tev"
) -> tuple[Tensor, Optional[Tensor]]:
    """([5] float64 partials of the whole matrix, merged over the mesh; [R_local] float32 TEV_i or None).

    ``rows`` holds valid global row indices; each rank keeps those inside its range, in their order, and
    ``per_token`` is TEV_i of those (or of all its local rows). ``kernel`` reads blocks of whole rows with
    the compiled op; column-split blocks, and every block when ``kernel`` is False, go through float64 torch.
    """
    lay = check(w, rows is not None, per_token, who)
    local = lay.local.detach()
    idx = None
    if rows is not None:
        start, end = lay.row_offset, lay.row_offset + local.shape[0]
        rows = rows.to(local.device)
        idx = rows[(rows >= start) & (rows < end)] - start
    n = local.shape[0] if idx is None else idx.numel()
    if lay.col_groups or not kernel:
        parts = row_partials(local, idx)  # [R_local, 3] over the local columns
        for group in lay.col_groups:
            if n:  # ranks of one column group hold the same rows: all of them skip, or none
                parts = merge_row_partials(_all_gather(parts, group))
        stats, tev_i = rows_to_partials(parts)
        pt = tev_i.float() if per_token else None
    elif n == 0:
        stats = torch.zeros(5, dtype=torch.float64, device=local.device)
        pt = torch.empty(0, dtype=torch.float32, device=local.device) if per_token else None
    else:
        from .op import tev_partials

        stats, pt = tev_partials(local, idx, per_token)
        pt = pt if per_token else None
    for group in lay.row_groups:
        stats = all_reduce_partials(stats, group)
    return stats, pt


def _all_gather(t: Tensor, group) -> Tensor:
    import torch.distributed as dist

    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)
