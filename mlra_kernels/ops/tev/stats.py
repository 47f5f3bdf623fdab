"""TEVStats and the merge of TEV partials (count, mean, M2) in plain torch; no compiled code needed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

# Layout of the [5] float64 partials the op returns.
COUNT, MEAN, M2, NONFINITE, BAD_INDEX = range(5)


@dataclass(frozen=True)
class TEVStats:
    """Token Embedding Variability of an embedding matrix (DESIGN.md).

    Attributes:
        mean: µ_TEV, the mean over rows of the per-row population std TEV_i.
        std: σ_TEV, the std of TEV_i across rows (population, or unbiased if requested).
        per_token: [R] float32 TEV_i per selected row (NaN for rows left out), or None.
        rows: number of rows counted in ``mean`` and ``std``.
        nonfinite_rows: rows left out because they hold NaN or Inf.
    """

    mean: float
    std: float
    per_token: Optional[Tensor]
    rows: int
    nonfinite_rows: int


def merge_partials(parts: Tensor) -> Tensor:
    """Merge [k, 5] partials (count, mean, M2, nonfinite, bad_index) into one [5], on their device.

    This is Chan's parallel merge written for k groups at once:
    n = Σ n_k, mean = Σ n_k·mean_k / n, M2 = Σ M2_k + Σ n_k·(mean_k − mean)².
    """
    n = parts[:, COUNT]
    total = n.sum()
    mean = (n * parts[:, MEAN]).sum() / total.clamp_min(1.0)
    m2 = parts[:, M2].sum() + (n * (parts[:, MEAN] - mean).square()).sum()
    return torch.stack([total, mean, m2, parts[:, NONFINITE].sum(), parts[:, BAD_INDEX].sum()])


def all_reduce_partials(stats: Tensor, process_group) -> Tensor:
    """Gather every rank's [5] partials over ``process_group`` and merge them (same result on every rank)."""
    import torch.distributed as dist

    world = dist.get_world_size(process_group)
    gathered = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats.contiguous(), group=process_group)
    return merge_partials(torch.stack(gathered))


def merge_row_partials(parts: Tensor) -> Tensor:
    """Merge [k, R, 3] per-row partials (count, mean, M2) of k column blocks of the same R rows into [R, 3].

    Chan's merge, as in :func:`merge_partials`; a block with no columns holds (0, 0, 0). A row holding NaN
    or Inf in any block comes out with a non-finite mean or M2.
    """
    n = parts[..., 0]
    total = n.sum(0)
    mean = (n * parts[..., 1]).sum(0) / total.clamp_min(1.0)
    m2 = parts[..., 2].sum(0) + (n * (parts[..., 1] - mean).square()).sum(0)
    return torch.stack([total, mean, m2], dim=1)


def row_partials(weight: Tensor, rows: Optional[Tensor] = None, chunk_elems: int = 1 << 22) -> Tensor:
    """[R, 3] float64 (count, mean, M2) over the columns of each selected row of ``weight`` [V, d], in torch.

    Rows are converted to float64 ``chunk_elems`` elements at a time. ``rows`` must be valid indices.
    """
    n = weight.shape[0] if rows is None else rows.numel()
    out = torch.zeros(n, 3, dtype=torch.float64, device=weight.device)
    d = weight.shape[1]
    if d == 0 or n == 0:
        return out
    out[:, 0] = d
    step = max(1, chunk_elems // d)
    for start in range(0, n, step):
        sel = slice(start, min(n, start + step))
        block = (weight[sel] if rows is None else weight[rows[sel]]).double()  # [r, d]
        mean = block.mean(dim=1)  # [r]
        out[sel, 1] = mean
        out[sel, 2] = (block - mean[:, None]).square().sum(dim=1)
    return out


def rows_to_partials(row_stats: Tensor) -> tuple[Tensor, Tensor]:
    """From [R, 3] per-row (count, mean, M2) over whole rows: ([5] partials over the rows, [R] float64 TEV_i).

    TEV_i is the population std sqrt(M2 / count); a row whose mean or M2 is not finite is NaN in TEV_i,
    left out of the partials and counted as non-finite. No host sync.
    """
    n, mean, m2 = row_stats.unbind(1)
    ok = torch.isfinite(mean) & torch.isfinite(m2)
    tev_i = torch.where(ok, (m2.clamp_min(0.0) / n.clamp_min(1.0)).sqrt(), torch.full_like(m2, math.nan))
    count = ok.sum().to(torch.float64)
    vals = torch.where(ok, tev_i, torch.zeros_like(tev_i))
    mu = vals.sum() / count.clamp_min(1.0)
    m2_rows = torch.where(ok, (tev_i - mu).square(), torch.zeros_like(tev_i)).sum()
    bad = torch.zeros_like(count)
    return torch.stack([count, mu, m2_rows, row_stats.shape[0] - count, bad]), tev_i


def finalize(stats: Tensor, *, unbiased: bool, per_token: Optional[Tensor], n_vocab: int) -> TEVStats:
    """Turn [5] partials into TEVStats. This is the one device-to-host copy of the reduction."""
    count, mean, m2, nonfinite, bad = stats.tolist()
    if bad > 0:
        raise IndexError(f"tev: {int(bad)} entries of `rows` are outside [0, {n_vocab})")
    if count == 0:
        mean_out, std_out = math.nan, math.nan
    else:
        dof = count - 1 if unbiased else count
        mean_out = mean
        std_out = math.sqrt(max(m2, 0.0) / dof) if dof > 0 else math.nan
    return TEVStats(mean=mean_out, std=std_out, per_token=per_token, rows=int(count), nonfinite_rows=int(nonfinite))
