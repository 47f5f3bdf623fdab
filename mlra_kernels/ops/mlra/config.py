"""The runtime switches of the MLRA op, in one place. Each is read when it is needed, so that setting the
environment variable before the call (not before the import) is enough; docs/paths.md lists them.

- ``MLRA_BACKEND``: ``auto`` (default) or one path of :data:`mlra_kernels.ops.mlra.backend.PATHS`, to
  force the path of every call that can take it (``with use_backend(...)`` does the same in code).
- ``MLRA_FWD_VARIANT``: ``auto`` (default), ``rebuild`` or ``absorbed``: the Triton forward kernel.
- ``MLRA_AUTOTUNE``: ``1`` (default) autotunes the Triton kernels over a short config list; ``0`` takes
  the first config (quicker first calls, for tests and profiling).
- ``TRITON_INTERPRET``: Triton's own switch, read by Triton when it is first imported; ``1`` runs the
  Triton kernels on CPU tensors under the interpreter.
"""

from __future__ import annotations

import os

FWD_VARIANTS = ("auto", "rebuild", "absorbed")

# Set by tests: fill every kernel output with NaN before the kernels run, so an element never written shows.
POISON_OUTPUTS = False


def _choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).strip().lower() or default
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def backend() -> str:
    """``MLRA_BACKEND``: ``"auto"`` or a path name."""
    from mlra_kernels.ops.mlra.backend import PATHS

    return _choice("MLRA_BACKEND", "auto", ("auto",) + PATHS)


def fwd_variant() -> str:
    """``MLRA_FWD_VARIANT``: ``"auto"``, ``"rebuild"`` or ``"absorbed"``."""
    return _choice("MLRA_FWD_VARIANT", "auto", FWD_VARIANTS)


def autotune() -> bool:
    """``MLRA_AUTOTUNE`` (default on)."""
    return os.environ.get("MLRA_AUTOTUNE", "1").strip() != "0"


def interpret_requested() -> bool:
    """``TRITON_INTERPRET`` asks for the Triton interpreter (read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
