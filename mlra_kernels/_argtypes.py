"""argparse types shared by the ``mlra`` command's subcommands (demo, benchmarks), and the check of a
folder that an output path needs."""

from __future__ import annotations

import argparse
import math
import os
from typing import Callable, TypeVar

_Number = TypeVar("_Number", int, float)


def parse_number(text: str, kind: Callable[[str], _Number], expected: str) -> _Number:
    """``kind(text)`` (``int`` or ``float``), or an ``argparse.ArgumentTypeError`` "expected <expected>, got
    <text>" when ``text`` is not such a number; the range is the caller's to check."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    value = parse_number(text, int, "a positive integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (``1e8`` and ``100000000`` alike)."""
    value = parse_number(text, float, "a positive number")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number (finite), got {text!r}")
    return value


def existing_folder_above(path: str | os.PathLike) -> str:
    """The nearest existing path above ``path`` (its parent first): where the folders that ``path`` needs
    would be made. The caller refuses it when it is not a folder."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return folder
