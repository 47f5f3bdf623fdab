"""The ``mlra`` command: ``demo``, ``tev``, ``plot``, ``bench``, ``info``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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




def _pick_key(keys: Sequence[str], shapes: dict, key: Optional[str], source: str) -> str:
    if key is not None:
        if key not in keys:
            raise CLIError(f"--key {key!r} is not in {source}")
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
    with safe_open(path, framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _safetensors_tensor(path: str, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_tensor(key)


def _torch_state_dict(path: str) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for files that are not checkpoints
        raise CLIError(f"cannot read {path} as a PyTorch state dict (torch.load weights_only=True): {err}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise CLIError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_embedding(path: str, key: Optional[str] = None) -> tuple[str, torch.Tensor]:
    """Find and load the token-embedding matrix of a saved model.

    ``path`` is a state-dict file (``.pt``/``.pth``/``.bin``, read with ``weights_only=True``), a
    ``.safetensors`` file, or a Hugging Face model folder (``config.json`` with ``model.safetensors``,
    ``pytorch_model.bin`` or a sharded index). Returns ``(key, tensor)``.
    """
    if os.path.isdir(path):
        for index_name in _HF_INDEX_FILES:
            index = os.path.join(path, index_name)
            if os.path.isfile(index):
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                k = _pick_key(list(weight_map), {}, key, index)
                shard = os.path.join(path, weight_map[k])
                return k, load_embedding(shard, k)[1]
        for name in _HF_WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return load_embedding(os.path.join(path, name), key)
        raise CLIError(f"{path} is a folder without {', '.join(_HF_WEIGHT_FILES + _HF_INDEX_FILES)}")
    if not os.path.isfile(path):
        raise CLIError(f"no such file or folder: {path}")
    if path.endswith(".safetensors"):
        shapes = _safetensors_keys(path)
        k = _pick_key(list(shapes), shapes, key, path)
        return k, _safetensors_tensor(path, k)
    sd = _torch_state_dict(path)
    k = _pick_key(list(sd), {n: tuple(t.shape) for n, t in sd.items()}, key, path)
    return k, sd[k]


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
    from mlra_kernels.plot import plot_runs

    for p in args.runs:
        if not os.path.isfile(p):
            raise CLIError(f"no such log: {p}")
    out = args.out or os.path.splitext(args.runs[0])[0] + ".png"
    print(plot_runs(args.runs, out, title=args.title))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark modules shipped in ``mlra_kernels.benchmarks``, each in its own process."""
    names = ["tev", "mlra"] if args.which == "all" else [args.which]
    rc = 0
    for name in names:
        cmd = [sys.executable, "-m", f"mlra_kernels.benchmarks.{name}", *args.extra]
        print("$ " + " ".join(cmd), flush=True)
        rc = max(rc, subprocess.call(cmd))
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

    p = sub.add_parser("bench", help="run the kernel benchmarks (mlra_kernels.benchmarks: tev, mlra)")
    p.add_argument("which", nargs="?", choices=["all", "tev", "mlra"], default="all")
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
    try:
        return args.func(args)
    except (CLIError, ValueError, FileNotFoundError, ImportError) as err:
        print(f"mlra {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mlra {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
