"""Loading of the compiled extension ``mlra_kernels._C``.

Nothing here runs at ``import mlra_kernels``. The first call that needs a native op calls :func:`load`,
which checks that ``_C`` fits the installed torch before importing it, and turns every failure (missing,
stale, or built for a torch it cannot run with) into one :class:`ExtensionNotAvailableError` that says what
to do.

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

BUILD_COMMAND = "pip install --no-build-isolation -e ."
BUILD_INFO_PATH = pathlib.Path(__file__).with_name("_build_info.json")

_module: Optional[ModuleType] = None


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
    _module = _C
    return _C


def available() -> bool:
    """Whether :func:`load` succeeds. Never raises."""
    try:
        load()
    except ImportError:
        return False
    return True
