"""The ``mlra`` command: ``demo``, ``tev``, ``plot``, ``bench``, ``info``."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shlex
import subprocess
import sys
import warnings
from typing import Optional, Sequence

import torch

_EMBEDDING_KEYS = (
    "wte.weight", "tok_embeddings.weight", "embed_tokens.weight", "word_embeddings.weight",
    "embed_in.weight", "token_embedding.weight", "tok_emb.weight", "embeddings.weight",
)
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt")
_HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CLIError(Exception):
    """A user error: printed as one line, exit status 1."""


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (some libraries raise multi-line messages)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


def _brief(err: BaseException) -> str:
    """One line, cut to its first sentence when long (torch's loader errors run to a paragraph)."""
    text = one_line(err)
    if len(text) > 160 and ". " in text:
        text = text.split(". ", 1)[0] + "."
    return text


def _pick_key(keys: Sequence[str], shapes: dict, key: Optional[str], source: str) -> str:
    if key is not None:
        if key not in keys:
            # The 2-D tensors where the shapes are known; a sharded index lists names only.
            names, what = ([k for k in keys if len(shapes.get(k, ())) == 2], "its 2-D tensors") if shapes else (
                list(keys), "its tensors")
            listed = ", ".join(names[:12]) + (f" (and {len(names) - 12} more)" if len(names) > 12 else "")
            raise CLIError(f"--key {key!r} is not in {source}; {what}: {listed or 'none'}")
        return key
    for suffix in _EMBEDDING_KEYS:
        for k in keys:
            if k == suffix or k.endswith("." + suffix):
                return k
    two_d = [k for k in keys if len(shapes.get(k, ())) == 2][:12]
    raise CLIError(
        f"no token-embedding key found in {source} (looked for names ending in {', '.join(_EMBEDDING_KEYS)}); "
        f"2-D tensors there: {', '.join(two_d) or 'none'}. Pass --key NAME."
    )


def _safetensors_keys(path: str):
    try:
        from safetensors import safe_open
    except ImportError:
        raise CLIError(f"reading {path} needs the safetensors package: pip install safetensors") from None
    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except OSError as err:
        raise CLIError(f"cannot read {path}: {err.strerror or one_line(err)}") from None
    except Exception as err:  # safetensors raises its own SafetensorError for a malformed file
        raise CLIError(f"{path} is not a valid safetensors file (truncated or corrupt?): {_brief(err)}") from None


def _safetensors_tensor(path: str, key: str) -> torch.Tensor:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(key)
    except OSError as err:
        raise CLIError(f"cannot read {path}: {err.strerror or one_line(err)}") from None
    except Exception as err:
        raise CLIError(f"cannot read tensor {key!r} from {path} (truncated or corrupt?): {_brief(err)}") from None


_NOT_A_CHECKPOINT = "it is not a checkpoint torch wrote (neither torch.save's zip archive nor a pickle of tensors)"


def _torch_state_dict(path: str) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message advises weights_only=False, which would run code from the file: not passed on.
        text = one_line(err)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found is None:
            reason = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:Check the documentation|$)", text)
            detail = reason.group(1) if reason else ""
            if not detail or detail.startswith("Unsupported operand"):  # the pickle opcode of some other file
                detail = _NOT_A_CHECKPOINT
            raise CLIError(f"cannot read {path} as a PyTorch state dict (torch.load weights_only=True): "
                           f"{detail}") from None
        what = f" ({found.group(1)})"
        raise CLIError(
            f"refused to load {path}: it holds pickled Python objects{what}, not only tensors; mlra tev loads "
            "checkpoints with torch.load(weights_only=True), which never runs code from the file. Re-save the "
            "state dict (or a .safetensors file) from a session you trust"
        ) from None
    except OSError as err:
        raise CLIError(f"cannot read {path}: {err.strerror or one_line(err)}") from None
    except Exception as err:  # torch raises several types for files that are not checkpoints
        detail = _brief(err)
        if isinstance(err, EOFError):
            detail = "the file ends early (truncated?)"
        elif isinstance(err, (KeyError, IndexError)):
            # e.g. KeyError(101): the first byte of a text file read as a pickle opcode
            detail = f"{_NOT_A_CHECKPOINT} ({type(err).__name__}: {detail})"
        raise CLIError(f"cannot read {path} as a PyTorch state dict (torch.load weights_only=True): {detail}"
                       ) from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise CLIError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _read_weight_map(index: str) -> dict:
    """The ``weight_map`` of a sharded checkpoint's index JSON: tensor name -> shard file name."""
    try:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError:
        raise CLIError(f"{index} is not a JSON index (not UTF-8 text)") from None
    except json.JSONDecodeError as err:
        raise CLIError(f"{index} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except OSError as err:
        raise CLIError(f"cannot read {index}: {err.strerror or one_line(err)}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CLIError(
            f"{index} has no usable 'weight_map' (expected a JSON object mapping tensor names to shard files)"
        )
    return weight_map


def _is_monitor_log(path: str) -> bool:
    """Whether ``path`` starts like a TEVMonitor log: a JSON line with its ``meta`` header (or a record)."""
    try:
        with open(path, "rb") as f:
            if f.read(1) != b"{":  # neither torch.save's zip archive nor a pickle starts so
                return False
            f.seek(0)
            first = json.loads(f.readline(1 << 20))
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and (isinstance(first.get("meta"), dict) or {"step", "tev_mean"} <= first.keys())


def _load_file(path: str, key: Optional[str]) -> tuple[str, torch.Tensor]:
    """``(key, tensor)`` from one state-dict or safetensors file (``key=None``: found by name)."""
    if os.path.getsize(path) == 0:
        raise CLIError(f"{path} is empty (0 bytes); expected a state dict (.pt/.bin) or a .safetensors file")
    if not path.endswith(".safetensors") and _is_monitor_log(path):
        raise CLIError(
            f"{path} is a TEV monitor log (the JSONL a TEVMonitor writes), not a saved model; mlra tev reads a "
            f"model's embedding, and `mlra plot {shlex.quote(path)}` draws the TEV and loss curves of the log"
        )
    if path.endswith(".safetensors"):
        shapes = _safetensors_keys(path)
        k = _pick_key(list(shapes), shapes, key, path)
        return k, _safetensors_tensor(path, k)
    sd = _torch_state_dict(path)
    k = _pick_key(list(sd), {n: tuple(t.shape) for n, t in sd.items()}, key, path)
    return k, sd[k]


def _load_sharded(folder: str, index: str, key: Optional[str]) -> tuple[str, torch.Tensor]:
    weight_map = _read_weight_map(index)
    k = _pick_key(list(weight_map), {}, key, index)
    name = weight_map[k]
    shard = os.path.normpath(os.path.join(folder, name))
    if os.path.isabs(name) or os.path.relpath(shard, folder).split(os.sep)[0] == os.pardir:
        raise CLIError(f"{index} maps {k} to {name!r}, outside {folder}; expected a shard file in that folder")
    if not os.path.isfile(shard):
        state = "is a folder" if os.path.isdir(shard) else "is missing"
        raise CLIError(f"{index} maps {k} to the shard {shard}, which {state}")
    try:
        return k, _load_file(shard, k)[1]
    except CLIError as err:
        if str(err).startswith("--key "):
            raise CLIError(f"{index} maps {k} to the shard {shard}, which does not hold it") from None
        raise


def load_embedding(path: str, key: Optional[str] = None) -> tuple[str, torch.Tensor]:
    """Find and load the token-embedding matrix of a saved model.

    ``path`` is a state-dict file (``.pt``/``.pth``/``.bin``, read with ``weights_only=True``), a
    ``.safetensors`` file, or a Hugging Face model folder (``config.json`` with ``model.safetensors``,
    ``pytorch_model.bin`` or a sharded index). Returns ``(key, tensor)``. Every problem with the
    files is a :class:`CLIError` naming the file.
    """
    if os.path.isdir(path):
        for index_name in _HF_INDEX_FILES:
            index = os.path.join(path, index_name)
            if os.path.isfile(index):
                return _load_sharded(path, index, key)
        for name in _HF_WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return _load_file(os.path.join(path, name), key)
        raise CLIError(f"{path} is a folder without {', '.join(_HF_WEIGHT_FILES + _HF_INDEX_FILES)}")
    if not os.path.isfile(path):
        if os.path.exists(path):
            raise CLIError(f"{path} is not a regular file; expected a state dict, .safetensors file or model folder")
        raise CLIError(f"no such file or folder: {path}")
    return _load_file(path, key)


def cmd_tev(args: argparse.Namespace) -> int:
    from mlra_kernels.monitor import compute_tev

    key, weight = load_embedding(args.model, args.key)
    if weight.dim() != 2:
        raise CLIError(f"{key} has shape {list(weight.shape)}; a token embedding is 2-D [V, d]")
    if not weight.is_floating_point():
        raise CLIError(
            f"{key} has dtype {str(weight.dtype).replace('torch.', '')}; TEV is defined on a floating-point "
            "embedding (dequantize the checkpoint first, or pick another tensor with --key)"
        )
    mean, std, bad, _ = compute_tev(weight, unbiased=args.unbiased)
    if bad >= weight.shape[0]:
        raise CLIError(f"every row of {key} ({bad} of {weight.shape[0]}) holds NaN or Inf: TEV is undefined")
    if args.json:
        print(json.dumps({"model": args.model, "key": key, "shape": list(weight.shape),
                          "dtype": str(weight.dtype).replace("torch.", ""), "tev_mean": mean, "tev_std": std,
                          "nonfinite_rows": bad}))
    else:
        print(f"model:  {args.model}")
        print(f"key:    {key}  {list(weight.shape)} {str(weight.dtype).replace('torch.', '')}")
        print(f"µ_TEV:  {mean:.6f}")
        print(f"σ_TEV:  {std:.6f}")
        if bad:
            print(f"rows with NaN/Inf (left out): {bad}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from mlra_kernels.plot import plot_path, plot_runs

    for p in args.runs:
        if os.path.isdir(p):
            raise CLIError(f"{p} is a folder; expected a TEVMonitor JSONL log")
        if not os.path.isfile(p):
            raise CLIError(f"{p} is not a regular file; expected a TEVMonitor JSONL log" if os.path.exists(p)
                           else f"no such log: {p}")
    if args.out is not None:
        try:
            out = plot_path(args.out, args.runs)
        except ValueError as err:
            raise CLIError(f"--out {args.out}: {err}") from None
    else:
        default = os.path.splitext(args.runs[0])[0] + ".png"
        try:
            out = plot_path(default, args.runs)
        except ValueError as err:
            raise CLIError(f"the default plot path {default} (next to the first log): {err}; pass --out") from None
    print(plot_runs(args.runs, out, title=args.title))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark modules shipped in ``mlra_kernels.benchmarks``, each in its own process."""
    names = ["tev", "mlra", "decode"] if args.benchmark == "all" else [args.benchmark]
    rc = 0
    for name in names:
        cmd = [sys.executable, "-m", f"mlra_kernels.benchmarks.{name}", *args.extra]
        print("$ " + " ".join(cmd), flush=True)
        child = subprocess.call(cmd)
        if child < 0:  # killed by a signal: subprocess reports -signal, which must not read as success
            print(f"mlra bench: error: mlra_kernels.benchmarks.{name} was killed by signal {-child}",
                  file=sys.stderr)
            child = 128 - child
        if child and not rc:
            rc = child
    return rc


def cmd_info(args: argparse.Namespace) -> int:
    try:
        from mlra_kernels import info
    except ImportError:
        info = None
    for name in ("print_info", "main", "info"):
        fn = getattr(info, name, None)
        if callable(fn):
            result = fn()
            return result if isinstance(result, int) else 0
    import mlra_kernels

    print(f"mlra-kernels {mlra_kernels.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA available: {torch.cuda.is_available()}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mlra_kernels.demo import run

    run(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mlra_kernels.demo import add_arguments

    parser = argparse.ArgumentParser(
        prog="mlra",
        description="Multi-head Low-Rank Attention and Token Embedding Variability for PyTorch.",
    )
    parser.add_argument("--traceback", action="store_true",
                        help="on an error, show the Python traceback instead of the one-line message")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="train MHA and MLRA GPT-2s side by side and compare loss and TEV")
    add_arguments(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("tev", help="print the TEV of a saved model's token embedding")
    p.add_argument("model", help="state dict (.pt/.bin), .safetensors file or Hugging Face model folder")
    p.add_argument("--key", default=None, help="name of the embedding tensor (default: found by name)")
    p.add_argument("--unbiased", action="store_true", help="unbiased σ_TEV across rows")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_tev)

    p = sub.add_parser("plot", help="plot TEV and loss curves of TEVMonitor JSONL logs into a PNG")
    p.add_argument("runs", nargs="+", metavar="RUN.jsonl")
    p.add_argument("-o", "--out", default=None, help="PNG path (default: next to the first log)")
    p.add_argument("--title", default=None)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser(
        "bench", help="run the kernel benchmarks (mlra_kernels.benchmarks: tev, mlra, decode)",
        description="Run the kernel benchmarks shipped in mlra_kernels.benchmarks, each in its own process; the "
                    "arguments after the name go to the benchmark (`mlra bench tev --help` lists them). Results "
                    "are JSON files in the folder --out (tev, decode) or --out-dir (mlra) names, by default in "
                    "./bench/results of the current folder, wherever the package is installed from. A result file "
                    "that git tracks (such as a checkout's committed results, when run from its root) is replaced "
                    "only when --out / --out-dir names its folder: without it the benchmark stops before measuring "
                    "and says so. Each result records the clock's resolution and the calls per timing; timings "
                    "on the clock's floor are taken again over batches of calls, or refused.")
    p.add_argument("benchmark", nargs="?", choices=["all", "tev", "mlra", "decode"], default="all")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="arguments passed to the benchmark scripts")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("info", help="print build and runtime information")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    command = args.command
    formatwarning = warnings.formatwarning
    # A warning is one line too ("mlra plot: warning: ..."), not Python's file:line plus source line.
    warnings.formatwarning = lambda message, *_, **__: f"mlra {command}: warning: {one_line(message)}\n"
    try:
        return args.func(args)
    except (CLIError, ValueError, OSError, ImportError) as err:
        if args.traceback:
            raise
        print(f"mlra {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.traceback:
            raise
        print(f"mlra {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a failure nobody foresaw: still one line; --traceback shows where
        if args.traceback:
            raise
        print(f"mlra {args.command}: error: {type(err).__name__}: {one_line(err)} "
              f"(run 'mlra --traceback {args.command} ...' to see where)", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
