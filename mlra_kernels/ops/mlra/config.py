"""Every environment read of the package, each at the moment it is needed (setting a variable before the
call, not before the import, is enough); docs/paths.md lists them. Nothing in the package writes the
environment.

- ``MLRA_BACKEND``: ``auto`` (default) or a path name (``backend.PATHS``), forced for every call that can
  take it.
- ``MLRA_FWD_VARIANT``: ``auto`` (default), ``rebuild`` or ``absorbed``: the Triton forward kernel.
- ``MLRA_AUTOTUNE``: ``1`` (default) autotunes the Triton kernels; ``0`` takes the first config.
- ``TRITON_INTERPRET``: Triton's own switch, which Triton reads when it is first imported; ``1`` then
  runs the Triton kernels on CPU tensors under the interpreter.
- ``MLRA_CACHE_DIR`` (else ``$XDG_CACHE_HOME/mlra-kernels``): the experiments' token cache.
- ``RANK``: torchrun's global rank; without a process group, rank 0 alone writes a TEV log.
"""

from __future__ import annotations

import importlib.util
import os

FWD_VARIANTS = ("auto", "rebuild", "absorbed")

# Set by tests: fill every kernel output with NaN before the kernels run, so an element never written shows.
POISON_OUTPUTS = False


def _choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).strip().lower() or default
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def backend(paths: tuple[str, ...]) -> str:
    """``MLRA_BACKEND``: ``"auto"`` or one of ``paths`` (``backend.PATHS``, the path table's names)."""
    return _choice("MLRA_BACKEND", "auto", ("auto",) + tuple(paths))


def fwd_variant() -> str:
    """``MLRA_FWD_VARIANT``: ``"auto"``, ``"rebuild"`` or ``"absorbed"``."""
    return _choice("MLRA_FWD_VARIANT", "auto", FWD_VARIANTS)


def autotune() -> bool:
    """``MLRA_AUTOTUNE`` (default on)."""
    return os.environ.get("MLRA_AUTOTUNE", "1").strip() != "0"


def interpret_requested() -> bool:
    """``TRITON_INTERPRET`` asks for the Triton interpreter now (whether it took effect: :func:`triton_interpreted`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cache_dir() -> str:
    """``$MLRA_CACHE_DIR``, else ``$XDG_CACHE_HOME/mlra-kernels``, else ``~/.cache/mlra-kernels``."""
    if os.environ.get("MLRA_CACHE_DIR"):
        return os.environ["MLRA_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mlra-kernels")


def launcher_rank() -> int:
    """``$RANK``, the global rank torchrun gives a process (0 when unset or not a number): who writes a
    log before a process group exists."""
    try:
        return int(os.environ.get("RANK") or 0)
    except ValueError:
        return 0


# Both facts are fixed for the life of a process (Triton's mode once it is imported), and are kept as plain
# values so that ``torch.compile`` traces the choice without calling importlib (older dynamo refuses it).
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
_TRITON_INTERPRETED: list[bool] = []


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def triton_interpreted() -> bool:
    """True when ``triton`` was imported under ``TRITON_INTERPRET=1``, so that its own library runs under the
    interpreter (the kernels then run on CPU tensors); imports triton on the first call, which fixes its mode."""
    if not _TRITON_INTERPRETED:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        _TRITON_INTERPRETED.append(isinstance(tl.zeros, InterpretedFunction))
    return _TRITON_INTERPRETED[0]
