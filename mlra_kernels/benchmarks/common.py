"""Shared helpers for the benchmarks: environment metadata, timing and JSON results.

API (stable, small):

    env_metadata(device="cpu") -> dict
        device name, torch / Triton / CUDA / Python versions, git commit, UTC date, CPU count, load.
    time_cpu(fn, *, warmup=1, rep=5, min_time_s=0.0) -> dict
        wall-clock timing of a CPU callable: {"ms": median, "ms_p20": ..., "ms_p80": ..., "n": reps}.
    time_gpu(fn, *, warmup=25, rep=100) -> dict
        triton.testing.do_bench median with quantiles (0.2, 0.8), same keys as time_cpu.
    gbps(nbytes, ms) -> float
        bytes moved / time, in GB/s (1e9 bytes).
    write_results(name, rows, out_dir="bench/results", device="cpu") -> pathlib.Path
        writes {"meta": env_metadata(device), "rows": rows} to <out_dir>/<name>.json; every row gets the
        metadata keys it does not already have, so a single row is self-describing.

Example:

    from mlra_kernels.benchmarks.common import env_metadata, time_cpu, gbps, write_results
    t = time_cpu(lambda: x.sum())
    write_results("sum_cpu", [{"op": "sum", "gbps": gbps(x.nbytes, t["ms"]), **t}])
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import pathlib
import platform
import statistics
import subprocess
import time
from typing import Callable, Iterable

import torch

_CHECKOUT = pathlib.Path(__file__).resolve().parents[2]
# The source checkout this package runs from (an editable install), or None for an installed wheel.
SOURCE_CHECKOUT = _CHECKOUT if (_CHECKOUT / "setup.py").is_file() and (_CHECKOUT / "bench").is_dir() else None
# Relative result folders are taken from the source checkout, so that `bench/results` is the committed
# folder; from an installed wheel, from the current folder.
REPO_ROOT = SOURCE_CHECKOUT or pathlib.Path.cwd()

# Keys copied from the metadata into every result row.
ROW_META_KEYS = ("device", "torch", "triton", "cuda", "commit", "date")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    """The checkout's commit (``-dirty`` for uncommitted code); ``"unknown"`` for an installed wheel,
    whose version is recorded instead (the current folder may be some other repository)."""
    if SOURCE_CHECKOUT is None:
        return "unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=SOURCE_CHECKOUT, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            # Result files are not code: a previous result waiting to be committed does not make the code dirty.
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results"],
            cwd=SOURCE_CHECKOUT, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not sha:
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("mlra-kernels")
    except Exception:  # not installed as a distribution (a bare source tree on sys.path)
        return "unknown"


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:
        return None
    return triton.__version__


def env_metadata(device: str | torch.device = "cpu") -> dict:
    """Describe the machine and software a benchmark ran on. Touches the GPU only when `device` is CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = props.name
        extra = {"gpu_memory_gib": round(props.total_memory / 2**30, 1), "sm_count": props.multi_processor_count}
    else:
        name = _cpu_name()
        extra = {"threads": torch.get_num_threads()}
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": _git_commit(),
        "mlra_kernels": _package_version(),
        "command": " ".join(["python", *sys.argv]),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_count": os.cpu_count(),
        "loadavg_1m": load,
        **extra,
    }


def _summary(times_ms: list[float]) -> dict:
    times_ms = sorted(times_ms)
    q = statistics.quantiles(times_ms, n=5, method="inclusive") if len(times_ms) > 1 else times_ms * 4
    return {"ms": statistics.median(times_ms), "ms_p20": q[0], "ms_p80": q[3], "n": len(times_ms)}


def time_cpu(fn: Callable[[], object], *, warmup: int = 1, rep: int = 5, min_time_s: float = 0.0) -> dict:
    """Median wall time of `fn()` over `rep` runs (at least `min_time_s` in total), after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < rep or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


def time_gpu(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100) -> dict:
    """triton.testing.do_bench median and (0.2, 0.8) quantiles, in ms."""
    from triton.testing import do_bench

    med, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return {"ms": med, "ms_p20": p20, "ms_p80": p80, "n": rep}


def gbps(nbytes: int, ms: float) -> float:
    """Bandwidth in GB/s (1e9 bytes per second)."""
    return nbytes / (ms * 1e-3) / 1e9


def write_results(
    name: str, rows: Iterable[dict], out_dir: str | os.PathLike = "bench/results", device: str | torch.device = "cpu"
) -> pathlib.Path:
    """Write rows plus metadata to `<out_dir>/<name>.json` (relative paths: see `REPO_ROOT`)."""
    meta = env_metadata(device)
    out = pathlib.Path(out_dir)
    if not out.is_absolute():
        out = REPO_ROOT / out
    out.mkdir(parents=True, exist_ok=True)
    full_rows = []
    for row in rows:
        full = dict(row)
        for key in ROW_META_KEYS:
            full.setdefault(key, meta[key])
        full_rows.append(full)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"meta": meta, "rows": full_rows}, indent=2) + "\n")
    return path
