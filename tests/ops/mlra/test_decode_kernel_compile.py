"""The split-KV decode kernels compile for real GPUs (sm_80, sm_90) without one, with zero spills.

Like ``test_kernel_compile.py``: a subprocess without ``TRITON_INTERPRET`` compiles each kernel to a cubin
for the configs ``decode_kernels.block_sizes`` picks at GPT-2 small keys (d = 768, H = 12: r = 192 with
g = 1, r = 16 with g = 12), with the specialisation a real launch gets (16-byte-aligned pointers, the
integer arguments divisible by 16 marked so, ``t = 1`` a constant), then runs the bundled ptxas with
``-v`` on the PTX to read the spill bytes, which the compiled kernel reports only once a GPU loads it.
"""

import textwrap


from tests.helpers import run_compiler_subprocess


SCRIPT = textwrap.dedent(
    """
    import os, re, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mlra_kernels.ops.mlra import launcher
    from mlra_kernels.ops.mlra.backend import triton_interpreted

    K = launcher.kernels("decode_kernels")
    assert not triton_interpreted()
    POINTERS_OF_DTYPE = ("Q", "K", "V", "Z")
    POINTERS_FP32 = ("KPM", "O_PART", "LSE_PART")

    def ptxas_path(arch):
        try:
            from triton.backends.nvidia.compiler import get_ptxas
            return get_ptxas(arch).path
        except Exception:
            import triton.backends.nvidia as nv
            return os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")

    def spills(ptx, arch):
        gpu = re.search(r"^\\.target\\s+(\\w+)", ptx, re.M).group(1)
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "k.ptx")
            open(src, "w").write(ptx)
            log = subprocess.run([ptxas_path(arch), "-v", f"--gpu-name={gpu}", src, "-o", src + ".o"],
                                 capture_output=True, text=True, check=True)
        text = log.stdout + log.stderr
        found = [int(n) for n in re.findall(r"(\\d+) bytes spill (?:stores|loads)", text)]
        assert found, text
        regs = re.findall(r"Used (\\d+) registers", text)
        return sum(found), regs

    def compile_kernel(kern, arch, dtype, ints, consts, warps, stages):
        fn = kern if hasattr(kern, "arg_names") else kern.fn  # a JITFunction, or an autotuner around one
        sig, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                sig[name] = "constexpr"
            elif name in POINTERS_OF_DTYPE:
                sig[name] = "*" + dtype
            elif name in POINTERS_FP32:
                sig[name] = "*fp32"
            elif name == "LENS":
                sig[name] = "*i32"  # the launcher passes int32 lengths
            elif name == "qk_scale":
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
            # What the JIT would mark: aligned pointers, integers divisible by 16 (not S: do_not_specialize).
            if sig[name].startswith("*") or (name in ints and name != "S" and ints[name] % 16 == 0):
                attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
        out = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
        assert out.asm.get("cubin"), fn.__name__
        n, regs = spills(out.asm["ptx"], arch)
        assert n == 0, f"{fn.__name__} sm_{arch} {dtype} {consts}: {n} bytes of spills (registers {regs})"
        print("compiled", fn.__name__, arch, dtype, consts["BLOCK_R"], "regs", regs, flush=True)

    S = 1024
    cases = [
        # arch, dtype, H, g, r, t, causal/kpm/lens
        (90, "bf16", 12, 1, 192, 1, True),
        (90, "fp16", 12, 12, 16, 1, False),
        (80, "bf16", 12, 1, 192, 1, False),
        (80, "fp16", 12, 12, 16, 1, True),
        (90, "bf16", 12, 1, 192, 4, True),
        (90, "fp32", 12, 12, 16, 3, True),
    ]
    for arch, dtype, H, g, r, t, masks in cases:
        M = H // g * t
        b = K.block_sizes(M, r)
        ints = dict(stride_qb=g * M * r, stride_qg=M * r, stride_qm=r, stride_kb=g * S * r, stride_kg=S * r,
                    stride_ks=r, stride_vb=g * S * r, stride_vg=S * r, stride_vs=r, stride_pb=S,
                    stride_zb=g * M * r, stride_zg=M * r, stride_zm=r, G=g, M=M, R=r, S=S, SPLIT_LEN=256)
        for direct in (True, False):
            consts = dict(CAUSAL=masks and t > 1, HAS_KPM=masks, HAS_LENS=masks, DIRECT=direct,
                          PREC="ieee" if dtype == "fp32" else "tf32", UPCAST=False,
                          BLOCK_M=b["BLOCK_M"], BLOCK_N=b["BLOCK_N"], BLOCK_R=b["BLOCK_R"])
            if t == 1:
                consts["T_NEW"] = 1  # the JIT makes an integer argument equal to 1 a constant
            else:
                ints["T_NEW"] = t
            if g == 1:
                consts["G"] = 1
                ints.pop("G", None)
            compile_kernel(K._mlra_decode_fwd_kernel, arch, dtype, ints, consts, b["num_warps"], b["num_stages"])
        consts = dict(BLOCK_M=b["BLOCK_M"], BLOCK_R=b["BLOCK_R"])
        compile_kernel(K._mlra_decode_merge_kernel, arch, dtype, dict(ints, N_SPLITS=4), consts, 4, 2)
    """
)


def test_decode_kernels_compile_without_spills():
    proc = run_compiler_subprocess(["-c", SCRIPT])
    assert proc.stdout.count("compiled") == 18, proc.stdout
