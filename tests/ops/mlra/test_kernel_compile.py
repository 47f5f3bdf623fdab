"""The MLRA kernels compile for real GPUs (sm_80, sm_90) without one.

The interpreter runs the kernels' arithmetic but not Triton's compiler, which has its own rules
(``tl.dot`` shapes, constexpr branches, register-level types). This test compiles every kernel down
to a cubin in a subprocess without ``TRITON_INTERPRET``, for a few configs covering the constexpr
switches. It needs Triton's NVIDIA backend and its bundled ptxas, not a GPU.

The gate (``compile_gate.py``) then compiles every config the pruner keeps at GPT-2 keys with the
specialisation hints a real launch gives, and checks ptxas' spills, wgmma on sm_90 and shared memory.
Without those hints Triton pipelines no load and ptxas reports spills that real launches do not have,
so only the gate's figures are judged.
"""

import pathlib
import textwrap

import pytest

from tests.helpers import run_compiler_subprocess

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
        # (GPT-2 keys are compiled by the gate below, with a real launch's hints; these cover the rest.)
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
    proc = run_compiler_subprocess(["-c", SCRIPT])
    assert proc.stdout.count("compiled") == 10


# The Triton each torch stack is tested with; the gate's exact expectations (spills, wgmma, shared memory)
# hold for these compilers. Another Triton still compiles everything; its findings are reported in a skip.
PINNED_TRITON = {(2, 11): (3, 6), (2, 14): (3, 8)}
GATE = ROOT / "tests" / "ops" / "mlra" / "compile_gate.py"


def _major_minor(version):
    return tuple(int(x) for x in version.split("+")[0].split(".")[:2])


@pytest.fixture(scope="module")
def gate():
    """The compile gate's rows (one per compiled kernel and config), its first line the versions."""
    proc = run_compiler_subprocess([str(GATE)])
    import json

    versions, *rows = [json.loads(line) for line in proc.stdout.splitlines()]
    return versions, rows


def _name(row):
    return f"{row['kernel']} sm_{row['arch']} r={row['r']} {row['dtype']} config={row['config']}"


def _problems(rows):
    """What breaks the gate's expectations, one line per compiled kernel that does."""
    out = []
    for row in rows:
        if row["spill_stores"] is None:
            out.append(f"{_name(row)}: no ptxas report (was it taken from Triton's cache?)")
        elif row["spill_stores"] or row["spill_loads"]:
            out.append(f"{_name(row)}: spills {row['spill_stores']} B stored, {row['spill_loads']} B loaded")
        if row["arch"] == 90 and row["dot"] and not row["wgmma"]:
            out.append(f"{_name(row)}: matrix products without wgmma")
        if row["shared"] > row["smem_limit"]:
            out.append(f"{_name(row)}: {row['shared']} B shared memory over the {row['smem_limit']} B limit")
        if row["smem_estimate"] is not None and row["shared"] > row["smem_estimate"]:
            out.append(f"{_name(row)}: {row['shared']} B shared memory over the pruner's bound {row['smem_estimate']}")
        if row["config"] and row["config"][3] > 1 and not row["cp_async"]:
            out.append(f"{_name(row)}: {row['config'][3]} stages but no cp.async: the launch hints were not applied")
    return out


def test_gate_compiles_every_kept_config_for_each_architecture(gate):
    _, rows = gate
    assert all(row["cubin"] for row in rows)
    for arch in (80, 90):
        kernels = {row["kernel"] for row in rows if row["arch"] == arch}
        assert kernels == {"_mlra_fwd_kernel", "_mlra_fwd_absorbed_kernel", "_mlra_bwd_dkdv_kernel",
                           "_mlra_bwd_dq_kernel", "_mlra_bwd_preprocess_kernel"}, arch
        assert {row["r"] for row in rows if row["arch"] == arch and row["config"]} == {16, 96, 192}


def test_gate_no_spills_wgmma_on_hopper_shared_memory_within_limits(gate):
    versions, rows = gate
    torch_mm, triton_mm = _major_minor(versions["torch"]), _major_minor(versions["triton"])
    problems = _problems(rows)
    found = "; ".join(problems) or f"all {len(rows)} compiles meet them"
    pinned = PINNED_TRITON.get(torch_mm)
    if pinned != triton_mm:
        expected = f"Triton {pinned[0]}.{pinned[1]}.x" if pinned else "no Triton (torch not in PINNED_TRITON)"
        pytest.skip(f"torch {versions['torch']} pins {expected}, found Triton {versions['triton']}: the exact "
                    f"expectations are not judged on this compiler. Found: {found}")
    assert not problems, "\n".join(problems)
