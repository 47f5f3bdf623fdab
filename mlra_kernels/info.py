"""Build and runtime information: ``mlra info`` or ``python -m mlra_kernels.info``.

Prints the torch and Triton versions the extension was built against and the ones running now (and,
for a build on LibTorch's stable ABI, the oldest torch it works with), whether ``_C`` has CUDA code and
for which architectures, and whether a GPU is visible. How ``_C`` was built comes from its record,
``mlra_kernels/_build_info.json``, written by setup.py next to it.
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
    """How ``_C`` was built: ``torch`` (compiled against), ``torch_min`` (the oldest torch it works with: a
    build on LibTorch's stable ABI; None for one that needs exactly ``torch``), ``triton``, ``cuda`` (bool: CUDA
    code compiled in), ``cuda_archs`` (list), ``cuda_version`` (the toolkit, whose CUDA runtime is linked in),
    ``debug``, and ``extension`` ("ok" or why it cannot load)."""
    recorded = _ext.build_info_file() or {}
    cuda = bool(recorded.get("with_cuda", False))
    info = {
        "torch": recorded.get("torch"),
        "torch_min": recorded.get("torch_min") if recorded.get("stable_abi") else None,
        "triton": recorded.get("triton"),
        "cuda": cuda,
        "cuda_archs": [a for a in (recorded.get("cuda_arch_list") or "").replace(" ", ";").split(";") if a]
        if cuda else [],
        "cuda_version": recorded.get("nvcc") if cuda else None,
        "debug": bool(recorded.get("debug", False)),
        "extension": "ok",
    }
    try:
        _ext.load()
    except ImportError as err:
        info["extension"] = str(err)
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
        f"  torch   built against {b['torch'] or 'unknown'}"
        + (f" (stable ABI: works with torch {b['torch_min']} or newer)" if b["torch_min"] else "")
        + f", running {r['torch']} (CUDA {r['torch_cuda']})",
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
