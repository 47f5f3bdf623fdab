"""Decode benchmark: one decode step of an attention layer on a preallocated KV cache, MLRA against MHA.

    mlra bench decode [--device cpu|cuda] [--batches 1,4,16] [--lengths 512,2048,8192] [--rep 20]

Each row times one layer's step for one new token per sequence, ``S`` tokens already cached, with the
layers of ``mlra_kernels.models.GPT2`` (projections, cache write, attention and ``W_O``):

- ``mha``: the dense Q/K/V projection, K and V written into a preallocated ``[B, H, S_max, d_h]`` cache,
  torch's SDPA over the cached ``S + 1`` keys;
- ``mlra-g1`` (``g = 1``, ``r = d/4``) and ``mlra-gH`` (``g = H``, ``g·r = d/4``): the latents ``c_K, c_V``
  written into a preallocated group-major ``[B, g, S_max, r]`` cache and ``mlra_decode`` over them
  (absorbed form: no K or V is built). On CUDA ``mlra_decode`` runs the split-KV Triton decode kernel;
- ``mlra-g1-torch``, ``mlra-gH-torch`` (CUDA only, default there): the same layers with decode's torch
  path forced (GEMMs and SDPA on the latents), the baseline of the kernel in the same run. Each row
  records the ``decode_path`` it ran.

Bytes per step are the cache read (``2·B·(S+1)`` times the per-token width: ``d`` for MHA, ``g·r`` for
MLRA) plus the layer's weights; ``fraction_of_read_bw`` compares the achieved rate with a plain
``buffer.sum()`` of 256 MB measured in the same run. The cache is filled with random values (the
values do not change the time), and the step is timed with its length rewound, so every repetition
appends at position ``S``, and with the CPU caches flushed before each repetition, as they are in a
model whose other layers run in between (on GPU ``do_bench`` flushes L2).

It also times ``GPT2.generate()`` end to end (MLRA against MHA), and a Hugging Face GPT-2 converted with
``convert_gpt2`` against the original (when transformers is installed).

Correctness first: ``mlra_decode`` is checked against the float64 oracle on small shapes; a failure
stops the run before any time is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch
from tqdm.auto import tqdm

from mlra_kernels.benchmarks.common import (
    BenchError, BenchParser, _summary, check_output, comma_list, gbps, positive_int, run_main, time_cpu, time_gpu,
    write_results,
)
from mlra_kernels.models import GPT2, GPT2Config
from mlra_kernels.models.gpt2 import LayerCache, MHASelfAttention, MLRASelfAttention
from mlra_kernels.ops.mlra import kernel_path, kv_latents, mlra_decode, use_backend
from mlra_kernels.ops.mlra.reference import mlra_attention_reference

VARIANTS = ("mha", "mlra-g1", "mlra-gH")
# The MLRA layers with decode's torch path forced: on CUDA, the baseline of the Triton decode kernel.
TORCH_PATH_VARIANTS = ("mlra-g1-torch", "mlra-gH-torch")


def variant_config(name: str, d: int, H: int, capacity: int) -> GPT2Config:
    """The layer configuration of a variant: MLRA keeps a latent of ``d/4`` numbers per token for K (and V)."""
    base = dict(vocab_size=256, block_size=capacity, n_layer=1, n_head=H, n_embd=d)
    if name == "mha":
        return GPT2Config(attention="mha", **base)
    if name == "mlra-g1":
        return GPT2Config(attention="mlra", rank=d // 4, latent_groups=1, **base)
    return GPT2Config(attention="mlra", rank=d // (4 * H), latent_groups=H, **base)


def check_decode(device: str) -> None:
    """``mlra_decode`` against the float64 oracle for the last tokens of a sequence, on each decode path
    the run times (on CUDA the Triton kernel and the forced torch path); raises on a miss."""
    paths = ("auto", "torch") if device == "cuda" else ("auto",)
    gen = torch.Generator().manual_seed(0)
    for B, T, H, g, r in ((2, 37, 4, 1, 16), (3, 20, 4, 4, 8)):
        d = 64
        x = torch.randn(B, T, d, generator=gen, dtype=torch.float64)
        down = torch.randn(3 * g * r, d, generator=gen, dtype=torch.float64) / d ** 0.5
        up = torch.randn(3, d, r, generator=gen, dtype=torch.float64) / r ** 0.5
        bias = torch.randn(3 * d, generator=gen, dtype=torch.float64) * 0.2
        exact = mlra_attention_reference(x, down, up, bias, num_heads=H, latent_groups=g, causal=True)[:, -1:]
        for dt in (torch.float32,) + ((torch.bfloat16,) if device == "cuda" else ()):
            xs, ds, us, bs = (t.to(device=device, dtype=dt) for t in (x, down, up, bias))
            c_k, c_v = kv_latents(xs, ds, g, group_major=True)  # the layout the timed step reads
            for path in paths:
                with use_backend(path), torch.no_grad():
                    got, _ = mlra_decode(xs[:, -1:], ds, us, bs, cache_k=c_k, cache_v=c_v, num_heads=H,
                                         latent_groups=g)
                err = (got.double().cpu() - exact).abs().max().item()
                bound = 64 * torch.finfo(dt).eps * exact.abs().max().item()
                if not err <= bound:
                    raise BenchError(f"correctness check failed: mlra_decode ({device}, {dt}, g={g}, path {path}) "
                                     f"error {err:.3e} > {bound:.3e} against the float64 oracle")


def _layer(name: str, cfg: GPT2Config, device, dtype):
    layer = MHASelfAttention(cfg) if name == "mha" else MLRASelfAttention(cfg)
    return layer.to(device=device, dtype=dtype).eval()


def _filled_cache(name: str, cfg: GPT2Config, B: int, S: int, device, dtype) -> tuple[LayerCache, int]:
    """A cache holding ``S`` random tokens; returns it and its per-token width (numbers per K)."""
    d, H = cfg.n_embd, cfg.n_head
    if name == "mha":
        cache, shape = LayerCache(cfg.block_size, seq_dim=2), (B, H, S, d // H)
        width = d
    else:
        cache, shape = LayerCache(cfg.block_size, seq_dim=2), (B, cfg.latent_groups, S, cfg.rank)
        width = cfg.latent_groups * cfg.rank
    cache.append(torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype))
    return cache, width


def read_bandwidth(device: str, rep: int) -> float:
    """GB/s of ``buffer.sum()`` over 256 MB: the machine's read rate, measured in this run."""
    buf = torch.randn(64 * 2**20, device=device)  # 256 MB of fp32
    timer = time_gpu if device == "cuda" else (lambda f: time_cpu(f, warmup=1, rep=rep))
    t = timer(lambda: buf.sum())
    rate = gbps(buf.numel() * 4, t["ms"])
    del buf
    return rate


_FLUSH: list[torch.Tensor] = []


def time_cold_cpu(fn, rep: int) -> dict:
    """``time_cpu`` with the CPU caches flushed before each repetition (128 MB written), as they are in a
    model whose other layers read their own caches between two steps of this one; without it a small
    cache stays in L3 and its step looks faster than it is in a model (``do_bench`` does the same on GPU)."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(32 * 2**20))
    scratch = _FLUSH[0]
    times = []
    fn()
    for _ in range(rep):
        scratch.fill_(1.0)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


def bench_step(name: str, B: int, S: int, d: int, H: int, device: str, dtype, rep: int, bw: float) -> dict:
    forced = name in TORCH_PATH_VARIANTS
    with use_backend("torch") if forced else contextlib.nullcontext():
        row = _bench_step(name.removesuffix("-torch"), B, S, d, H, device, dtype, rep, bw)
        row["decode_path"] = None if name == "mha" else kernel_path(
            torch.empty(B, 1, d, device=device, dtype=dtype), op="decode", requires_grad=False)
    row["variant"] = name
    return row


def _bench_step(name: str, B: int, S: int, d: int, H: int, device: str, dtype, rep: int, bw: float) -> dict:
    cfg = variant_config(name, d, H, S + 1)
    layer = _layer(name, cfg, device, dtype)
    cache, width = _filled_cache(name, cfg, B, S, device, dtype)
    x = torch.randn(B, 1, d, device=device, dtype=dtype)

    def step():
        cache.length = S  # rewind: every repetition appends at position S
        return layer(x, cache)

    with torch.no_grad():
        t = time_gpu(step) if device == "cuda" else time_cold_cpu(step, rep)
    elem = torch.finfo(dtype).bits // 8
    cache_bytes = 2 * B * (S + 1) * width * elem
    weight_bytes = sum(p.numel() for p in layer.parameters()) * elem
    nbytes = cache_bytes + weight_bytes
    del cache
    return {
        "op": "decode_step", "variant": name, "device_type": device, "dtype": str(dtype).replace("torch.", ""),
        "B": B, "S": S, "d": d, "H": H, "g": getattr(cfg, "latent_groups", 1) if name != "mha" else None,
        "r": cfg.rank if name != "mha" else None, "cache_numbers_per_token": 2 * width,
        "ms": t["ms"], "ms_p20": t["ms_p20"], "ms_p80": t["ms_p80"],
        "bytes": nbytes, "cache_bytes": cache_bytes, "gbps": gbps(nbytes, t["ms"]),
        "read_bw_gbps": bw, "fraction_of_read_bw": gbps(nbytes, t["ms"]) / bw,
        "tokens_per_s": B / (t["ms"] / 1e3),
    }


def bench_generate(device: str, dtype, B: int, prompt: int, new: int) -> list[dict]:
    """``GPT2.generate()`` (greedy, KV cache) for MHA and MLRA of the same size, in tokens/s."""
    rows = []
    for name in VARIANTS:
        cfg = variant_config(name, 512, 8, prompt + new)
        cfg.n_layer = 4
        torch.manual_seed(0)
        model = GPT2(cfg).to(device=device, dtype=dtype).eval()
        idx = torch.randint(0, 256, (B, prompt), device=device)
        model.generate(idx, 2, temperature=0)  # warm-up
        t0 = time.perf_counter()
        model.generate(idx, new, temperature=0)
        if device == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter() - t0
        rows.append({"op": "generate", "variant": name, "model": "mlra_kernels.models.GPT2", "layers": 4, "d": 512,
                     "H": 8, "B": B, "prompt": prompt, "new_tokens": new, "s": s, "tokens_per_s": B * new / s,
                     "device_type": device, "dtype": str(dtype).replace("torch.", "")})
    return rows


def bench_hf_generate(device: str, B: int, prompt: int, new: int) -> list[dict]:
    """A Hugging Face GPT-2 (random weights) converted at rank d/4 against the original, greedy generate()."""
    try:
        import transformers

        from mlra_kernels.integrations.transformers import convert_gpt2
    except ImportError:
        return []
    cfg = transformers.GPT2Config(n_layer=4, n_embd=512, n_head=8, vocab_size=256, n_positions=prompt + new,
                                  bos_token_id=255, eos_token_id=255, pad_token_id=255)
    rows = []
    for name in ("hf-gpt2", "hf-gpt2-mlra"):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg).to(device).eval()
        if name == "hf-gpt2-mlra":
            convert_gpt2(model, rank=128)
        idx = torch.randint(0, 255, (B, prompt), device=device)
        kw = dict(do_sample=False, attention_mask=torch.ones_like(idx))  # no padding: every prompt is full
        model.generate(idx, max_new_tokens=2, **kw)
        t0 = time.perf_counter()
        model.generate(idx, max_new_tokens=new, min_new_tokens=new, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter() - t0
        rows.append({"op": "generate", "variant": name, "model": "transformers.GPT2LMHeadModel", "layers": 4,
                     "d": 512, "H": 8, "B": B, "prompt": prompt, "new_tokens": new, "s": s,
                     "tokens_per_s": B * new / s, "device_type": device, "dtype": "float32",
                     "transformers": transformers.__version__})
    return rows


def build_parser(prog: str = "mlra bench decode") -> argparse.ArgumentParser:
    p = BenchParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batches", type=lambda s: [positive_int(v) for v in s.split(",")], default=None,
                   help="comma list of batch sizes (default 1,4,16 on CPU; 1,8,32 on CUDA)")
    p.add_argument("--lengths", type=lambda s: [positive_int(v) for v in s.split(",")], default=None,
                   help="comma list of cached lengths S (default 512,2048,8192)")
    p.add_argument("--variants", type=comma_list(VARIANTS + TORCH_PATH_VARIANTS), default=None,
                   help=f"comma list of {', '.join(VARIANTS + TORCH_PATH_VARIANTS)} (default: all on CUDA; "
                        f"{', '.join(VARIANTS)} on CPU, where decode runs the torch path anyway)")
    p.add_argument("--width", type=positive_int, default=512, help="model width d (default 512)")
    p.add_argument("--heads", type=positive_int, default=8, help="heads H (default 8)")
    p.add_argument("--rep", type=positive_int, default=20, help="CPU repetitions per measurement (default 20)")
    p.add_argument("--no-generate", action="store_true", help="skip the end-to-end generate() rows")
    p.add_argument("--out", default=None,
                   help="folder for decode_<device>.json, relative to the current folder (default: bench/results "
                        "of the source checkout, or ./bench/results for an installed package)")
    p.add_argument("--traceback", action="store_true", help="on an error, show the Python traceback")
    return p


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no GPU visible")
    d, H = args.width, args.heads
    if d % (4 * H):
        raise BenchError(f"--width {d} must be a multiple of 4·--heads = {4 * H} (the g = H latent is d/4 wide)")
    name = f"decode_{args.device}"
    out = check_output(args.out, "--out", name)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    batches = args.batches or ([1, 8, 32] if args.device == "cuda" else [1, 4, 16])
    lengths = args.lengths or [512, 2048, 8192]

    check_decode(args.device)
    bw = read_bandwidth(args.device, args.rep)
    print(f"read bandwidth (sum of 256 MB): {bw:.1f} GB/s", flush=True)
    rows = []
    variants = args.variants or list(VARIANTS + (TORCH_PATH_VARIANTS if args.device == "cuda" else ()))
    cases = [(B, S, v) for B in batches for S in lengths for v in variants]
    for B, S, v in tqdm(cases, desc="decode bench", unit="step", file=sys.stderr):
        row = bench_step(v, B, S, d, H, args.device, dtype, args.rep, bw)
        rows.append(row)
    by_key = {(r["B"], r["S"], r["variant"]): r for r in rows}
    for r in rows:
        mha = by_key.get((r["B"], r["S"], "mha"))
        r["speedup_vs_mha"] = mha["ms"] / r["ms"] if mha is not None else None
        tqdm.write(f"B={r['B']:>3} S={r['S']:>5} {r['variant']:8} {r['ms']:8.3f} ms  {r['gbps']:6.1f} GB/s "
                   f"({100 * r['fraction_of_read_bw']:5.1f}% of read bw)  x{r['speedup_vs_mha'] or 0:.2f} vs MHA")
    if not args.no_generate:
        B, prompt, new = (8, 1024, 64) if args.device == "cuda" else (4, 512, 32)
        gen_rows = bench_generate(args.device, dtype, B, prompt, new) + bench_hf_generate(args.device, B, prompt, new)
        for r in gen_rows:
            tqdm.write(f"generate {r['variant']:14} {r['tokens_per_s']:8.1f} tokens/s")
        rows += gen_rows
    path = write_results(name, rows, out_dir=out, device=args.device)
    print(f"wrote {path}")
    return 0


def main(argv=None, prog: str = "mlra bench decode") -> int:
    return run_main(prog, run, build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
