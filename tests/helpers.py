"""Helpers shared by the tests: the repository root, MLRA inputs, and the tolerance rule.

Tolerance: for the output and every gradient, the kernel's error against float64 must stay within
3x the error of the same reference computed by torch in the kernel's dtype, plus one ulp of the
largest value (so that float32 cases, where torch is nearly exact, still have a finite bar). For the
gradients, that ulp is scaled by (1 + the score's magnitude s · Σ_c |q_c|·|k_c|, the standard bound
of a dot product's rounding): the backward recomputes the probabilities as exp(s - lse) from scores
recomputed in another order (or, after the absorbed forward, in another algebra) than the forward's,
so that rounding becomes a relative error of P that torch's softmax backward, which reuses P, lacks.

``assert_within_torch_error`` is the same rule for one output, without the recompute term.
"""

import gc
import math
import os
import pathlib
import subprocess
import sys

import torch
import torch.distributed as dist

from mlra_kernels.ops.mlra import mlra_decode, use_backend
from mlra_kernels.ops.mlra.layout import kv_latents
from mlra_kernels.ops.mlra.reference import mlra_qkv_reference

REPO = pathlib.Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_inputs(B, T, H, g, r, dh, *, bias=True, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    d = H * dh
    x = torch.randn(B, T, d, generator=gen, dtype=torch.float64)
    down = torch.randn(3 * g * r, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    up = torch.randn(3, d, r, generator=gen, dtype=torch.float64) / math.sqrt(r)
    b = torch.randn(3 * d, generator=gen, dtype=torch.float64) * 0.2 if bias else None
    go = torch.randn(B, T, d, generator=gen, dtype=torch.float64)
    return [t.to(device) if t is not None else None for t in (x, down, up, b, go)]


def key_padding(kind, B, T, device=DEVICE, seed=1):
    if kind is None:
        return None
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        return (torch.rand(B, T, generator=gen) < 0.3).to(device)
    if kind == "left":  # left padding: under causal masking the first rows see no key at all
        lens = torch.randint(1, T + 1, (B,), generator=gen)
        return (torch.arange(T)[None, :] < (T - lens)[:, None]).to(device)
    if kind == "float":
        m = torch.randn(B, T, generator=gen, dtype=torch.float64)
        return m.masked_fill(torch.rand(B, T, generator=gen) < 0.2, float("-inf")).to(device)
    raise ValueError(kind)


def run_case(fn, inputs, dtype, go, kpm, **kw):
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in inputs]
    if kpm is not None and kpm.dtype != torch.bool:
        kpm = kpm.to(dtype)
    x = leaves[0]
    if kw.pop("noncontiguous", False):
        x = x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
        leaves[0] = x
        assert not x.is_contiguous()
    out = fn(x, leaves[1], leaves[2], leaves[3], key_padding_mask=kpm, **kw)
    live = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, live, go.to(dtype))
    return [out] + list(grads)


def max_abs_score(x, down, up, bias, *, num_heads, latent_groups=1, scale=None, **_):
    """The largest ``s · Σ_c |q_c|·|k_c|`` of the exact inputs: the scale of a score's rounding, for the
    recompute term in ``assert_close_rel``."""
    q, k, _ = mlra_qkv_reference(x, down, up, bias, num_heads=num_heads, latent_groups=latent_groups)
    s = scale if scale is not None else q.shape[-1] ** -0.5
    return (s * q.abs() @ k.abs().transpose(-1, -2)).max().item()


def assert_close_rel(name, got, low, exact, score_max=0.0):
    """``score_max``: the largest |score| (``max_abs_score``), for gradients of the lse-recompute backward."""
    ulp = torch.finfo(low.dtype).eps
    got, low, exact = got.double(), low.double(), exact.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an element never written?)"
    err = (got - exact).abs().max().item()
    torch_err = (low - exact).abs().max().item()
    bound = 3.0 * torch_err + ulp * (1.0 + score_max) * exact.abs().max().item()
    assert err <= bound, f"{name}: kernel error {err:.3e} > bound {bound:.3e} (torch's own error {torch_err:.3e})"


def assert_within_torch_error(got, low, exact, what="error"):
    """``got``'s error against ``exact`` within 3x torch's own (``low``) plus one ulp of the largest value."""
    ulp = torch.finfo(low.dtype).eps
    err = (got.double() - exact.double()).abs().max().item()
    torch_err = (low.double() - exact.double()).abs().max().item()
    bound = 3.0 * torch_err + ulp * exact.abs().max().item()
    assert err <= bound, f"{what} {err:.3e} > bound {bound:.3e} (torch's own {torch_err:.3e})"


def run_compiler_subprocess(args: list, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python ARGS`` in a subprocess with Triton's real compiler (``TRITON_INTERPRET`` unset) and the
    repository on the path, for the compile gates: skips when Triton or its NVIDIA backend is missing;
    fails with the output's tail when the script does."""
    import pytest

    pytest.importorskip("triton")
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the Triton build
        pytest.skip(f"Triton has no NVIDIA backend here: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def decode_case(B, t, S, H, g, r, dh, *, lengths=None, seed=0):
    """float64 ``(x [B, t, d], down, up, bias, c_K, c_V [B, g, S, r])``: the caches hold the latents of a
    random sequence of ``S`` tokens; ``x`` are its tokens at ``L_b - t .. L_b - 1``."""
    gen = torch.Generator().manual_seed(seed)
    d = H * dh
    seq = torch.randn(B, S, d, generator=gen, dtype=torch.float64)
    down = torch.randn(3 * g * r, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    up = torch.randn(3, d, r, generator=gen, dtype=torch.float64) / math.sqrt(r)
    bias = torch.randn(3 * d, generator=gen, dtype=torch.float64) * 0.2
    c_k, c_v = kv_latents(seq, down, g, group_major=True)
    ends = lengths.tolist() if lengths is not None else [S] * B
    x = torch.stack([seq[b, e - t:e] for b, e in enumerate(ends)])
    return x, down, up, bias, c_k.contiguous(), c_v.contiguous()


def padding(B, S, kind, lengths=None, seed=1):
    """Decode tests' key padding ``[B, S]``, leaving each sequence's last position (its newest token) unmasked."""
    if kind is None:
        return None
    gen = torch.Generator().manual_seed(seed)
    hit = torch.rand(B, S, generator=gen) < 0.3
    last = (lengths if lengths is not None else torch.full((B,), S)) - 1
    hit[torch.arange(B), last] = False
    if kind == "bool":
        return hit
    return torch.randn(B, S, generator=gen, dtype=torch.float64).masked_fill(hit, float("-inf"))


# Decode shapes (B, t, S, H, g, r, d_h) both decode kernels are checked on: g = 1 and g = H, S = 1, S not a
# multiple of a key tile, widths not a multiple of 8, several new tokens.
DECODE_SHAPES = {
    "g1-B1-S1": (1, 1, 1, 4, 1, 16, 16),
    "g1-B2-S37": (2, 1, 37, 4, 1, 24, 16),
    "gH-B3-S70": (3, 1, 70, 4, 4, 8, 16),
    "g1-H12-S130": (2, 1, 130, 12, 1, 48, 8),
    "g2-t3-S45": (2, 3, 45, 4, 2, 16, 16),
    "gH-t2-S33": (1, 2, 33, 2, 2, 16, 32),
}


def run_decode(path, dtype, case, *, H, g, kpm=None, lengths=None, token_major=False, causal=True, device=DEVICE):
    """``mlra_decode`` of a :func:`decode_case` on ``path`` (forced with ``use_backend``) in ``dtype``."""
    x, down, up, bias, c_k, c_v = (t.to(device, dtype) for t in case)
    if token_major:  # [B, S, g·r], read through a strided view
        B, _, S, r = c_k.shape
        c_k, c_v = (c.transpose(1, 2).reshape(B, S, g * r) for c in (c_k, c_v))
    if kpm is not None:
        kpm = kpm.to(device) if kpm.dtype == torch.bool else kpm.to(device, dtype)
    with use_backend(path), torch.no_grad():
        out, _ = mlra_decode(x, down, up, bias, cache_k=c_k, cache_v=c_v, num_heads=H, latent_groups=g,
                             key_padding_mask=kpm, cache_seqlens=lengths.to(device) if lengths is not None else None,
                             causal=causal)
    return out


def need_cpu_decode_kernel():
    """Skip unless a float32 CPU decode step takes the C++ kernel (the path on which a layer's step runs
    on its step weights): it does whenever the extension is built, as the test command builds it."""
    import pytest

    from mlra_kernels.ops.mlra import kernel_path

    path = kernel_path(torch.zeros(1, 1, 32), op="decode", requires_grad=False)
    if path != "cpu-kernel":
        pytest.skip(f"a float32 CPU decode step takes {path!r} here, not the C++ kernel (is the extension built?)")


def run_example(code: str, what: str, folder) -> None:
    """Run a documentation example as a user would: a fresh interpreter in an empty ``folder``, the package
    importable from the checkout, Triton in its default mode; skip one that needs transformers without it."""
    import importlib.util

    import pytest

    if "transformers" in code and importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (pip install '.[transformers]')")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TRITON_INTERPRET", None)  # as a user runs them (the kernel tests set it for themselves)
    proc = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{what} example failed:\n{code}\n--- stderr ---\n{proc.stderr[-3000:]}"


def package_crossings(fn, caller: str, callee: str = "ops"):
    """Run ``fn()`` under a ``sys.setprofile`` hook; returns ``(areas, calls)``: the sequence of the package
    areas ``caller`` and ``callee`` (folders of ``mlra_kernels``, e.g. ``"models"`` and ``"ops"``) whose Python
    code ran, each stay counted once, and the number of calls made from ``caller`` code straight into
    ``callee`` code."""
    root = pathlib.Path(__file__).resolve().parents[1] / "mlra_kernels"
    prefixes = {area: str(root / area) + os.sep for area in (caller, callee)}
    areas, calls = [], [0]

    def area_of(frame):
        name = frame.f_code.co_filename if frame is not None else ""
        return next((area for area, prefix in prefixes.items() if name.startswith(prefix)), None)

    def hook(frame, event, arg):
        if event != "call":
            return
        here = area_of(frame)
        if here is None:
            return
        if not areas or areas[-1] != here:
            areas.append(here)
        if here == callee and area_of(frame.f_back) == caller:
            calls[0] += 1

    sys.setprofile(hook)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return areas, calls[0]


def gloo_worker(rank: int, body, world: int, init_file: str, *args) -> None:
    """An ``mp.spawn`` worker: ``body(rank, world, *args)`` in a gloo process group (file init). Once the
    body has returned, the ranks meet at a barrier, and everything the body made is freed, reference
    cycles too, before the group is destroyed: a module or mesh that held the group until interpreter exit would tear
    gloo's threads down there, which aborts the process ("terminate called without an active exception").
    A body that raised skips the barrier (the other ranks may never reach it), and its traceback keeps its
    objects alive: the test fails on the exception either way."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        body(rank, world, *args)
        dist.barrier()  # every rank done before any tears its process group down
    finally:
        gc.collect()
        dist.destroy_process_group()
        gc.collect()
