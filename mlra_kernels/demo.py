"""``mlra demo``: train an MHA GPT-2 and an MLRA GPT-2 side by side and compare loss and TEV.

The default data needs no download: the Python standard library's own sources, read in a fixed
order and tokenised as bytes (vocabulary 256). ``--data`` takes the user's own text files or folders.

Output: ``--out`` (default ``runs/demo-<timestamp>``) receives ``mha.jsonl``, ``mlra.jsonl`` (TEVMonitor
logs), ``summary.json`` and ``demo.png``, all at once: the run writes into a new sibling folder
``<out>.incomplete-XXXX`` that is renamed to ``--out`` only when the run completed, and removed when it
fails or is interrupted. ``--out`` must not exist yet or be empty; ``--overwrite`` lets it hold an earlier
demo run (only the files above), which is deleted only after the new run is in place.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from mlra_kernels._argtypes import existing_folder_above, positive_float, positive_int
from mlra_kernels.models import GPT2, GPT2Config
from mlra_kernels.monitor import TEVMonitor

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo"}
_TEXT_SUFFIXES = (".py", ".txt", ".rst", ".md")


def stdlib_text_files() -> list[str]:
    """The standard library's ``.py`` files in a fixed (sorted) order, installed packages left out."""
    root = os.path.dirname(os.__file__)
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        files.extend(os.path.join(folder, n) for n in sorted(names) if n.endswith(".py"))
    return files


def _expand(paths: Sequence[str]) -> list[str]:
    files = []
    for p in paths:
        if os.path.isdir(p):
            for folder, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files.extend(os.path.join(folder, n) for n in sorted(names) if n.endswith(_TEXT_SUFFIXES))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"--data: no such file or folder: {p}")
    if not files:
        raise ValueError(f"--data: no text files ({', '.join(_TEXT_SUFFIXES)}) found in {list(paths)}")
    return files


def load_bytes(paths: Optional[Sequence[str]] = None, max_bytes: int = 4_000_000) -> tuple[torch.Tensor, str]:
    """Byte tokens ``[N]`` (int64, 0..255) of the given files/folders, or of the stdlib by default.

    Returns the tokens and a one-line description of the source.
    """
    if not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"--max-bytes must be a positive int, got {max_bytes!r}")
    files = _expand(paths) if paths else stdlib_text_files()
    chunks, total = [], 0
    for f in files:
        try:
            with open(f, "rb") as fh:
                data = fh.read(max_bytes - total)
        except OSError as err:
            if paths:  # the user's own file: training on less than asked for would be a silent change
                raise OSError(f"--data: cannot read {f}: {err.strerror or err}") from None
            continue  # a stdlib file that cannot be read is simply left out
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    blob = b"\n".join(chunks)
    if not blob:
        raise ValueError("the training text is empty")
    tokens = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(torch.int64)
    where = ", ".join(paths) if paths else f"Python {sys.version.split()[0]} standard library sources"
    return tokens, f"{where}: {len(chunks)} files, {len(tokens):,} bytes"


@dataclass
class RunResult:
    name: str
    params: int
    train_loss: float = math.nan
    val_loss: float = math.nan
    tev_mean: float = math.nan
    tev_std: float = math.nan
    tokens_per_s: float = 0.0
    monitor_ms: float = 0.0
    log: str = ""
    history: list = field(default_factory=list)

    @property
    def ppl(self) -> float:
        return math.exp(self.val_loss) if self.val_loss < 50 else math.inf


def _batches(data: torch.Tensor, n: int, batch: int, T: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - T - 1, (n, batch), generator=gen)
    return starts


def _get(data: torch.Tensor, starts: torch.Tensor, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    offs = starts[:, None] + torch.arange(T + 1)
    chunk = data[offs]
    return chunk[:, :-1].to(device, non_blocking=True), chunk[:, 1:].to(device, non_blocking=True)


def _lr(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


@torch.no_grad()
def _evaluate(model: GPT2, data: torch.Tensor, starts: torch.Tensor, T: int, device) -> float:
    model.eval()
    losses = []
    for row in starts:
        x, y = _get(data, row, T, device)
        losses.append(model(x, y)[1].item())
    model.train()
    return sum(losses) / len(losses)


def _progress(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, disable=not enabled, dynamic_ncols=True, unit="step", desc="training")
    except ImportError:
        return _PlainProgress(total, enabled)


class _PlainProgress:
    """Progress line for when tqdm is not installed."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.n, self.enabled, self.t0, self.post = total, 0, enabled, time.perf_counter(), ""

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.enabled and (self.n == self.total or self.n % max(1, self.total // 50) == 0):
            rate = self.n / max(1e-9, time.perf_counter() - self.t0)
            print(f"\rtraining {self.n}/{self.total} [{rate:.2f} step/s] {self.post}", end="", file=sys.stderr)

    def set_postfix_str(self, s: str) -> None:
        self.post = s

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def format_table(results: Sequence[RunResult]) -> str:
    head = ["model", "params", "train loss (EMA)", "val loss", "val ppl", "µ_TEV", "σ_TEV", "tokens/s"]
    rows = [
        [r.name, f"{r.params:,}", f"{r.train_loss:.4f}", f"{r.val_loss:.4f}", f"{r.ppl:.3f}",
         f"{r.tev_mean:.5f}", f"{r.tev_std:.5f}", f"{r.tokens_per_s:,.0f}"]
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    line = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([fmt(head), line] + [fmt(r) for r in rows])


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {value}")
    return value


_DEVICE_CHOICES = "cpu, cuda or cuda:N"


def _device_flag(text: str) -> str:
    if text in ("cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"expected {_DEVICE_CHOICES}, got {text!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=positive_int, default=300, help="training steps per model (default 300)")
    p.add_argument("--layers", type=positive_int, default=4, help="depth (default 4)")
    p.add_argument("--width", type=positive_int, default=128, help="model width d (default 128)")
    p.add_argument("--heads", type=positive_int, default=4, help="attention heads (default 4)")
    p.add_argument("--context", type=positive_int, default=128, help="context length T (default 128)")
    p.add_argument("--batch", type=positive_int, default=8, help="sequences per step (default 8)")
    p.add_argument("--rank", type=positive_int, default=None, help="MLRA rank per group (default width // 4)")
    p.add_argument("--groups", type=positive_int, default=1, help="MLRA latent groups (default 1)")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--log-every", type=positive_int, default=10,
                   help="TEV/loss record interval in steps (default 10)")
    p.add_argument("--eval-batches", type=positive_int, default=8, help="validation batches at the end (default 8)")
    p.add_argument("--device", type=_device_flag, default=None, metavar="DEVICE",
                   help=f"{_DEVICE_CHOICES} (default: cuda if available, else cpu)")
    p.add_argument("--out", default=None,
                   help="output folder (default runs/demo-<timestamp>); must be new or empty unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="let --out name the folder of an earlier demo run: it is replaced once the new run completes")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="your own text files or folders (default: the Python standard library sources)")
    p.add_argument("--max-bytes", type=positive_int, default=4_000_000,
                   help="cap on the text read (default 4 MB)")
    p.add_argument("--seed", type=_seed, default=0, help="seed for init and data order (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


# What a demo run writes; --overwrite replaces only a folder that holds nothing else.
RUN_FILES = ("mha.jsonl", "mlra.jsonl", "summary.json", "demo.png")

CAVEAT = (
    "One short run, one seed, small models: a loss, perplexity or TEV difference of this size between MHA "
    "and MLRA is not evidence either way. It shows that both models train and what the TEV monitor "
    "records; the paper's comparison needs deeper models, far longer training and several seeds."
)


def _check_args(args: argparse.Namespace) -> None:
    """The checks argparse makes (see :func:`add_arguments`), for a Namespace built by hand."""
    for name in ("steps", "layers", "width", "heads", "context", "batch", "groups", "log_every", "eval_batches",
                 "max_bytes"):
        value = getattr(args, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value!r}")
    if args.rank is not None and (not isinstance(args.rank, int) or args.rank <= 0):
        raise ValueError(f"--rank must be positive, got {args.rank!r}")
    if not isinstance(args.lr, (int, float)) or not math.isfinite(args.lr) or args.lr <= 0:
        raise ValueError(f"--lr must be a positive number, got {args.lr!r}")
    if args.device is not None:
        try:
            _device_flag(args.device)
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"--device: {err}") from None
    if args.width % args.heads:
        raise ValueError(f"--heads {args.heads} must divide --width {args.width}")
    if args.heads % args.groups:
        raise ValueError(f"--groups {args.groups} must divide --heads {args.heads}")
    if args.rank is not None and args.rank > args.width:
        raise ValueError(f"--rank {args.rank} must be at most --width {args.width}")


def _device(flag: Optional[str]) -> torch.device:
    if flag is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(flag)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {flag} was asked for, but torch sees no CUDA device (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'no'}); leave --device out to use the CPU"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {flag}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def _is_inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or os.path.commonpath([path, folder]) == folder


def _default_out() -> str:
    base = os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S"))
    out, n = base, 1
    while os.path.lexists(out):
        n += 1
        out = f"{base}-{n}"
    return out


def check_out(out: str, overwrite: bool) -> None:
    """Refuse an ``--out`` the run cannot own: a file, the current folder or one above it, or a non-empty
    folder (unless ``overwrite`` and it holds only what an earlier demo run wrote, :data:`RUN_FILES`)."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file; expected a folder for the run's logs, plot and summary")
    if _is_inside(os.getcwd(), out):
        raise ValueError(f"--out {out} is the current folder or one above it; pass a new folder, e.g. runs/demo")
    above = existing_folder_above(out)
    if not os.path.isdir(above):
        raise ValueError(f"--out {out}: {above} is a file, so the folder cannot be made there")
    if not os.path.isdir(out):
        return
    present = sorted(os.listdir(out))
    if not present:
        return
    if not overwrite:
        raise ValueError(
            f"--out {out} already holds files ({', '.join(present[:4])}{', ...' if len(present) > 4 else ''}); "
            "pass another folder, or --overwrite to replace an earlier demo run once the new run completes"
        )
    foreign = [n for n in present if n not in RUN_FILES or not os.path.isfile(os.path.join(out, n))]
    if foreign:
        raise ValueError(
            f"--out {out} holds files a demo run does not write ({', '.join(foreign[:4])}); --overwrite only "
            "replaces the folder of an earlier demo run, so pass another folder"
        )


def _staging_folder(out: str) -> str:
    """A new folder beside ``out`` (same parent, so the final rename is atomic) for the run to write into."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(out)) + ".incomplete-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; the finished run gets the usual permissions
    return staging


def _publish(staging: str, out: str) -> None:
    """Move the completed run from ``staging`` to ``out``. An earlier run in ``out`` is moved aside
    first and deleted only once the new run is in place; if the move fails it is put back."""
    if not os.path.isdir(out):
        os.rename(staging, out)
        return
    if not os.listdir(out):
        os.rmdir(out)
        os.rename(staging, out)
        return
    parent = os.path.dirname(os.path.abspath(out))
    aside = tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(out)) + ".replaced-", dir=parent)
    os.rmdir(aside)  # only the unique name is wanted
    os.rename(out, aside)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def run(args: argparse.Namespace) -> list[RunResult]:
    """Run the demo with parsed arguments (see :func:`add_arguments`); returns one result per model.

    The run writes into a new folder beside ``--out`` (``<out>.incomplete-XXXX``) and that folder is
    renamed to ``--out`` only when the run has completed, so ``--out`` never holds a partial run. An
    interrupted or failed run removes its folder and leaves ``--out`` as it was. ``--out`` must be new
    or empty; with ``--overwrite`` it may hold an earlier demo run, which is replaced (deleted only
    after the new run is in place).
    """
    _check_args(args)
    device = _device(args.device)
    overwrite = bool(getattr(args, "overwrite", False))
    out = args.out or _default_out()
    check_out(out, overwrite)

    data, source = load_bytes(args.data, args.max_bytes)
    T = args.context
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    if len(val) <= T + 1:
        raise ValueError(f"the text ({len(data):,} bytes) is too short for --context {T}; give more data")
    gen = torch.Generator().manual_seed(args.seed)
    train_starts = _batches(train, args.steps, args.batch, T, gen)
    val_starts = _batches(val, args.eval_batches, args.batch, T, gen)

    print(f"data:   {source}")
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                 f" ({torch.get_num_threads()} threads)"))

    staging = _staging_folder(out)
    monitors: list[TEVMonitor] = []
    try:
        results, plot = _train_and_write(args, device, out, staging, train, val, train_starts, val_starts,
                                        source, monitors)
    except BaseException:
        for mon in monitors:
            mon.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        _publish(staging, out)
    except OSError as err:
        _print_results(results)  # the run completed: its table is not lost with the move
        raise OSError(
            f"the run completed in {staging} but could not be moved to --out {out}: {err.strerror or err}; "
            "its files are kept there"
        ) from None

    # Printed once the run is in place: a closed stdout (a pipe into `head`) cannot cost the written run.
    _print_results(results)
    print(f"logs:   {', '.join(r.log for r in results)}")
    print(f"        (TEV monitor cost: {', '.join(f'{r.name} {r.monitor_ms:.3f} ms' for r in results)} per record)")
    print(f"plot:   {plot}")
    print(f"summary: {os.path.join(out, 'summary.json')}")
    return results


def _print_results(results: list) -> None:
    print()
    print(format_table(results))
    print()
    print(textwrap.fill(CAVEAT, 100))
    print()


def _train_and_write(args, device, out, staging, train, val, train_starts, val_starts, source,
                     monitors: list) -> tuple[list[RunResult], str]:
    """Train both models, writing logs, summary and plot into ``staging`` (``monitors`` collects the open
    monitors, for the caller to close on failure). Returns the results (whose ``log`` paths are the
    final ones, under ``out``) and the plot's final path, or why it was skipped."""
    T = args.context
    runs = []
    for attention in ("mha", "mlra"):
        cfg = GPT2Config(
            vocab_size=256, block_size=T, n_layer=args.layers, n_head=args.heads, n_embd=args.width,
            attention=attention, rank=args.rank, latent_groups=args.groups,
        )
        torch.manual_seed(args.seed)
        model = GPT2(cfg).to(device)
        opt = _optimizer(model, args.lr, 0.1)
        name = f"{attention}.jsonl"
        mon = TEVMonitor(model, every=args.log_every, path=os.path.join(staging, name), name=attention.upper())
        monitors.append(mon)
        res = RunResult(attention.upper(), model.num_parameters(), log=os.path.join(out, name))
        runs.append((cfg, model, opt, mon, res))
        rank = f", rank {cfg.rank}, groups {cfg.latent_groups}" if attention == "mlra" else ""
        print(f"model:  {attention.upper()} GPT-2, {cfg.n_layer} layers, d={cfg.n_embd}, {cfg.n_head} heads, "
              f"T={T}{rank}: {res.params:,} parameters")

    bar = _progress(args.steps, not args.no_progress)
    train_time = [0.0] * len(runs)
    smooth: list[Optional[float]] = [None] * len(runs)
    warmup = max(1, min(100, args.steps // 10))
    try:
        for step in range(args.steps):
            x, y = _get(train, train_starts[step], T, device)
            lr = _lr(step, args.steps, args.lr, warmup)
            for i, (cfg, model, opt, mon, res) in enumerate(runs):
                t0 = time.perf_counter()
                for group in opt.param_groups:
                    group["lr"] = lr
                _, loss = model(x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                train_time[i] += time.perf_counter() - t0
                value = loss.item()
                smooth[i] = value if smooth[i] is None else 0.9 * smooth[i] + 0.1 * value
                if step % args.log_every == 0 or step == args.steps - 1:
                    mon.record(step, loss=value, lr=lr)
            bar.set_postfix_str(" ".join(f"{r[4].name} {s:.3f}" for r, s in zip(runs, smooth)))
            bar.update(1)
    finally:
        bar.close()

    results = []
    for i, (cfg, model, opt, mon, res) in enumerate(runs):
        res.train_loss = smooth[i]
        res.val_loss = _evaluate(model, val, val_starts, T, device)
        final = mon.records[-1]
        res.tev_mean, res.tev_std = final["tev_mean"], final["tev_std"]
        res.tokens_per_s = args.steps * args.batch * T / max(1e-9, train_time[i])
        res.monitor_ms = mon.cost_per_call_ms
        res.history = mon.records
        mon.close()
        results.append(res)

    summary = {
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "out": out,
        "device": str(device),
        "data": source,
        "caveat": CAVEAT,
        "results": [
            {"name": r.name, "params": r.params, "train_loss": r.train_loss, "val_loss": r.val_loss,
             "val_ppl": r.ppl, "tev_mean": r.tev_mean, "tev_std": r.tev_std, "tokens_per_s": r.tokens_per_s,
             "monitor_ms_per_call": r.monitor_ms, "log": r.log}
            for r in results
        ],
    }
    with open(os.path.join(staging, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    try:
        from mlra_kernels.plot import plot_runs

        plot_runs([os.path.join(staging, f"{r.name.lower()}.jsonl") for r in results],
                  os.path.join(staging, "demo.png"), title=f"GPT-2 {args.layers}L d={args.width}: MHA vs MLRA")
        plot = os.path.join(out, "demo.png")
    except ImportError as err:
        plot = f"skipped ({err})"
    except (ValueError, OSError, RuntimeError) as err:  # the run's data is complete: a failed plot must not lose it
        plot = f"skipped (the plot failed: {' '.join(str(err).split())})"
    return results, plot
