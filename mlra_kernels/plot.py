"""Plot TEV and loss curves of one or more ``TEVMonitor`` JSONL logs into a PNG (``mlra plot``)."""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

from mlra_kernels.monitor import read_jsonl

PathLike = Union[str, os.PathLike]


def plot_runs(paths: Sequence[PathLike], out: PathLike, title: Optional[str] = None) -> str:
    """Draw loss, µ_TEV and σ_TEV against step for every run in ``paths``; returns the PNG path.

    Each run is labelled with the ``name`` of its header, else its file name. Records without a
    loss still appear in the TEV panels. Needs matplotlib.
    """
    if not paths:
        raise ValueError("paths must name at least one JSONL log")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from None

    runs = []
    for path in paths:
        meta, records = read_jsonl(path)
        if not records:
            raise ValueError(f"{path} holds no records (expected JSON lines with a 'step' key)")
        label = meta.get("name") or os.path.splitext(os.path.basename(os.fspath(path)))[0]
        runs.append((label, records))

    panels = [("loss", "loss"), ("tev_mean", "µ_TEV"), ("tev_std", "σ_TEV")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, ylabel) in zip(axes, panels):
        for label, records in runs:
            pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=label, marker="." if len(pts) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "TEV and loss")
    fig.tight_layout()
    out = os.fspath(out)
    folder = os.path.dirname(out)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
