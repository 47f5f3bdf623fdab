"""mlra-kernels: fused kernels for Multi-head Low-Rank Attention (MLRA) and Token Embedding Variability (TEV).

Importing this package touches no GPU and never fails because the compiled extension is missing:
a missing or mismatched extension is reported at the first call that needs it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> module that defines it. Loaded on first access, so `import mlra_kernels` stays cheap.
_LAZY = {
    "tev": "mlra_kernels.ops.tev",
    "TEVStats": "mlra_kernels.ops.tev",
    "mlra_attention": "mlra_kernels.ops.mlra",
    "mlra_attention_dense": "mlra_kernels.ops.mlra",
    "mlra_decode": "mlra_kernels.ops.mlra",
    "kernel_path": "mlra_kernels.ops.mlra",
    "TEVMonitor": "mlra_kernels.monitor",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mlra_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
