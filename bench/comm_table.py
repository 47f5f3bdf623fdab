"""What MHA and MLRA layers communicate per training step under DDP, FSDP2 and tensor parallelism, and
their decode cache per rank (docs/scaling.md).

    python bench/comm_table.py                 # the tables for GPT-2 small, XL and a 7B-wide model (Markdown)
    python bench/comm_table.py --measure       # 2 CPU processes (gloo): count the collectives of one step of a
                                               # tiny GPT-2 with torch's CommDebugMode, beside this model's
                                               # numbers; writes bench/results/comm_counts_cpu.json
    python bench/comm_table.py --page docs/scaling.md   # rewrite the page's two generated blocks

Model (per layer, per step = one forward and backward; "payload" is the full tensor a collective
reduces or gathers; a ring moves 2·(n-1)/n of it per rank for an all-reduce, (n-1)/n for an
all-gather or a reduce-scatter):

- DDP: one all-reduce of every gradient (in buckets).
- FSDP2 (resharding after forward): the parameters all-gathered in the forward and again in the
  backward, the gradients reduce-scattered.
- TP (degree t, row-parallel output projections): an all-reduce of the [tokens, d] activations after
  attention and after the MLP in the forward, and of the input gradients of both in the backward; MLRA at
  g = 1 adds the all-reduce of the replicated down-projection's gradient, [3·r, d]. Activation
  checkpointing repeats the forward's two.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import pathlib
import sys
import tempfile

MODELS = {  # name: (d, H, layers, tensor-parallel degree dividing H)
    "GPT-2 small": (768, 12, 12, 4),
    "GPT-2 XL": (1600, 25, 48, 5),
    "7B-wide": (4096, 32, 32, 8),
}
TOKENS = 8 * 1024  # tokens per rank and step
BYTES = 2  # bf16
RESULT = pathlib.Path(__file__).resolve().parent / "results" / "comm_counts_cpu.json"
# The generated blocks of docs/scaling.md: the tables, and the measured counts beside the model's.
BLOCKS = {"tables": ("<!-- comm_table.py: tables -->", "<!-- /comm_table.py: tables -->"),
          "counts": ("<!-- comm_table.py: counts -->", "<!-- /comm_table.py: counts -->")}


def variants(d: int, H: int) -> dict:
    """attention kind -> (g, r): MHA, MLRA g = 1 at r = d/4, grouped MLRA g = H at the same latent width d/4."""
    return {"MHA": None, "MLRA g=1": (1, d // 4), "MLRA g=H": (H, max(1, d // (4 * H)))}


def layer_shapes(d: int, attn, bias: bool = True) -> dict:
    """Parameter shapes of one block, by name (GPT-2 layout)."""
    b = [(3 * d,)] if bias else []
    if attn is None:
        qkv = {"c_attn": [(3 * d, d)] + b}
    else:
        g, r = attn
        qkv = {"down": [(3 * g * r, d)], "up": [(3, d, r)], "qkv_bias": b}
    return {**qkv, "attn.c_proj": [(d, d)] + ([(d,)] if bias else []),
            "mlp": [(4 * d, d), (d, 4 * d)] + ([(4 * d,), (d,)] if bias else []),
            "ln": [(d,)] * (4 if bias else 2)}


def numel(shapes, pad_to: int = 1) -> int:
    """Elements of ``shapes``, each dim 0 rounded up to a multiple of ``pad_to`` (FSDP2's padding)."""
    return sum(math.ceil(s[0] / pad_to) * pad_to * math.prod(s[1:]) for s in shapes)


def layer_params(d: int, attn, bias: bool = True) -> dict:
    """Parameters of one block, by part."""
    return {k: numel(v) for k, v in layer_shapes(d, attn, bias).items()}


def step_collectives(scheme: str, d: int, attn, tokens: int, nbytes: int, bias: bool = True) -> list:
    """``[(collective, count, payload bytes each)]`` of one block in one training step."""
    P = sum(layer_params(d, attn, bias).values())
    if scheme == "ddp":
        return [("all_reduce", 1, P * nbytes)]
    if scheme == "fsdp":
        return [("all_gather", 2, P * nbytes), ("reduce_scatter", 1, P * nbytes)]
    act = [("all_reduce", 4, tokens * d * nbytes)]  # tp
    if attn is not None and attn[0] == 1:
        act.append(("all_reduce", 1, 3 * attn[1] * d * nbytes))
    return act


def cache_bytes(d: int, H: int, attn, tp: int, nbytes: int) -> int:
    """Decode cache per token, layer and rank: K and V of H/tp heads, or the latents c_K, c_V."""
    if attn is None:
        return 2 * d // tp * nbytes
    g, r = attn
    return 2 * (r if g == 1 else g // tp * r) * nbytes


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f}"


def tables() -> str:
    out = [f"Per layer and training step; {TOKENS} tokens per rank, bf16. Payload in MiB (count × size).", "",
           ("| model | attention | params/layer | DDP all-reduce | FSDP2 all-gather + reduce-scatter | "
            "TP all-reduce (t) | TP params/rank |"),
           "|---|---|---|---|---|---|---|"]
    for name, (d, H, L, tp) in MODELS.items():
        for kind, attn in variants(d, H).items():
            P = sum(layer_params(d, attn).values())
            ddp = sum(c * s for _, c, s in step_collectives("ddp", d, attn, TOKENS, BYTES))
            fsdp = sum(c * s for _, c, s in step_collectives("fsdp", d, attn, TOKENS, BYTES))
            tpc = step_collectives("tp", d, attn, TOKENS, BYTES)
            tp_total = sum(c * s for _, c, s in tpc)
            tp_text = " + ".join(f"{c}×{_mb(s)}" for _, c, s in tpc) + f" = {_mb(tp_total)} (t={tp})"
            parts = layer_params(d, attn)
            replicated = parts["ln"] + 2 * d + (parts.get("down", 0) if attn is not None and attn[0] == 1 else 0)
            per_rank = (P - replicated) / tp + replicated
            out.append(f"| {name} | {kind} | {P / 1e6:.2f} M | {_mb(ddp)} | {_mb(fsdp)} | {tp_text} | "
                       f"{per_rank / 1e6:.2f} M |")
    out += ["", "Decode cache per token and layer on each rank (bytes, bf16):", "",
            "| model | t | MHA | MLRA g=1 (latent replicated) | MLRA g=H (groups sharded) |", "|---|---|---|---|---|"]
    for name, (d, H, L, tp) in MODELS.items():
        v = variants(d, H)
        row = [cache_bytes(d, H, v[k], t, BYTES) for t in (1, tp) for k in v]
        out.append(f"| {name} | 1 → {tp} | {row[0]} → {row[3]} | {row[1]} → {row[4]} | {row[2]} → {row[5]} |")
    return "\n".join(out)


# --- measurement: a tiny GPT-2 on 2 CPU processes ------------------------------------------------------------

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32, rank=8)
CASES = [("tp", "mlra", 1), ("tp", "mlra", 2), ("fsdp", "mlra", 1), ("fsdp", "mha", 1), ("ddp", "mlra", 1),
         ("ddp", "mha", 1)]
B, T = 2, 16


def predicted(scheme: str, attention: str, g: int, world: int) -> dict:
    """Counts and payload bytes of one step of the tiny model on ``world`` ranks (float32), from the model above."""
    d, L, V = TINY["n_embd"], TINY["n_layer"], TINY["vocab_size"]
    attn = None if attention == "mha" else (g, TINY["rank"])
    root = V * d + TINY["block_size"] * d + 2 * d  # wte (tied lm_head), wpe, ln_f
    blocks = step_collectives(scheme, d, attn, B * T, 4)
    counts, payload = {}, {}
    for name, c, s in blocks:
        counts[name] = counts.get(name, 0) + c * L
        payload[name] = payload.get(name, 0) + c * s * L
    if scheme == "ddp":  # one bucket holds the whole tiny model
        counts, payload = {"all_reduce": 1}, {"all_reduce": payload["all_reduce"] + root * 4}
    elif scheme == "fsdp":  # the root group is gathered once (not resharded after forward) and reduce-scattered
        counts = {"all_gather": 2 * L + 1, "reduce_scatter": L + 1}
        per_block = sum(numel(v, world) for v in layer_shapes(d, attn).values()) * 4
        root = numel([(V, d), (TINY["block_size"], d), (d,), (d,)], world) * 4
        payload = {"all_gather": 2 * L * per_block + root, "reduce_scatter": L * per_block + root}
    return {"counts": counts, "payload_bytes": payload}


def _kind(op) -> str:
    name = str(op)
    for key in ("reduce_scatter", "all_reduce", "allreduce", "all_gather", "allgather"):
        if key in name:
            return {"allreduce": "all_reduce", "allgather": "all_gather"}.get(key, key)
    return name


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mlra_kernels.distributed import tensor_parallel
    from mlra_kernels.models import GPT2, GPT2Config

    class CountBytes(CommDebugMode):
        """CommDebugMode, also summing the bytes of each collective's input tensors."""

        def __init__(self):
            super().__init__()
            self.payload: dict = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            from torch.distributed.tensor.debug._comm_mode import c10d_collective_ops
            packet = func._overloadpacket
            if packet in self.comm_registry or packet in c10d_collective_ops:
                flat = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
                flat = [t._local_tensor if isinstance(t, DTensor) else t for t in flat]
                # The whole: the largest tensor of a c10d op (an all-gather's output, a reduce-scatter's
                # input); a functional all-gather is handed one shard.
                n = max(t.numel() * t.element_size() for t in flat)
                if packet in self.comm_registry and "all_gather" in str(packet):
                    n *= world
                k = _kind(packet)
                self.payload[k] = self.payload.get(k, 0) + n
            return super().__torch_dispatch__(func, types, args, kwargs)

    def count_cases() -> dict:
        mesh = init_device_mesh("cpu", (world,))
        idx = torch.randint(0, TINY["vocab_size"], (B, T + 1), generator=torch.Generator().manual_seed(0))
        result = {}
        for scheme, attention, g in CASES:
            torch.manual_seed(0)
            model = GPT2(GPT2Config(**TINY, attention=attention, latent_groups=g))
            if scheme == "tp":
                run = tensor_parallel(model, mesh)
            elif scheme == "fsdp":
                for block in model.h:
                    fully_shard(block, mesh=mesh)
                run = fully_shard(model, mesh=mesh)
            else:
                run = DDP(model)
            with CountBytes() as mode:
                _, loss = run(idx[:, :-1], idx[:, 1:])
                loss.backward()
            counts: dict = {}
            for op, c in mode.get_comm_counts().items():
                counts[_kind(op)] = counts.get(_kind(op), 0) + c
            result[f"{scheme} {attention} g={g}"] = {"counts": counts, "payload_bytes": mode.payload}
        return result

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = count_cases()  # its models, DDP and mesh, which hold the group, are gone when it returns
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
        dist.barrier()  # every rank done before any tears its group down
    finally:
        # What still held the group in a reference cycle goes before the group: torn down at interpreter
        # exit, gloo's threads abort the process (as tests/helpers.gloo_worker does for the tests).
        gc.collect()
        dist.destroy_process_group()


def measure(world: int = 2) -> dict:
    import torch.multiprocessing as mp

    from mlra_kernels.benchmarks.common import env_metadata

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "counts.json")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "pg"), out), nprocs=world, join=True)
        measured = json.loads(pathlib.Path(out).read_text())
    rows = {}
    for scheme, attention, g in CASES:
        key = f"{scheme} {attention} g={g}"
        rows[key] = {"measured": measured[key], "model": predicted(scheme, attention, g, world)}
    return {"world": world, "config": dict(TINY, batch=B, tokens=T), "dtype": "float32", **env_metadata("cpu"),
            "cases": rows}


def counts_table(res: dict) -> str:
    lines = ["| run (2 CPU ranks, float32) | CommDebugMode counts | model counts | measured payload B | "
             "model payload B |", "|---|---|---|---|---|"]
    for key, row in res["cases"].items():
        m, p = row["measured"], row["model"]

        def fmt(x):
            return ", ".join(f"{k} {v}" for k, v in sorted(x.items()))
        lines.append(f"| {key} | {fmt(m['counts'])} | {fmt(p['counts'])} | {fmt(m['payload_bytes'])} | "
                     f"{fmt(p['payload_bytes'])} |")
    return "\n".join(lines)


def render(name: str) -> str:
    """The generated block ``name`` of docs/scaling.md (``counts`` from the committed result file)."""
    return tables() if name == "tables" else counts_table(json.loads(RESULT.read_text()))


def write_page(path: str) -> None:
    text = pathlib.Path(path).read_text(encoding="utf-8")
    for name, (begin, end) in BLOCKS.items():
        head, rest = text.split(begin, 1)
        text = head + begin + "\n" + render(name) + "\n" + end + rest.split(end, 1)[1]
    pathlib.Path(path).write_text(text, encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure", action="store_true", help="count a tiny CPU run's collectives (2 processes)")
    ap.add_argument("--page", help="rewrite the generated blocks of this Markdown page")
    args = ap.parse_args(argv)
    if args.page:
        write_page(args.page)
        return 0
    if not args.measure:
        print(tables())
        return 0
    res = measure()
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(res, indent=1) + "\n")
    print(counts_table(res))
    bad = [k for k, r in res["cases"].items() if r["measured"] != r["model"]]
    if bad:
        print("the model differs from the measurement for: " + ", ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
