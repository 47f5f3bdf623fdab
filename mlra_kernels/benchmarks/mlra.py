"""Benchmark of the fused MLRA attention against unfused MLRA and standard MHA.

Every row measures, in the same process and on the same inputs:

  (a) ``unfused``: the best unfused PyTorch MLRA: the latent GEMM, the per-group up-projection as one
      batched GEMM, then ``scaled_dot_product_attention`` on its fastest backend (each backend is timed
      and the fastest kept);
  (b) ``mha``: standard attention: one QKV GEMM plus SDPA (fastest backend);
  (c) ``ours``: ``mlra_kernels.mlra_attention``.

For each: forward, backward and forward+backward time (``do_bench`` median with 20/80% quantiles; on the
CPU the median of 9 rounds in which the three candidates run by turns, see ``interleaved_cpu_timings``),
TFLOP/s, peak memory of forward+backward, and the memory saved for backward (unique storages the
autograd graph holds, with and without the inputs and weights).

FLOP formula (model FLOPs, the same for (a) and (c); recomputation is not counted):

  N = B·T tokens, P = T(T+1)/2 attended pairs per head under causal masking (T² otherwise)
  MLRA forward = 2·N·d·(3·g·r)        latent GEMM  c = x·Aᵀ
               + 2·N·(3·d)·r          up-projections  q, k, v = c·Bᵀ
               + 4·B·H·P·d_h          QKᵀ and PV
  MHA forward  = 2·N·d·(3·d) + 4·B·H·P·d_h
  backward     = 2 × forward,  forward+backward = 3 × forward

Correctness comes first: the run checks the kernels against the float64 reference on small shapes
(the rule of the test suite), and every row checks its own output against an fp32 computation of
(a); a failing check stops the run before any speed is reported, and nothing is written. Every flag is
checked before anything runs; an earlier result file is replaced only by a complete one.

Usage:
  python bench/bench_mlra.py                     # full grid on a CUDA GPU, writes bench/results/mlra_<gpu>.json;
                                                 # without a GPU: GPT-2 small, T=1024, fp32 (mlra_cpu.json)
  python bench/bench_mlra.py --models small --T 1024 2048 --dtypes bf16
  TRITON_INTERPRET=1 python bench/bench_mlra.py --smoke   # tiny shapes on CPU under the interpreter
  mlra bench mlra ...                            # the same from an installed wheel

--smoke changes only the defaults (model d=64 H=2, T 40, 80 tokens, ranks d/4, groups 1 and H; fp32 and
bf16 on CPU); flags given explicitly are used as given. Results: <--out-dir>/<--out>.json, the folder by
default ./bench/results of the current folder (a relative --out-dir is taken from there too), where a
result file git tracks is replaced only when --out-dir names its folder; python bench/bench_mlra.py from
the checkout root names bench/results, the committed results. Each row records its timings' calls per
timing (inner_reps: more than one where a timing sat on the clock's floor and was taken again).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mlra_kernels.benchmarks.common import (
    BenchError, BenchParser, add_output_flags, bench_main, check_output, positive_int, save_results, time_gpu,
    time_interleaved, timing_fields,
)
from mlra_kernels.ops.mlra import config, kernel_path, mlra_attention
from mlra_kernels.ops.mlra.reference import mlra_attention_reference

MODELS = {"small": (768, 12), "medium": (1024, 16), "large": (1280, 20)}
SMOKE_MODEL = ("smoke", 64, 2)  # --smoke: d = 64, H = 2
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Defaults of the grid flags: the full benchmark, and --smoke (tiny shapes, CPU under the interpreter).
FULL = {"models": list(MODELS), "T": [1024, 2048, 4096, 8192], "ranks": ["d/8", "d/4", "d/2"],
        "groups": ["1", "H"], "dtypes": ["bf16", "fp16"], "tokens": 16384}
SMOKE = {"models": [SMOKE_MODEL[0]], "T": [40], "ranks": ["d/4"], "groups": ["1", "H"], "dtypes": ["bf16", "fp16"],
         "tokens": 80}
SMOKE_CPU_DTYPES = ["fp32", "bf16"]
# The CPU benchmark (no GPU, no --smoke): GPT-2 small's width at T = 1024, fp32, every latent shape.
CPU = {"models": ["small"], "T": [1024], "ranks": ["d/8", "d/4", "d/2"], "groups": ["1", "H"], "dtypes": ["fp32"],
       "tokens": 2048}


def mlra_flops(B, T, d, H, g, r, causal=True):
    pairs = T * (T + 1) // 2 if causal else T * T
    return 2 * B * T * d * (3 * g * r) + 2 * B * T * (3 * d) * r + 4 * B * H * pairs * (d // H)


def mha_flops(B, T, d, H, causal=True):
    pairs = T * (T + 1) // 2 if causal else T * T
    return 2 * B * T * d * (3 * d) + 4 * B * H * pairs * (d // H)




def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }


def _sdpa(q, k, v, backend):
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(_sdpa_backends()[backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def unfused_mlra(x, down, up, bias, H, g, backend=None):
    """(a): latent GEMM, one batched up-projection GEMM, SDPA. Returns [B, T, d]."""
    B, T, d = x.shape
    r = up.shape[-1]
    c = (x.reshape(B * T, d) @ down.t()).view(B * T, 3 * g, r).transpose(0, 1)  # [3g, N, r]
    upg = up.view(3, g, d // g, r).reshape(3 * g, d // g, r)
    qkv = torch.bmm(c, upg.transpose(1, 2))  # [3g, N, d/g]
    qkv = qkv.view(3, g, B, T, d // g).permute(0, 2, 3, 1, 4).reshape(3, B, T, d)
    if bias is not None:
        qkv = qkv + bias.view(3, 1, 1, d)
    q, k, v = (t.view(B, T, H, d // H).transpose(1, 2) for t in qkv)
    o = _sdpa(q, k, v, backend)
    return o.transpose(1, 2).reshape(B, T, d)


def mha(x, w, b, H, backend=None):
    """(b): one QKV GEMM plus SDPA. Returns [B, T, d]."""
    B, T, d = x.shape
    qkv = F.linear(x, w, b).view(B, T, 3, H, d // H).permute(2, 0, 3, 1, 4)
    o = _sdpa(qkv[0], qkv[1], qkv[2], backend)
    return o.transpose(1, 2).reshape(B, T, d)




def saved_bytes(fn, inputs):
    """Bytes of the unique storages the autograd graph of ``fn()`` keeps: (all, excluding ``inputs``)."""
    seen = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except Exception:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    ptrs = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    total = sum(seen.values())
    excl = sum(n for p, n in seen.items() if p not in ptrs)
    del out
    return total, excl


def _phases(fn, leaves, go):
    """The three timed callables of one candidate: forward (no grad), backward of a kept graph, and
    forward+backward; the kept graph's output is returned too, for the caller to drop."""

    def zero():
        for t in leaves:
            t.grad = None

    def fwd():
        with torch.no_grad():
            return fn()

    out = fn()

    def bwd():
        zero()
        out.backward(go, retain_graph=True)

    def fwdbwd():
        zero()
        fn().backward(go)

    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwdbwd}, out


def timings(fn, leaves, go, cuda=True, label="timing"):
    """One candidate's times on the GPU (``do_bench``) with its peak memory of forward+backward (the CPU
    candidates are timed together, by :func:`interleaved_cpu_timings`)."""
    phases, out = _phases(fn, leaves, go)
    res = {name: time_gpu(f, label=f"{label} {name}") for name, f in phases.items()}
    del out
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    phases["fwdbwd"]()
    torch.cuda.synchronize()
    res["peak_mem_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return res


CPU_ROUNDS = 9


def interleaved_cpu_timings(candidates: dict, go, rounds: int = CPU_ROUNDS, label: str = "timing") -> dict:
    """CPU times of several candidates ``{name: (fn, leaves)}``, measured round by round: each round runs
    every candidate's phase once, in an order that rotates from round to round, so that a slow stretch
    of a shared 2-core machine falls on all of them alike instead of on whichever ran then. Median and
    20/80% quantiles per candidate and phase, after one warm-up round (``common.time_interleaved``:
    timings on the clock's floor are taken again over batches of calls)."""
    names = list(candidates)
    phases = {}
    for name, (fn, leaves) in candidates.items():
        phases[name] = _phases(fn, leaves, go)
    res = {name: {} for name in names}
    for phase in ("fwd", "bwd", "fwdbwd"):
        t = time_interleaved({name: phases[name][0][phase] for name in names}, rounds=rounds, warmup=1,
                             label=f"{label} {phase}")
        for name in names:
            res[name][phase] = t[name]
    del phases
    return res


def best_backend(make, leaves, go, cuda):
    """Time every SDPA backend that runs on the GPU; return (name, timings) of the fastest forward+backward."""
    best = None
    for name in ("flash", "cudnn", "efficient"):
        try:
            make(name).backward(go)
        except RuntimeError:
            continue
        t = timings(lambda: make(name), leaves, go, cuda)
        if best is None or t["fwdbwd"]["ms"] < best[1]["fwdbwd"]["ms"]:
            best = (name, t)
    if best is None:
        raise BenchError("no SDPA backend (flash, cudnn, efficient) runs this row's shapes")
    return best


def close_enough(got, low, exact):
    """The test-suite rule: error ≤ 3 × the low-precision baseline's error + one ulp of the largest value."""
    ulp = torch.finfo(low.dtype).eps
    err = (got.double() - exact.double()).abs().max().item()
    base = (low.double() - exact.double()).abs().max().item()
    return err <= 3 * base + ulp * exact.double().abs().max().item(), err, base


def correctness_gate(device, dtypes):
    """Kernels vs. float64 reference on small awkward shapes, forward and every gradient."""
    shapes = [(2, 97, 4, 1, 24, 64), (1, 130, 4, 4, 8, 48), (1, 200, 2, 2, 40, 80), (1, 77, 2, 1, 64, 128)]
    gen = torch.Generator().manual_seed(0)
    for dt in dtypes:
        for B, T, H, g, r, dh in shapes:
            d = H * dh
            base = [
                torch.randn(B, T, d, generator=gen, dtype=torch.float64),
                torch.randn(3 * g * r, d, generator=gen, dtype=torch.float64) / math.sqrt(d),
                torch.randn(3, d, r, generator=gen, dtype=torch.float64) / math.sqrt(r),
                torch.randn(3 * d, generator=gen, dtype=torch.float64) * 0.2,
            ]
            go = torch.randn(B, T, d, generator=gen, dtype=torch.float64).to(device)
            results = []
            for fn, t in ((mlra_attention_reference, torch.float64), (mlra_attention_reference, dt), (mlra_attention, dt)):
                leaves = [b.to(device=device, dtype=t).requires_grad_() for b in base]
                out = fn(*leaves, num_heads=H, latent_groups=g)
                results.append([out] + list(torch.autograd.grad(out, leaves, go.to(t))))
            for name, ex, lo, got in zip(["out", "dx", "ddown", "dup", "dbias"], *results):
                ok, err, ref_err = close_enough(got, lo, ex)
                if not ok:
                    raise BenchError(
                        f"correctness check failed ({dt}, B={B} T={T} H={H} g={g} r={r} d_h={dh}, {name}): "
                        f"error {err:.3e} vs torch's {ref_err:.3e}; no speed is reported"
                    )
    print(f"correctness gate passed for {', '.join(str(d) for d in dtypes)}", flush=True)




def bench_row(model, d, H, T, B, g, r, dtype_name, device):
    cuda = device.type == "cuda"
    dt = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, d, generator=gen).to(device, dt).requires_grad_()
    down = (torch.randn(3 * g * r, d, generator=gen) / math.sqrt(d)).to(device, dt).requires_grad_()
    up = (torch.randn(3, d, r, generator=gen) / math.sqrt(r)).to(device, dt).requires_grad_()
    bias = (torch.randn(3 * d, generator=gen) * 0.1).to(device, dt).requires_grad_()
    w = (torch.randn(3 * d, d, generator=gen) / math.sqrt(d)).to(device, dt).requires_grad_()
    go = torch.randn(B, T, d, generator=gen).to(device, dt)

    ours = lambda: mlra_attention(x, down, up, bias, num_heads=H, latent_groups=g)  # noqa: E731
    # Per-row check against (a) computed in fp32 (fp64 for fp32 rows), cheap enough at every size.
    hi = torch.float64 if dt == torch.float32 else torch.float32
    with torch.no_grad():
        exact = unfused_mlra(*(t.to(hi) for t in (x, down, up, bias)), H, g)
        ok, err, base_err = close_enough(ours(), unfused_mlra(x, down, up, bias, H, g), exact)
    if not ok:
        raise BenchError(f"row check failed for {model} T={T} g={g} r={r} {dtype_name}: {err:.3e} vs {base_err:.3e}")

    mlra_leaves, mha_leaves = [x, down, up, bias], [x, w, bias]
    what = f"{model} T={T} g={g} r={r} {dtype_name}"
    if cuda:
        name_a, t_a = best_backend(lambda be: unfused_mlra(x, down, up, bias, H, g, be), mlra_leaves, go, cuda)
        name_b, t_b = best_backend(lambda be: mha(x, w, bias, H, be), mha_leaves, go, cuda)
        t_c = timings(ours, mlra_leaves, go, cuda, label=f"{what} ours")
    else:  # one SDPA backend on the CPU; the three candidates measured round by round
        name_a = name_b = "default"
        t = interleaved_cpu_timings({"unfused": (lambda: unfused_mlra(x, down, up, bias, H, g), mlra_leaves),
                                     "mha": (lambda: mha(x, w, bias, H), mha_leaves),
                                     "ours": (ours, mlra_leaves)}, go, label=what)
        t_a, t_b, t_c = t["unfused"], t["mha"], t["ours"]
    saved = {
        "unfused": saved_bytes(lambda: unfused_mlra(x, down, up, bias, H, g, None if not cuda else name_a), mlra_leaves),
        "mha": saved_bytes(lambda: mha(x, w, bias, H, None if not cuda else name_b), mha_leaves),
        "ours": saved_bytes(ours, mlra_leaves),
    }
    f_mlra, f_mha = mlra_flops(B, T, d, H, g, r), mha_flops(B, T, d, H)
    row = {
        "model": model, "d": d, "H": H, "d_h": d // H, "B": B, "T": T, "g": g, "r": r, "latent_width": g * r,
        "dtype": dtype_name, "causal": True, "path": kernel_path(x.detach(), rank=r, head_dim=d // H),
        "sdpa_backend_unfused": name_a, "sdpa_backend_mha": name_b,
        "check_err": err, "check_err_unfused": base_err,
    }
    for key, t, flops in (("unfused", t_a, f_mlra), ("mha", t_b, f_mha), ("ours", t_c, f_mlra)):
        for phase, mult in (("fwd", 1), ("bwd", 2), ("fwdbwd", 3)):
            row[f"{key}_{phase}_ms"] = t[phase]["ms"]
            row[f"{key}_{phase}_ms_p20"] = t[phase]["ms_p20"]
            row[f"{key}_{phase}_ms_p80"] = t[phase]["ms_p80"]
            row[f"{key}_{phase}_tflops"] = mult * flops / (t[phase]["ms"] * 1e-3) / 1e12
        row[f"{key}_peak_mem_mib"] = t.get("peak_mem_mib")
        row[f"{key}_saved_mib"] = saved[key][0] / 2**20
        row[f"{key}_saved_excl_inputs_mib"] = saved[key][1] / 2**20
    row["speedup_fwdbwd_vs_unfused"] = t_a["fwdbwd"]["ms"] / t_c["fwdbwd"]["ms"]
    row["speedup_fwd_vs_mha"] = t_b["fwd"]["ms"] / t_c["fwd"]["ms"]
    row["saved_ratio_vs_unfused"] = saved["ours"][0] / saved["unfused"][0]
    row.update(timing_fields(**{f"{key}_{phase}": t[phase] for key, t in (("unfused", t_a), ("mha", t_b), ("ours", t_c))
                                for phase in ("fwd", "bwd", "fwdbwd")}))
    return row


def rank_fraction(text: str) -> str:
    """argparse type of --ranks: ``d/N``, the total latent width g·r as the fraction 1/N of d."""
    head, sep, tail = text.strip().partition("/")
    if head != "d" or not sep or not tail.isdigit() or int(tail) <= 0:
        raise argparse.ArgumentTypeError(f"expected d/N with N a positive integer (such as d/8), got {text!r}")
    return f"d/{int(tail)}"


def group_count(text: str) -> str:
    """argparse type of --groups: ``H`` (one group per head) or a positive integer dividing H."""
    if text.strip() == "H":
        return "H"
    try:
        return str(positive_int(text))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected H or a positive integer that divides H, got {text!r}") from None


def result_name(text: str) -> str:
    """argparse type of --out: a file name (``.json`` optional) without folders; the folder is --out-dir."""
    name = text[:-5] if text.endswith(".json") else text
    if not name or name in (".", "..") or "/" in name or (os.altsep and os.altsep in name) or "\0" in name:
        raise argparse.ArgumentTypeError(
            f"expected a result name without folders (the folder is --out-dir), got {text!r}")
    return name


def build_parser(prog: str = "mlra bench mlra", default_out=None) -> argparse.ArgumentParser:
    p = BenchParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=None,
                   help=f"default {' '.join(FULL['models'])} (--smoke: the d=64 smoke model)")
    p.add_argument("--T", nargs="+", type=positive_int, default=None,
                   help=f"sequence lengths, default {' '.join(map(str, FULL['T']))} (--smoke: {SMOKE['T'][0]})")
    p.add_argument("--ranks", nargs="+", type=rank_fraction, default=None,
                   help="total latent width g·r as a fraction d/N of d, default d/8 d/4 d/2 (--smoke: d/4)")
    p.add_argument("--groups", nargs="+", type=group_count, default=None,
                   help="latent groups g: H or integers dividing H, default 1 H")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None,
                   help="default bf16 fp16 (--smoke on CPU: fp32 bf16)")
    p.add_argument("--tokens", type=positive_int, default=None,
                   help=f"B·T per row (B = tokens // T, at least 1), default {FULL['tokens']} (--smoke: {SMOKE['tokens']})")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU (Triton interpreter)")
    p.add_argument("--out", type=result_name, default=None, help="results name (default mlra_<device>)")
    return add_output_flags(p, "--out-dir", "the JSON", default_out)


def grid(args: argparse.Namespace, device: torch.device) -> list[tuple]:
    """The rows to run, ``(model, d, H, T, B, g, r, dtype)``, each checked; a combination that does not
    exist (g not dividing H, a latent width below g) is an error naming its flag."""
    defaults = dict(SMOKE if args.smoke else FULL if device.type == "cuda" else CPU)
    if args.smoke and device.type == "cpu":
        defaults["dtypes"] = SMOKE_CPU_DTYPES
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)
    models = {**MODELS, SMOKE_MODEL[0]: SMOKE_MODEL[1:]}
    rows = []
    for model in dict.fromkeys(args.models):
        d, H = models[model]
        for T in dict.fromkeys(args.T):
            for gname in dict.fromkeys(args.groups):
                g = H if gname == "H" else int(gname)
                if H % g:
                    raise BenchError(f"--groups {gname}: {g} does not divide H={H} of the {model} model (d={d})")
                for rf in dict.fromkeys(args.ranks):
                    width = d // int(rf.split("/")[1])
                    r = width // g  # rf is the total latent width g·r as a fraction of d
                    if r < 1:
                        raise BenchError(
                            f"--ranks {rf}: the latent width {rf} = {width} of the {model} model (d={d}) is below "
                            f"g={g} latent groups, so r would be 0")
                    for dtn in dict.fromkeys(args.dtypes):
                        rows.append((model, d, H, T, max(1, args.tokens // T), g, r, dtn))
    return rows


def run(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = grid(args, device)
    if not args.smoke and device.type != "cuda" and config.interpret_requested():
        raise BenchError("TRITON_INTERPRET=1 would time the Triton interpreter; unset it for the CPU benchmark, "
                         "or pass --smoke for the tiny interpreter shapes")
    interpreted = config.triton_available() and config.interpret_requested() and config.triton_interpreted()
    if args.smoke and device.type != "cuda" and not interpreted:
        raise BenchError("--smoke on the CPU runs the Triton kernels under the interpreter, which Triton sets when "
                         "it is first imported: start the run with TRITON_INTERPRET=1 in the environment "
                         "(TRITON_INTERPRET=1 python bench/bench_mlra.py --smoke)")
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    name = args.out or "mlra_" + ("smoke_" if args.smoke else "") + re.sub(r"[^a-z0-9]+", "_", dev_name.lower()).strip("_")
    out = check_output(args.out_dir, "--out-dir", name, default=getattr(args, "default_out", None))

    if args.smoke and device.type == "cpu":
        print("--smoke on the CPU: the Triton kernels run under the interpreter, so this checks that every path "
              "runs and agrees; its times and ratios say nothing about speed", flush=True)
    correctness_gate(device, [DTYPES[n] for n in dict.fromkeys(args.dtypes)])
    rows = []
    for model, d, H, T, B, g, r, dtn in tqdm(cases, desc="mlra bench", unit="row", file=sys.stderr):
        row = bench_row(model, d, H, T, B, g, r, dtn, device)
        rows.append(row)
        tqdm.write(
            f"{model:6s} T={T:5d} B={B:2d} g={g:2d} r={r:3d} {dtn}: "
            f"fwd+bwd {row['ours_fwdbwd_ms']:.3f} ms ({row['speedup_fwdbwd_vs_unfused']:.2f}x unfused), "
            f"fwd {row['ours_fwd_ms']:.3f} ms ({row['speedup_fwd_vs_mha']:.2f}x mha), "
            f"saved {row['saved_ratio_vs_unfused']:.2f}x unfused"
        )
    save_results(name, rows, out, device)
    return 0


main = bench_main("mlra bench mlra", run, build_parser)


if __name__ == "__main__":
    sys.exit(main())
