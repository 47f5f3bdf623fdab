"""Shared helpers for the benchmarks: environment metadata, timing and JSON results.

API (stable, small):

    env_metadata(device="cpu") -> dict
        device name, torch / Triton / CUDA / Python versions, git commit, UTC date, CPU count, load.
    time_cpu(fn, *, warmup=1, rep=5, min_time_s=0.0, label="timing") -> dict
        wall-clock timing of a CPU callable: {"ms": median, "ms_p20": ..., "ms_p80": ..., "n": reps,
        "inner": calls per timing, "rerun": bool}. Timings on the clock's floor (floor_reason) are taken
        again over batches of calls, or refused with a BenchError.
    time_interleaved(fns, *, rounds, warmup=1, label="timing") -> dict
        the same for several callables {name: fn}, timed round by round in a rotating order.
    time_gpu(fn, *, warmup=25, rep=100, label="timing") -> dict
        triton.testing.do_bench median with quantiles (0.2, 0.8), same keys as time_cpu.
    clock_info() -> dict, floor_reason(spans_s, tick_s) -> str | None
        the clock's reported and measured resolution (recorded in every result's meta), and why timings
        sit on its floor: within a few ticks of it, or all the same multiple of one quantum.
    timing_fields(**timings) -> dict
        a row's "inner_reps" (calls per timing, by name) and "rerun_at_floor" (any taken again).
    gbps(nbytes, ms) -> float
        bytes moved / time, in GB/s (1e9 bytes).
    default_results_dir() -> pathlib.Path
        where results go when no folder is given: ./bench/results of the current folder, wherever the
        package runs from (an installed wheel or its source checkout).
    results_dir(out_dir=None) -> pathlib.Path
        the absolute folder for `out_dir`: None is the default above; a relative path is relative to
        the current folder, like any path a user types.
    check_output(path, flag, name=None, default=None) -> pathlib.Path
        refuses, before anything is measured, a folder that cannot be created or written, a result
        file name that is a folder, or, when no folder was named (`path` and `default` None), a result
        file that git tracks (ValueError naming the flag); returns the absolute folder.
    script_default_out(script) -> pathlib.Path | None
        the result folder a bench/*.py script names on the user's behalf: the checkout's bench/results
        (whose committed results it then replaces) when it runs from the checkout root, else None.
    write_results(name, rows, out_dir=None, device="cpu") -> pathlib.Path
        writes {"meta": env_metadata(device), "rows": rows} to <out_dir>/<name>.json; every row gets the
        metadata keys it does not already have, so a single row is self-describing. No rows is an error
        (nothing is written), and so is a file git tracks when `out_dir` is None; the file is written
        under a temporary name and renamed, so an earlier result is replaced only by a complete one.

Where results go: the folder the user names (--out / --out-dir), else ./bench/results of the current
folder. A result file that git tracks (the committed results of the source checkout, or of any other
repository) is replaced only when its folder was named; without a name the run stops before measuring
and says which flag replaces it. The bench/*.py scripts name the checkout's bench/results when run from
the checkout root: that is how the committed results are regenerated.

Command-line helpers shared by the benchmark scripts: `BenchParser` (an argparse parser whose errors are
one line), the argparse types `positive_int`, `positive_float` and `comma_list(allowed)`, `BenchError`
(a user-facing failure) and `run_main(prog, body, argv)` (one line on stderr for every failure).

Example:

    from mlra_kernels.benchmarks.common import env_metadata, time_cpu, gbps, write_results
    t = time_cpu(lambda: x.sum())
    write_results("sum_cpu", [{"op": "sum", "gbps": gbps(x.nbytes, t["ms"]), **t}])
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import os
import sys
import pathlib
import platform
import statistics
import subprocess
import time
from typing import Callable, Iterable, Optional, Sequence

import torch

from mlra_kernels._argtypes import positive_float, positive_int  # noqa: F401  (the benchmarks' flag types)
from mlra_kernels._fileio import write_atomic

_CHECKOUT = pathlib.Path(__file__).resolve().parents[2]
# The source checkout this package runs from (an editable install), or None for an installed wheel.
SOURCE_CHECKOUT = _CHECKOUT if (_CHECKOUT / "setup.py").is_file() and (_CHECKOUT / "bench").is_dir() else None
# The default result folder, relative to the current folder, as a folder the user names is. From the
# checkout root that is the committed results, where a file git tracks is replaced only through --out.
DEFAULT_RESULTS = pathlib.Path("bench", "results")

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
        "clock": dict(clock_info(), **({"cuda_event_resolution_s": CUDA_EVENT_RESOLUTION_S}
                                       if device.type == "cuda" else {})),
        **extra,
    }


def _summary(times_ms: list[float]) -> dict:
    times_ms = sorted(times_ms)
    q = statistics.quantiles(times_ms, n=5, method="inclusive") if len(times_ms) > 1 else times_ms * 4
    return {"ms": statistics.median(times_ms), "ms_p20": q[0], "ms_p80": q[3], "n": len(times_ms)}


# ---------------------------------------------------------------- timing, and the clock's floor

# The clock every CPU timing reads: a module global, so that a test can put a fake clock in its place.
CLOCK: Callable[[], float] = time.perf_counter
CLOCK_NAME = "perf_counter"
# A timing that spans fewer than FLOOR_TICKS ticks of the clock (one tick is then more than 5% of it),
# or single calls whose repeats all read the same multiple of one quantum, say more about the clock (a
# coarse or stalled one) or the scheduler than about the code. They are measured again with the calls
# batched, so that one timing spans at least TARGET_TICKS ticks, each divided by its batch ("inner").
FLOOR_TICKS = 20
TARGET_TICKS = 10 * FLOOR_TICKS
# A timing still on the floor at MAX_INNER calls, or whose next try is expected to take longer than
# RERUN_BUDGET_S, is refused (BenchError) rather than written.
MAX_INNER = 100_000
RERUN_BUDGET_S = 60.0
MAX_TIMINGS = 10_000  # the most timings one measurement takes, whatever its min_time_s
# CUDA events, which do_bench reads, resolve about 0.5 µs; a GPU timing within GPU_FLOOR_TICKS of that
# is batched the same way.
CUDA_EVENT_RESOLUTION_S = 0.5e-6
GPU_FLOOR_TICKS = 4
# Single-call timings of at least SCHED_QUANTUM_MIN_S that all lie within SCHED_QUANTUM_TOL of whole
# multiples of the shortest (one of them twice it or more) were set by the scheduler's time slices.
SCHED_QUANTUM_MIN_S = 1e-3
SCHED_QUANTUM_TOL = 0.03


@functools.lru_cache(maxsize=None)
def _measured_tick(clock: Callable[[], float]) -> float:
    """The smallest non-zero step between successive readings of `clock`, over 20 tries."""
    steps = []
    for _ in range(20):
        t0 = t1 = clock()
        for _ in range(1_000_000):
            t1 = clock()
            if t1 != t0:
                break
        else:
            raise BenchError(f"the clock (time.{CLOCK_NAME}) did not move in a million readings: it is stalled, "
                             f"and every timing would read 0")
        steps.append(t1 - t0)
    return min(steps)


def clock_info() -> dict:
    """The clock the CPU timings read: the resolution the OS reports for it, the smallest step measured
    between successive readings (once per process), and `resolution_s`, the larger of the two, which
    timings are checked against (see :func:`floor_reason`)."""
    info = time.get_clock_info(CLOCK_NAME)
    measured = _measured_tick(CLOCK)
    return {"timer": f"time.{CLOCK_NAME}", "implementation": info.implementation,
            "reported_resolution_s": info.resolution, "measured_tick_s": measured,
            "resolution_s": max(info.resolution, measured), "floor_ticks": FLOOR_TICKS, "target_ticks": TARGET_TICKS}


def clock_resolution() -> float:
    """The tick CPU timings are checked against, in seconds (``clock_info()["resolution_s"]``)."""
    return clock_info()["resolution_s"]


def floor_reason(spans_s: Sequence[float], tick_s: float, *, floor_ticks: int = FLOOR_TICKS,
                 repeats: bool = True) -> Optional[str]:
    """Why the timings `spans_s` (seconds, one per timing) sit on the floor of a clock whose tick is
    `tick_s`, or None when they do not:

    - a timing read 0 or less (the clock did not move), or their median spans fewer than `floor_ticks`
      ticks (within a few ticks of the resolution);
    - with `repeats` (timings of single calls) and three timings or more: at least three and 80% of
      them read the median to within half a tick (the same reading), or every one is a whole multiple
      (to within half a tick) of the shortest, itself at least TARGET_TICKS ticks long, and one at least
      twice it. Single calls of real code on a shared machine do not agree that closely: a stalled
      clock, or a quantum of the clock or the scheduler, set them. (Batches of calls average their
      jitter away, so a steady batch may read the same each time.)
    """
    spans = [float(s) for s in spans_s]
    if not spans:
        return None
    if min(spans) <= 0:
        return f"a timing read {min(spans) * 1e3:.6g} ms: the clock did not move"
    med = statistics.median(spans)
    if med < floor_ticks * tick_s:
        return (f"the median timing, {med * 1e3:.6g} ms, is within {floor_ticks} ticks of the clock's "
                f"resolution ({tick_s * 1e3:.3g} ms)")
    if repeats and len(spans) >= 3:
        same = sum(abs(s - med) <= tick_s / 2 for s in spans)
        if same >= max(3, 0.8 * len(spans)):
            return f"{same} of {len(spans)} timings read {med * 1e3:.6g} ms"
        low = min(spans)
        if low >= TARGET_TICKS * tick_s and all(abs(s - round(s / low) * low) <= tick_s / 2 for s in spans):
            return f"every timing is a whole multiple of {low * 1e3:.6g} ms, a clock or scheduler quantum"
        # A loaded machine's scheduler hands out slices of a few ms: a thread of the pool that waits for
        # one makes every timing a multiple of it, to within a few percent.
        if (low >= SCHED_QUANTUM_MIN_S and max(spans) >= 1.9 * low
                and all(abs(s / low - round(s / low)) <= SCHED_QUANTUM_TOL for s in spans)):
            return (f"every timing is within {SCHED_QUANTUM_TOL:.0%} of a whole multiple of {low * 1e3:.3g} ms, "
                    "a scheduler time slice")
    return None


def _more_inner(inner: int, spans_s: Sequence[float], tick_s: float, floor_ticks: int) -> int:
    """The calls per timing of the next try of a timing on the floor: enough for 10 × `floor_ticks` ticks
    at the median so far less one tick (a reading is up to one tick long), and at least 10× more."""
    low = max(statistics.median(spans_s) - tick_s, tick_s)
    return inner * max(10, math.ceil(10 * floor_ticks * tick_s / low))


def _refuse_floor(label: str, reason: str, inner: int, why: str) -> None:
    raise BenchError(
        f"{label}: timings on the clock's floor ({reason}) at {inner} call(s) per timing, and {why}; the clock "
        f"is too coarse or stalled, or the machine too loaded, to time it")


def _span(fn: Callable[[], object], inner: int) -> float:
    """Seconds of `inner` back-to-back calls of `fn`, read on CLOCK."""
    t0 = CLOCK()
    for _ in range(inner):
        fn()
    return CLOCK() - t0


def time_cpu(fn: Callable[[], object], *, warmup: int = 1, rep: int = 5, min_time_s: float = 0.0,
             label: str = "timing") -> dict:
    """Median wall time of one call of `fn()` over `rep` timings (at least `min_time_s` in all), after
    `warmup` calls. A timing is one call, unless the timings sit on the clock's floor
    (:func:`floor_reason`): then all are taken again, each over a batch of calls that spans about
    TARGET_TICKS ticks, and divided by the batch; one still on the floor at MAX_INNER calls, or whose
    next try would take over RERUN_BUDGET_S, is a BenchError naming `label`.
    Returns ``{"ms", "ms_p20", "ms_p80", "n", "inner": calls per timing, "rerun": measured again}``."""
    tick = clock_resolution()
    for _ in range(warmup):
        fn()
    inner, rerun = 1, False
    while True:
        spans: list[float] = []
        start = CLOCK()
        while len(spans) < rep or (CLOCK() - start < min_time_s and len(spans) < MAX_TIMINGS):
            spans.append(_span(fn, inner))
        reason = floor_reason(spans, tick, repeats=inner == 1)
        if reason is None:
            break
        more = _more_inner(inner, spans, tick, FLOOR_TICKS)
        expected = rep * more / inner * max(statistics.median(spans), tick)
        if more > MAX_INNER:
            _refuse_floor(label, reason, inner, f"{more} calls per timing would pass the limit of {MAX_INNER}")
        if expected > RERUN_BUDGET_S:
            _refuse_floor(label, reason, inner, f"a try at {more} calls per timing could take {expected:.0f} s")
        inner, rerun = more, True
    return {**_summary([s * 1e3 / inner for s in spans]), "inner": inner, "rerun": rerun}


def time_interleaved(fns: dict[str, Callable[[], object]], *, rounds: int, warmup: int = 1,
                     label: str = "timing") -> dict[str, dict]:
    """Wall times of several candidates ``{name: fn}`` measured round by round: each round times every
    candidate once, in an order that rotates from round to round, so that a slow stretch of a shared
    machine falls on all of them alike; `warmup` untimed rounds first. The floor is handled as in
    :func:`time_cpu`, per candidate: a candidate on the floor gets batches of calls, and all candidates
    are measured again together. Returns ``{name: {"ms", "ms_p20", "ms_p80", "n", "inner", "rerun",
    "times_ms": the per-call time of each round}}``; a failure names ``label: name``."""
    names = list(fns)
    tick = clock_resolution()
    for _ in range(warmup):
        for name in names:
            fns[name]()
    inner = dict.fromkeys(names, 1)
    rerun = dict.fromkeys(names, False)
    while True:
        spans: dict[str, list[float]] = {name: [] for name in names}
        for k in range(rounds):
            for name in names[k % len(names):] + names[:k % len(names)]:
                spans[name].append(_span(fns[name], inner[name]))
        floor = {name: reason for name in names
                 if (reason := floor_reason(spans[name], tick, repeats=inner[name] == 1)) is not None}
        if not floor:
            break
        more = {name: _more_inner(inner[name], spans[name], tick, FLOOR_TICKS) if name in floor else inner[name]
                for name in names}
        expected = sum(rounds * more[n] / inner[n] * max(statistics.median(spans[n]), tick) for n in names)
        for name, reason in floor.items():
            if more[name] > MAX_INNER:
                _refuse_floor(f"{label}: {name}", reason, inner[name],
                              f"{more[name]} calls per timing would pass the limit of {MAX_INNER}")
            if expected > RERUN_BUDGET_S:
                _refuse_floor(f"{label}: {name}", reason, inner[name],
                              f"a try at {more[name]} calls per timing could take {expected:.0f} s")
            rerun[name] = True
        inner = more
    out = {}
    for name in names:
        per_call = [s * 1e3 / inner[name] for s in spans[name]]
        out[name] = {**_summary(per_call), "inner": inner[name], "rerun": rerun[name], "times_ms": per_call}
    return out


def time_gpu(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100, label: str = "timing") -> dict:
    """triton.testing.do_bench median and (0.2, 0.8) quantiles, in ms. A median within GPU_FLOOR_TICKS
    ticks of the CUDA events' resolution is measured again over batches of calls (divided by the batch;
    do_bench then flushes L2 before each batch, not each call); still there at MAX_INNER calls, it is a
    BenchError naming `label`. ``inner`` and ``rerun`` as in :func:`time_cpu`."""
    from triton.testing import do_bench

    inner, rerun, tick = 1, False, CUDA_EVENT_RESOLUTION_S
    while True:
        batch = fn if inner == 1 else (lambda k=inner: [fn() for _ in range(k)])
        med, p20, p80 = do_bench(batch, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
        reason = floor_reason([med * 1e-3], tick, floor_ticks=GPU_FLOOR_TICKS, repeats=False)
        if reason is None:
            break
        more = _more_inner(inner, [med * 1e-3], tick, GPU_FLOOR_TICKS)
        if more > MAX_INNER:
            _refuse_floor(label, reason, inner, f"{more} calls per timing would pass the limit of {MAX_INNER}")
        inner, rerun = more, True
    # do_bench's rep is a time
    return {"ms": med / inner, "ms_p20": p20 / inner, "ms_p80": p80 / inner, "n": None, "rep_ms": rep,
            "inner": inner, "rerun": rerun}


def timing_fields(**timings: dict) -> dict:
    """The row fields that say how a row's timings were taken, from the dicts :func:`time_cpu`,
    :func:`time_gpu` or :func:`time_interleaved` returned: ``{"inner_reps": {name: calls per timing},
    "rerun_at_floor": whether any was measured again because it sat on the clock's floor}``."""
    return {"inner_reps": {name: t.get("inner", 1) for name, t in timings.items()},
            "rerun_at_floor": any(bool(t.get("rerun")) for t in timings.values())}


def gbps(nbytes: int, ms: float) -> float:
    """Bandwidth in GB/s (1e9 bytes per second)."""
    return nbytes / (ms * 1e-3) / 1e9


class BenchError(Exception):
    """A failure the user can act on: printed as one line, exit status 1."""


def default_results_dir() -> pathlib.Path:
    """``./bench/results`` of the current folder, also when the package runs from its source checkout:
    `mlra bench` run from another folder never writes into the checkout."""
    return pathlib.Path.cwd() / DEFAULT_RESULTS


def git_tracked(path: str | os.PathLike) -> bool:
    """Whether git tracks the file `path` (in whatever repository holds it). Where git cannot tell (no
    git, or a repository it refuses to read), a file that exists inside the source checkout counts as
    tracked: the committed results are kept rather than risked."""
    path = pathlib.Path(os.path.abspath(path))
    if not path.parent.is_dir():
        return False
    try:
        proc = subprocess.run(["git", "ls-files", "--error-unmatch", "--", f":(literal){path.name}"], cwd=path.parent,
                              capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        proc = None
    if proc is not None and proc.returncode in (0, 1):
        return proc.returncode == 0
    if proc is not None and b"not a git repository" in proc.stderr.lower():
        return False
    return SOURCE_CHECKOUT is not None and path.exists() and path.is_relative_to(SOURCE_CHECKOUT)


def script_default_out(script: str | os.PathLike) -> Optional[pathlib.Path]:
    """The result folder of a ``bench/*.py`` script when no ``--out`` is given: run from the checkout root
    (the documented way to regenerate the committed results), the checkout's ``bench/results``, named on
    the user's behalf so that its tracked files are replaced; from any other folder None, the rule of
    `mlra bench` (``./bench/results`` there, a tracked file refused)."""
    root = pathlib.Path(script).resolve().parents[1]
    return root / DEFAULT_RESULTS if pathlib.Path.cwd().resolve() == root else None


def out_help(what: str, default_out: str | os.PathLike | None = None) -> str:
    """The help of a benchmark's folder flag, saying where `what` goes without it."""
    if default_out is not None:
        return (f"folder for {what}, relative to the current folder (default: {_shown(pathlib.Path(default_out))}, "
                f"the committed results of this checkout, which this run replaces)")
    return (f"folder for {what}, relative to the current folder (default: ./bench/results of the current folder; "
            f"a result file there that git tracks, such as a checkout's committed results, is replaced only "
            f"when this flag names its folder: without it the run stops before measuring)")


def _shown(path: pathlib.Path) -> str:
    """`path` as the user would type it: relative to the current folder when under it."""
    try:
        return str(path.relative_to(pathlib.Path.cwd())) or "."
    except ValueError:
        return str(path)


def _refuse_tracked(target: pathlib.Path, flag: str) -> None:
    if git_tracked(target):
        raise ValueError(
            f"{flag} not given: the default {target} is tracked by git (a committed result), and a tracked file is "
            f"replaced only when {flag} names its folder; pass {flag} {_shown(target.parent)} to replace it, or "
            f"{flag} FOLDER to write elsewhere")


def results_dir(out_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The absolute result folder: ``None`` is :func:`default_results_dir`; a relative path is taken
    from the current folder."""
    if out_dir is None:
        return default_results_dir()
    text = os.fspath(out_dir)
    if not text or "\0" in text:
        raise ValueError(f"expected a folder name, got {text!r}")
    return pathlib.Path(os.path.abspath(os.path.expanduser(text)))


# Folders check_output created for this run; removed again (when still empty) if the run fails.
_CREATED: list[pathlib.Path] = []


def check_output(path: str | os.PathLike | None, flag: str, name: Optional[str] = None,
                 default: str | os.PathLike | None = None) -> pathlib.Path:
    """Make sure, before a benchmark runs, that its results can be written under `path` (see
    `results_dir`): the folder is created if missing and a probe file written and removed there, and
    `<name>.json` there must not be a folder. With `path` None the folder is `default` (one a caller
    names on the user's behalf, as the bench/*.py scripts do) or else :func:`default_results_dir`, where
    a `<name>.json` that git tracks is refused: only a folder named explicitly replaces a tracked file.
    Errors are ValueErrors whose message starts with `flag` and the folder; returns the folder.
    `run_main` removes the folders created here if the run fails."""
    if path is None and default is not None:
        path = default
    elif path is None and name is not None:
        _refuse_tracked(default_results_dir() / f"{name}.json", flag)
    try:
        out = results_dir(path)
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from None
    probe = out
    while not probe.exists():
        if probe.is_symlink():
            raise ValueError(f"{flag} {out}: {probe} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        what = "is a file" if probe == out else f"cannot be created: {probe} is a file"
        raise ValueError(f"{flag} {out}: {what}, expected a folder")
    missing = []
    parent = out
    while parent != probe:
        missing.append(parent)
        parent = parent.parent
    try:
        for folder in reversed(missing):
            folder.mkdir()
            _CREATED.append(folder)
        fd, tmp = _probe_file(out)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        remove_created_folders()
        raise ValueError(f"{flag} {out}: cannot write there ({err.strerror or one_line(err)})") from None
    if name is not None:
        target = out / f"{name}.json"
        if target.is_dir():
            remove_created_folders()
            raise ValueError(f"{flag} {out}: {target.name} there is a folder, expected a result file")
    return out


def _probe_file(folder: pathlib.Path):
    tmp = folder / f".write-test.{os.getpid()}.tmp"
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), tmp


def remove_created_folders() -> None:
    """Remove the folders `check_output` created, deepest first, where still empty."""
    while _CREATED:
        folder = _CREATED.pop()
        try:
            folder.rmdir()
        except OSError:
            pass


def write_results(
    name: str, rows: Iterable[dict], out_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> pathlib.Path:
    """Write rows plus metadata to `<out_dir>/<name>.json` (folder: see `results_dir`) and return the path.

    No rows raises ValueError and writes nothing: an empty result must not replace an earlier one; so
    does a `<name>.json` that git tracks when `out_dir` is None (a tracked file is replaced only in a
    folder named explicitly). The file is written under a temporary name and renamed once complete."""
    rows = list(rows)
    if not rows:
        raise ValueError(f"no results to write for {name}: nothing was measured")
    if not name or name in (".", "..") or "/" in name or (os.altsep and os.altsep in name) or os.sep in name:
        raise ValueError(f"expected a result name without folders, got {name!r}")
    out = results_dir(out_dir)
    if out_dir is None:
        _refuse_tracked(out / f"{name}.json", "out_dir")
    meta = env_metadata(device)
    # A 1-minute load average above the CPU count: other work shared the CPUs (a heuristic: it lags).
    meta["loaded"] = bool(meta["device_type"] == "cpu" and meta["loadavg_1m"] is not None
                          and meta["cpu_count"] and meta["loadavg_1m"] > meta["cpu_count"])
    if meta["loaded"]:
        print(f"warning: {name}: the 1-minute load average was {meta['loadavg_1m']:.2f} on {meta['cpu_count']} "
              "CPUs while this ran: other work shared the CPUs, so these timings and ratios may say more about it "
              "than about the code; run again on a quiet machine (the result file records loaded: true)",
              file=sys.stderr)
    # Whether any row's timings sat on the clock's floor and were measured again (timing_fields).
    meta["rows_rerun_at_floor"] = sum(bool(row.get("rerun_at_floor")) for row in rows)
    meta["rerun_at_floor"] = meta["rows_rerun_at_floor"] > 0
    full_rows = []
    for row in rows:
        full = dict(row)
        for key in ROW_META_KEYS:
            full.setdefault(key, meta[key])
        full_rows.append(full)
    text = json.dumps({"meta": meta, "rows": full_rows}, indent=2) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    write_atomic(path, text)
    return path


# ---------------------------------------------------------------- command line


def one_line(err: BaseException | str) -> str:
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or (type(err).__name__ if isinstance(err, BaseException) else "")


class BenchParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line on stderr (exit status 2), and which takes no
    abbreviated options (``--smo`` is not ``--smoke``: the scripts look for some flags before parsing)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):  # noqa: D102 - argparse API
        self.exit(2, f"{self.prog}: error: {one_line(message)} (--help lists the options)\n")


def comma_list(allowed: Sequence[str]) -> Callable[[str], list]:
    """argparse type: a comma list whose items are all in `allowed` (repeats dropped, order kept)."""
    allowed = list(allowed)

    def parse(text: str) -> list:
        items = [item.strip() for item in text.split(",")]
        if not text.strip() or any(not item for item in items):
            raise argparse.ArgumentTypeError(
                f"expected a comma list of {', '.join(allowed)} without empty items, got {text!r}")
        unknown = [item for item in items if item not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(repr, unknown))} in {text!r}; expected a comma list of {', '.join(allowed)}")
        return list(dict.fromkeys(items))

    return parse


def check_device(device: str) -> None:
    """Refuse ``--device cuda`` without a visible GPU, before anything is measured."""
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no GPU visible")


def add_output_flags(p: argparse.ArgumentParser, flag: str, what: str,
                     default_out: str | os.PathLike | None) -> argparse.ArgumentParser:
    """Add the flags every benchmark ends with, `flag` (the results folder; `what`: the file it holds, see
    `out_help`) and --traceback, and record `default_out` for `check_output`; returns `p`."""
    p.add_argument(flag, default=None, help=out_help(what, default_out))
    p.add_argument("--traceback", action="store_true", help="on an error, show the Python traceback")
    p.set_defaults(default_out=default_out)
    return p


def save_results(name: str, rows: Iterable[dict], out: pathlib.Path, device: str | torch.device) -> pathlib.Path:
    """`write_results` into the folder `check_output` returned, then print where; returns the path."""
    path = write_results(name, rows, out_dir=out, device=device)
    print(f"wrote {path}")
    return path


def bench_main(prog: str, run: Callable[[argparse.Namespace], int],
               build_parser: Callable[..., argparse.ArgumentParser]) -> Callable[..., int]:
    """A benchmark module's ``main(argv=None, prog=prog, default_out=None) -> int``: parse `argv` with
    ``build_parser(prog, default_out)`` and run `run` through `run_main`."""

    def main(argv: Sequence[str] | None = None, prog: str = prog,
             default_out: str | os.PathLike | None = None) -> int:
        """`default_out`: the results folder used when none is named (a bench/*.py script's; see
        `script_default_out`)."""
        return run_main(prog, run, build_parser(prog, default_out), argv)

    return main


def run_main(prog: str, body: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
             argv: Optional[Sequence[str]] = None) -> int:
    """Parse `argv` with `parser` and run `body(args)`; every failure is one line on stderr
    (``<prog>: error: ...``), a non-zero status and no traceback, unless ``args.traceback`` is set."""
    args = parser.parse_args(argv)
    show = getattr(args, "traceback", False)
    try:
        try:
            rc = body(args)
        except BaseException:
            remove_created_folders()
            raise
        _CREATED.clear()
        return rc
    except (BenchError, ValueError, OSError) as err:
        if show:
            raise
        if isinstance(err, OSError) and err.filename is not None and err.strerror:
            text = f"{err.filename}: {err.strerror}"
        else:
            text = one_line(err)
        print(f"{prog}: error: {text}; no result file written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if show:
            raise
        print(f"{prog}: interrupted; no result file written", file=sys.stderr)
        return 130
    except Exception as err:  # a failure nobody foresaw (out of memory, a kernel error): still one line
        if show:
            raise
        print(f"{prog}: error: {type(err).__name__}: {one_line(err)}; no result file written "
              f"(--traceback shows where)", file=sys.stderr)
        return 1
