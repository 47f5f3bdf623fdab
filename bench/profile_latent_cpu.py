"""Where the CPU latent path's forward+backward spends its time (torch.profiler), at the CPU benchmark's
narrow row that misses 1.5x: GPT-2 small's width, T = 1024, B = 2, g = H = 12, r = 32, fp32.

    python bench/profile_latent_cpu.py      # from the checkout root: writes bench/results/profile_latent_cpu.json

Rows: the median of 7 round-by-round timings of ours and of unfused MLRA, then ours' profiled self time
(3 steps, per step) in the latent GEMMs (aten::mm), torch's fused CPU attention (forward and backward),
and everything else.
"""

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from mlra_kernels.benchmarks.common import script_default_out, write_results  # noqa: E402
from mlra_kernels.benchmarks.mlra import unfused_mlra  # noqa: E402
from mlra_kernels.ops.mlra import config, kernel_path, mlra_attention  # noqa: E402

B, T, d, H, g, r, STEPS, ROUNDS = 2, 1024, 768, 12, 12, 32, 3, 7


def main() -> int:
    if config.interpret_requested():
        raise SystemExit("profile_latent_cpu.py profiles the CPU path: unset TRITON_INTERPRET (it would run the "
                         "Triton interpreter)")
    torch.manual_seed(0)
    x = torch.randn(B, T, d, requires_grad=True)
    down = (torch.randn(3 * g * r, d) / d ** 0.5).requires_grad_()
    up = (torch.randn(3, d, r) / r ** 0.5).requires_grad_()
    bias = (torch.randn(3 * d) * 0.1).requires_grad_()
    go = torch.randn(B, T, d)
    leaves = [x, down, up, bias]
    fns = {"ours": lambda: mlra_attention(x, down, up, bias, num_heads=H, latent_groups=g, causal=True),
           "unfused": lambda: unfused_mlra(x, down, up, bias, H, g)}

    def step(f):
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        f().backward(go)
        return (time.perf_counter() - t0) * 1e3

    for f in fns.values():
        step(f)
    ms = {k: [] for k in fns}
    for _ in range(ROUNDS):
        for k, f in fns.items():
            ms[k].append(step(f))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(STEPS):
            step(fns["ours"])
    parts = {"latent GEMMs (aten::mm)": 0.0, "fused CPU attention": 0.0, "everything else": 0.0}
    for e in prof.key_averages():
        if e.key == "aten::mm":
            part = "latent GEMMs (aten::mm)"
        elif e.key.startswith("aten::_scaled_dot_product_flash_attention_for_cpu"):
            part = "fused CPU attention"
        else:
            part = "everything else"
        parts[part] += e.self_cpu_time_total / 1e3 / STEPS
    path_name = kernel_path(x, rank=r, head_dim=d // H)
    rows = [{"op": "fwd+bwd", "variant": k, "path": path_name if k == "ours" else None, "B": B, "T": T, "d": d,
             "H": H, "g": g, "r": r, "dtype": "float32", "ms": sorted(v)[len(v) // 2]} for k, v in ms.items()]
    rows += [{"op": "profile", "variant": "ours", "part": k, "ms_per_step": v, "steps": STEPS} for k, v in parts.items()]
    for row in rows:
        print(row)
    # From the checkout root: bench/results, the committed result; elsewhere ./bench/results there, a file
    # git tracks refused.
    print(f"wrote {write_results('profile_latent_cpu', rows, out_dir=script_default_out(__file__))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
