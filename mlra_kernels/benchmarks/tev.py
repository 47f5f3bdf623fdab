"""Benchmark of mlra_kernels.tev: GB/s, and the ratio to the torch one-liner and to E.sum(), in one run.

    python bench/bench_tev.py                       # CPU: V·d = 1e6 .. 1e9, fp32 and bf16
    python bench/bench_tev.py --device cuda         # GPU (do_bench), plus 128k x 4096 (up to --max-elems)
    python bench/bench_tev.py --max-elems 1e8       # smaller run (at least 1e6, the smallest matrix)
    mlra bench tev ...                              # the same from an installed wheel

Bandwidth is E.nbytes / time: each element is read once, in its own dtype. The baseline is what users
write without the package: t = torch.std(E.float(), dim=1, unbiased=False); t.mean(); t.std(). E.sum() on
the same matrix is the reference read rate. Correctness is checked first (float64 reference on small
matrices, the one-liner on every benchmarked matrix); nothing is written if a check fails or the run
stops early, and an earlier result file is replaced only by a complete one.
Results: tev_<device>.json in --out (default: ./bench/results of the current folder, where a file git
tracks is not replaced: pass --out to name its folder; python bench/bench_tev.py from the checkout root
names bench/results, the committed results); rows carry device, versions, commit, date, and how each
time was taken (inner_reps: calls per timing, more than one where a timing sat on the clock's floor).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from tqdm.auto import tqdm

from mlra_kernels._argtypes import parse_number
from mlra_kernels.benchmarks.common import (
    BenchError, BenchParser, add_output_flags, bench_main, check_device, check_output, comma_list, gbps,
    positive_int, save_results, time_cpu, time_gpu, timing_fields,
)
from mlra_kernels.ops.tev import tev, tev_reference
from mlra_kernels.ops.tev.reference import tev_one_liner

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZES = (1e6, 1e7, 1e8, 1e9)  # V·d of the benchmarked matrices (d = 1024)
CUDA_EXTRA = (131072, 4096)  # a large vocabulary at a large width, on GPUs


def make(v: int, d: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    """N(0, s_i^2) rows with s_i in [0.01, 0.03], built in blocks to keep temporaries small."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.empty(v, d, dtype=dtype, device=device)
    step = max(1, (1 << 24) // d)
    for i in range(0, v, step):
        n = min(step, v - i)
        scale = 0.01 + 0.02 * torch.rand(n, 1, generator=g, device=device)
        w[i : i + n] = torch.randn(n, d, generator=g, device=device) * scale
    return w


def check_small(device: str) -> None:
    for name, dtype in DTYPES.items():
        w = make(3000, 1000, dtype, device, seed=1)
        got, ref = tev(w), tev_reference(w)
        for a, b, what in ((got.mean, ref.mean, "mean"), (got.std, ref.std, "std")):
            if not abs(a - b) <= 1e-6 * abs(b):
                raise BenchError(f"correctness check failed ({device}, {name}, {what}: {a} vs float64 {b})")


def shapes(max_elems: float, device: str) -> list[tuple[int, int]]:
    out = []
    for n in SIZES:
        if n <= max_elems:
            d = 1024
            out.append((int(round(n / d)), d))
    if device == "cuda" and CUDA_EXTRA[0] * CUDA_EXTRA[1] <= max_elems:
        out.append(CUDA_EXTRA)
    return out


def max_elems_type(text: str) -> float:
    """argparse type of --max-elems: a number of elements, at least the smallest benchmarked matrix."""
    value = parse_number(text, float, "a number of elements such as 1e8")
    if not math.isfinite(value) or value < SIZES[0]:
        raise argparse.ArgumentTypeError(
            f"expected a number of elements of at least 1e6 (the smallest matrix), got {text!r}")
    return value


def bench_one(v: int, d: int, dtype_name: str, device: str, rep: int) -> dict:
    dtype = DTYPES[dtype_name]
    w = make(v, d, dtype, device)
    nbytes = w.numel() * w.element_size()

    got = tev(w)
    one_mean, one_std = (t.item() for t in tev_one_liner(w))
    if not (abs(got.mean - one_mean) <= 1e-4 * abs(one_mean) and abs(got.std - one_std) <= 1e-3 * abs(one_std)):
        raise BenchError(f"tev disagrees with the one-liner on {v}x{d} {dtype_name}: {got} vs {one_mean}, {one_std}")

    def run_tev():
        tev(w)

    def run_one_liner():
        m, s = tev_one_liner(w)
        return m.item(), s.item()

    def run_sum():
        return w.sum().item()

    what = f"{v}x{d} {dtype_name}"
    if device == "cuda":
        t_tev = time_gpu(run_tev, label=f"{what} tev")
        t_one = time_gpu(run_one_liner, label=f"{what} one-liner")
        t_sum = time_gpu(run_sum, label=f"{what} sum")
    else:
        big = nbytes > 1 << 30
        kw = dict(warmup=1, rep=3 if big else rep, min_time_s=0.0 if big else 0.5)
        t_tev = time_cpu(run_tev, label=f"{what} tev", **kw)
        t_one = time_cpu(run_one_liner, warmup=0 if big else 1, rep=2 if big else rep, label=f"{what} one-liner")
        t_sum = time_cpu(run_sum, label=f"{what} sum", **kw)
    row = {
        "op": "tev",
        "device_type": device,
        "dtype": dtype_name,
        "shape": [v, d],
        "elements": v * d,
        "bytes": nbytes,
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "ms": t_tev["ms"],
        "ms_p20": t_tev["ms_p20"],
        "ms_p80": t_tev["ms_p80"],
        "gbps": gbps(nbytes, t_tev["ms"]),
        "one_liner_ms": t_one["ms"],
        "one_liner_gbps": gbps(nbytes, t_one["ms"]),
        "speedup_vs_one_liner": t_one["ms"] / t_tev["ms"],
        "sum_ms": t_sum["ms"],
        "sum_gbps": gbps(nbytes, t_sum["ms"]),
        "fraction_of_sum_read_rate": t_sum["ms"] / t_tev["ms"],
        **timing_fields(tev=t_tev, one_liner=t_one, sum=t_sum),
    }
    del w
    return row


def build_parser(prog: str = "mlra bench tev", default_out=None) -> argparse.ArgumentParser:
    p = BenchParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtypes", type=comma_list(DTYPES), default=["fp32", "bf16"],
                   help=f"comma list of {', '.join(DTYPES)} (default fp32,bf16)")
    p.add_argument("--max-elems", type=max_elems_type, default=1e9,
                   help="largest V·d to run, at least 1e6 (default 1e9)")
    p.add_argument("--rep", type=positive_int, default=5, help="CPU repetitions per measurement (default 5)")
    return add_output_flags(p, "--out", "tev_<device>.json", default_out)


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    name = f"tev_{args.device}"
    out = check_output(args.out, "--out", name, default=getattr(args, "default_out", None))
    cases = [(v, d, dt) for v, d in shapes(args.max_elems, args.device) for dt in args.dtypes]
    if not cases:  # --max-elems has a minimum, so this is a guard, not a path
        raise BenchError(f"--max-elems {args.max_elems:g}: no matrix to benchmark")

    check_small(args.device)
    rows = []
    for v, d, dt in tqdm(cases, desc="tev bench", unit="matrix", file=sys.stderr):
        row = bench_one(v, d, dt, args.device, args.rep)
        rows.append(row)
        tqdm.write(
            f"{v:>8}x{d:<5} {dt:5} tev {row['gbps']:7.2f} GB/s | one-liner {row['one_liner_gbps']:6.2f} GB/s "
            f"(x{row['speedup_vs_one_liner']:5.1f}) | sum {row['sum_gbps']:6.2f} GB/s "
            f"({100 * row['fraction_of_sum_read_rate']:5.1f}% of it)",
        )
    save_results(name, rows, out, args.device)
    worst = min(r["speedup_vs_one_liner"] for r in rows)
    print(f"lowest speedup over the one-liner: x{worst:.1f}")
    return 0


main = bench_main("mlra bench tev", run, build_parser)


if __name__ == "__main__":
    sys.exit(main())
