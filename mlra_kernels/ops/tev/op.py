"""The torch.library op ``mlra::tev_partials`` (C++ CPU and CUDA kernels) and its fake implementation."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mlra_kernels import _ext

_fake_registered = False


def _fake_tev_partials(weight: Tensor, rows: Optional[Tensor] = None, per_token: bool = False):
    # Also the Meta kernel: a meta `rows` with a real weight dispatches here, and would get uninitialised stats.
    if rows is not None and rows.device != weight.device:
        if rows.device.type == "meta":
            raise ValueError(
                "mlra::tev_partials: `rows` is on the meta device, which holds no indices to read; expected a 1-D "
                f"int64 or int32 tensor of row indices on weight's device ({weight.device})"
            )
        raise ValueError(
            f"mlra::tev_partials: `rows` is on {rows.device} but weight is on {weight.device}; expected rows on "
            "weight's device"
        )
    n = weight.shape[0] if rows is None else rows.shape[0]
    stats = weight.new_empty((5,), dtype=torch.float64)
    pt = weight.new_empty((n if per_token else 0,), dtype=torch.float32)
    return stats, pt


def ensure_loaded() -> None:
    """Load ``_C`` (which registers the CPU / CUDA kernels) and register the fake kernel, once."""
    global _fake_registered
    if _fake_registered:
        return
    _ext.load()
    torch.library.register_fake("mlra::tev_partials")(_fake_tev_partials)
    _fake_registered = True


def tev_partials(weight: Tensor, rows: Optional[Tensor] = None, per_token: bool = False) -> tuple[Tensor, Tensor]:
    """One streaming pass over ``weight`` [V, d]: returns ([5] float64 partials, [R] or [0] float32 TEV_i).

    The partials are (count, mean, M2, nonfinite, bad_index), see ``csrc/tev/tev.h``. ``rows`` must be on
    ``weight``'s device (ValueError otherwise, a meta ``rows`` included). A meta ``weight`` gives meta outputs
    of the right shapes, as any op does on the meta device.
    """
    ensure_loaded()
    if weight.is_cuda and not _ext.built_with_cuda():
        raise _ext.ExtensionNotAvailableError(
            "tev: weight is a CUDA tensor but mlra_kernels._C was built without CUDA (no nvcc was found, or "
            "MLRA_SKIP_CUDA_BUILD=1 was set). Rebuild it on a host with the CUDA toolkit: run "
            f"`{_ext.BUILD_COMMAND}` in the mlra-kernels source checkout, or pass weight.cpu()."
        )
    return torch.ops.mlra.tev_partials(weight, rows, per_token)
