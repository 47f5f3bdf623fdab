"""Build and runtime information: ``mlra info`` or ``python -m mlra_kernels.info``.

Prints the torch and Triton versions the extension was built against and the ones running now,
whether ``_C`` has CUDA code and for which architectures, and whether a GPU is visible.
"""

from __future__ import annotations

import sys
from typing import Optional

from mlra_kernels import _ext


def _triton_version() -> Optional[str]:
    try:
        import triton
    except Exception:
        return None
    return triton.__version__


def build_info() -> dict:
    """How ``_C`` was built: ``torch``, ``triton``, ``cuda`` (bool: CUDA code compiled in), ``cuda_archs``
    (list), ``cuda_version`` (toolkit), ``debug``, and ``extension`` ("ok" or why it cannot load)."""
    recorded = _ext.build_info_file() or {}
    info = {
        "torch": recorded.get("torch"),
        "triton": recorded.get("triton"),
        "cuda": bool(recorded.get("with_cuda", False)),
        "cuda_archs": [a for a in (recorded.get("cuda_arch_list") or "").replace(" ", ";").split(";") if a],
        "cuda_version": recorded.get("nvcc"),
        "debug": bool(recorded.get("debug", False)),
        "extension": "ok",
    }
    try:
        mod = _ext.load()
    except ImportError as err:
        info["extension"] = str(err)
        return info
    # What the loaded binary says wins over the record file.
    info["cuda"] = bool(mod.with_cuda)
    if not mod.with_cuda:
        info["cuda_archs"] = []
    if mod.cuda_runtime_version is not None:
        v = int(mod.cuda_runtime_version)
        info["cuda_version"] = f"{v // 1000}.{(v % 1000) // 10}"
    if info["torch"] is None:
        info["torch"] = mod.torch_version
    info["debug"] = bool(mod.debug)
    return info


def runtime_info() -> dict:
    """What runs now: torch / Triton / CUDA versions and the visible GPUs (this initialises CUDA)."""
    import torch

    gpus: list[str] = []
    error = None
    try:
        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as err:  # a broken driver must not stop `mlra info`
        error = str(err)
    return {
        "torch": torch.__version__,
        "triton": _triton_version(),
        "torch_cuda": torch.version.cuda,
        "gpu_visible": bool(gpus),
        "gpus": gpus,
        "cuda_error": error,
    }


def format_info() -> str:
    import mlra_kernels

    b, r = build_info(), runtime_info()
    lines = [
        f"mlra-kernels {mlra_kernels.__version__}",
        f"  torch   built against {b['torch'] or 'unknown'}, running {r['torch']} (CUDA {r['torch_cuda']})",
        f"  triton  built against {b['triton'] or 'unknown'}, running {r['triton'] or 'not installed'}",
    ]
    if b["extension"] != "ok":
        lines.append(f"  _C      unavailable: {b['extension']}")
    elif b["cuda"]:
        lines.append(f"  _C      CPU + CUDA {b['cuda_version']}, architectures {', '.join(b['cuda_archs']) or 'unknown'}")
    else:
        lines.append("  _C      CPU only (no CUDA code compiled in)")
    if r["gpu_visible"]:
        lines.append(f"  GPU     {', '.join(r['gpus'])}")
    else:
        lines.append("  GPU     none visible" + (f" ({r['cuda_error']})" if r["cuda_error"] else ""))
    if b["debug"]:
        lines.append("  build   DEBUG=1")
    return "\n".join(lines)


def print_info() -> int:
    print(format_info())
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return print_info()


if __name__ == "__main__":
    sys.exit(main())
