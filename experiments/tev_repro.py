"""Does TEV track stability? Depth and learning-rate sweeps of pre-LN GPT-2, MHA against MLRA, several seeds.

The paper's claims, tested here at a small scale:
1. pre-LN GPT-2 grows less stable with depth and with the learning rate, and Token Embedding
   Variability (TEV) tracks that;
2. MLRA lowers TEV and perplexity against standard attention, more so with depth;
3. MLRA widens the range of learning rates that train stably.

Every configuration trains with several seeds (each seed sets the initialisation and the data order;
MHA and MLRA with the same seed see the same batches, so their differences are paired). The
vocabulary is a byte-level BPE trained on the training text (``--tokenizer bytes`` for 256 byte
tokens), so it has rare tokens as GPT-2's has. Each run logs:

- training loss, final validation loss and perplexity, whether it diverged (a non-finite loss, or a
  final training loss above that of a uniform guess, ln V);
- µ_TEV and σ_TEV over training, over all rows of the embedding and over the rows of the tokens that
  occur in the run's training batches (``TEVMonitor``, JSONL);
- the global gradient norm at every step, and the spikes in it and in the loss;
- at a few checkpoints, the embedding-gradient variance: the element-wise variance of the token
  embedding's gradient across independent mini-batches, averaged over elements (all rows, and the
  trained rows). This is the expensive stability signal TEV stands in for.

Then ``summary.json``, ``summary.md`` (mean ± standard deviation over seeds, paired differences and
whether every seed agrees on their sign, the learning-rate range that trains, and the rank correlation
of TEV with the gradient variance across runs and across the checkpoints of a run, with bootstrap
intervals) and PNG plots. ``--page docs/reproduction.md`` rewrites that page's results block from them.

Presets (``--preset``): ``cpu`` finishes in about an hour on a 2-core CPU; ``gpu`` is the one-GPU
setting. Any flag overrides the preset. ``--resume`` continues an interrupted sweep in its folder.
Run ``python experiments/tev_repro.py --help``.
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

from mlra_kernels._fileio import write_atomic
from mlra_kernels.demo import load_bytes
from mlra_kernels.models import GPT2, GPT2Config
from mlra_kernels.monitor import TEVMonitor, compute_tev

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(depths=[6, 12, 24, 48], width=64, heads=4, context=64, batch=16, steps=400, lr=3e-3,
                lrs=[1e-3, 3e-3, 1e-2, 3e-2], lr_depth=12, seeds=3, vocab_size=4096, eval_batches=16,
                checkpoints=5, gvar_batches=8),
    "gpu": dict(depths=[6, 12, 24, 48], width=256, heads=8, context=256, batch=32, steps=3000, lr=2e-3,
                lrs=[5e-4, 2e-3, 6e-3, 2e-2], lr_depth=24, seeds=3, vocab_size=16384, eval_batches=50,
                checkpoints=6, gvar_batches=16),
}
BOOTSTRAP = 2000  # resamples for every interval
VAL_SEED = 12345  # the validation batches are the same for every run


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="base setting (default cpu)")
    p.add_argument("--depths", type=int, nargs="+", help="depths of the depth sweep")
    p.add_argument("--width", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--context", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate of the depth sweep (AdamW, warmup then cosine)")
    p.add_argument("--lrs", type=float, nargs="+", help="peak learning rates of the learning-rate sweep")
    p.add_argument("--lr-depth", type=int, help="depth of the learning-rate sweep")
    p.add_argument("--no-lr-sweep", action="store_true", help="skip the learning-rate sweep")
    p.add_argument("--seeds", type=int, help="seeds per configuration (0, 1, …)")
    p.add_argument("--rank", type=int, default=None, help="MLRA rank (default width // 4), latent groups 1")
    p.add_argument("--rank-sweep", action="store_true",
                   help="also train MLRA at ranks width/8, /4, /2 with 1 and `heads` latent groups at --lr-depth")
    p.add_argument("--tokenizer", choices=["bpe", "bytes"], default="bpe",
                   help="byte-level BPE trained on the training text (default), or 256 byte tokens")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size")
    p.add_argument("--cache-dir", default=None, help="where the trained tokenizer is cached (default ~/.cache/mlra-kernels)")
    p.add_argument("--eval-batches", type=int)
    p.add_argument("--checkpoints", type=int, help="gradient-variance checkpoints per run")
    p.add_argument("--gvar-batches", type=int, help="mini-batches per gradient-variance estimate")
    p.add_argument("--data", nargs="+", metavar="PATH", help="text files or folders (default: Python's stdlib sources)")
    p.add_argument("--max-bytes", type=int, default=8_000_000, help="cap on the text read (default 8 MB)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default="experiments/results/latest", help="output folder")
    p.add_argument("--resume", action="store_true", help="keep the finished runs in --out and train the rest")
    p.add_argument("--only-plots", action="store_true", help="re-make summary and plots from the run files in --out")
    p.add_argument("--page", "--readme", dest="page", metavar="PATH",
                   help="rewrite the results block (<!-- experiment:begin --> ... <!-- experiment:end -->) of this "
                        "Markdown page from the summary, e.g. docs/reproduction.md; plots outside the page's folder "
                        "are copied into assets/<page name>/ beside it (--readme: the same)")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("width", "heads", "context", "batch", "steps", "seeds", "eval_batches", "checkpoints", "gvar_batches"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.gvar_batches < 2:
        p.error("--gvar-batches must be at least 2 (a variance across mini-batches)")
    if any(lr <= 0 or not math.isfinite(lr) for lr in [args.lr] + args.lrs):
        p.error("learning rates must be positive and finite")
    if args.tokenizer == "bpe" and args.vocab_size <= 256:
        p.error(f"--vocab-size must be above 256 (the byte alphabet), got {args.vocab_size}")
    if any(L <= 0 for L in args.depths) or args.lr_depth <= 0:
        p.error("--depths and --lr-depth must be positive layer counts")
    if args.rank is not None and not 0 < args.rank <= args.width:
        p.error(f"--rank must be in 1..--width ({args.width}), got {args.rank}")
    if args.max_bytes <= 0:
        p.error(f"--max-bytes must be positive, got {args.max_bytes}")
    if args.width % args.heads:
        p.error(f"--width {args.width} must be a multiple of --heads {args.heads}")
    return args


# ---------------------------------------------------------------------------------------------
# data


def load_tokens(args) -> tuple[torch.Tensor, torch.Tensor, int, dict[str, Any]]:
    """Train and validation token ids, the vocabulary size, and a description of both."""
    data, source = load_bytes(args.data, args.max_bytes)
    split = int(0.9 * len(data))
    if args.tokenizer == "bytes":
        return data[:split], data[split:], 256, {"source": source, "tokenizer": "bytes", "vocab_size": 256,
                                                 "train_tokens": split, "val_tokens": len(data) - split}
    from mlra_kernels.data import bpe_tokens

    blob = bytes(data.to(torch.uint8).numpy())
    train, val, info = bpe_tokens(blob[:split], blob[split:], args.vocab_size, args.cache_dir)
    return train, val, info["vocab_size"], {"source": source, **info}


def batch_at(data: torch.Tensor, starts: torch.Tensor, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = data[starts[:, None] + torch.arange(T + 1)]  # [B, T + 1]
    return chunk[:, :-1].to(device), chunk[:, 1:].to(device)


def trained_rows(data: torch.Tensor, starts: torch.Tensor, T: int) -> torch.Tensor:
    """The token ids that are inputs in the given batches (``starts`` of any shape)."""
    return torch.unique(data[starts.reshape(-1, 1) + torch.arange(T)])


# ---------------------------------------------------------------------------------------------
# training


def lr_at(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def embedding_grad_variance(model: GPT2, data, starts, T: int, device, rows: torch.Tensor) -> tuple[float, float]:
    """Mean over elements of the variance, across mini-batches, of the token-embedding gradient:
    over all rows, and over ``rows``."""
    wte = model.get_input_embeddings().weight
    grads = []
    for row in starts:  # one mini-batch per row of starts
        x, y = batch_at(data, row, T, device)
        model.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        grads.append(wte.grad.detach().double().clone())
    model.zero_grad(set_to_none=True)
    var = torch.stack(grads).var(dim=0, unbiased=True)  # [V, d]
    return var.mean().item(), var[rows.to(var.device)].mean().item()


@torch.no_grad()
def evaluate(model: GPT2, data, starts, T: int, device) -> float:
    model.eval()
    loss = sum(model(*batch_at(data, row, T, device))[1].item() for row in starts) / len(starts)
    model.train()
    return loss


DIVERGE_NATS = 1.0  # a run whose last 50 steps lost this much against its best 50 steps has diverged


def best_window_loss(losses: list[float], window: int = 50) -> float:
    """The lowest mean training loss over ``window`` consecutive steps (of the whole run if shorter)."""
    if len(losses) <= window:
        return sum(losses) / len(losses)
    t = torch.tensor(losses, dtype=torch.float64)
    return t.unfold(0, window, 1).mean(1).min().item()


def is_diverged(losses: list[float], val_loss: float, vocab: int, diverged_at: Optional[int]) -> bool:
    """A non-finite loss; a final training loss (last 50 steps) above a uniform guess's (ln V); or one
    more than ``DIVERGE_NATS`` above the run's best 50 steps (it trained, then lost what it had learnt)."""
    if diverged_at is not None or not math.isfinite(val_loss) or not losses:
        return True
    tail = losses[-50:]
    final = sum(tail) / len(tail)
    return final > math.log(vocab) or final > best_window_loss(losses) + DIVERGE_NATS


def spikes(values: list[float], factor: float, window: int = 20) -> int:
    """Steps whose value exceeds ``factor`` × the median of the previous ``window`` steps."""
    count = 0
    for i in range(window, len(values)):
        prev = sorted(values[i - window:i])
        if values[i] > factor * prev[window // 2]:
            count += 1
    return count


def train_run(spec: dict[str, Any], args, train, val, vocab: int, device, out: str) -> dict[str, Any]:
    name, seed, lr, T, steps = spec["name"], spec["seed"], spec["lr"], args.context, args.steps
    gen = torch.Generator().manual_seed(1000 + seed)  # the seed sets the data order, shared by MHA and MLRA
    train_starts = torch.randint(0, len(train) - T - 1, (steps, args.batch), generator=gen)
    gvar_starts = torch.randint(0, len(train) - T - 1, (args.gvar_batches, args.batch), generator=gen)
    val_starts = torch.randint(0, len(val) - T - 1, (args.eval_batches, args.batch),
                               generator=torch.Generator().manual_seed(VAL_SEED))
    rows = trained_rows(train, train_starts, T)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, block_size=T, n_head=args.heads, n_embd=args.width, dropout=0.0, **spec["model"])
    model = GPT2(cfg).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    every = max(1, steps // 60)
    # Each run gets its own log; a rerun of an unfinished run (--resume) starts it again.
    monitor = TEVMonitor(model, every=every, path=os.path.join(out, f"{name}.jsonl"), name=name, mode="w")
    wte = model.get_input_embeddings().weight
    checkpoints = sorted({round(steps * (i + 1) / args.checkpoints) - 1 for i in range(args.checkpoints)})
    grad_norms, losses, gvar = [], [], []
    diverged_at = None
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        x, y = batch_at(train, train_starts[step], T, device)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        grad_norms.append(norm)
        losses.append(loss.item())
        if not (math.isfinite(losses[-1]) and math.isfinite(norm)):
            diverged_at = step  # nothing after a non-finite loss is worth training or measuring
            monitor.record(step, loss=losses[-1], grad_norm=norm)
            break
        extra: dict[str, Any] = {}
        if step in checkpoints:
            g_all, g_rows = embedding_grad_variance(model, train, gvar_starts, T, device, rows)
            extra = {"emb_grad_var": g_all, "emb_grad_var_trained": g_rows}
        if step % every == 0 or extra or step == steps - 1:
            mean, std, _, _ = compute_tev(wte, rows)
            rec = monitor.record(step, loss=losses[-1], grad_norm=norm, tev_mean_trained=mean, tev_std_trained=std, **extra)
            if extra:
                gvar.append({k: rec[k] for k in ("step", "tev_mean", "tev_std", "tev_mean_trained", "tev_std_trained",
                                                 "emb_grad_var", "emb_grad_var_trained")})
    seconds = time.perf_counter() - t0
    last = monitor.records[-1]
    monitor.close()
    val_loss = evaluate(model, val, val_starts, T, device) if diverged_at is None else math.inf
    tail = losses[-50:]
    train_loss = sum(tail) / len(tail)
    diverged = is_diverged(losses, val_loss, vocab, diverged_at)
    return {
        **{k: v for k, v in spec.items() if k != "model"}, "config": cfg.to_dict(), "params": model.num_parameters(),
        "tokens": len(losses) * args.batch * T, "trained_rows": len(rows), "vocab_size": vocab, "seconds": seconds,
        "train_loss_last50": train_loss, "val_loss": val_loss, "val_ppl": math.exp(val_loss) if val_loss < 50 else math.inf,
        "diverged": diverged, "diverged_at": diverged_at,
        "tev_mean": last["tev_mean"], "tev_std": last["tev_std"],
        "tev_mean_trained": last.get("tev_mean_trained", math.nan), "tev_std_trained": last.get("tev_std_trained", math.nan),
        "grad_var": gvar, "grad_norm_max": max(grad_norms), "grad_norm_spikes": spikes(grad_norms, 3.0),
        "loss_spikes": spikes(losses, 1.2), "grad_norms": grad_norms, "losses": losses, "tev_log": f"{name}.jsonl",
    }


def run_plan(args) -> list[dict[str, Any]]:
    """Every run of the sweep; a configuration shared by both sweeps is trained once."""
    d, H = args.width, args.heads
    rank = args.rank or d // 4
    configs: list[tuple[str, int, float, dict[str, Any]]] = []  # (sweep, depth, lr, model)

    def models(L: int, lr: float, sweep: str):
        configs.append((sweep, L, lr, dict(n_layer=L, attention="mha")))
        configs.append((sweep, L, lr, dict(n_layer=L, attention="mlra", rank=rank, latent_groups=1)))

    for L in args.depths:
        models(L, args.lr, "depth")
    if not args.no_lr_sweep:
        for lr in args.lrs:
            models(args.lr_depth, lr, "lr")
    if args.rank_sweep:
        for r in sorted({max(1, d // 8), max(1, d // 4), max(1, d // 2)}):
            for g in sorted({1, H}):
                configs.append(("rank", args.lr_depth, args.lr, dict(n_layer=args.lr_depth, attention="mlra", rank=r, latent_groups=g)))
    plan, seen = [], {}
    for sweep, L, lr, model in configs:
        config = config_name(model, lr)
        if config in seen:
            seen[config]["sweeps"].append(sweep)
            continue
        for seed in range(args.seeds):
            spec = {"name": f"{config}-s{seed}", "config_name": config, "seed": seed, "lr": lr, "depth": L,
                    "attention": model["attention"], "sweeps": [sweep], "model": model}
            plan.append(spec)
        seen[config] = plan[-1]
    # Every seed of a configuration lists the same sweeps.
    for spec in plan:
        spec["sweeps"] = seen[spec["config_name"]]["sweeps"]
    return plan


def config_name(model: dict[str, Any], lr: float) -> str:
    base = f"{model['attention']}-L{model['n_layer']}-lr{lr:g}"
    if model["attention"] == "mlra":
        base += f"-r{model['rank']}-g{model['latent_groups']}"
    return base


# ---------------------------------------------------------------------------------------------
# statistics


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (ties get their mean rank); NaN when either side is constant."""
    def ranks(v: list[float]) -> torch.Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in t.unique():
            same = t == value
            r[same] = r[same].mean()
        return r
    if len(a) != len(b):
        raise ValueError(f"spearman needs two lists of one length, got {len(a)} and {len(b)}")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else math.nan


def bootstrap(stat, n: int, draws: int = BOOTSTRAP, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of ``stat(indices)`` over ``draws`` resamples (with replacement) of
    ``range(n)``. Resamples where the statistic is undefined (NaN) are left out."""
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(draws):
        v = stat(torch.randint(0, n, (n,), generator=gen).tolist())
        if not math.isnan(v):
            values.append(v)
    if len(values) < draws // 2:
        return math.nan, math.nan
    t = torch.tensor(values, dtype=torch.float64)
    lo, hi = torch.quantile(t, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return lo, hi


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value); infinities propagate."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1 or not math.isfinite(mean):
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def sign_agreement(diffs: list[float], seeds: int) -> str:
    """``lower`` / ``higher`` when every one of ``seeds`` (at least 2) paired differences has that sign,
    ``mixed`` when they disagree, ``n/a (k of n)`` when a seed diverged on either side, so there are
    fewer pairs than seeds: a verdict never rests on the seeds that happened to survive."""
    if len(diffs) < max(2, seeds):
        return f"n/a ({len(diffs)} of {seeds})"
    if all(d < 0 for d in diffs):
        return "lower"
    if all(d > 0 for d in diffs):
        return "higher"
    return "mixed"


def correlations(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank correlation of TEV with the embedding-gradient variance, across runs (last checkpoint)
    and across the checkpoints within each run, with bootstrap intervals. Diverged runs are left out."""
    ok = [r for r in runs if not r["diverged"] and r["grad_var"]]
    pairs = {"tev_mean vs emb_grad_var": ("tev_mean", "emb_grad_var"),
             "tev_std vs emb_grad_var": ("tev_std", "emb_grad_var"),
             "tev_mean_trained vs emb_grad_var_trained": ("tev_mean_trained", "emb_grad_var_trained")}
    result: dict[str, Any] = {"runs": len(ok), "across_runs": {}, "within_runs": {}}
    for label, (a, b) in pairs.items():
        xs = [r["grad_var"][-1][a] for r in ok]
        ys = [r["grad_var"][-1][b] for r in ok]
        if len(ok) >= 3:
            rho = spearman(xs, ys)
            lo, hi = bootstrap(lambda idx: spearman([xs[i] for i in idx], [ys[i] for i in idx]), len(ok))
            result["across_runs"][label] = {"rho": rho, "ci95": [lo, hi]}
        per_run = [spearman([c[a] for c in r["grad_var"]], [c[b] for c in r["grad_var"]])
                   for r in ok if len(r["grad_var"]) >= 3]
        per_run = [v for v in per_run if not math.isnan(v)]
        if len(per_run) >= 2:
            mean = sum(per_run) / len(per_run)
            lo, hi = bootstrap(lambda idx: sum(per_run[i] for i in idx) / len(idx), len(per_run))
            result["within_runs"][label] = {"mean_rho": mean, "ci95": [lo, hi], "runs": len(per_run)}
    return result


# ---------------------------------------------------------------------------------------------
# summary

METRICS = ("val_ppl", "tev_mean", "tev_mean_trained", "tev_std", "grad_norm_spikes", "loss_spikes")


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per configuration: the seeds, mean and sd of each metric, the diverged count."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(r["config_name"], []).append(r)
    table = {}
    for name, rs in groups.items():
        rs.sort(key=lambda r: r["seed"])
        entry = {"config_name": name, "depth": rs[0]["depth"], "lr": rs[0]["lr"], "attention": rs[0]["attention"],
                 "rank": rs[0]["config"]["rank"], "latent_groups": rs[0]["config"]["latent_groups"],
                 "sweeps": rs[0]["sweeps"], "params": rs[0]["params"], "seeds": [r["seed"] for r in rs],
                 "diverged": sum(r["diverged"] for r in rs), "n": len(rs)}
        for m in METRICS:
            values = [r[m] for r in rs if not r["diverged"]]
            entry[m] = mean_sd(values)
        gv = [r["grad_var"][-1]["emb_grad_var"] for r in rs if r["grad_var"] and not r["diverged"]]
        entry["emb_grad_var"] = mean_sd(gv)
        table[name] = entry
    return table


def paired(runs: list[dict[str, Any]], mha: str, mlra: str, metric: str) -> list[float]:
    """MLRA − MHA per seed that both configurations finished without diverging."""
    a = {r["seed"]: r[metric] for r in runs if r["config_name"] == mha and not r["diverged"]}
    b = {r["seed"]: r[metric] for r in runs if r["config_name"] == mlra and not r["diverged"]}
    return [b[s] - a[s] for s in sorted(set(a) & set(b))]


def fmt_ms(ms: tuple[float, float], spec: str = ".3f") -> str:
    mean, sd = ms
    if math.isnan(mean):
        return "—"
    if math.isinf(mean):
        return "∞"
    return f"{mean:{spec}}" + ("" if math.isnan(sd) else f" ± {sd:{spec.lstrip('+')}}")


def _pairs(table: dict[str, dict[str, Any]], sweep: str, key: str) -> list[tuple[Any, dict, dict]]:
    """(key value, MHA entry, MLRA entry at the depth sweep's rank) for one sweep."""
    by: dict[Any, dict[str, dict]] = {}
    for e in table.values():
        if sweep in e["sweeps"] and (e["attention"] == "mha" or e["latent_groups"] == 1):
            by.setdefault(e[key], {})[e["attention"]] = e
    return [(k, v["mha"], v["mlra"]) for k, v in sorted(by.items()) if "mha" in v and "mlra" in v]


def summarize(out: str, runs: list[dict[str, Any]], meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    table = aggregate(runs)
    args, env, data = meta["args"], meta["env"], meta["data"]
    head = ("| layers | lr | attention | params | val ppl | µ_TEV (all rows) | µ_TEV (trained rows) | σ_TEV | "
            "emb. grad var | grad-norm spikes | loss spikes | diverged |\n|---|---|---|---|---|---|---|---|---|---|---|---|")

    def row(e):
        att = "MHA" if e["attention"] == "mha" else f"MLRA r={e['rank']} g={e['latent_groups']}"
        return (f"| {e['depth']} | {e['lr']:g} | {att} | {e['params']:,} | {fmt_ms(e['val_ppl'], '.2f')} | "
                f"{fmt_ms(e['tev_mean'], '.4f')} | {fmt_ms(e['tev_mean_trained'], '.4f')} | {fmt_ms(e['tev_std'], '.4f')} | "
                f"{fmt_ms(e['emb_grad_var'], '.2e')} | {fmt_ms(e['grad_norm_spikes'], '.1f')} | "
                f"{fmt_ms(e['loss_spikes'], '.1f')} | {e['diverged']}/{e['n']} |")

    tokens = runs[0]["tokens"] if runs else 0
    lines = ["# TEV reproduction: depth and learning-rate sweeps", "",
             f"- command: `{env['command']}`",
             f"- device: {env['device']}; torch {env['torch']}; commit {env['commit']}; {env['date']}",
             f"- data: {data['source']}; {data['tokenizer']} vocabulary of {data['vocab_size']:,} tokens "
             f"({data['train_tokens']:,} training and {data['val_tokens']:,} validation tokens)",
             f"- {args['steps']} steps × {args['batch']} × {args['context']} = {args['steps'] * args['batch'] * args['context']:,} "
             f"tokens trained per run; width {args['width']}, {args['heads']} heads, AdamW (β = 0.9, 0.95, weight decay 0.1), "
             f"warmup then cosine, gradient clip 1.0",
             f"- {args['seeds']} seeds per configuration (initialisation and data order; MHA and MLRA of one seed see the "
             f"same batches); tables give mean ± standard deviation over the seeds that did not diverge",
             f"- {len(runs)} runs, {sum(r['seconds'] for r in runs) / 60:.1f} min of training in all", ""]
    verdicts: dict[str, Any] = {"depth": {}, "lr": {}}

    def diff_table(sweep: str, key: str, label: str) -> list[str]:
        out_lines = [f"| {label} | Δ val ppl (MLRA − MHA) | seeds | Δ µ_TEV (all rows) | seeds | Δ µ_TEV (trained rows) | seeds |",
                     "|---|---|---|---|---|---|---|"]
        for k, a, b in _pairs(table, sweep, key):
            cells, v = [], {}
            for m, spec in (("val_ppl", ".2f"), ("tev_mean", ".4f"), ("tev_mean_trained", ".4f")):
                d = paired(runs, a["config_name"], b["config_name"], m)
                agree = sign_agreement(d, max(a["n"], b["n"]))
                v[m] = {"diffs": d, "agree": agree}
                cells += [fmt_ms(mean_sd(d), "+" + spec), agree]
            verdicts[sweep][k] = v
            out_lines.append(f"| {k:g} | " + " | ".join(cells) + " |")
        return out_lines

    depth = [e for e in table.values() if "depth" in e["sweeps"]]
    depth.sort(key=lambda e: (e["depth"], e["attention"]))
    lines += ["## Depth sweep", "", f"Peak learning rate {args['lr']:g}.", "", head] + [row(e) for e in depth]
    lines += ["", "Paired differences over seeds (MLRA − MHA, same seed): *lower* / *higher* only when every seed "
              "agrees, *mixed* when they disagree, *n/a* when a seed diverged on either side:", ""]
    lines += diff_table("depth", "depth", "layers")

    lr_rows = [e for e in table.values() if "lr" in e["sweeps"]]
    if lr_rows:
        lr_rows.sort(key=lambda e: (e["lr"], e["attention"]))
        lines += ["", f"## Learning-rate sweep at {args['lr_depth']} layers", "", head] + [row(e) for e in lr_rows]
        lines += ["", "Paired differences:", ""] + diff_table("lr", "lr", "lr")
        stable = {}
        for att in ("mha", "mlra"):
            ok = [e["lr"] for e in lr_rows if e["attention"] == att and e["diverged"] == 0 and e["grad_norm_spikes"][0] < 1]
            stable[att] = max(ok) if ok else None
        meta["stable_lr"] = stable
        lines += ["", "Highest learning rate at which no seed diverged and the grad-norm spikes average below one: "
                  f"MHA {stable['mha'] if stable['mha'] is not None else 'none'}, "
                  f"MLRA {stable['mlra'] if stable['mlra'] is not None else 'none'}."]

    rank_rows = [e for e in table.values() if "rank" in e["sweeps"]]
    if rank_rows:
        rank_rows.sort(key=lambda e: (e["rank"], e["latent_groups"]))
        lines += ["", f"## Rank and latent-group sweep at {args['lr_depth']} layers", "", head] + [row(e) for e in rank_rows]

    corr = correlations(runs)
    meta["correlations"] = corr
    if corr["across_runs"] or corr["within_runs"]:
        lines += ["", "## Does TEV track the embedding-gradient variance?", "",
                  f"Spearman rank correlation with a 95% bootstrap interval ({BOOTSTRAP} resamples), over the "
                  f"{corr['runs']} runs that did not diverge:", "",
                  "| pair | across runs (last checkpoint) | within runs (across checkpoints, mean) |", "|---|---|---|"]
        caveats = ["", "Read with care: the embedding is tied to the output layer, so every row gets a gradient at "
                   "every step through the softmax; *trained rows* are the rows that are also inputs in the run's "
                   "batches. Across runs, depth and learning rate move both quantities. Within a run, both drift with "
                   "training and the learning-rate schedule, so a within-run correlation says little about cause."]
        for label in sorted(corr["across_runs"].keys() | corr["within_runs"].keys()):
            a = corr["across_runs"].get(label)
            w = corr["within_runs"].get(label)
            a_txt = f"{a['rho']:+.2f} [{a['ci95'][0]:+.2f}, {a['ci95'][1]:+.2f}]" if a else "—"
            w_txt = f"{w['mean_rho']:+.2f} [{w['ci95'][0]:+.2f}, {w['ci95'][1]:+.2f}] ({w['runs']} runs)" if w else "—"
            lines.append(f"| {label} | {a_txt} | {w_txt} |")
        lines += caveats
    meta["verdicts"] = verdicts
    text = "\n".join(lines) + "\n"
    write_atomic(os.path.join(out, "summary.md"), text)
    summary = {"meta": meta, "configs": table,
               "runs": [{k: v for k, v in r.items() if k not in ("grad_norms", "losses")} for r in runs]}
    write_atomic(os.path.join(out, "summary.json"), json.dumps(summary, indent=1, default=str))
    return text, summary


README_BEGIN, README_END = "<!-- experiment:begin -->", "<!-- experiment:end -->"
PLOT_TITLES = {"tev_repro.png": "depth and learning-rate sweeps, and TEV against the gradient variance",
               "tev_curves_by_depth.png": "TEV and training loss over the steps, MHA against MLRA, by depth"}


def page_plots(page: str, plots: list[str]) -> list[str]:
    """The plots as the page links them: in place when they lie under the page's folder (a README at the
    checkout's root), else copied into ``assets/<page name>/`` beside it (a docs page: MkDocs sees only
    its own folder)."""
    import shutil

    folder = os.path.dirname(os.path.abspath(page))
    links = []
    for plot_path in plots:
        src = os.path.abspath(plot_path)
        if os.path.commonpath([folder, src]) != folder:
            dest_dir = os.path.join(folder, "assets", os.path.splitext(os.path.basename(page))[0])
            os.makedirs(dest_dir, exist_ok=True)
            dest = os.path.join(dest_dir, os.path.basename(src))
            shutil.copyfile(src, dest)
            src = dest
        links.append(os.path.relpath(src, folder).replace(os.sep, "/"))
    return links


def page_block(out: str, text: str, page: str, links: list[str]) -> str:
    """The page's results block: the summary's tables and plots, pointing at the files they came from."""
    rel = os.path.relpath(out)
    body = text.split("\n", 2)[2]  # without the title
    body = body.replace("## ", "#### ")
    images = "\n\n".join(f"![{PLOT_TITLES.get(os.path.basename(link), os.path.basename(link))}]({link})"
                          for link in links)
    return (f"{README_BEGIN}\nGenerated by `python experiments/tev_repro.py --only-plots --out {rel} "
            f"--page {os.path.relpath(page)}` from `{rel}/summary.json` (per-run logs beside it).\n\n{body}\n"
            f"{images}\n{README_END}")


def update_page(path: str, block: str) -> None:
    with open(path) as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"--page: {path} has no {README_BEGIN} … {README_END} block to replace")
    start = text.index(README_BEGIN)
    end = text.index(README_END) + len(README_END)
    write_atomic(path, text[:start] + block + text[end:])


# ---------------------------------------------------------------------------------------------
# plots


def plot(out: str, runs: list[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlra_kernels.monitor import read_jsonl

    table = summary["configs"]
    style = {"mha": dict(marker="o", color="tab:red", label="MHA"), "mlra": dict(marker="s", color="tab:blue", label="MLRA")}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))

    def sweep_panel(ax, sweep: str, key: str, metric: str, title: str, logx: bool):
        for att in ("mha", "mlra"):
            es = sorted((e for e in table.values() if sweep in e["sweeps"] and e["attention"] == att
                         and (att == "mha" or e["latent_groups"] == 1)), key=lambda e: e[key])
            xs = [e[key] for e in es if math.isfinite(e[metric][0])]
            ms = [e[metric][0] for e in es if math.isfinite(e[metric][0])]
            sd = [0.0 if math.isnan(e[metric][1]) else e[metric][1] for e in es if math.isfinite(e[metric][0])]
            ax.errorbar(xs, ms, yerr=sd, capsize=3, **style[att])
            for e in es:
                if e["diverged"]:
                    ax.annotate(f"{e['diverged']}/{e['n']} diverged", (e[key], ax.get_ylim()[1]), fontsize=7,
                                color=style[att]["color"], ha="center", va="top")
        ax.set_xscale("log", base=2 if key == "depth" else 10)
        if key == "depth":
            ax.set_xticks(sorted({e["depth"] for e in table.values() if sweep in e["sweeps"]}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("layers" if key == "depth" else "peak learning rate")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()

    sweep_panel(axes[0, 0], "depth", "depth", "val_ppl", "validation perplexity by depth (mean ± sd over seeds)", False)
    sweep_panel(axes[0, 1], "depth", "depth", "tev_mean_trained", "final µ_TEV of the trained rows by depth", False)
    if any("lr" in e["sweeps"] for e in table.values()):
        sweep_panel(axes[1, 0], "lr", "lr", "val_ppl", f"validation perplexity by learning rate, {summary['meta']['args']['lr_depth']} layers", True)
        axes[1, 0].set_yscale("log")
    else:
        axes[1, 0].set_visible(False)
    ax = axes[1, 1]
    for att in ("mha", "mlra"):
        pts = [(c["tev_mean_trained"], c["emb_grad_var_trained"]) for r in runs if r["attention"] == att and not r["diverged"]
               for c in r["grad_var"]]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, alpha=0.6, color=style[att]["color"], label=style[att]["label"])
    ax.set_yscale("log")
    ax.set_xlabel("µ_TEV (trained rows)")
    ax.set_ylabel("embedding-gradient variance (trained rows)")
    corr = summary["meta"].get("correlations", {}).get("across_runs", {}).get("tev_mean_trained vs emb_grad_var_trained")
    ax.set_title("every checkpoint of every run" + (f"; across runs ρ = {corr['rho']:+.2f}" if corr else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    main = os.path.join(out, "tev_repro.png")
    fig.savefig(main, dpi=100)
    plt.close(fig)

    # µ_TEV over training, seed 0 of the depth sweep.
    depths = sorted({r["depth"] for r in runs if "depth" in r["sweeps"]})
    colors = plt.cm.viridis([i / max(1, len(depths) - 1) for i in range(len(depths))])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for r in sorted(runs, key=lambda r: (r["depth"], r["attention"])):
        if "depth" not in r["sweeps"] or r["seed"] != 0 or (r["attention"] == "mlra" and r["config"]["latent_groups"] != 1):
            continue
        _, recs = read_jsonl(os.path.join(out, r["tev_log"]))
        recs = [x for x in recs if "tev_mean" in x]
        kw = dict(color=colors[depths.index(r["depth"])], label=f"{r['attention'].upper()} L={r['depth']}",
                  linestyle="-" if r["attention"] == "mlra" else "--")
        axes[0].plot([x["step"] for x in recs], [x["tev_mean"] for x in recs], **kw)
        axes[1].plot([x["step"] for x in recs], [x.get("tev_mean_trained", math.nan) for x in recs], **kw)
        losses = torch.tensor(r["losses"])
        k = max(1, len(losses) // 50)
        smooth = losses[: len(losses) // k * k].view(-1, k).mean(1)
        axes[2].plot([i * k for i in range(len(smooth))], smooth.tolist(), **kw)
    for ax, title in zip(axes, ("µ_TEV, all rows", "µ_TEV, trained rows", "training loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7, ncol=2)
    fig.suptitle("MHA (dashed) against MLRA (solid) by depth, seed 0")
    fig.tight_layout()
    curves = os.path.join(out, "tev_curves_by_depth.png")
    fig.savefig(curves, dpi=100)
    plt.close(fig)
    return [main, curves]


# ---------------------------------------------------------------------------------------------


def environment(device: torch.device, argv: Optional[list[str]] = None) -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    return {"device": name, "torch": torch.__version__, "python": platform.python_version(), "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(["python", os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv)))}


def read_runs(path: str) -> tuple[list[dict[str, Any]], int]:
    """The finished runs in ``path`` and the number of unreadable lines (a write torn by an interruption:
    that run is trained again). The divergence rule is applied afresh to every run, so a summary always
    uses this file's rule."""
    if not os.path.exists(path):
        return [], 0
    runs, torn = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                run = json.loads(line)
            except json.JSONDecodeError:
                torn += 1
                continue
            if "losses" in run:
                run["diverged"] = is_diverged(run["losses"], run["val_loss"], run["vocab_size"], run.get("diverged_at"))
            runs.append(run)
    return runs, torn


# What each run's numbers depend on: a resumed sweep must agree on all of them. The plan's own flags
# (depths, lrs, lr_depth, seeds, the sweeps) may change: they only add or leave out runs.
RUN_ARGS = ("width", "heads", "context", "batch", "steps", "lr", "rank", "tokenizer", "vocab_size", "eval_batches",
            "checkpoints", "gvar_batches", "data", "max_bytes")


def resume_meta(meta_path: str, args, env: dict[str, Any]) -> dict[str, Any]:
    """The stored ``meta.json`` of the sweep being resumed, with this resume added to its history;
    refuses a resume whose settings would change what a run means."""
    with open(meta_path) as f:
        meta = json.load(f)
    stored = meta["args"]
    differ = [k for k in RUN_ARGS if json.dumps(stored.get(k), default=str) != json.dumps(getattr(args, k), default=str)]
    if differ:
        flags = ", ".join(f"--{k.replace('_', '-')} (sweep {stored.get(k)!r}, now {getattr(args, k)!r})" for k in differ)
        raise SystemExit(f"--resume: these settings differ from the sweep in {os.path.dirname(meta_path) or '.'}: {flags}; "
                         f"resume with the sweep's settings, or choose another --out")
    meta.setdefault("resumes", []).append(env)
    meta["plan_args"] = {k: v for k, v in vars(args).items() if k not in RUN_ARGS}  # the plan now trained
    return meta


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = args.out
    runs_path, meta_path = os.path.join(out, "runs.jsonl"), os.path.join(out, "meta.json")
    if args.page and not os.path.isfile(args.page):
        raise SystemExit(f"--page: {args.page} is not a file")
    if args.only_plots:
        if not os.path.exists(meta_path):
            raise SystemExit(f"--only-plots: {meta_path} does not exist; run the sweep into --out first")
        with open(meta_path) as f:
            meta = json.load(f)
        runs, _ = read_runs(runs_path)
    else:
        if os.path.exists(runs_path) and not args.resume:
            raise SystemExit(f"--out {out} already holds a sweep ({runs_path}); pass --resume to continue it, "
                             f"--only-plots to re-make its summary, or choose another --out")
        os.makedirs(out, exist_ok=True)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        env = environment(device, argv)
        resuming = args.resume and os.path.exists(meta_path)
        meta = resume_meta(meta_path, args, env) if resuming else {"args": vars(args), "env": env}
        train, val, vocab, data = load_tokens(args)
        if min(len(train), len(val)) < args.context + 2:
            raise SystemExit(f"--max-bytes {args.max_bytes}: the text gives {len(train):,} training and {len(val):,} "
                             f"validation tokens, too few for --context {args.context}; read more text")
        if resuming and meta.get("data", {}).get("train_tokens") not in (None, data["train_tokens"]):
            raise SystemExit(f"--resume: the training text now has {data['train_tokens']:,} tokens, the sweep's had "
                             f"{meta['data']['train_tokens']:,}; resume with the sweep's --data, or choose another --out")
        meta["data"] = data
        write_atomic(meta_path, json.dumps(meta, indent=1, default=str))
        runs, torn = read_runs(runs_path)
        if torn:
            # Rewrite the file without the torn lines, so that the next result starts on a line of its own.
            write_atomic(runs_path, "".join(json.dumps(r) + "\n" for r in runs))
            print(f"note: {torn} unreadable line(s) in {runs_path} (an interrupted write) dropped; those runs train again")
        done = {r["name"] for r in runs}
        plan = [s for s in run_plan(args) if s["name"] not in done]
        print(f"{len(plan)} runs to train ({len(done)} already in {out}) on {env['device']}; "
              f"data: {data['source']}, {data['tokenizer']} vocabulary {vocab}", flush=True)
        from tqdm.auto import tqdm

        with open(runs_path, "a") as f, tqdm(plan, unit="run", dynamic_ncols=True) as bar:
            for spec in bar:
                bar.set_description(spec["name"])
                result = train_run(spec, args, train, val, vocab, device, out)
                bar.write(f"{spec['name']}: val ppl {result['val_ppl']:.2f}, µ_TEV {result['tev_mean']:.4f} "
                          f"(trained rows {result['tev_mean_trained']:.4f}), "
                          f"{'diverged, ' if result['diverged'] else ''}{result['seconds']:.0f}s")
                f.write(json.dumps(result) + "\n")
                f.flush()
                runs.append(result)
    if not runs:
        raise SystemExit(f"no finished runs in {runs_path}")
    text, summary = summarize(out, runs, meta)
    print(text)
    plots = plot(out, runs, summary)
    for path in plots:
        print("plot:", path)
    if args.page:
        update_page(args.page, page_block(out, text, args.page, page_plots(args.page, plots)))
        print("updated", args.page)
    return summary


if __name__ == "__main__":
    main()
