"""Launchers for the MLRA Triton kernels: shapes, strides and grids, no math.

The kernel modules are imported through :func:`kernels`, which decorates them in the mode of Triton's own
library (compiled or interpreted: the two cannot be mixed in one process; docs/paths.md).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import re
import sys
from typing import Optional

import torch
from torch import Tensor

from mlra_kernels.ops.mlra import config
from mlra_kernels.ops.mlra.config import triton_interpreted


def _version(text: str) -> tuple[int, ...]:
    """``"3.6.0+git..."`` -> ``(3, 6, 0)``: the leading numeric parts."""
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def check_interpreter(triton_version: Optional[str] = None, numpy_version: Optional[str] = None) -> None:
    """Raise when the installed Triton's interpreter cannot run these kernels.

    Triton's interpreter before 3.7 turns scalar kernel arguments into Python ints with ``int()`` on a
    one-element array, which numpy 2.4 and later refuse ("only 0-dimensional arrays can be converted to
    Python scalars"). Compiled GPU kernels are not affected.
    """
    if triton_version is None or numpy_version is None:
        import numpy
        import triton

        triton_version, numpy_version = triton.__version__, numpy.__version__
    if _version(triton_version) < (3, 7) and _version(numpy_version) >= (2, 4):
        raise RuntimeError(
            f"TRITON_INTERPRET=1 with triton {triton_version} and numpy {numpy_version}: the Triton interpreter "
            "before 3.7 fails on numpy 2.4 or newer. Install 'numpy<2.4' or 'triton>=3.7', or unset "
            "TRITON_INTERPRET to run CPU tensors on the torch path."
        )


@functools.lru_cache(maxsize=None)
def check_interpreter_once() -> None:
    """``check_interpreter()`` for the installed versions, when running interpreted; once per process
    (a raised error is not cached, so a failing pair raises on every call)."""
    if triton_interpreted():
        check_interpreter()


@contextlib.contextmanager
def _jit_mode(interpreted: bool):
    """``@triton.jit`` decorates for the interpreter (or the compiler) inside the block, whatever
    ``TRITON_INTERPRET`` says now. ``triton.knobs`` (Triton >= 3.4) holds the switch the decorator reads;
    with ``propagate_env`` off, setting it writes no environment variable."""
    try:
        from triton import knobs
    except ImportError:  # older Triton reads the environment variable itself
        if interpreted != config.interpret_requested():
            raise RuntimeError(
                f"triton {_triton_version()} was imported {'with' if interpreted else 'without'} TRITON_INTERPRET=1, "
                "which has changed since: keep TRITON_INTERPRET as it was when triton was imported, or install "
                "triton>=3.4") from None
        yield
        return
    runtime, propagate = knobs.runtime, knobs.propagate_env
    had, before = "interpret" in vars(runtime), vars(runtime).get("interpret")
    knobs.propagate_env = False
    try:
        runtime.interpret = interpreted
        yield
    finally:
        if had:
            runtime.interpret = before
        else:
            del runtime.interpret
        knobs.propagate_env = propagate


def _triton_version() -> str:
    import triton

    return triton.__version__


def kernels(name: str = "kernels"):
    """The kernel module ``mlra_kernels.ops.mlra.<name>`` (``kernels``, ``decode_kernels``), decorated in
    the mode of Triton's own library (:func:`~mlra_kernels.ops.mlra.config.triton_interpreted`)."""
    module = f"mlra_kernels.ops.mlra.{name}"
    if module in sys.modules:
        return sys.modules[module]
    with _jit_mode(triton_interpreted()):
        return importlib.import_module(module)


def _alloc(shape, dtype, device) -> Tensor:
    if config.POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (int(n) - 1).bit_length())


def seq_bucket(T: int) -> int:
    """The autotuning bucket of a sequence length: the next power of two, at least 64. Lengths in one
    bucket share a tuned config; shorter ones all share the first bucket, where launch overhead dominates."""
    return _pow2(T, lo=64)


def _meta(c: Tensor, r: int, dh: int, causal: bool, has_bias: bool, has_kpm: bool, dropout_p: float) -> dict:
    return dict(
        CAUSAL=causal,
        HAS_BIAS=has_bias,
        HAS_KPM=has_kpm,
        DROPOUT=dropout_p > 0.0,
        PREC="ieee" if c.dtype == torch.float32 else "tf32",
        UPCAST=c.dtype == torch.bfloat16 and triton_interpreted(),
        BLOCK_D=_pow2(dh),
        BLOCK_R=min(64, _pow2(r)),
    )


def _dims(x_shape, num_heads: int, latent_groups: int, r: int):
    B, T, d = x_shape
    return B, T, d, num_heads, num_heads // latent_groups, r, d // num_heads


def fwd_variant(r: int, dh: int) -> str:
    """Forward kernel for rank ``r`` and head dim ``d_h``: ``"rebuild"`` or ``"absorbed"``.

    ``MLRA_FWD_VARIANT`` (``auto``/``rebuild``/``absorbed``, ``config.fwd_variant``) overrides. ``auto``
    is a FLOP model until GPU measurements replace it: per (BM=128)×BN tile the rebuild form costs
    ``4·BN·d_h·(BM + r)`` and the absorbed form ``4·BM·BN·r``; the absorbed form also needs its
    ``[BM, r]`` accumulator in registers, so it is only taken for ``r ≤ 128``. The absorbed form never
    handles ``r > 256``.
    """
    requested = config.fwd_variant()
    rf = _pow2(r)
    if requested == "absorbed":
        return "absorbed" if rf <= 256 else "rebuild"
    if requested == "rebuild":
        return "rebuild"
    bm = 128
    return "absorbed" if rf <= 128 and bm * r < dh * (bm + r) else "rebuild"


def mlra_fwd(
    c: Tensor, up: Tensor, bias: Optional[Tensor], kpm: Optional[Tensor], *,
    num_heads: int, latent_groups: int, causal: bool, scale: float, dropout_p: float, seed: int,
) -> tuple[Tensor, Tensor]:
    """Attention output ``o [B, T, H·d_h]`` (``H·d_h = up.shape[1]``) and ``lse [B, H, T]`` (fp32) from latents
    ``c [B, T, 3·g·r]``."""
    B, T, _ = c.shape
    d, r = up.shape[1], up.shape[2]
    _, _, _, H, hpg, _, dh = _dims((B, T, d), num_heads, latent_groups, r)
    o = _alloc((B, T, d), c.dtype, c.device)
    lse = _alloc((B, H, T), torch.float32, c.device)
    dummy = c  # never read when the matching flag is off
    grid = lambda meta: (triton_cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    meta = _meta(c, r, dh, causal, bias is not None, kpm is not None, dropout_p)
    if fwd_variant(r, dh) == "absorbed":
        kernel = kernels()._mlra_fwd_absorbed_kernel
        meta["BLOCK_RF"] = _pow2(r)
    else:
        kernel = kernels()._mlra_fwd_kernel
    kernel[grid](
        c, up, bias if bias is not None else dummy, kpm if kpm is not None else dummy, o, lse,
        c.stride(0), c.stride(1), o.stride(0), o.stride(1),
        T, seq_bucket(T), H, hpg, r, dh, d, latent_groups * r,
        scale, seed, dropout_p,
        **meta,
    )
    return o, lse


def mlra_bwd_qkv(
    c: Tensor, up: Tensor, bias: Optional[Tensor], kpm: Optional[Tensor], o: Tensor, lse: Tensor, do: Tensor, *,
    num_heads: int, latent_groups: int, causal: bool, scale: float, dropout_p: float, seed: int,
) -> Tensor:
    """Per-head gradients of q, k and v, ``[B, T, 3, H·d_h]`` in the input dtype."""
    B, T, _ = c.shape
    d, r = up.shape[1], up.shape[2]
    _, _, _, H, hpg, _, dh = _dims((B, T, d), num_heads, latent_groups, r)
    o, do = o.contiguous(), do.contiguous()  # the preprocess kernel reads both with o's strides
    delta = _alloc((B, H, T), torch.float32, c.device)
    mod = kernels()
    mod._mlra_bwd_preprocess_kernel[(triton_cdiv(T, 64), B * H)](
        o, do, delta, o.stride(0), o.stride(1), T, H, dh, BLOCK_M=64, BLOCK_D=_pow2(dh),
    )
    dqkv = _alloc((B, T, 3, d), c.dtype, c.device)
    dummy = c
    args = (
        c, up, bias if bias is not None else dummy, kpm if kpm is not None else dummy, do, lse, delta, dqkv,
        c.stride(0), c.stride(1), do.stride(0), do.stride(1), dqkv.stride(0), dqkv.stride(1),
        T, seq_bucket(T), H, hpg, r, dh, d, latent_groups * r,
        scale, seed, dropout_p,
    )
    meta = _meta(c, r, dh, causal, bias is not None, kpm is not None, dropout_p)
    mod._mlra_bwd_dkdv_kernel[lambda m: (triton_cdiv(T, m["BLOCK_N"]), B * H)](*args, **meta)
    mod._mlra_bwd_dq_kernel[lambda m: (triton_cdiv(T, m["BLOCK_M"]), B * H)](*args, **meta)
    return dqkv


def dropout_keep_mask(B: int, H: int, T: int, dropout_p: float, seed: int, device) -> Tensor:
    """The boolean keep mask ``[B, H, T, T]`` the kernels draw for ``(dropout_p, seed)`` (for tests)."""
    keep = torch.empty((B * H, T, T), dtype=torch.int8, device=device)
    kernels()._mlra_dropout_mask_kernel[(triton_cdiv(T, 32), B * H)](keep, T, seed, dropout_p, BLOCK=32)
    return keep.view(B, H, T, T).bool()


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
