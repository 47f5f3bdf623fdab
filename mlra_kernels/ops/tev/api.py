"""Public call: ``mlra_kernels.tev``."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .op import tev_partials
from .sharded import dtensor_partials, is_dtensor
from .stats import TEVStats, all_reduce_partials, finalize, row_partials, rows_to_partials

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DEVICES = ("cpu", "cuda")


def _mask_error(who: str, what: str) -> TypeError:
    return TypeError(
        f"{who}: `rows` must hold integer row indices (int32 or int64), got {what}; a boolean mask is not read "
        "as rows: pass the indices where it is True, mask.nonzero()[:, 0] for a tensor or numpy.flatnonzero(mask) "
        "for an array"
    )


def _float_error(who: str, what: str) -> TypeError:
    return TypeError(
        f"{who}: `rows` must hold integer row indices (int32 or int64), got {what}; floats are never truncated "
        "to indices: convert them yourself if that is what you mean"
    )


def _holds_bool(seq: Any) -> bool:
    """Whether a (nested) list / tuple holds a Python or numpy bool, which torch would read as 0 / 1."""
    for x in seq:
        if isinstance(x, (list, tuple)):
            if _holds_bool(x):
                return True
        elif isinstance(x, bool) or type(x).__name__ == "bool_":  # numpy.bool_ without importing numpy
            return True
    return False


def _rows_tensor(rows: Any, who: str) -> Tensor:
    """``rows`` (tensor, numpy array, list, tuple, range) as an integer tensor; the same checks for each kind."""
    if isinstance(rows, Tensor):
        t = rows
    else:
        kind = getattr(getattr(rows, "dtype", None), "kind", None)  # numpy arrays and numpy scalars
        if kind is not None and getattr(rows, "size", 1) == 0:
            return torch.empty(0, dtype=torch.long)  # no dtype to check: "selects no rows"
        if kind == "b":
            raise _mask_error(who, f"a numpy {rows.dtype} array")
        if kind in ("f", "c"):
            raise _float_error(who, f"a numpy {rows.dtype} array")
        if kind in ("i", "u"):
            return torch.as_tensor(rows.astype("int64"))
        if kind is not None or isinstance(rows, (str, bytes)):
            raise TypeError(f"{who}: `rows` must hold integer row indices, got {type(rows).__name__} {rows!r:.80}")
        try:
            t = torch.as_tensor(rows)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"{who}: `rows` must be a tensor, numpy array or sequence of integer row indices, got "
                f"{type(rows).__name__} ({err})"
            ) from None
        if t.numel() == 0:
            return t.long()
        if t.dtype == torch.bool or (t.dtype == torch.int64 and isinstance(rows, (list, tuple)) and _holds_bool(rows)):
            raise _mask_error(who, f"a {type(rows).__name__} holding booleans")
        if t.is_floating_point() or t.is_complex():
            raise _float_error(who, f"a {type(rows).__name__} of {str(t.dtype).replace('torch.', '')} values")
    if t.dtype == torch.bool:
        raise _mask_error(who, "a bool tensor")
    if t.is_floating_point() or t.is_complex():
        raise _float_error(who, f"a {str(t.dtype).replace('torch.', '')} tensor")
    if t.dtype == torch.uint8:  # torch indexing reads uint8 as a (deprecated) mask: say which is meant
        raise TypeError(
            f"{who}: `rows` is a uint8 tensor, which torch indexing reads as a mask; pass rows.long() for indices, "
            "or rows.bool().nonzero()[:, 0] for a mask"
        )
    if t.dtype not in (torch.int32, torch.int64):
        t = t.long()
    if t.device.type not in _DEVICES:
        raise ValueError(
            f"{who}: `rows` is on the {t.device.type} device; it must hold real indices on the CPU or a CUDA device"
        )
    return t.reshape(-1) if t.dim() != 1 else t


def _nonempty(t: Tensor, who: str) -> Tensor:
    if t.numel() == 0:
        raise ValueError(f"{who}: rows selects no rows")
    return t


def _as_rows(rows: Any, device: torch.device) -> Optional[Tensor]:
    if rows is None:
        return None
    return _nonempty(_rows_tensor(rows, "tev"), "tev").to(device, non_blocking=True)


def check_rows(rows: Any, n_vocab: int, who: str = "tev") -> Optional[Tensor]:
    """Validate ``rows`` for a [V, d] matrix with V = ``n_vocab`` now, the range included (one host sync).

    Returns the [R] int32 / int64 index tensor (on the device ``rows`` came on), or None for None. Raises what
    :func:`tev` raises at its call, so that a long-lived caller (``TEVMonitor``) fails at its construction.
    """
    if rows is None:
        return None
    t = _nonempty(_rows_tensor(rows, who), who)
    bad = int(((t < 0) | (t >= n_vocab)).sum())
    if bad:
        raise IndexError(f"{who}: {bad} entries of `rows` are outside [0, {n_vocab})")
    return t


def check_weight(w: Any, weight: Any, who: str = "tev") -> None:
    """Type, rank and device of ``w`` (the tensor of ``weight``); the dtype is checked by each caller."""
    if not isinstance(w, Tensor):
        raise TypeError(f"{who}: weight must be a [V, d] tensor or an nn.Embedding, got {type(weight).__name__}")
    if w.dim() != 2:
        raise ValueError(f"{who}: weight must be a 2-D [V, d] tensor, got {w.dim()}-D with shape {tuple(w.shape)}")
    if w.device.type not in _DEVICES:
        raise ValueError(
            f"{who}: weight is on the {w.device.type} device, which holds no data to read: TEV needs a tensor "
            "with real values on the CPU or a CUDA device (materialise the model and load its weights first)"
            if w.device.type == "meta" else
            f"{who}: weight is on the {w.device.type} device; the TEV kernels run on CPU and CUDA tensors"
        )


def check_process_group(process_group: Any, weight: Any = None, who: str = "tev") -> None:
    """``process_group`` is None or a ProcessGroup, and None when ``weight`` is a DTensor (its mesh says)."""
    if process_group is None:
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError(f"{who}: process_group needs torch.distributed, which this torch build does not have")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"{who}: process_group must be a torch.distributed ProcessGroup (dist.group.WORLD, or one made by "
            f"dist.new_group) or None, got {type(process_group).__name__} {process_group!r:.80}"
        )
    if is_dtensor(weight):
        raise ValueError(
            f"{who}: weight is a DTensor, whose device mesh already says how it is spread over the ranks; leave "
            "process_group None (process_group is for a plain tensor holding one shard of the rows)"
        )


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

    A ``DTensor`` (FSDP2's sharded parameters, tensor parallelism, or a 2-D mesh of both) is reduced over
    its device mesh, and every rank of the mesh must call ``tev`` with it. Each rank reads its own block,
    and only partials cross the network, never the matrix: where a mesh dim splits the columns
    (``Shard(1)``), [V_local, 3] per-row (count, mean, M2) partials are merged (a row's std needs the whole
    row), computed in float64 torch rather than the compiled op; where it splits the rows (``Shard(0)``),
    the [5] partials are merged; ``Replicate`` merges nothing. A ``Partial`` placement is refused.

    Args:
        weight: [V, d] float32 / float16 / bfloat16 tensor (any strides) on the CPU or a CUDA device, an
            ``nn.Embedding``, or a [V, d] ``DTensor`` with ``Shard(0)``, ``Shard(1)`` or ``Replicate`` on each
            mesh dim.
        rows: optional [R] integer indices of the rows to include (for example the tokens that occur in the
            data): an int32 / int64 tensor, a numpy integer array, or a list / tuple / range of ints. Floats
            and booleans are refused (TypeError), never truncated or read as 0 / 1; for a boolean mask pass
            ``mask.nonzero()[:, 0]``. For a DTensor, indices of the whole [V, d] matrix, the same on every
            rank. Default: all V rows.
        unbiased: σ_TEV with the (R - 1) denominator instead of R. Default False.
        per_token: also return TEV_i of every selected row as a [R] float32 tensor. Default False. For a
            DTensor, TEV_i of the selected rows this rank holds (those of ``weight.to_local()``, in the order
            of ``rows``), over whole rows; ``rows`` and ``per_token`` are refused (ValueError) when the local
            rows are not one range of the matrix (a strided shard, FSDP2 over row-wise tensor parallelism).
        process_group: for a vocab-sharded plain tensor, the torch.distributed ProcessGroup over which the
            shards are spread. Each rank passes its own [V_rank, d] shard (and ``rows`` indexes that shard);
            the (count, mean, M2) partials are merged over the group, so every rank gets the statistics of
            the whole matrix. ``per_token`` stays local. Default None: no communication (for a plain tensor),
            or the DTensor's mesh (which must then not be given a process_group: ValueError).

    Returns:
        TEVStats(mean, std, per_token, rows, nonfinite_rows). Rows holding NaN or Inf are left out of
        mean and std and counted in ``nonfinite_rows``; if every row is left out, mean and std are NaN.
        Rows whose fp32 squares overflow (huge finite values) or underflow (std below ~1e-19, subnormal
        values) are counted and exact: they are redone in fp64.

    Raises:
        ValueError: weight is not 2-D, is empty, or is not on the CPU or a CUDA device (a meta tensor has no
            data); a DTensor with a Partial placement, on a mesh without this rank, or with ``process_group``.
        TypeError: unsupported dtype; ``rows`` not integer indices; ``process_group`` not a ProcessGroup.
        IndexError: an entry of ``rows`` is outside [0, V).
        ImportError: the compiled extension is missing or stale.

    Example:
        >>> import torch, mlra_kernels
        >>> emb = torch.nn.Embedding(1000, 64)
        >>> s = mlra_kernels.tev(emb)
        >>> 0.9 < s.mean < 1.1 and s.rows == 1000 and s.nonfinite_rows == 0
        True
    """
    return tev_stats(weight, rows=rows, unbiased=unbiased, per_token=per_token, process_group=process_group)


def tev_stats(
    weight: Union[Tensor, nn.Embedding],
    *,
    rows: Any = None,
    unbiased: bool = False,
    per_token: bool = False,
    process_group=None,
    kernel: bool = True,
) -> TEVStats:
    """:func:`tev`, or with ``kernel=False`` the same reduction and merges in float64 torch (any floating
    dtype, float64 included; no compiled extension needed). ``TEVMonitor`` falls back to it for a sharded
    embedding when the extension is missing."""
    w = weight.weight if isinstance(weight, nn.Embedding) else weight
    check_weight(w, weight)
    if kernel and w.dtype not in _DTYPES:
        raise TypeError(f"tev: weight dtype must be float32, float16 or bfloat16, got {w.dtype}")
    if not w.is_floating_point():
        raise TypeError(f"tev: weight must hold floating-point values, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"tev: weight is empty (shape {tuple(w.shape)}); TEV needs at least one row and one column")
    check_process_group(process_group, w)
    if is_dtensor(w):
        idx = check_rows(rows, w.shape[0])  # global indices: each rank keeps those it holds
        stats, pt = dtensor_partials(w.detach(), idx, per_token, kernel)
        return finalize(stats, unbiased=unbiased, per_token=pt, n_vocab=w.shape[0])
    if kernel:
        idx = _as_rows(rows, w.device)
        stats, pt = tev_partials(w.detach(), idx, per_token)
    else:
        idx = check_rows(rows, w.shape[0])
        stats, pt = rows_to_partials(row_partials(w.detach(), None if idx is None else idx.to(w.device)))
        pt = pt.float()
    if process_group is not None:
        stats = all_reduce_partials(stats, process_group)
    return finalize(stats, unbiased=unbiased, per_token=pt if per_token else None, n_vocab=w.shape[0])
