"""Plot TEV and loss curves of one or more ``TEVMonitor`` JSONL logs into a PNG (``mlra plot``)."""

from __future__ import annotations

import json
import math
import os
import secrets
from typing import Any, Optional, Sequence, Union

from mlra_kernels._argtypes import existing_folder_above
from mlra_kernels.monitor import read_jsonl

PathLike = Union[str, os.PathLike]

_PANELS = (("loss", "loss"), ("tev_mean", "µ_TEV"), ("tev_std", "σ_TEV"))
# The formats matplotlib's savefig writes (matplotlib.backend_bases.FigureCanvasBase.filetypes).
_FORMATS = ("avif", "eps", "gif", "jpeg", "jpg", "pdf", "pgf", "png", "ps", "raw", "rgba", "svg", "svgz",
            "tif", "tiff", "webp")


def plot_path(out: PathLike, logs: Sequence[PathLike] = ()) -> str:
    """Check that a plot can be written to ``out`` and return the path it will have.

    A path without an extension gets ``.png``. Raises ``ValueError`` when ``out`` is a folder, has an
    image format matplotlib cannot write, is one of the ``logs`` (which it would overwrite), or sits
    under something that is not a folder.
    """
    out = os.fspath(out)
    if not out or out.endswith(("/", os.sep)) or os.path.isdir(out):
        raise ValueError("is a folder; expected the path of an image file, e.g. plot.png")
    ext = os.path.splitext(out)[1].lower().lstrip(".")
    if not ext:
        out, ext = out + ".png", "png"
    if ext not in _FORMATS:
        raise ValueError(f"cannot write a .{ext} image (expected .png, or one of {', '.join(_FORMATS)})")
    if os.path.isdir(out):
        raise ValueError(f"{out} is a folder; expected the path of an image file")
    for log in logs:
        if os.path.exists(out) and os.path.exists(log) and os.path.samefile(out, log):
            raise ValueError(f"is the log {os.fspath(log)} itself; writing the plot there would overwrite it")
    folder = existing_folder_above(out)
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is a file, so no folder can be made there for the plot")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"the folder {folder} is not writable")
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _line_of(path: PathLike, record: int) -> Optional[int]:
    """The line number of the ``record``-th record (0-based) of a log, counted as read_jsonl counts."""
    seen = -1
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError:
        return None
    for n, raw in enumerate(lines, 1):
        try:
            obj = json.loads(raw.decode("utf-8"))
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            continue
        if isinstance(obj, dict) and "meta" not in obj and "step" in obj:
            seen += 1
            if seen == record:
                return n
    return None


def _binary_at(path: PathLike) -> Optional[int]:
    """Offset of the first byte showing that the file is not UTF-8 text (in its first 4 KiB), else None."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if b"\0" in head:
        return head.index(b"\0")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not a multi-byte character cut by the 4 KiB boundary
            return err.start
    return None


def _load(path: PathLike) -> tuple[str, list[dict]]:
    """``(label, records)`` of one log; ``ValueError`` naming the file (and line) when it cannot be plotted."""
    name = os.fspath(path)
    if os.path.getsize(path) == 0:
        raise ValueError(f"{name} is empty; expected a TEVMonitor JSONL log")
    offset = _binary_at(path)
    if offset is not None:
        raise ValueError(f"{name} is binary data (byte {offset} is not UTF-8 text); expected a TEVMonitor JSONL log")
    try:
        meta, records = read_jsonl(path)
    except UnicodeDecodeError as err:
        raise ValueError(f"{name} is not a text log (byte {err.start} is not UTF-8); expected TEVMonitor JSONL") from None
    except (TypeError, AttributeError) as err:  # e.g. a header whose "meta" is not an object
        raise ValueError(f"{name} is not a TEVMonitor log ({err})") from None
    if not records:
        raise ValueError(f"{name} holds no records (expected JSON lines with a 'step' key)")

    def where(i: int) -> str:
        line = _line_of(path, i)
        return f"{name}:{line}" if line is not None else f"{name} (record {i + 1})"

    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{where(i)}: expected a JSON object with a 'step', got {json.dumps(rec)[:60]}")
        step = rec["step"]
        if not _is_number(step) or not math.isfinite(step):
            raise ValueError(f"{where(i)}: 'step' is {json.dumps(step)[:60]}; expected a number")
        for key, _ in _PANELS:
            value = rec.get(key)
            if value is not None and not _is_number(value):
                raise ValueError(f"{where(i)}: {key!r} is {json.dumps(value)[:60]}; expected a number")
    if not any(rec.get(key) is not None for rec in records for key, _ in _PANELS):
        raise ValueError(
            f"{name}: no record has {', '.join(repr(k) for k, _ in _PANELS)}; expected TEVMonitor records"
        )
    label = meta.get("name") if isinstance(meta, dict) else None
    label = str(label) if label else os.path.splitext(os.path.basename(name))[0]
    return label, records


def plot_runs(paths: Sequence[PathLike], out: PathLike, title: Optional[str] = None) -> str:
    """Draw loss, µ_TEV and σ_TEV against step for every run in ``paths``; returns the image path.

    Each run is labelled with the ``name`` of its header, else its file name. Records without a
    loss still appear in the TEV panels. Every log is checked before anything is drawn: a log that
    is not text, holds no records, or whose ``step``/plotted values are not numbers raises
    ``ValueError`` naming the file and line. The image is written to a temporary file beside
    ``out`` and renamed into place, so a failure never leaves a partial image (see
    :func:`plot_path` for what ``out`` may be). Needs matplotlib.
    """
    if not paths:
        raise ValueError("paths must name at least one JSONL log")
    out = plot_path(out, paths)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from None

    runs = [_load(path) for path in paths]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    try:
        for ax, (key, ylabel) in zip(axes, _PANELS):
            for label, records in runs:
                pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, label=label, marker="." if len(pts) < 50 else None)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        fig.suptitle(title or "TEV and loss")
        fig.tight_layout()
        folder = os.path.dirname(out) or "."
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise OSError(f"cannot create the folder {folder} for {out}: {err.strerror or err}") from None
        ext = os.path.splitext(out)[1].lstrip(".").lower()
        tmp = os.path.join(folder, f".{os.path.basename(out)}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
        except OSError as err:
            raise OSError(f"cannot write {out}: {err.strerror or err}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                fig.savefig(f, format=ext, dpi=110)
            os.replace(tmp, out)
        except BaseException as err:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(err, OSError):
                raise OSError(f"cannot write {out}: {err.strerror or err}") from None
            raise
    finally:
        plt.close(fig)
    return out
