"""Decode benchmark: one decode step of an attention layer on a preallocated KV cache, MLRA against MHA.

    mlra bench decode [--device cpu|cuda] [--batches 1,4,16] [--lengths 512,2048,8192] [--rep 20]

Each row times one layer's step for one new token per sequence, ``S`` tokens already cached, with the
layers of ``mlra_kernels.models.GPT2`` (projections, cache write, attention and ``W_O``):

- ``mha``: the dense Q/K/V projection, K and V written into a preallocated ``[B, H, S_max, d_h]`` cache,
  torch's SDPA over the cached ``S + 1`` keys;
- ``mlra-g1`` (``g = 1``, ``r = d/4``) and ``mlra-gH`` (``g = H``, ``g·r = d/4``): the latents ``c_K, c_V``
  written into a preallocated group-major ``[B, g, S_max, r]`` cache and attended in the absorbed form
  (no K or V is built), by the layer's decode step on pre-multiplied weights: the split-KV Triton kernel
  between GEMMs on CUDA, one call of the C++ whole-step op (``mlra::latent_decode_step_cpu``: its own
  few-row GEMMs, the cache write and the split-KV kernel) on the CPU;
- ``mlra-g1-torch``, ``mlra-gH-torch``: the same layers with decode's torch path forced (GEMMs and SDPA on
  the latents), the baseline of the kernels in the same run. Each row records the ``decode_path`` it ran.

Bytes per step are the cache read (``2·B·(S+1)`` times the per-token width: ``d`` for MHA, ``g·r`` for
MLRA) plus the weights the step reads: the parameters, or on MLRA's kernel paths the layer's
pre-multiplied step weights (``step_weights.step_weights``, ``W_O`` included); ``fraction_of_read_bw`` compares the achieved rate with a plain
``buffer.sum()`` of 256 MB measured in the same run. The cache is filled with random values (the
values do not change the time), and the step is timed with its length rewound, so every repetition
appends at position ``S``. On the CPU a pass runs through a stack of copies of the layer, each with its
own weights and cache, holding at least 96 MB together (``STACK_BYTES``) or 32 layers (``MAX_STACK``), whichever
comes first, and the time per layer is the
pass's over the stack's depth: as in a model, each layer finds its data evicted by the layers before it,
while code and framework state stay warm (``stack_depth`` in each row). The variants of one (B, S) are
timed round by round, in a rotating order. On the GPU ``do_bench`` times one layer and flushes L2.

It also times ``GPT2.generate()`` end to end (MLRA against MHA), and a Hugging Face GPT-2 converted with
``convert_gpt2`` against the original (when transformers is installed): each case five times, round by
round in a rotating order, the median reported with its 20th and 80th percentiles.

Correctness first: ``mlra_decode`` is checked against the float64 oracle on small shapes; a failure
stops the run before any time is reported.

Results: decode_<device>[_<dtype>].json in --out, by default ./bench/results of the current folder, where a
result file git tracks is replaced only when --out names its folder (``python bench/bench_decode.py``
from the checkout root names bench/results, the committed results). Each row records its calls per
timing (``inner_reps``: more than one where a timing sat on the clock's floor and was taken again).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from mlra_kernels.benchmarks.common import (
    BenchError, BenchParser, add_output_flags, bench_main, check_device, check_output, comma_list, gbps,
    positive_int, save_results, time_cpu, time_gpu, time_interleaved, timing_fields,
)
from mlra_kernels.models import GPT2, GPT2Config
from mlra_kernels.models.gpt2 import LayerCache, MHASelfAttention, MLRASelfAttention
from mlra_kernels.ops.mlra import kernel_path, kv_latents, mlra_decode, use_backend
from mlra_kernels.ops.mlra.backend import DECODE_KERNELS
from mlra_kernels.ops.mlra.reference import mlra_attention_reference
from mlra_kernels.ops.mlra.step_weights import StepWeightsMemo

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


def check_decode(device: str, dtype=torch.float32) -> None:
    """``mlra_decode`` against the float64 oracle for the last tokens of a sequence, on each decode path
    the run times (on CUDA the Triton kernel and the forced torch path); raises on a miss."""
    paths = ("auto", "torch")
    gen = torch.Generator().manual_seed(0)
    for B, T, H, g, r in ((2, 37, 4, 1, 16), (3, 20, 4, 4, 8)):
        d = 64
        x = torch.randn(B, T, d, generator=gen, dtype=torch.float64)
        down = torch.randn(3 * g * r, d, generator=gen, dtype=torch.float64) / d ** 0.5
        up = torch.randn(3, d, r, generator=gen, dtype=torch.float64) / r ** 0.5
        bias = torch.randn(3 * d, generator=gen, dtype=torch.float64) * 0.2
        exact = mlra_attention_reference(x, down, up, bias, num_heads=H, latent_groups=g, causal=True)[:, -1:]
        for dt in (torch.float32,) + ((torch.bfloat16,) if device == "cuda" or dtype == torch.bfloat16 else ()):
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
        cache, shape = LayerCache(cfg.block_size, seq_dim=2, layout=("heads", H, d // H)), (B, H, S, d // H)
        width = d
    else:
        cache = LayerCache(cfg.block_size, seq_dim=2, layout=("latents", cfg.latent_groups, cfg.rank))
        shape = (B, cfg.latent_groups, S, cfg.rank)
        width = cfg.latent_groups * cfg.rank
    cache.append(torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype))
    return cache, width


def read_bandwidth(device: str, rep: int) -> float:
    """GB/s of ``buffer.sum()`` over 256 MB: the machine's read rate, measured in this run."""
    buf = torch.randn(64 * 2**20, device=device)  # 256 MB of fp32
    label = "read bandwidth (sum of 256 MB)"
    timer = (lambda f: time_gpu(f, label=label)) if device == "cuda" else (lambda f: time_cpu(f, rep=rep, label=label))
    t = timer(lambda: buf.sum())
    rate = gbps(buf.numel() * 4, t["ms"])
    del buf
    return rate


# The CPU timing runs a stack of copies of the layer, each with its own weights and cache, and divides a
# pass over the stack by its depth: as in a model, every layer finds its data evicted by the layers before
# it, while the code and the framework's own state stay warm. The stack holds at least this many bytes,
# three times this machine's 32 MB last-level cache, or MAX_STACK layers (a layer that alone holds more
# is timed by itself).
STACK_BYTES = 96 * 2**20
MAX_STACK = 32
CPU_ROUNDS_DEFAULT = 20


class _LayerStack:
    """``depth`` copies of one variant's layer with their filled caches, for one (B, S)."""

    def __init__(self, variant: str, B: int, S: int, d: int, H: int, device: str, dtype) -> None:
        # "-torch": the same layers with decode's torch path forced, the baseline of the decode kernels.
        self.forced = variant in TORCH_PATH_VARIANTS
        self.name, self.S = variant.removesuffix("-torch"), S
        self.cfg = variant_config(self.name, d, H, S + 1)
        self.layers, self.caches = [], []
        self.x = torch.randn(B, 1, d, device=device, dtype=dtype)
        self._add(device, dtype)
        elem = torch.finfo(dtype).bits // 8
        self.cache_bytes = 2 * B * (S + 1) * self.width * elem
        self.weight_bytes = self._weight_bytes()
        per_layer = self.cache_bytes + self.weight_bytes
        depth = 1 if device == "cuda" else min(MAX_STACK, max(1, -(-STACK_BYTES // per_layer)))
        while len(self.layers) < depth:
            self._add(device, dtype)

    def _weight_bytes(self) -> int:
        """The weights one step reads: on a decode kernel path (eager) the layer's pre-multiplied step
        weights, otherwise its parameters."""
        layer = self.layers[0]
        if self.name != "mha" and not self.forced and not layer.training:
            if kernel_path(self.x, op="decode", requires_grad=False) in DECODE_KERNELS:
                qkv = layer.qkv
                w = StepWeightsMemo().get(qkv.down, qkv.up, qkv.bias, layer.c_proj.weight, layer.c_proj.bias,
                                          num_heads=layer.n_head, latent_groups=layer.latent_groups)
                return sum(t.numel() * t.element_size() for t in w if isinstance(t, torch.Tensor))
        return sum(p.numel() * p.element_size() for p in layer.parameters())

    def _add(self, device, dtype) -> None:
        self.layers.append(_layer(self.name, self.cfg, device, dtype))
        cache, self.width = _filled_cache(self.name, self.cfg, self.x.shape[0], self.S, device, dtype)
        self.caches.append(cache)

    def step(self) -> None:
        """One decode step through every layer of the stack (each appends at position ``S``)."""
        with use_backend("torch") if self.forced else contextlib.nullcontext():
            for layer, cache in zip(self.layers, self.caches):
                cache.length = self.S  # rewind: every repetition appends at position S
                layer(self.x, cache)

    def decode_path(self) -> Optional[str]:
        if self.name == "mha":
            return None
        x = self.x.new_empty(self.x.shape)
        with use_backend("torch") if self.forced else contextlib.nullcontext():
            return kernel_path(x, op="decode", requires_grad=False)


def _row(stack: _LayerStack, name: str, t: dict, device: str, dtype, bw: float) -> dict:
    B, S, cfg = stack.x.shape[0], stack.S, stack.cfg
    nbytes = stack.cache_bytes + stack.weight_bytes
    return {
        "op": "decode_step", "variant": name, "device_type": device, "dtype": str(dtype).replace("torch.", ""),
        "B": B, "S": S, "d": cfg.n_embd, "H": cfg.n_head,
        "g": getattr(cfg, "latent_groups", 1) if stack.name != "mha" else None,
        "r": cfg.rank if stack.name != "mha" else None, "cache_numbers_per_token": 2 * stack.width,
        "stack_depth": len(stack.layers),
        "ms": t["ms"], "ms_p20": t["ms_p20"], "ms_p80": t["ms_p80"],
        "bytes": nbytes, "cache_bytes": stack.cache_bytes, "gbps": gbps(nbytes, t["ms"]),
        "read_bw_gbps": bw, "fraction_of_read_bw": gbps(nbytes, t["ms"]) / bw,
        "tokens_per_s": B / (t["ms"] / 1e3),
        **timing_fields(step=t),
    }


def bench_point_cpu(names: list[str], B: int, S: int, d: int, H: int, dtype, rounds: int, bw: float) -> list[dict]:
    """Every variant's step at one (B, S) on the CPU, per layer of its stack, measured round by round: each
    round times one pass of every variant's stack, in an order that rotates from round to round, so that
    a slow stretch of a shared machine falls on all of them alike. Median and 20/80% quantiles."""
    stacks = {name: _LayerStack(name, B, S, d, H, "cpu", dtype) for name in names}
    with torch.no_grad():  # one warm-up round, then timings of whole passes (on the clock's floor: batches)
        passes = time_interleaved({name: stacks[name].step for name in names}, rounds=rounds, warmup=1,
                                  label=f"decode step B={B} S={S}")
    rows = []
    for name in names:
        depth = len(stacks[name].layers)
        t = dict(passes[name], **{key: passes[name][key] / depth for key in ("ms", "ms_p20", "ms_p80")})
        row = _row(stacks[name], name, t, "cpu", dtype, bw)
        row["decode_path"] = stacks[name].decode_path()
        rows.append(row)
    return rows


def bench_step(name: str, B: int, S: int, d: int, H: int, device: str, dtype, bw: float) -> dict:
    """One variant's step on the GPU (``do_bench``, which flushes L2 between repetitions)."""
    stack = _LayerStack(name, B, S, d, H, device, dtype)
    with torch.no_grad():
        t = time_gpu(stack.step, label=f"decode step {name} B={B} S={S}")
    row = _row(stack, name, t, device, dtype, bw)
    row["decode_path"] = stack.decode_path()
    return row


GENERATE_ROUNDS = 5


def _generate_cases(device: str, dtype, B: int, prompt: int, new: int) -> list[tuple[str, dict, Callable[[], object]]]:
    """``(variant, row fields, one timed generate())`` for ``GPT2`` (MHA and MLRA of the same size) and a
    Hugging Face GPT-2 (random weights) converted at rank d/4 against the original; greedy, KV cache."""
    cases = []
    for name in VARIANTS:
        cfg = variant_config(name, 512, 8, prompt + new)
        cfg.n_layer = 4
        torch.manual_seed(0)
        model = GPT2(cfg).to(device=device, dtype=dtype).eval()
        idx = torch.randint(0, 256, (B, prompt), device=device)
        model.generate(idx, 2, temperature=0)  # warm-up
        cases.append((name, {"model": "mlra_kernels.models.GPT2"},
                      lambda model=model, idx=idx: model.generate(idx, new, temperature=0)))
    try:
        import transformers

        from mlra_kernels.integrations.transformers import convert_gpt2
    except ImportError:
        return cases
    hf_cfg = transformers.GPT2Config(n_layer=4, n_embd=512, n_head=8, vocab_size=256, n_positions=prompt + new,
                                     bos_token_id=255, eos_token_id=255, pad_token_id=255)
    for name in ("hf-gpt2", "hf-gpt2-mlra"):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(hf_cfg).to(device).eval()
        if name == "hf-gpt2-mlra":
            convert_gpt2(model, rank=128)
        idx = torch.randint(0, 255, (B, prompt), device=device)
        kw = dict(do_sample=False, attention_mask=torch.ones_like(idx))  # no padding: every prompt is full
        model.generate(idx, max_new_tokens=2, **kw)
        cases.append((name, {"model": "transformers.GPT2LMHeadModel", "transformers": transformers.__version__},
                      lambda model=model, idx=idx, kw=kw: model.generate(idx, max_new_tokens=new, min_new_tokens=new,
                                                                         **kw)))
    return cases


def _time_quantiles(seconds: list[float]) -> tuple[float, float, float]:
    """``(median, 80th, 20th percentile)`` of the rounds' times, by nearest rank: the time of the median
    rate and of the rates at their 20th and 80th percentiles."""
    ts = sorted(seconds)
    n = len(ts) - 1
    return ts[len(ts) // 2], ts[round(0.8 * n)], ts[round(0.2 * n)]


def bench_generate(device: str, dtype, B: int, prompt: int, new: int, rounds: int = GENERATE_ROUNDS) -> list[dict]:
    """``generate()`` end to end in tokens/s (the prompt's prefill included), each case timed ``rounds``
    times, round by round in rotating order so that a slow stretch of the machine falls on all alike;
    the median and the 20th/80th percentiles."""
    cases = _generate_cases(device, dtype, B, prompt, new)

    def timed(run_once):
        def call():
            run_once()
            if device == "cuda":
                torch.cuda.synchronize()
        return call

    t = time_interleaved({name: timed(run_once) for name, _, run_once in cases}, rounds=rounds, warmup=0,
                         label="generate")  # the cases warmed up when built
    rows = []
    for name, fields, _ in cases:
        s, slow, fast = _time_quantiles([ms / 1e3 for ms in t[name]["times_ms"]])
        rows.append({"op": "generate", "variant": name, **fields, "layers": 4, "d": 512, "H": 8, "B": B,
                     "prompt": prompt, "new_tokens": new, "rounds": rounds, "s": s, "tokens_per_s": B * new / s,
                     "tokens_per_s_p20": B * new / slow, "tokens_per_s_p80": B * new / fast,
                     "device_type": device, **timing_fields(generate=t[name]),
                     "dtype": str(dtype).replace("torch.", "") if fields["model"].startswith("mlra") else "float32"})
    return rows


def build_parser(prog: str = "mlra bench decode", default_out=None) -> argparse.ArgumentParser:
    p = BenchParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batches", type=lambda s: [positive_int(v) for v in s.split(",")], default=None,
                   help="comma list of batch sizes (default 1,4,16 on CPU; 1,8,32 on CUDA)")
    p.add_argument("--lengths", type=lambda s: [positive_int(v) for v in s.split(",")], default=None,
                   help="comma list of cached lengths S (default 512,2048,8192)")
    p.add_argument("--variants", type=comma_list(VARIANTS + TORCH_PATH_VARIANTS), default=None,
                   help=f"comma list of {', '.join(VARIANTS + TORCH_PATH_VARIANTS)} (default: all)")
    p.add_argument("--width", type=positive_int, default=512, help="model width d (default 512)")
    p.add_argument("--heads", type=positive_int, default=8, help="heads H (default 8)")
    p.add_argument("--rep", type=positive_int, default=CPU_ROUNDS_DEFAULT,
                   help=f"CPU rounds per (B, S) point (default {CPU_ROUNDS_DEFAULT}), each timing every variant once")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="the layers' and caches' dtype (default fp32 on CPU, bf16 on CUDA); another than the "
                        "default writes decode_<device>_<dtype>.json")
    p.add_argument("--no-generate", action="store_true", help="skip the end-to-end generate() rows")
    return add_output_flags(p, "--out", "decode_<device>.json", default_out)


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    d, H = args.width, args.heads
    if d % (4 * H):
        raise BenchError(f"--width {d} must be a multiple of 4·--heads = {4 * H} (the g = H latent is d/4 wide)")
    default = "bf16" if args.device == "cuda" else "fp32"
    dtn = args.dtype or default
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtn]
    name = f"decode_{args.device}" + ("" if dtn == default else f"_{dtn}")
    out = check_output(args.out, "--out", name, default=getattr(args, "default_out", None))
    batches = args.batches or ([1, 8, 32] if args.device == "cuda" else [1, 4, 16])
    lengths = args.lengths or [512, 2048, 8192]

    check_decode(args.device, dtype)
    bw = read_bandwidth(args.device, args.rep)
    print(f"read bandwidth (sum of 256 MB): {bw:.1f} GB/s", flush=True)
    rows = []
    variants = args.variants or list(VARIANTS + TORCH_PATH_VARIANTS)
    points = [(B, S) for B in batches for S in lengths]
    for B, S in tqdm(points, desc="decode bench", unit="point", file=sys.stderr):
        if args.device == "cpu":
            rows += bench_point_cpu(variants, B, S, d, H, dtype, args.rep, bw)
        else:
            rows += [bench_step(v, B, S, d, H, args.device, dtype, bw) for v in variants]
    by_key = {(r["B"], r["S"], r["variant"]): r for r in rows}
    for r in rows:
        mha = by_key.get((r["B"], r["S"], "mha"))
        r["speedup_vs_mha"] = mha["ms"] / r["ms"] if mha is not None else None
        tqdm.write(f"B={r['B']:>3} S={r['S']:>5} {r['variant']:8} {r['ms']:8.3f} ms  {r['gbps']:6.1f} GB/s "
                   f"({100 * r['fraction_of_read_bw']:5.1f}% of read bw)  x{r['speedup_vs_mha'] or 0:.2f} vs MHA")
    if not args.no_generate:
        B, prompt, new = (8, 1024, 64) if args.device == "cuda" else (4, 512, 32)
        gen_rows = bench_generate(args.device, dtype, B, prompt, new)
        for r in gen_rows:
            tqdm.write(f"generate {r['variant']:14} {r['tokens_per_s']:8.1f} tokens/s")
        rows += gen_rows
    save_results(name, rows, out, args.device)
    return 0


main = bench_main("mlra bench decode", run, build_parser)


if __name__ == "__main__":
    sys.exit(main())
