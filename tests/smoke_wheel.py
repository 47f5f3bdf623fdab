"""Smoke test of an installed mlra-kernels (a wheel) on the running torch, from outside the source tree.

    python tests/smoke_wheel.py [--source DIR ...] [--expect-torch 2.13]

Run it with the Python of the environment the wheel is installed in, from a folder that is not the source
checkout (with ``--source`` naming the checkout, it fails if the checkout's ``mlra_kernels`` is imported; with
``--expect-torch``, if the running torch is not that version). It checks, through the compiled extension
``mlra_kernels._C``:

- the build record: built on LibTorch's stable ABI, for a torch no newer than the running one's minimum;
- TEV: the C++ CPU kernel (``mlra::tev_partials``) against float64;
- a prefill: ``mlra_attention`` on CPU tensors against the float64 reference;
- a decode step through the C++ paths: ``mlra_decode`` on float32 CPU tensors takes the ``cpu-kernel`` path
  (``mlra::latent_decode_cpu``), and the whole-step op ``mlra::latent_decode_step_cpu`` (one token, and more
  than 16 rows, where it calls torch's batched GEMM), each against float64;
- ``torch.library.opcheck`` (all of its tests) of the three C++ ops, each with its fake kernel:
  ``mlra::tev_partials``, ``mlra::latent_decode_cpu`` and ``mlra::latent_decode_step_cpu`` (the last also
  checks that the step writes exactly ``k_cache``, ``v_cache`` and ``seqlens``).

Prints one line per check and exits 0 when all pass.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

os.environ.setdefault("TRITON_INTERPRET", "0")  # the CPU paths under test, not the Triton interpreter

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def check(what: str, ok: bool, detail: str = "") -> None:
    if not ok:
        raise AssertionError(f"{what}: {detail}")
    print(f"ok  {what}" + (f" ({detail})" if detail else ""), flush=True)


def close(got: torch.Tensor, ref: torch.Tensor, tol: float) -> tuple[bool, str]:
    err = (got.double() - ref.double()).abs().max().item()
    bound = tol * (1.0 + ref.double().abs().max().item())
    return err <= bound, f"max error {err:.2e}, bound {bound:.2e}"


def smoke_build(sources: list[str], expect_torch: str | None) -> None:
    import mlra_kernels
    from mlra_kernels import _ext, info

    where = pathlib.Path(mlra_kernels.__file__).resolve().parent
    for source in sources:
        package = (pathlib.Path(source) / "mlra_kernels").resolve()
        check(f"mlra_kernels is not the package of the source tree {source}", where != package, str(where))
    if expect_torch is not None:
        version = torch.__version__.split("+")[0]
        check(f"the running torch is {expect_torch}", (version + ".").startswith(expect_torch + "."),
              torch.__version__)
    rec = _ext.build_info_file()
    check("the build record says stable ABI", bool(rec and rec.get("stable_abi")),
          str({k: (rec or {}).get(k) for k in ("torch", "with_cuda", "nvcc", "torch_min", "python_abi")}))
    running, minimum = _ext._major_minor(torch.__version__), _ext._major_minor(rec["torch_min"])
    check("the running torch is one the build supports", running >= minimum,
          f"torch {torch.__version__}, built against {rec['torch']}, works with {rec['torch_min']} or newer")
    _ext.load()
    b = info.build_info()
    check("the extension loads", b["extension"] == "ok", b["extension"])


def smoke_tev() -> None:
    import mlra_kernels

    gen = torch.Generator().manual_seed(0)
    e = torch.randn(1000, 64, generator=gen) * (0.5 + torch.rand(1000, 1, generator=gen))
    for dtype in (torch.float32, torch.bfloat16):
        w = e.to(dtype)
        s = mlra_kernels.tev(w)
        ref = w.double().std(dim=1, unbiased=False)
        tol = 1e-9 if dtype == torch.float32 else 1e-7
        ok = abs(s.mean - ref.mean().item()) <= tol and abs(s.std - ref.std(unbiased=False).item()) <= tol
        check(f"tev {dtype}", ok, f"mean {s.mean:.9f} vs {ref.mean().item():.9f}")


def layer(d: int, H: int, g: int, r: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    down = torch.randn(3 * g * r, d, generator=gen, dtype=torch.float64) / d ** 0.5
    up = torch.randn(3, d, r, generator=gen, dtype=torch.float64) / r ** 0.5
    bias = torch.randn(3 * d, generator=gen, dtype=torch.float64) * 0.2
    w_o = torch.randn(d, d, generator=gen, dtype=torch.float64) / d ** 0.5
    b_o = torch.randn(d, generator=gen, dtype=torch.float64) * 0.2
    return gen, down, up, bias, w_o, b_o


def smoke_prefill() -> None:
    from mlra_kernels import kernel_path, mlra_attention
    from mlra_kernels.ops.mlra.reference import mlra_attention_reference

    B, T, d, H, g, r = 2, 24, 64, 4, 2, 16
    gen, down, up, bias, _, _ = layer(d, H, g, r, seed=1)
    x = torch.randn(B, T, d, generator=gen, dtype=torch.float64)
    ref = mlra_attention_reference(x, down, up, bias, num_heads=H, latent_groups=g, causal=True)
    xf = x.float()
    out = mlra_attention(xf, down.float(), up.float(), bias.float(), num_heads=H, latent_groups=g, causal=True)
    ok, detail = close(out, ref, 1e-4)
    check(f"prefill mlra_attention on the CPU, path {kernel_path(xf, rank=r, head_dim=d // H)}", ok, detail)


def smoke_decode() -> None:
    from mlra_kernels import kernel_path, mlra_decode
    from mlra_kernels.ops.mlra import kv_latents
    from mlra_kernels.ops.mlra.reference import mlra_attention_reference
    from mlra_kernels.ops.mlra.step_weights import step_weights

    # mlra_decode: the new token of each sequence over a latent cache, through the C++ split-KV kernel.
    B, S, d, H, g, r = 2, 40, 64, 4, 2, 16
    gen, down, up, bias, w_o, b_o = layer(d, H, g, r, seed=2)
    seq = torch.randn(B, S, d, generator=gen, dtype=torch.float64)
    ref = mlra_attention_reference(seq, down, up, bias, num_heads=H, latent_groups=g, causal=True)[:, -1:]
    x = seq[:, -1:].float()
    path = kernel_path(x, op="decode")
    check("mlra_decode on float32 CPU tensors takes the C++ kernel", path == "cpu-kernel", path)
    c_k, c_v = kv_latents(seq.float(), down.float(), g, group_major=True)
    out, _ = mlra_decode(x, down.float(), up.float(), bias.float(), cache_k=c_k, cache_v=c_v, num_heads=H,
                         latent_groups=g)
    ok, detail = close(out, ref, 1e-4)
    check("decode step: mlra_decode (mlra::latent_decode_cpu)", ok, detail)

    # The whole step on pre-multiplied weights, as GPT-2's generate runs it: one token per sequence, then
    # 3 sequences of 6 tokens (18 rows: torch's batched GEMM inside the op).
    w = step_weights(down.float(), up.float(), bias.float(), w_o.float(), b_o.float(), num_heads=H, latent_groups=g)
    for B, t, pos in ((2, 1, 30), (3, 6, 20)):
        seq = torch.randn(B, pos + t, d, generator=gen, dtype=torch.float64)
        ref = F.linear(mlra_attention_reference(seq, down, up, bias, num_heads=H, latent_groups=g, causal=True)
                       [:, -t:], w_o, b_o)
        cap = pos + t + 5
        k_cache, v_cache = torch.zeros(B, g, cap, r), torch.zeros(B, g, cap, r)
        c_k, c_v = kv_latents(seq[:, :pos].float(), down.float(), g, group_major=True)
        k_cache[:, :, :pos], v_cache[:, :, :pos] = c_k, c_v
        seqlens = torch.full((B,), pos, dtype=torch.int32)
        out = torch.ops.mlra.latent_decode_step_cpu(seq[:, pos:].float(), w.w_in, w.b_in, w.m, w.beta, w.w_v, w.b_v,
                                                    w.w_out, w.b_out, k_cache, v_cache, seqlens, pos, H,
                                                    1 / (d // H) ** 0.5)
        ok, detail = close(out, ref, 3e-4)
        ok = ok and bool((seqlens == pos + t).all())
        check(f"decode step: mlra::latent_decode_step_cpu, {B * t} rows", ok, detail + f", seqlens {seqlens.tolist()}")


def smoke_opcheck() -> None:
    from mlra_kernels.ops.mlra.step_weights import step_weights
    from mlra_kernels.ops.tev.op import ensure_loaded

    ensure_loaded()  # the fake kernel of mlra::tev_partials
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(300, 48, generator=gen)
    torch.library.opcheck(torch.ops.mlra.tev_partials.default, (w, None, True))
    torch.library.opcheck(torch.ops.mlra.tev_partials.default, (w.bfloat16()[:, 5:], torch.tensor([3, 1, 299]), False))
    check("opcheck mlra::tev_partials (all tests)", True)

    B, g, M, S, r = 2, 2, 4, 50, 16
    q, k, v = (torch.randn(B, g, n, r, generator=gen) for n in (M, S, S))
    lengths = torch.tensor([50, 30], dtype=torch.int32)
    kpm = torch.zeros(B, S)
    kpm[1, 3] = float("-inf")
    result = torch.library.opcheck(torch.ops.mlra.latent_decode_cpu.default, (q, k, v, kpm, lengths, 1, True, 0.25))
    check("opcheck mlra::latent_decode_cpu (all tests)", set(result.values()) == {"SUCCESS"}, str(result))

    H, d, cap, pos = 4, 64, 20, 7
    down, up = torch.randn(3 * g * r, d, generator=gen) * 0.1, torch.randn(3, d, r, generator=gen) * 0.1
    sw = step_weights(down, up, torch.randn(3 * d, generator=gen) * 0.1, torch.randn(d, d, generator=gen) * 0.1,
                      torch.randn(d, generator=gen) * 0.1, num_heads=H, latent_groups=g)
    args = (torch.randn(B, 1, d, generator=gen), sw.w_in, sw.b_in, sw.m, sw.beta, sw.w_v, sw.b_v, sw.w_out, sw.b_out,
            torch.randn(B, g, cap, r, generator=gen), torch.randn(B, g, cap, r, generator=gen),
            torch.full((B,), pos, dtype=torch.int32), pos, H, 0.25)
    result = torch.library.opcheck(torch.ops.mlra.latent_decode_step_cpu.default, args)
    check("opcheck mlra::latent_decode_step_cpu (all tests)", set(result.values()) == {"SUCCESS"}, str(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", action="append", default=[],
                        help="a source checkout, which mlra_kernels must not be imported from (repeatable)")
    parser.add_argument("--expect-torch", help="the torch version (major.minor or more) that must be running")
    args = parser.parse_args(argv)
    import mlra_kernels

    print(f"mlra-kernels {mlra_kernels.__version__} from {pathlib.Path(mlra_kernels.__file__).parent} on torch "
          f"{torch.__version__}, Python {sys.version.split()[0]}", flush=True)
    smoke_build(args.source, args.expect_torch)
    smoke_tev()
    smoke_prefill()
    smoke_decode()
    smoke_opcheck()
    print(f"smoke test passed on torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
