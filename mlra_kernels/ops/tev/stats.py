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
