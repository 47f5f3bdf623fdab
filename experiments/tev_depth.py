"""Depth sweep: does MLRA lower TEV and perplexity against standard attention, more so with depth?

Trains pre-LN GPT-2s with MHA and with MLRA at several depths (same width, data, seed, optimiser
and schedule), plus a rank / latent-group sweep at one depth, and logs for each run:

- training loss, final validation loss and perplexity;
- µ_TEV and σ_TEV over training (``TEVMonitor``, JSONL);
- the global gradient norm at every step, and the spikes in it;
- the gradient variance of the token embedding at a few checkpoints: the element-wise variance of
  the embedding gradient across independent mini-batches, averaged over elements. This is the
  expensive stability signal TEV stands in for.

Then it writes ``summary.json``, ``summary.md`` (tables, the rank correlation of TEV with the
gradient variance across runs) and PNG plots. Run ``python experiments/tev_depth.py --help``.

Presets (``--preset``): ``cpu`` is the smallest setting (a 2-core CPU, well under an hour),
``gpu`` the one-GPU setting. Any flag overrides the preset.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Any, Optional

import torch

from mlra_kernels.demo import load_bytes
from mlra_kernels.models import GPT2, GPT2Config
from mlra_kernels.monitor import TEVMonitor

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(depths=[6, 12, 24, 48], width=64, heads=4, context=64, batch=16, steps=300, lr=3e-3,
                sweep_depth=12, eval_batches=16, checkpoints=3, gvar_batches=8),
    "gpu": dict(depths=[6, 12, 24, 48], width=256, heads=8, context=256, batch=32, steps=3000, lr=2e-3,
                sweep_depth=24, eval_batches=50, checkpoints=5, gvar_batches=16),
}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="base setting (default cpu)")
    p.add_argument("--depths", type=int, nargs="+", help="depths to train")
    p.add_argument("--width", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--context", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate (AdamW, warmup then cosine)")
    p.add_argument("--rank", type=int, default=None, help="MLRA rank of the depth sweep (default width // 4)")
    p.add_argument("--sweep-depth", type=int, help="depth of the rank / latent-group sweep")
    p.add_argument("--no-sweep", action="store_true", help="skip the rank / latent-group sweep")
    p.add_argument("--eval-batches", type=int)
    p.add_argument("--checkpoints", type=int, help="gradient-variance checkpoints per run")
    p.add_argument("--gvar-batches", type=int, help="mini-batches per gradient-variance estimate")
    p.add_argument("--data", nargs="+", metavar="PATH", help="text files or folders (default: Python's stdlib sources)")
    p.add_argument("--hf-dataset", metavar="NAME[:CONFIG]",
                   help="a Hugging Face dataset already in the local cache (needs `datasets`), text column 'text'")
    p.add_argument("--max-bytes", type=int, default=8_000_000, help="cap on the text read (default 8 MB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default="experiments/results/latest", help="output folder")
    p.add_argument("--only-plots", action="store_true", help="re-make summary and plots from the run files in --out")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def load_hf_dataset(name: str, max_bytes: int) -> tuple[torch.Tensor, str]:
    try:
        import datasets
    except ImportError as e:
        raise SystemExit("--hf-dataset needs the `datasets` package: pip install datasets") from e
    path, _, config = name.partition(":")
    ds = datasets.load_dataset(path, config or None, split="train", download_mode="reuse_cache_if_exists")
    chunks, total = [], 0
    for row in ds:
        text = row["text"].encode("utf-8")
        chunks.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    blob = b"\n".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(torch.int64), f"{name}: {len(blob):,} bytes"


def lr_at(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def batch_at(data: torch.Tensor, starts: torch.Tensor, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = data[starts[:, None] + torch.arange(T + 1)]  # [B, T + 1]
    return chunk[:, :-1].to(device), chunk[:, 1:].to(device)


def embedding_grad_variance(model: GPT2, data: torch.Tensor, starts: torch.Tensor, T: int, device) -> float:
    """Mean over elements of the variance, across mini-batches, of the token-embedding gradient."""
    wte = model.get_input_embeddings().weight
    grads = []
    for row in starts:  # one mini-batch per row
        x, y = batch_at(data, row, T, device)
        model.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        grads.append(wte.grad.detach().double().clone())
    model.zero_grad(set_to_none=True)
    g = torch.stack(grads)  # [K, V, d]
    return g.var(dim=0, unbiased=True).mean().item()


@torch.no_grad()
def evaluate(model: GPT2, data: torch.Tensor, starts: torch.Tensor, T: int, device) -> float:
    model.eval()
    loss = sum(model(*batch_at(data, row, T, device))[1].item() for row in starts) / len(starts)
    model.train()
    return loss


def train_run(name: str, cfg: GPT2Config, args, train, val, device, out: str) -> dict[str, Any]:
    T, steps = args.context, args.steps
    gen = torch.Generator().manual_seed(args.seed)  # same data order for every run
    train_starts = torch.randint(0, len(train) - T - 1, (steps, args.batch), generator=gen)
    val_starts = torch.randint(0, len(val) - T - 1, (args.eval_batches, args.batch), generator=gen)
    gvar_starts = torch.randint(0, len(train) - T - 1, (args.gvar_batches, args.batch), generator=gen)
    torch.manual_seed(args.seed)
    model = GPT2(cfg).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    every = max(1, steps // 60)
    monitor = TEVMonitor(model, every=every, path=os.path.join(out, f"{name}.jsonl"), name=name)
    checkpoints = sorted({round(steps * (i + 1) / args.checkpoints) - 1 for i in range(args.checkpoints)})
    grad_norms, gvar, losses = [], [], []
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.lr)
        x, y = batch_at(train, train_starts[step], T, device)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        grad_norms.append(norm)
        losses.append(loss.item())
        monitor.step(step, loss=losses[-1], grad_norm=norm)
        if step in checkpoints:
            gvar.append({"step": step, "emb_grad_var": embedding_grad_variance(model, train, gvar_starts, T, device)})
            monitor.record(step, loss=losses[-1], grad_norm=norm, emb_grad_var=gvar[-1]["emb_grad_var"])
    seconds = time.perf_counter() - t0
    last = monitor.records[-1]
    monitor.close()
    val_loss = evaluate(model, val, val_starts, T, device)
    return {
        "name": name, "config": cfg.to_dict(), "params": model.num_parameters(), "steps": steps,
        "tokens": steps * args.batch * T, "seconds": seconds,
        "train_loss_last50": sum(losses[-50:]) / len(losses[-50:]), "val_loss": val_loss,
        "val_ppl": math.exp(val_loss) if val_loss < 50 else math.inf,
        "tev_mean": last["tev_mean"], "tev_std": last["tev_std"], "grad_var": gvar,
        "grad_norm_max": max(grad_norms), "grad_norm_spikes": count_spikes(grad_norms),
        "grad_norms": grad_norms, "losses": losses, "tev_log": f"{name}.jsonl",
    }


def count_spikes(norms: list[float], window: int = 20, factor: float = 3.0) -> int:
    """Steps whose gradient norm exceeds ``factor`` × the median of the previous ``window`` steps."""
    spikes = 0
    for i in range(window, len(norms)):
        prev = sorted(norms[i - window:i])
        if norms[i] > factor * prev[window // 2]:
            spikes += 1
    return spikes


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (ties get their mean rank)."""
    def ranks(v: list[float]) -> torch.Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in t.unique():
            same = t == value
            r[same] = r[same].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else math.nan


def environment(device: torch.device) -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return {"device": name, "torch": torch.__version__, "python": platform.python_version(), "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}


def run_plan(args) -> list[tuple[str, dict[str, Any]]]:
    d, H = args.width, args.heads
    rank = args.rank or d // 4
    plan = []
    for L in args.depths:
        plan.append((f"mha-L{L}", dict(n_layer=L, attention="mha")))
        plan.append((f"mlra-L{L}-r{rank}-g1", dict(n_layer=L, attention="mlra", rank=rank, latent_groups=1)))
    if not args.no_sweep:
        for r in (d // 8, d // 4, d // 2):
            for g in (1, H):
                name = f"mlra-L{args.sweep_depth}-r{r}-g{g}"
                if all(name != n for n, _ in plan):
                    plan.append((name, dict(n_layer=args.sweep_depth, attention="mlra", rank=r, latent_groups=g)))
        if args.sweep_depth not in args.depths:
            plan.append((f"mha-L{args.sweep_depth}", dict(n_layer=args.sweep_depth, attention="mha")))
    return plan


def summarize(out: str, runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def fmt(r):
        c = r["config"]
        att = "MHA" if c["attention"] == "mha" else f"MLRA r={c['rank']} g={c['latent_groups']}"
        gv = r["grad_var"][-1]["emb_grad_var"] if r["grad_var"] else math.nan
        return (f"| {c['n_layer']} | {att} | {r['params']:,} | {r['train_loss_last50']:.4f} | {r['val_loss']:.4f} | "
                f"{r['val_ppl']:.3f} | {r['tev_mean']:.5f} | {r['tev_std']:.5f} | {gv:.3e} | {r['grad_norm_max']:.2f} | "
                f"{r['grad_norm_spikes']} |")
    head = ("| layers | attention | params | train loss (last 50) | val loss | val ppl | µ_TEV | σ_TEV | "
            "emb. grad var | max grad norm | grad-norm spikes |\n|---|---|---|---|---|---|---|---|---|---|---|")
    depth_runs = [r for r in runs if r["config"]["attention"] == "mha" or
                  (r["config"]["rank"] == (meta["args"]["rank"] or meta["args"]["width"] // 4) and r["config"]["latent_groups"] == 1)]
    depth_runs = [r for r in depth_runs if r["config"]["n_layer"] in meta["args"]["depths"]]
    depth_runs.sort(key=lambda r: (r["config"]["n_layer"], r["config"]["attention"]))
    sweep = [r for r in runs if r["config"]["n_layer"] == meta["args"]["sweep_depth"]]
    sweep.sort(key=lambda r: (r["config"]["attention"], r["config"]["rank"] or 0, r["config"]["latent_groups"]))

    lines = ["# TEV depth sweep", "",
             f"- command: `{meta['env']['command']}`",
             f"- device: {meta['env']['device']}; torch {meta['env']['torch']}; commit {meta['env']['commit']}; {meta['env']['date']}",
             f"- data: {meta['data']}; {runs[0]['tokens']:,} tokens trained per run "
             f"({meta['args']['steps']} steps × {meta['args']['batch']} × {meta['args']['context']})",
             f"- width {meta['args']['width']}, {meta['args']['heads']} heads, peak lr {meta['args']['lr']}, AdamW, clip 1.0, seed {meta['args']['seed']}",
             "", "## Depth sweep (MHA against MLRA)", "", head] + [fmt(r) for r in depth_runs]
    by_depth = {}
    for r in depth_runs:
        by_depth.setdefault(r["config"]["n_layer"], {})[r["config"]["attention"]] = r
    lines += ["", "| layers | Δ val ppl (MLRA − MHA) | Δ µ_TEV | Δ σ_TEV |", "|---|---|---|---|"]
    for L, pair in sorted(by_depth.items()):
        if "mha" in pair and "mlra" in pair:
            a, b = pair["mha"], pair["mlra"]
            lines.append(f"| {L} | {b['val_ppl'] - a['val_ppl']:+.3f} | {b['tev_mean'] - a['tev_mean']:+.5f} | "
                         f"{b['tev_std'] - a['tev_std']:+.5f} |")
    if len(sweep) > 1:
        lines += ["", f"## Rank and latent-group sweep at {meta['args']['sweep_depth']} layers", "", head] + [fmt(r) for r in sweep]
    with_gv = [r for r in runs if r["grad_var"]]
    if len(with_gv) >= 3:
        gv = [r["grad_var"][-1]["emb_grad_var"] for r in with_gv]
        rho_mu = spearman([r["tev_mean"] for r in with_gv], gv)
        rho_sigma = spearman([r["tev_std"] for r in with_gv], gv)
        lines += ["", "## Does TEV track the embedding gradient variance?", "",
                  f"Spearman rank correlation across the {len(with_gv)} runs, final checkpoint: "
                  f"µ_TEV vs gradient variance ρ = {rho_mu:+.3f}; σ_TEV vs gradient variance ρ = {rho_sigma:+.3f}."]
        meta["spearman"] = {"tev_mean": rho_mu, "tev_std": rho_sigma, "runs": len(with_gv)}
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"meta": meta, "runs": [{k: v for k, v in r.items() if k not in ("grad_norms", "losses")} for r in runs]},
                  f, indent=1)
    return text


def plot(out: str, runs: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlra_kernels.monitor import read_jsonl

    depths = meta["args"]["depths"]
    rank = meta["args"]["rank"] or meta["args"]["width"] // 4
    pick = {}
    for r in runs:
        c = r["config"]
        if c["n_layer"] in depths and (c["attention"] == "mha" or (c["rank"] == rank and c["latent_groups"] == 1)):
            pick[(c["n_layer"], c["attention"])] = r
    colors = plt.cm.viridis([i / max(1, len(depths) - 1) for i in range(len(depths))])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for (L, att), r in sorted(pick.items()):
        _, recs = read_jsonl(os.path.join(out, r["tev_log"]))
        recs = [x for x in recs if "tev_mean" in x]
        color = colors[depths.index(L)]
        style = "-" if att == "mlra" else "--"
        label = f"{att.upper()} L={L}"
        axes[0].plot([x["step"] for x in recs], [x["tev_mean"] for x in recs], style, color=color, label=label)
        axes[1].plot([x["step"] for x in recs], [x["tev_std"] for x in recs], style, color=color, label=label)
        losses = torch.tensor(r["losses"])
        k = max(1, len(losses) // 50)
        smooth = losses.unfold(0, k, k).mean(1) if k > 1 else losses
        axes[2].plot([i * k for i in range(len(smooth))], smooth.tolist(), style, color=color, label=label)
    for ax, title in zip(axes, ("µ_TEV", "σ_TEV", "training loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7, ncol=2)
    fig.suptitle("MHA (dashed) vs MLRA (solid) by depth")
    fig.tight_layout()
    curves = os.path.join(out, "tev_loss_by_depth.png")
    fig.savefig(curves, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for att, marker in (("mha", "o"), ("mlra", "s")):
        pts = sorted((L, r) for (L, a), r in pick.items() if a == att)
        axes[0].plot([L for L, _ in pts], [r["val_ppl"] for _, r in pts], marker=marker, label=att.upper())
        axes[1].plot([L for L, _ in pts], [r["tev_mean"] for _, r in pts], marker=marker, label=att.upper())
    for ax, title in zip(axes, ("validation perplexity", "final µ_TEV")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(depths, [str(L) for L in depths])
        ax.set_xlabel("layers")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    vs = os.path.join(out, "ppl_tev_vs_depth.png")
    fig.savefig(vs, dpi=110)
    plt.close(fig)
    return [curves, vs]


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    out = args.out
    os.makedirs(out, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    runs_path = os.path.join(out, "runs.jsonl")
    if args.only_plots:
        with open(os.path.join(out, "summary.json")) as f:
            meta = json.load(f)["meta"]
    else:
        data, source = load_hf_dataset(args.hf_dataset, args.max_bytes) if args.hf_dataset else load_bytes(args.data, args.max_bytes)
        split = int(0.9 * len(data))
        train, val = data[:split], data[split:]
        meta = {"args": {k: v for k, v in vars(args).items()}, "env": environment(device), "data": source}
        plan = run_plan(args)
        print(f"{len(plan)} runs on {meta['env']['device']}; data: {source}", flush=True)
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        bar = tqdm(plan, unit="run") if tqdm else plan
        with open(runs_path, "w") as f:
            for name, over in bar:
                cfg = GPT2Config(vocab_size=256, block_size=args.context, n_head=args.heads, n_embd=args.width,
                                 dropout=0.0, **over)
                if tqdm:
                    bar.set_description(name)
                result = train_run(name, cfg, args, train, val, device, out)
                print(f"{name}: val ppl {result['val_ppl']:.3f}, µ_TEV {result['tev_mean']:.5f}, "
                      f"σ_TEV {result['tev_std']:.5f}, {result['seconds']:.0f}s", flush=True)
                f.write(json.dumps(result) + "\n")
                f.flush()
    with open(runs_path) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    print(summarize(out, runs, meta))
    for path in plot(out, runs, meta):
        print("plot:", path)


if __name__ == "__main__":
    main()
