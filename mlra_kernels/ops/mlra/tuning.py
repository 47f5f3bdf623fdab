"""Autotuning of the MLRA prefill kernels: the config list, the key, and the pruning per architecture.

Plain Python over ``triton.Config`` objects (no kernel here), so that the pruning is tested on a CPU and
the compile gate (``tests/ops/mlra/test_kernel_compile.py``) keeps exactly the configs that a launch on
each architecture keeps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import triton

from mlra_kernels.ops.mlra import config

# The best tiles change with the sequence length, but keying on T itself would retune every new length:
# the key holds T's power-of-two bucket (``T_BUCKET``, from the launcher), an int the kernels never read.
# Neither is specialised, so a new T or bucket never recompiles. The autotuner adds the dtypes itself.
KEY = ["T_BUCKET", "DH", "R", "CAUSAL", "HAS_BIAS", "HAS_KPM", "DROPOUT"]

# Opt-in shared memory per block, in bytes, by compute capability (CUDA C++ Programming Guide): what one
# program may use once Triton raises its dynamic limit. A launch reads its device's own figure; this table
# serves where no device can be asked (the compile gate).
SMEM_OPTIN = {
    (8, 0): 163 * 1024,  # A100
    (8, 6): 99 * 1024,  # RTX 30xx, A10, A40
    (8, 7): 163 * 1024,  # Jetson Orin
    (8, 9): 99 * 1024,  # RTX 40xx, L4, L40
    (9, 0): 227 * 1024,  # H100, H200
}


@dataclass(frozen=True)
class Arch:
    """What the pruning needs to know of a GPU."""

    capability: tuple[int, int]
    smem_optin: int


def arch_for(capability) -> Arch:
    """The table's ``Arch`` for a compute capability such as ``(9, 0)``."""
    cap = tuple(int(x) for x in capability)
    if cap not in SMEM_OPTIN:
        known = ", ".join(f"sm_{a}{b}" for a, b in sorted(SMEM_OPTIN))
        raise KeyError(f"no shared-memory limit is tabled for sm_{cap[0]}{cap[1]} (tabled: {known})")
    return Arch(cap, SMEM_OPTIN[cap])


@functools.lru_cache(maxsize=None)
def device_arch(index: int) -> Arch:
    """The ``Arch`` of CUDA device ``index``, read off the device (once per device)."""
    import torch

    props = torch.cuda.get_device_properties(index)
    cap = (props.major, props.minor)
    # Older torch releases do not expose the opt-in limit; the table (or the default 48 KB) stands in.
    optin = getattr(props, "shared_memory_per_block_optin", None) or SMEM_OPTIN.get(cap) or getattr(props, "shared_memory_per_block", 48 * 1024)
    return Arch(cap, optin)


def launch_arch(tensor) -> Optional[Arch]:
    """The ``Arch`` of the GPU a launch on ``tensor`` runs on; ``None`` off CUDA (the interpreter has no limit)."""
    if tensor.device.type != "cuda":
        return None
    import torch

    index = tensor.device.index
    return device_arch(torch.cuda.current_device() if index is None else index)


def configs(interpret: bool) -> list:
    """The configs each autotuned kernel chooses from."""
    if interpret:
        # One fixed config: autotuning under the interpreter only costs time.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    # (BLOCK_M, BLOCK_N, warps, stages). A short list: every new key compiles each kept one once.
    grid = [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 8, 2)]
    if not config.autotune():
        grid = grid[:1]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in grid]


def smem_bytes(kernel: str, cfg, block_d: int, block_r: int, block_rf: int = 0, elem: int = 2) -> int:
    """An upper bound on one program's shared memory; the compile gate checks it against the compiler.

    A pipelined loop keeps ``num_stages`` copies of what one step loads: a latent chunk and its
    up-projection chunk (``[rows, BR]`` and ``[BR, BD]``), the backward's dO tile (``[BM, BD]``), or the
    absorbed kernel's c_K and c_V rows (``2 × [BN, RF]``). On top of that come the tiles kept as dot
    operands: q, dO, k and v for the rebuild kernels, q and q·B_K (``[BM, BD + RF]``) for the absorbed one.
    """
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    step = max(max(bm, bn) * block_r + block_r * block_d, 2 * bn * block_rf)
    if kernel == "bwd":
        step += bm * block_d
    kept = bm * (block_d + block_rf) if kernel == "absorbed" else 2 * (bm + bn) * block_d
    return elem * (cfg.num_stages * step + kept)


def _fits_registers(kernel: str, cfg, block_d: int, block_r: int, block_rf: int, arch: Optional[Arch]) -> bool:
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    if block_d >= 128 and bm * bn > 128 * 64:
        return False  # large head dims with large tiles spill registers on every current GPU
    if kernel == "absorbed" and bm * block_rf > 64 * 256:
        return False  # its [BM, r] accumulator and q·B_K tile live in registers: a small BM when r is large
    wide = kernel == "bwd" or (kernel == "absorbed" and max(block_r, block_rf) >= 64)
    if wide and arch is not None and arch.capability < (9, 0):
        # Before Hopper the dot operands sit in registers too (mma.sync, no wgmma reading shared memory).
        # The compile gate found sm_80 spills in the backward (r = 96 and, with Triton 3.6, r = 16) and the
        # absorbed forward at r = 96 (d_h = 64; 8 to 356 bytes) for tiles over 16 fp32 scores per thread,
        # and none at or below.
        return bm * bn <= 16 * 32 * cfg.num_warps
    return True


def prune(kernel: str, cfgs: list, block_d: int, block_r: int, block_rf: int = 0, elem: int = 2,
          arch: Optional[Arch] = None) -> list:
    """The configs worth compiling for ``kernel`` (``"rebuild"``, ``"absorbed"`` or ``"bwd"``) on ``arch``.

    Never empty. Configs over the shared-memory limit go first (their launch fails); if none fits, the
    smallest is kept, since the estimate is an upper bound and Triton reports a real overflow at launch.
    Register rules go next, but never drop the last config that fits.
    """
    def smem(c):
        return smem_bytes(kernel, c, block_d, block_r, block_rf, elem)

    fit = [c for c in cfgs if arch is None or smem(c) <= arch.smem_optin]
    if not fit:
        return [min(cfgs, key=smem)]
    return [c for c in fit if _fits_registers(kernel, c, block_d, block_r, block_rf, arch)] or fit[:1]


def pruner(kernel: str):
    """The autotuner's ``early_config_prune`` hook for ``kernel``; it carries ``kernel`` for the compile gate."""

    def hook(cfgs, named_args, **kwargs):
        # The autotuner passes positional arguments in `named_args` and keyword arguments apart.
        def arg(name):
            return kwargs[name] if name in kwargs else named_args.get(name, 0)

        c = named_args["C"]
        return prune(kernel, cfgs, arg("BLOCK_D"), arg("BLOCK_R"), arg("BLOCK_RF"), c.element_size(), launch_arch(c))

    hook.kernel = kernel
    return hook
