"""TEV in plain float64 torch, written for clarity: the reference for tests and benchmarks."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .stats import TEVStats


def tev_reference(
    weight: Tensor, rows: Optional[Tensor] = None, unbiased: bool = False, chunk_elems: int = 1 << 24
) -> TEVStats:
    """µ_TEV and σ_TEV of a [V, d] matrix in float64 (DESIGN.md), rows with NaN / Inf left out and counted.

    Rows are converted to float64 ``chunk_elems`` elements at a time, so large matrices fit in memory.
    ``per_token`` is the float64 TEV_i of every selected row (NaN for non-finite rows).
    """
    if rows is not None:
        rows = torch.as_tensor(rows, device=weight.device)
        if rows.dtype == torch.bool or rows.is_floating_point() or rows.is_complex():
            raise TypeError(f"tev_reference: rows must hold integer row indices, got {rows.dtype}")
        rows = rows.long().reshape(-1)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= weight.shape[0]):
            raise IndexError(f"tev_reference: entries of `rows` are outside [0, {weight.shape[0]})")
    n = weight.shape[0] if rows is None else rows.numel()
    step = max(1, chunk_elems // max(1, weight.shape[1]))
    per_row, finite = [], []
    for start in range(0, n, step):
        sel = slice(start, min(n, start + step))
        block = weight[sel] if rows is None else weight[rows[sel]]
        block = block.double()
        per_row.append(block.std(dim=1, unbiased=False))
        finite.append(torch.isfinite(block).all(dim=1))
    per_token = torch.cat(per_row)
    ok = torch.cat(finite)
    values = per_token[ok]
    per_token = per_token.masked_fill(~ok, float("nan"))
    count = values.numel()
    if count == 0:
        mean = std = float("nan")
    else:
        mean = values.mean().item()
        if unbiased and count == 1:  # no degree of freedom left (torch would warn, then give NaN)
            std = float("nan")
        else:
            std = values.std(unbiased=unbiased).item()
    return TEVStats(mean=mean, std=std, per_token=per_token, rows=count, nonfinite_rows=int((~ok).sum()))


def tev_one_liner(weight: Tensor) -> tuple[Tensor, Tensor]:
    """What users write without this package (the benchmark baseline): upcast copy, then two reductions."""
    t = torch.std(weight.float(), dim=1, unbiased=False)
    return t.mean(), t.std()
