"""The MLRA kernels compile for real GPUs (sm_80, sm_90) without one.

The interpreter runs the kernels' arithmetic but not Triton's compiler, which has its own rules
(``tl.dot`` shapes, constexpr branches, register-level types). This test compiles every kernel down
to a cubin in a subprocess without ``TRITON_INTERPRET``, for a few configs covering the constexpr
switches. It needs Triton's NVIDIA backend and its bundled ptxas, not a GPU.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]

SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mlra_kernels.ops.mlra import launcher
    from mlra_kernels.ops.mlra.backend import triton_interpreted

    K = launcher.kernels()
    assert not triton_interpreted()

    def pow2(n):
        return max(16, 1 << (n - 1).bit_length())

    def signature(fn, dtype, consts):
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name in ("C", "UP", "BIAS", "O", "DO", "DQKV"):
                sig[name] = "*" + dtype
            elif name in ("KPM", "LSE", "DELTA"):
                sig[name] = "*fp32"
            elif name in ("scale", "dropout_p"):
                sig[name] = "fp32"
            elif name == "seed":
                sig[name] = "i64"
            else:
                sig[name] = "i32"
        return sig

    cases = [
        # arch, dtype, d_h, r, causal, bias, kpm, dropout, BM, BN, warps, stages
        (90, "bf16", 64, 96, True, True, True, False, 128, 64, 8, 3),
        (80, "fp16", 48, 8, False, False, False, True, 64, 32, 4, 2),
        (90, "fp32", 80, 40, True, True, False, True, 32, 32, 4, 1),
    ]
    for arch, dtype, dh, r, causal, bias, kpm, dropout, bm, bn, warps, stages in cases:
        consts = dict(
            CAUSAL=causal, HAS_BIAS=bias, HAS_KPM=kpm, DROPOUT=dropout,
            PREC="ieee" if dtype == "fp32" else "tf32", UPCAST=False,
            BLOCK_D=pow2(dh), BLOCK_R=min(64, pow2(r)), BLOCK_M=bm, BLOCK_N=bn,
        )
        kernels = [K._mlra_fwd_kernel, K._mlra_bwd_dkdv_kernel, K._mlra_bwd_dq_kernel, K._mlra_fwd_absorbed_kernel]
        for kern in kernels:
            fn = kern.fn
            c = dict(consts, BLOCK_RF=pow2(r)) if "BLOCK_RF" in fn.arg_names else consts
            src = ASTSource(fn, signature(fn, dtype, c), constexprs=c)
            out = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
            assert out.asm.get("cubin"), fn.__name__
            print("compiled", fn.__name__, arch, dtype, dh, r, flush=True)
        fn = K._mlra_bwd_preprocess_kernel
        c = dict(BLOCK_M=64, BLOCK_D=pow2(dh))
        triton.compile(ASTSource(fn, signature(fn, dtype, c), constexprs=c), target=GPUTarget("cuda", arch, 32))
        print("compiled", fn.__name__, arch, dtype, dh, flush=True)
    """
)


def test_kernels_compile_to_cubin():
    pytest.importorskip("triton")
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the Triton build
        pytest.skip(f"Triton has no NVIDIA backend here: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("compiled") == 15
