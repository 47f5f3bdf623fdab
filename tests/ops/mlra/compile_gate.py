"""Compile the prefill kernels as a real launch at GPT-2 keys would, for sm_80 and sm_90, without a GPU.

Prints one JSON object per compile: registers, spills (from ptxas' own report), shared memory, whether
the PTX holds wgmma and cp.async. ``test_kernel_compile.py`` runs this in a subprocess and judges it;
run it directly (``python tests/ops/mlra/compile_gate.py``) to read the figures.

A real launch specialises its arguments: pointers and ints divisible by 16 are marked
``tt.divisibility = 16`` and ints equal to 1 become constants. Without these hints Triton vectorises and
pipelines no load (no cp.async) and ptxas reports spills that real launches do not have. So the gate
launches the real launchers on CPU tensors of GPT-2 shapes with the kernels' ``run`` replaced by a
recorder, and turns each recorded argument into its specialisation with the function Triton's own
launch binder calls (``native_specialize_impl``, the same in Triton 3.6 and 3.8).
"""

import atexit
import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time

# A fresh cache: a kernel found in Triton's cache is not re-assembled, and ptxas' report is then missing.
# It goes when the gate exits.
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="mlra-compile-gate-")
atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
for _name in ("TRITON_INTERPRET", "MLRA_AUTOTUNE", "MLRA_FWD_VARIANT"):
    os.environ.pop(_name, None)  # compiled kernels, the full config list, the launcher's own variant choice

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mlra_kernels.ops.mlra import launcher, tuning  # noqa: E402

ARCHS = (80, 90)
T, D, H = 1024, 768, 12  # GPT-2 small: d_h = 64
# (r, g): narrow latents per head, and wide shared ones. The backward at r = 192 is the same program as
# at r = 96 (R is a run-time int divisible by 16 and BLOCK_R = 64 for both); dedupe() compiles it once.
SHAPES = ((16, H), (96, 1), (192, 1))
# (dtype, bias, key padding), one per kept config in turn: every config with both dtypes and both flags
# would be 4× the compiles for a few registers' difference.
FLAGS = ((torch.bfloat16, True, False), (torch.float16, False, True), (torch.bfloat16, False, False),
         (torch.float16, True, True))
AUTOTUNED = ("_mlra_fwd_kernel", "_mlra_fwd_absorbed_kernel", "_mlra_bwd_dkdv_kernel", "_mlra_bwd_dq_kernel")
RECORDED = AUTOTUNED + ("_mlra_bwd_preprocess_kernel",)


def record_launches(K, call):
    """``[(kernel name, args, kwargs)]`` of every kernel launch ``call()`` makes; nothing runs."""
    seen = []
    for name in RECORDED:
        def run(*args, _name=name, grid=None, warmup=None, **kwargs):
            seen.append((_name, args, kwargs))

        getattr(K, name).run = run  # kernel[grid](...) calls self.run
    try:
        call()
    finally:
        for name in RECORDED:
            del getattr(K, name).run
    return seen


def gpt2_launches(K, r, g, dtype, bias, kpm):
    """The forward's and the backward's launches for one GPT-2 layer on CPU tensors."""
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(1, T, 3 * g * r, generator=gen).to(dtype)
    up = torch.randn(3, D, r, generator=gen).to(dtype)
    b = torch.randn(3 * D, generator=gen).to(dtype) if bias else None
    mask = torch.zeros(1, T) if kpm else None
    kw = dict(num_heads=H, latent_groups=g, causal=True, scale=0.125, dropout_p=0.0, seed=0)
    o, lse = torch.randn(1, T, D).to(dtype), torch.zeros(1, H, T)
    return record_launches(K, lambda: (launcher.mlra_fwd(c, up, b, mask, **kw),
                                       launcher.mlra_bwd_qkv(c, up, b, mask, o, lse, o.clone(), **kw)))


def specialise(fn, values):
    """``(signature, constexprs, attrs)`` for ASTSource, as Triton's launch binder derives them."""
    signature, constexprs, attrs = {}, {}, {}
    for i, kp in enumerate(fn.params):
        value = values[kp.name]
        if kp.is_constexpr:
            signature[kp.name], constexprs[kp.name] = "constexpr", value
            continue
        ty, key = native_specialize_impl(CUDABackend, value, kp.is_const, not kp.do_not_specialize,
                                         not kp.do_not_specialize_on_alignment)
        signature[kp.name] = ty
        if ty == "constexpr":  # an int equal to 1
            constexprs[kp.name] = key
        elif isinstance(key, str):
            attrs[(i,)] = CUDABackend.parse_attr(key)
    return signature, constexprs, attrs


def ptxas_report(log):
    """``(registers, spill store bytes, spill load bytes)`` from ptxas -v output, or None if it is absent."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        return None
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def compile_one(fn, values, arch, options):
    signature, constexprs, attrs = specialise(fn, values)
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    start = time.time()
    with contextlib.redirect_stdout(log):  # Triton prints ptxas' report when TRITON_DUMP_PTXAS_LOG is set
        out = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    report = ptxas_report(log.getvalue())
    ptx = out.asm["ptx"]
    return dict(
        cubin=bool(out.asm.get("cubin")), seconds=round(time.time() - start, 2),
        registers=report[0] if report else None, spill_stores=report[1] if report else None,
        spill_loads=report[2] if report else None, shared=out.metadata.shared,
        dot="tt.dot" in out.asm["ttir"], wgmma="wgmma" in ptx, cp_async="cp.async" in ptx,
    )


def jobs():
    """Every (kernel, arch, shape, flags, config) to compile, with the launch's argument values."""
    K = launcher.kernels()
    for arch in ARCHS:
        limit = tuning.arch_for(divmod(arch, 10))
        for r, g in SHAPES:
            for i_flags, (dtype, bias, kpm) in enumerate(FLAGS):
                launches = gpt2_launches(K, r, g, dtype, bias, kpm)
                for name, args, kwargs in launches:
                    kern = getattr(K, name)
                    fn = kern.fn if name in AUTOTUNED else kern
                    values = dict(zip(fn.arg_names, args), **kwargs)
                    row = dict(kernel=name, arch=arch, r=r, g=g, dtype=str(dtype).replace("torch.", ""),
                               bias=bias, kpm=kpm, smem_limit=limit.smem_optin)
                    if name not in AUTOTUNED:
                        if i_flags == 0:
                            yield fn, values, dict(row, config=None, smem_estimate=None), {}
                        continue
                    meta = dict(block_d=values["BLOCK_D"], block_r=values["BLOCK_R"], block_rf=values.get("BLOCK_RF", 0))
                    kept = tuning.prune(kern.early_config_prune.kernel, kern.configs, **meta,
                                        elem=c_elem(values), arch=limit)
                    for i_cfg, cfg in enumerate(kept):
                        if i_cfg % len(FLAGS) != i_flags:
                            continue
                        tiles = [cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages]
                        yield (fn, dict(values, **cfg.kwargs),
                               dict(row, config=tiles, smem_estimate=tuning.smem_bytes(kern.early_config_prune.kernel, cfg, **meta, elem=c_elem(values))),
                               dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def c_elem(values):
    return values["C"].element_size()


def dedupe_key(fn, values, arch, options):
    signature, constexprs, attrs = specialise(fn, values)
    return fn.__name__, arch, json.dumps([signature, constexprs, sorted(attrs.items()), options], default=str)


def main():
    print(json.dumps(dict(triton=triton.__version__, torch=torch.__version__)), flush=True)
    done = set()
    for fn, values, row, options in jobs():
        key = dedupe_key(fn, values, row["arch"], options)
        if key in done:
            continue
        done.add(key)
        row.update(compile_one(fn, values, row["arch"], options))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
