"""The one backend choice of an MLRA call: which path runs, and why.

:func:`choose` picks a prefill path (:data:`PATHS`), :func:`choose_decode` a decode path
(:data:`DECODE_PATHS`); the call runs the path's entry in :data:`PREFILL_OPS`, and :func:`kernel_path`,
:func:`explain` and the one-time "not the fast path" warnings read the same answer. docs/paths.md says
what each path runs and when, with the measurements behind the defaults. ``MLRA_BACKEND=<path>`` or
``with use_backend("<path>"):`` forces a path; a forced path that cannot run the call raises, saying why.

A new path is one file ``path_<name>.py`` (its ops, their fakes and backward, its entry point), its row
in :data:`PREFILL_OPS` (which names the paths) and one more rule in :func:`choose`.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from mlra_kernels._warnings import warn_once
from mlra_kernels.ops.mlra import config, layout
from mlra_kernels.ops.mlra import path_sdpa, path_torch, path_torch_cpu, path_torch_cpu_latent, path_triton
from mlra_kernels.ops.mlra.path_common import latent_is_narrow

# Each prefill path's entry point, ``(x, down, up, bias, kpm, attn_mask, num_heads, latent_groups, causal,
# dropout_p, scale) -> o``; ``mlra_attention`` calls the chosen one. The interpreter is a mode of Triton,
# not other kernels: both Triton paths run one op.
PREFILL_OPS: dict[str, Callable[..., Tensor]] = {
    "sdpa": path_sdpa.attention,
    "triton": path_triton.attention,
    "triton-interpreter": path_triton.attention,
    "torch-cpu": path_torch_cpu.attention,
    "torch-cpu-latent": path_torch_cpu_latent.attention,
    "torch": path_torch.attention,
}
PATHS = tuple(PREFILL_OPS)  # the prefill path names, in the order docs/paths.md gives them

# torch's fused CPU attention needs this many tokens to beat the T×T path (which is also the more exact:
# at T = 1 the fused backward leaves fp32 noise in dq and dk, whose exact value is 0).
CPU_FUSED_MIN_TOKENS = 16

_forced: list[str] = []


@dataclass(frozen=True)
class Choice:
    """``path``: one of :data:`PATHS`; ``reason``: why, in words; ``slow``: a faster path exists for
    this device but cannot run this call (the caller is warned once per reason)."""

    path: str
    reason: str
    slow: bool = False


@contextlib.contextmanager
def use_backend(path: str) -> Iterator[None]:
    """Force ``path`` for the MLRA calls made inside the ``with`` block (their backward keeps it).

    Example::

        >>> with use_backend("torch"):
        ...     y = mlra_kernels.mlra_attention(x, down, up, num_heads=4)
    """
    if path not in PATHS + ("auto",):
        raise ValueError(f"use_backend: path must be one of {', '.join(PATHS + ('auto',))}; got {path!r}")
    _forced.append(path)
    try:
        yield
    finally:
        _forced.pop()


triton_available = config.triton_available
triton_interpreted = config.triton_interpreted


def _interpreter_ready() -> bool:
    """``TRITON_INTERPRET=1`` is set and took effect (it must be set before triton's import)."""
    if not config.interpret_requested() or not triton_available():
        return False
    if triton_interpreted():
        return True
    if not torch.compiler.is_compiling():  # a warning would break the graph
        warn_once(
            "interpret-late",
            "TRITON_INTERPRET=1 was set after `triton` was imported; Triton reads it only at import, so "
            "mlra_attention keeps the torch path on CPU tensors. Set it before importing triton.",
        )
    return False


def _auto(x: Tensor, key_padding_mask: Optional[Tensor], dropout_p: float, attn_mask: Optional[Tensor],
          rank: Optional[int], head_dim: Optional[int]) -> Choice:
    if x.dtype == torch.float64:
        return Choice("torch", "float64 runs the exact torch path (the kernels compute in fp32)")
    if attn_mask is not None:
        return Choice(
            "torch", "a general attn_mask is not fused (causal and key_padding_mask are): the T×T scores "
            "are materialised", slow=True,
        )
    if x.is_cuda:
        if key_padding_mask is None:
            return Choice("sdpa", "CUDA tensors: cuBLAS GEMMs and SDPA's fastest backend" + (
                " on the latents" if latent_is_narrow(rank, head_dim, "cuda") else ""))
        if not triton_available():
            raise RuntimeError("mlra_attention on CUDA tensors with key padding needs Triton: pip install triton")
        return Choice("triton", "CUDA tensors with key padding: the fused Triton kernels")
    if x.device.type == "cpu" and _interpreter_ready():
        return Choice("triton-interpreter", "TRITON_INTERPRET=1: the Triton kernels under the interpreter")
    if key_padding_mask is not None:
        return Choice(
            "torch", "key padding on the CPU: torch's fused CPU attention would give NaN for a query whose "
            "keys are all padding, so the T×T scores are materialised", slow=True,
        )
    if dropout_p > 0.0:
        return Choice(
            "torch", "attention dropout on the CPU: torch's fused CPU attention cannot replay a seeded mask "
            "in the backward, so the T×T scores are materialised", slow=True,
        )
    if x.shape[1] < CPU_FUSED_MIN_TOKENS:
        return Choice("torch", f"fewer than {CPU_FUSED_MIN_TOKENS} tokens: the T×T path is cheaper and exact")
    if latent_is_narrow(rank, head_dim):
        return Choice("torch-cpu-latent", f"CPU tensors, latent r={rank} at most half a head (d_h={head_dim}): "
                      "torch's fused CPU attention on the latents")
    return Choice("torch-cpu", "CPU tensors: latent GEMMs and torch's fused CPU attention")


def _can_run(path: str, x: Tensor, key_padding_mask, dropout_p: float, attn_mask) -> Optional[str]:
    """None when ``path`` can run this call, else why not."""
    if path == "torch":
        return None
    if attn_mask is not None:
        return "a general attn_mask runs only on the torch path"
    if path == "sdpa":
        return "key padding runs on the triton and torch paths" if key_padding_mask is not None else None
    if x.dtype == torch.float64:
        return "float64 runs only on the torch path"
    if path == "triton":
        return None if x.is_cuda and triton_available() else "it needs CUDA tensors and Triton"
    if path == "triton-interpreter":
        ok = x.device.type == "cpu" and config.interpret_requested() and triton_available() and triton_interpreted()
        return None if ok else "it needs CPU tensors and TRITON_INTERPRET=1 set before triton is imported"
    if path in ("torch-cpu", "torch-cpu-latent"):
        if x.device.type != "cpu":
            return "it needs CPU tensors"
        if key_padding_mask is not None or dropout_p > 0.0:
            return "torch's fused CPU attention takes neither key padding nor dropout here"
        return None
    return f"unknown path {path!r}"


_FORCED = "forced by MLRA_BACKEND / use_backend"


def choose(
    x: Tensor, *, key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
    attn_mask: Optional[Tensor] = None, rank: Optional[int] = None, head_dim: Optional[int] = None,
) -> Choice:
    """The path for an ``mlra_attention`` call on ``x`` ``[B, T, d]`` with these modes; ``rank`` (r per
    group) and ``head_dim`` (d_h) let it take attention on the latents where that is less work."""
    forced = _forced[-1] if _forced else config.backend(PATHS)
    if forced == "auto":
        return _auto(x, key_padding_mask, dropout_p, attn_mask, rank, head_dim)
    why_not = _can_run(forced, x, key_padding_mask, dropout_p, attn_mask)
    if why_not is not None:
        raise RuntimeError(f"the MLRA backend {forced!r} was forced (MLRA_BACKEND / use_backend) but cannot run "
                           f"this call: {why_not}")
    return Choice(forced, _FORCED)


DECODE_PATHS = ("triton", "triton-interpreter", "cpu-kernel", "torch")
# The decode paths that take a whole preallocated cache with ``cache_seqlens`` (they skip the unused
# positions themselves); the torch path is given views of the filled part instead.
DECODE_KERNELS = ("triton", "triton-interpreter", "cpu-kernel")
# Whether the compiled extension (whose CPU decode kernel is the CPU default) is there: found, not loaded,
# so that nothing is loaded at import; a present but unloadable build warns once at the first decode call.
_EXTENSION_BUILT = importlib.util.find_spec("mlra_kernels._C") is not None


def _decode_cannot_fuse(x: Tensor, attn_mask, dropout_p: float, need_weights: bool, needs_grad: bool) -> Optional[str]:
    """Why the decode kernel cannot run this call (None when it can)."""
    if x.dtype == torch.float64:
        return "float64 runs the exact torch path (the kernel computes in fp32)"
    if attn_mask is not None:
        return "a general attn_mask is not fused (causal, key_padding_mask and cache_seqlens are)"
    if dropout_p > 0.0:
        return "attention dropout is not fused in the decode kernel"
    if need_weights:
        return "need_weights: the decode kernel never forms the attention weights"
    if needs_grad:
        return "an input requires grad: the decode kernel is forward only (autograd runs the torch path)"
    return None


def choose_decode(
    x: Tensor, *, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0, need_weights: bool = False,
    needs_grad: bool = False,
) -> Choice:
    """The path of an ``mlra_decode`` call on new tokens ``x`` ``[B, t, d]`` with these modes;
    ``needs_grad``: some input requires grad and grad mode is on."""
    forced = _forced[-1] if _forced else config.backend(PATHS)
    why_not = _decode_cannot_fuse(x, attn_mask, dropout_p, need_weights, needs_grad)
    if forced in ("triton", "triton-interpreter"):
        if why_not is None:
            why_not = _can_run(forced, x, None, 0.0, None)
        if why_not is not None:
            raise RuntimeError(f"the MLRA backend {forced!r} was forced (MLRA_BACKEND / use_backend) but cannot run "
                               f"this decode call: {why_not}")
        return Choice(forced, "forced by MLRA_BACKEND / use_backend: the split-KV Triton decode kernel")
    if forced != "auto":
        return Choice("torch", f"{forced!r} forced by MLRA_BACKEND / use_backend: decode's torch path (GEMMs and "
                      "torch's SDPA on the latents)")
    if x.device.type == "cpu":
        # The Triton kernel runs on CPU tensors only when forced: the interpreter is a checker, not a path.
        if why_not is not None:
            return Choice("torch", why_not, slow=x.dtype != torch.float64)
        if x.dtype not in (torch.float32, torch.bfloat16):
            return Choice("torch", f"{str(x.dtype).replace('torch.', '')} on the CPU: the C++ decode kernel takes "
                          "float32 or bfloat16; GEMMs and torch's fused attention on the latents")
        if not _EXTENSION_BUILT:
            return Choice("torch", "mlra_kernels._C is not built (pip install --no-build-isolation -e .): GEMMs and "
                          "torch's fused attention on the latents instead of the C++ decode kernel", slow=True)
        return Choice("cpu-kernel", f"CPU {str(x.dtype).replace('torch.', '')} tensors: the C++ split-KV decode "
                      "kernel (each cached latent read once for all heads of a group, the positions split across "
                      "threads; float32 arithmetic)")
    if not x.is_cuda:
        return Choice("torch", f"{x.device.type} tensors: GEMMs and torch's SDPA on the latents (the decode kernels "
                      "are for CUDA and CPU tensors)")
    if why_not is not None:
        return Choice("torch", why_not, slow=x.dtype != torch.float64)
    if not triton_available():
        return Choice("torch", "Triton is not installed (pip install triton): decode runs GEMMs and SDPA", slow=True)
    return Choice("triton", "CUDA tensors: the split-KV Triton decode kernel (each latent tile read once for all "
                  "heads of a group; a fixed grid, so a step can be captured in a CUDA graph)")


def warn_if_slow(choice: Choice, op: str = "mlra_attention") -> None:
    """Warn once per reason when a mode of the call keeps it off the fast path (not under compile,
    where a warning would break the graph)."""
    if choice.slow and not torch.compiler.is_compiling():
        warn_once(f"mlra-path:{op}:{choice.reason}", f"{op} runs the {choice.path!r} path: {choice.reason}.")


def _choice_of(op: str, x: Tensor, key_padding_mask, dropout_p, attn_mask, rank, head_dim, need_weights,
               requires_grad) -> Choice:
    if not isinstance(x, Tensor) or x.dim() != 3:
        got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be the call's input [B, T, d], got {got}")
    rank = layout.positive_int("rank", rank) if rank is not None else None
    head_dim = layout.positive_int("head_dim", head_dim) if head_dim is not None else None
    if op == "decode":
        needs_grad = (x.requires_grad if requires_grad is None else bool(requires_grad)) and torch.is_grad_enabled()
        return choose_decode(x, attn_mask=attn_mask, dropout_p=dropout_p, need_weights=need_weights,
                             needs_grad=needs_grad)
    if op != "attention":
        raise ValueError(f"op must be 'attention' (mlra_attention) or 'decode' (mlra_decode), got {op!r}")
    return choose(x, key_padding_mask=key_padding_mask, dropout_p=dropout_p, attn_mask=attn_mask, rank=rank,
                  head_dim=head_dim)


def kernel_path(
    x: Tensor, key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
    attn_mask: Optional[Tensor] = None, *, rank: Optional[int] = None, head_dim: Optional[int] = None,
    op: str = "attention", need_weights: bool = False, requires_grad: Optional[bool] = None,
) -> str:
    """Which path an ``mlra_attention`` call on ``x`` ``[B, T, d]`` takes (:data:`PATHS`); pass ``rank``
    (``up.shape[-1]``) and ``head_dim`` as the call has them. :func:`explain` gives the reason.

    ``op="decode"``: the path of an ``mlra_decode`` call on the new tokens ``x`` (:data:`DECODE_PATHS`),
    with its ``need_weights`` and whether any input ``requires_grad`` (default: ``x.requires_grad``)."""
    return _choice_of(op, x, key_padding_mask, dropout_p, attn_mask, rank, head_dim, need_weights,
                      requires_grad).path


def explain(
    x: Tensor, key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
    attn_mask: Optional[Tensor] = None, *, rank: Optional[int] = None, head_dim: Optional[int] = None,
    op: str = "attention", need_weights: bool = False, requires_grad: Optional[bool] = None,
) -> str:
    """``"<path>: <reason>"`` for an ``mlra_attention`` (or, with ``op="decode"``, ``mlra_decode``) call on
    ``x`` with these modes."""
    c = _choice_of(op, x, key_padding_mask, dropout_p, attn_mask, rank, head_dim, need_weights, requires_grad)
    if (op == "attention" and c.path in ("torch-cpu", "sdpa") and c.reason != _FORCED
            and (rank is None or head_dim is None)):
        return f"{c.path}: {c.reason} (rank or head_dim not given: attention on the latents was not considered)"
    return f"{c.path}: {c.reason}"
