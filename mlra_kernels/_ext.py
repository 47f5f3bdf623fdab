"""Loading of the compiled extension ``mlra_kernels._C``.

Nothing here runs at ``import mlra_kernels``. The first call that needs a native op calls :func:`load`,
which checks that ``_C`` fits the installed torch before importing it, and turns every failure (missing,
stale, or built for a torch it cannot run with) into one :class:`ExtensionNotAvailableError` that says what
to do. Loading also registers the fake (meta) kernels of the C++ decode ops, so that ``torch.compile``
traces them as they are. :func:`decode_kernel_loads` and :func:`step_op_loads` keep whether the decode ops
are there: a build that cannot load, or one from older sources, warns once and is not tried again.

``_C`` is built on LibTorch's stable ABI: one build works with every torch from the version it targets
(``torch_min`` in ``_build_info.json``, setup.py's TORCH_MIN) on, whatever torch it was compiled against.
A build from before the stable ABI (no ``stable_abi`` in its record) works only with the exact torch it was
built against. How ``_C`` was built is recorded in ``_build_info.json`` only; the module itself is empty.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import re
from types import ModuleType
from typing import Optional

import torch

from mlra_kernels._warnings import warn_once

BUILD_COMMAND = "pip install --no-build-isolation -e ."
BUILD_INFO_PATH = pathlib.Path(__file__).with_name("_build_info.json")

_module: Optional[ModuleType] = None
STEP_OP_NAME = "latent_decode_step_cpu"
# [] before the first try, then [True] or [False]: a build that is present but cannot load is tried once.
_DECODE_KERNEL: list = []
_STEP_OP: list = []


class ExtensionNotAvailableError(ImportError):
    """``mlra_kernels._C`` is missing or does not match the installed torch."""


def build_info_file() -> Optional[dict]:
    """The build record written by setup.py (torch / Triton / CUDA versions, arch list), or None."""
    try:
        return json.loads(BUILD_INFO_PATH.read_text())
    except (OSError, ValueError):
        return None


def built_with_cuda() -> bool:
    """Whether the CUDA kernels are compiled into ``_C`` (from the build record; False without one)."""
    info = build_info_file() or {}
    return bool(info.get("with_cuda", False))


def _major_minor(version: str) -> Optional[tuple[int, int]]:
    """(2, 11) for "2.11.0+cu130", "2.11" or "2.11.0.dev20260101"; None for what is not a version."""
    m = re.match(r"\s*(\d+)\.(\d+)", str(version))
    return (int(m.group(1)), int(m.group(2))) if m else None


def _rebuild_hint(torch_version: str) -> str:
    return (
        f"Rebuild it against the installed torch {torch_version}: run `{BUILD_COMMAND}` in the mlra-kernels "
        "source checkout (or install a wheel built for this torch)."
    )


def load() -> ModuleType:
    """Import ``mlra_kernels._C`` (registering the ``torch.ops.mlra`` ops) after checking it fits this torch."""
    global _module
    if _module is not None:
        return _module
    import torch  # libtorch must be loaded before _C

    hint = _rebuild_hint(torch.__version__)
    info = build_info_file()
    stable = info is not None and bool(info.get("stable_abi"))
    if stable:
        minimum = str(info.get("torch_min"))
        running, needed = _major_minor(torch.__version__), _major_minor(minimum)
        if running is not None and needed is not None and running < needed:
            raise ExtensionNotAvailableError(
                f"mlra_kernels._C was built against torch {info.get('torch')} on LibTorch's stable ABI, which "
                f"works with torch {minimum} or newer, but torch {torch.__version__} is installed. Upgrade torch "
                f"(pip install 'torch>={minimum}'); mlra-kernels does not build against an older torch."
            )
    elif info is not None and info.get("torch") not in (None, torch.__version__):
        raise ExtensionNotAvailableError(
            f"mlra_kernels._C was built against torch {info['torch']} but torch {torch.__version__} is installed. "
            + hint
        )
    try:
        _C = importlib.import_module("mlra_kernels._C")
    except ImportError as err:
        text = str(err)
        if "undefined symbol" in text or "version `" in text:
            raise ExtensionNotAvailableError(
                f"mlra_kernels._C does not match the installed torch {torch.__version__} ({text.splitlines()[0]}). "
                + hint
            ) from None
        if isinstance(err, ModuleNotFoundError) and err.name == "mlra_kernels._C":
            raise ExtensionNotAvailableError(
                "the compiled extension mlra_kernels._C is not built, so the native ops (TEV) are unavailable. "
                f"Build it: run `{BUILD_COMMAND}` in the mlra-kernels source checkout."
            ) from None
        raise ExtensionNotAvailableError(f"mlra_kernels._C could not be loaded ({text}). " + hint) from err
    built = getattr(_C, "torch_version", None)  # a build from before the stable ABI says it here
    running = torch.__version__.split("+", 1)[0]
    if not stable and built is not None and built != running:
        raise ExtensionNotAvailableError(
            f"mlra_kernels._C was built against torch {built} but torch {torch.__version__} is installed. " + hint
        )
    _register_fakes()
    _module = _C
    return _C


def _register_fakes() -> None:
    """The fake kernels of the C++ decode ops (``mlra::tev_partials`` has its own, in ``ops/tev/op.py``)."""
    if hasattr(torch.ops.mlra, "latent_decode_cpu"):
        torch.library.register_fake("mlra::latent_decode_cpu")(_fake_latent_decode_cpu)
    if hasattr(torch.ops.mlra, STEP_OP_NAME):
        torch.library.register_fake(f"mlra::{STEP_OP_NAME}")(_fake_latent_decode_step_cpu)


def _fake_latent_decode_cpu(q, k, v, kpm, lengths, t_new, causal, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)  # Z [B, g, M, r]


def _fake_latent_decode_step_cpu(x, w_in, b_in, m, beta, w_v, b_v, w_out, b_out, k_cache, v_cache, seqlens, pos,
                                 num_heads, scale):
    # The caches and seqlens are written in place (the schema says so); the output is [B, t, w_out rows].
    return x.new_empty((x.shape[0], x.shape[1], w_out.shape[0]))


def available() -> bool:
    """Whether :func:`load` succeeds. Never raises."""
    try:
        load()
    except ImportError:
        return False
    return True


@torch.compiler.assume_constant_result  # a fact of the process: traced as a constant, never as a load
def decode_kernel_loads() -> bool:
    """Whether ``mlra::latent_decode_cpu`` (the C++ decode kernel) is there; warns once where it is not:
    decode then runs torch's SDPA on the latents instead."""
    if not _DECODE_KERNEL:
        why = None
        try:
            load()
        except ExtensionNotAvailableError as err:
            why = str(err)
        else:
            if not hasattr(torch.ops.mlra, "latent_decode_cpu"):
                why = (f"mlra_kernels._C has no mlra::latent_decode_cpu: it was built from older sources; run "
                       f"`{BUILD_COMMAND}` in the source checkout")
        _DECODE_KERNEL.append(why is None)
        if why is not None:
            warn_once("decode-cpu-kernel-missing", f"mlra_decode: the C++ decode kernel is not available ({why}); "
                      "running torch's SDPA on the latents instead, which is slower.")
    return _DECODE_KERNEL[0]


@torch.compiler.assume_constant_result
def step_op_loads() -> bool:
    """Whether ``mlra::latent_decode_step_cpu`` (a layer's whole CPU step in one call) is there; a build
    without it warns once: the step then runs op by op from Python, which costs more per layer."""
    if not _STEP_OP:
        ok = decode_kernel_loads() and hasattr(torch.ops.mlra, STEP_OP_NAME)
        _STEP_OP.append(ok)
        if _DECODE_KERNEL[0] and not ok:
            warn_once("decode-step-op-missing", "the CPU decode step runs op by op from Python: mlra_kernels._C has "
                      f"no mlra::latent_decode_step_cpu (built from older sources; run `{BUILD_COMMAND}`).")
    return _STEP_OP[0]
