"""The CPU ops under AddressSanitizer and UndefinedBehaviorSanitizer, on random and invalid inputs.

    .venv/bin/python tests/sanitize/fuzz_ops.py [--calls 2000] [--seed 0] [--build-dir build/sanitize]

Builds the ``[cpu]`` sources of ``csrc/sources.txt`` with ``-fsanitize=address,undefined`` into
``--build-dir`` (never over ``mlra_kernels/_C``) and calls ``mlra::tev_partials``, ``mlra::latent_decode_cpu``
and ``mlra::latent_decode_step_cpu`` on random shapes, strides, dtypes, lengths, positions and optional
operands, each result checked against plain torch in float64, and on invalid inputs, each of which must
raise a RuntimeError (and leave the step's caches and seqlens as they were). The calls run in a child
process that preloads libasan (Python is not built with it) and libstdc++ (so that ASan finds
``__cxa_throw`` before the first C++ exception), loads the sanitized library with ``torch.ops.load_library``
and never imports ``mlra_kernels`` (its ``_C`` registers the same ops). Any sanitizer report stops the
child (halt_on_error); the exit status is 0 only when every call passed and nothing was reported.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import random
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHILD = "MLRA_SANITIZE_CHILD"
FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
REPORTS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer", "SUMMARY: UndefinedBehaviorSanitizer")


def cpu_sources(csrc: pathlib.Path) -> list[str]:
    """The [cpu] section of csrc/sources.txt (as setup.py reads it), as absolute paths."""
    out, section = [], None
    for raw in (csrc / "sources.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and section == "cpu":
            out.append(str(csrc / line))
    return out


def runtime_library(compiler: str, name: str) -> str:
    path = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True,
                          check=True).stdout.strip()
    real = os.path.realpath(path)
    if not os.path.isabs(path) or not os.path.exists(real):
        raise SystemExit(f"{compiler} does not know where {name} is (got {path!r}); install its sanitizer runtime")
    return real


def run_parent(argv: list[str]) -> int:
    """Start the child with the sanitizer runtimes preloaded; fail on its exit status or on any report."""
    compiler = os.environ.get("CXX", "c++")  # the compiler torch's build uses: its runtime must match
    env = dict(os.environ)
    env[CHILD] = "1"
    env["LD_PRELOAD"] = " ".join([runtime_library(compiler, "libasan.so"), runtime_library(compiler, "libstdc++.so")]
                                 + env.get("LD_PRELOAD", "").split())
    env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86:" + env.get("ASAN_OPTIONS", "")
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:" + env.get("UBSAN_OPTIONS", "")
    proc = subprocess.Popen([sys.executable, __file__, *argv], env=env, stderr=subprocess.PIPE, text=True,
                            errors="replace")
    reported = False
    for line in proc.stderr:
        sys.stderr.write(line)
        reported = reported or any(r in line for r in REPORTS)
    rc = proc.wait()
    if reported or rc != 0:
        print(f"sanitize: FAILED (exit status {rc}{', sanitizer report above' if reported else ''})", file=sys.stderr)
        return rc or 1
    return 0


# --- the child: build, load, fuzz ------------------------------------------------------------------------


def torch_target_define() -> str:
    """-DTORCH_TARGET_VERSION for setup.py's TORCH_MIN, as setup.py builds _C (the sources are on LibTorch's
    stable ABI and refuse to build without it)."""
    found = re.search(r'^TORCH_MIN = "(\d+)\.(\d+)"$', (ROOT / "setup.py").read_text(), re.M)
    assert found, "setup.py: no TORCH_MIN"
    major, minor = int(found.group(1)), int(found.group(2))
    return f"-DTORCH_TARGET_VERSION=0x{(major << 56) | (minor << 48):016x}"


def build_and_load(csrc: pathlib.Path, build_dir: pathlib.Path) -> None:
    os.environ.pop("LD_PRELOAD", None)  # the compilers this build starts run without ASan
    with open("/proc/self/maps") as maps:
        assert "libasan" in maps.read(), "the child runs without libasan preloaded"
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="mlra_sanitize", sources=cpu_sources(csrc), extra_include_paths=[str(csrc)],
        build_directory=str(build_dir),
        extra_cflags=["-O1", "-g", torch_target_define(), *FLAGS], extra_ldflags=FLAGS, with_cuda=False,
        is_python_module=False, verbose=False)


class Fuzz:
    def __init__(self, seed: int):
        import torch

        self.torch = torch
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.counts: dict[str, int] = {}

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def randn(self, *shape, dtype=None):
        return self.torch.randn(*shape, generator=self.gen, dtype=dtype or self.torch.float32)

    def layout(self, shape, dtype, *, keep_last: bool = True, fill=None):
        """A tensor of ``shape`` with random values (or ``fill``) in one of a few layouts: contiguous (its
        allocation ends where it ends, so ASan sees a read past it), rows padded with NaN (a read of the
        padding shows in the numbers), or its dimensions stored in another order (the last one kept last
        with ``keep_last``)."""
        torch = self.torch
        kind = self.rng.choice(["contiguous", "padded", "permuted"])
        values = fill if fill is not None else self.randn(*shape).to(dtype)
        if kind == "contiguous" or len(shape) < 2:
            return values.clone().contiguous()
        if kind == "padded":
            big = [n + self.rng.randint(0, 3) for n in shape]
            buf = torch.full(big, float("nan"), dtype=dtype)
            view = buf[tuple(slice(0, n) for n in shape)]
        else:
            dims = list(range(len(shape) - 1 if keep_last else len(shape)))
            self.rng.shuffle(dims)
            order = dims + ([len(shape) - 1] if keep_last else [])
            buf = torch.empty([shape[i] for i in order], dtype=dtype)
            view = buf.permute([order.index(i) for i in range(len(shape))])
        view.copy_(values)
        return view

    def raises(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except RuntimeError:
            self.count(what + " (refused)")
            return
        raise AssertionError(f"{what}: an invalid call did not raise")

    # --- mlra::tev_partials ---------------------------------------------------------------------------

    def tev_case(self) -> None:
        torch = self.torch
        dtype = self.rng.choice([torch.float32, torch.float16, torch.bfloat16])
        V = self.rng.choice([1, 2, 3, 17, 64, 129, 300])
        d = self.rng.choice([1, 2, 7, 16, 17, 33, 64, 100, 257])
        w = self.randn(V, d) * self.rng.choice([1.0, 1e-3, 50.0])
        for i in range(V):
            kind = self.rng.random()
            if kind < 0.05:
                w[i] = float(self.rng.choice(["nan", "inf", "-inf"]))
            elif kind < 0.08:
                w[i, self.rng.randrange(d)] = float("nan")
            elif kind < 0.12:
                w[i] = 3.0  # constant row
            elif kind < 0.15 and dtype != torch.float16:
                w[i] *= 1e30  # squares past fp32
            elif kind < 0.18:
                w[i] *= 1e-20 if dtype != torch.float16 else 1e-3
        weight = self.layout((V, d), dtype, keep_last=False, fill=w.to(dtype))
        rows = None
        if self.rng.random() < 0.5:
            n = self.rng.randint(1, 2 * V + 2)
            idx = [self.rng.randrange(V) for _ in range(n)]
            for j in range(n):
                if self.rng.random() < 0.05:
                    idx[j] = self.rng.choice([-1, V, V + 7, -V - 1])
            rows = torch.tensor(idx, dtype=self.rng.choice([torch.int32, torch.int64]))
            if self.rng.random() < 0.3:  # a strided index
                rows = torch.stack([rows, rows]).t().reshape(-1)[::2]
        per_token = self.rng.random() < 0.6
        stats, pt = torch.ops.mlra.tev_partials(weight, rows, per_token)
        self.check_tev(weight, rows, per_token, stats, pt)
        self.count("tev_partials")

    def check_tev(self, weight, rows, per_token, stats, pt) -> None:
        torch = self.torch
        w = weight.double()
        V = w.shape[0]
        idx = torch.arange(V) if rows is None else rows.long()
        valid = (idx >= 0) & (idx < V)
        sel = w[idx.clamp(0, V - 1)]
        finite = torch.isfinite(sel).all(dim=1) & valid
        std = sel.std(dim=1, correction=0)
        vals = std[finite]
        count, nonfinite, bad = int(finite.sum()), int((valid & ~finite).sum()), int((~valid).sum())
        mean = vals.mean().item() if count else 0.0
        m2 = ((vals - mean) ** 2).sum().item() if count else 0.0
        got = stats.tolist()
        where = f"tev_partials({tuple(weight.shape)} {weight.dtype} strides {weight.stride()}, rows={rows is not None})"
        assert got[0] == count and got[3] == nonfinite and got[4] == bad, f"{where}: stats {got}, expected counts " \
            f"{(count, nonfinite, bad)}"
        if count:
            assert abs(got[1] - mean) <= 1e-5 * abs(mean) + 1e-300, f"{where}: mean {got[1]} != {mean}"
            assert abs(got[2] - m2) <= 1e-4 * m2 + 1e-9 * count * mean * mean, f"{where}: M2 {got[2]} != {m2}"
        if per_token:
            ref = torch.where(finite, std, torch.full_like(std, float("nan")))
            assert pt.shape == ref.shape and torch.equal(pt.isnan(), ref.isnan()), f"{where}: NaN rows differ"
            ok = ~ref.isnan()
            err = (pt.double()[ok] - ref[ok]).abs()
            assert (err <= 1e-5 * ref[ok] + 1e-40).all(), f"{where}: per-token error {err.max().item()}"
        else:
            assert pt.numel() == 0

    def tev_invalid(self) -> None:
        torch = self.torch
        op = torch.ops.mlra.tev_partials
        w = self.randn(5, 4)
        case = self.rng.randrange(8)
        args = [
            (w[0], None, False), (w.view(5, 2, 2), None, False), (w[:0], None, False), (w[:, :0], None, False),
            (w.to(torch.int32), None, False), (w.double(), None, False),
            (w, torch.zeros(2, 2, dtype=torch.int64), False), (w, torch.zeros(0, dtype=torch.int64), True),
        ][case]
        self.raises("tev_partials", op, *args)
        self.raises("tev_partials", op, w, torch.tensor([0.5, 1.0]), False)

    # --- mlra::latent_decode_cpu ----------------------------------------------------------------------

    def decode_reference(self, q, k, v, kpm, lengths, t_new, causal, scale):
        """Z in float64 by decode's rules: positions at or past L are out; masked keys (kpm -inf, or after a
        row's token) weigh 0, unless every key of the row is masked: then the row averages the L values."""
        torch = self.torch
        B, G, M, R = q.shape
        S = k.shape[2]
        qd, kd, vd = q.double(), k.double(), v.double()
        z = torch.empty(B, G, M, R, dtype=torch.float64)
        for b in range(B):
            L = S if lengths is None else int(lengths[b])
            s = scale * qd[b] @ kd[b, :, :L].transpose(-1, -2)  # [G, M, L]
            masked = torch.zeros(M, L, dtype=torch.bool)
            if kpm is not None:
                pad = kpm[b, :L].double()
                masked |= torch.isneginf(pad).view(1, L)
                s = s + pad.masked_fill(torch.isneginf(pad), 0.0)
            if causal:
                last = L - t_new + torch.arange(M) % t_new  # each row's own position
                masked |= torch.arange(L).view(1, L) > last.view(M, 1)
            p = torch.softmax(s.masked_fill(masked, float("-inf")), dim=-1)
            p[:, masked.all(dim=-1)] = 1.0 / L
            z[b] = p @ vd[b, :, :L]
        return z

    def decode_case(self) -> None:
        torch = self.torch
        dtype = self.rng.choice([torch.float32, torch.bfloat16])
        B, G, t_new = self.rng.randint(1, 3), self.rng.randint(1, 3), self.rng.randint(1, 3)
        M = t_new * self.rng.randint(1, 5)
        R = self.rng.choice([1, 3, 7, 8, 13, 16, 24, 33, 64])
        S = max(t_new, self.rng.choice([1, 2, 3, 63, 64, 65, 200, 257, 700, 1100]))
        q = self.layout((B, G, M, R), dtype)
        k, v = self.layout((B, G, S, R), dtype), self.layout((B, G, S, R), dtype)
        lengths = None
        if self.rng.random() < 0.6:
            lens = [self.rng.choice([t_new, S, self.rng.randint(t_new, S)]) for _ in range(B)]
            lengths = torch.tensor(lens, dtype=self.rng.choice([torch.int32, torch.int64]))
        kpm = None
        if self.rng.random() < 0.5:
            pad = torch.randn(B, S, generator=self.gen)
            pad[torch.rand(B, S, generator=self.gen) < self.rng.choice([0.1, 0.5, 0.95])] = float("-inf")
            if self.rng.random() < 0.2:
                pad[self.rng.randrange(B)] = float("-inf")  # every key of a sequence padded
            kpm = torch.full((B, S + self.rng.randint(0, 4)), float("nan"))[:, :S]  # rows may be apart
            kpm.copy_(pad)
        causal = self.rng.random() < 0.7
        scale = self.rng.uniform(0.05, 0.6)
        poisoned = None
        if self.rng.random() < 0.15:  # a NaN or an infinity in one sequence: the others must not see it
            poisoned = self.rng.randrange(B)
            target = self.rng.choice([q, k, v])
            n = target.shape[2] if target is q or lengths is None else int(lengths[poisoned])
            target[poisoned, self.rng.randrange(G), self.rng.randrange(n), self.rng.randrange(R)] = float(
                self.rng.choice(["nan", "inf", "-inf"]))
        z = torch.ops.mlra.latent_decode_cpu(q, k, v, kpm, lengths, t_new, causal, scale)
        ref = self.decode_reference(q, k, v, kpm, lengths, t_new, causal, scale)
        assert z.dtype == dtype and z.shape == ref.shape
        if poisoned is not None:
            keep = [b for b in range(B) if b != poisoned]
            z, ref, v = z[keep], ref[keep], v[keep]
        err = (z.double() - ref).abs().max().item() if z.numel() else 0.0
        tol = (3e-4 if dtype == torch.float32 else 1.5e-2) * (1.0 + (v.double().abs().max().item() if v.numel() else 0))
        assert err <= tol, (f"latent_decode_cpu(B={B}, g={G}, M={M}, r={R}, S={S}, t_new={t_new}, {dtype}, "
                            f"causal={causal}, lengths={lengths}, kpm={kpm is not None}): error {err} > {tol}")
        self.count("latent_decode_cpu")

    def decode_invalid(self) -> None:
        torch = self.torch
        op = torch.ops.mlra.latent_decode_cpu
        B, G, M, S, R = 2, 1, 4, 30, 8
        q, k, v = self.randn(B, G, M, R), self.randn(B, G, S, R), self.randn(B, G, S, R)
        lens = torch.tensor([S, S])
        bad_len = self.rng.choice([-1, 0, 1, S + 1, 2**31 - 1, 2**40, -(2**62)])
        cases = [
            (q, k, v, None, torch.tensor([S, bad_len], dtype=torch.int64), 2, True, 0.3),
            (q, k, v, None, torch.tensor([bad_len, S], dtype=torch.int32) if abs(bad_len) < 2**31 else lens, 2, True,
             0.3 if abs(bad_len) < 2**31 else float("nan")),
            (q, k, v, None, lens.float(), 1, True, 0.3),
            (q, k, v, None, lens[:1], 1, True, 0.3),
            (q, k, v, torch.zeros(B, S + 1), None, 1, True, 0.3),
            (q, k, v, torch.zeros(B, 2 * S)[:, ::2], None, 1, True, 0.3),
            (q, k, v, None, None, 1, True, self.rng.choice([float("nan"), float("inf"), -0.5, 0.0, 1e40])),
            (q, k, v, None, None, self.rng.choice([0, 3, -1]), True, 0.3),
            (q, k.bfloat16(), v, None, None, 1, True, 0.3),
            (q, self.randn(B, G, S, 2 * R)[..., ::2], v, None, None, 1, True, 0.3),
            (q[0], k, v, None, None, 1, True, 0.3),
            (q.double(), k.double(), v.double(), None, None, 1, True, 0.3),
            (q, k, v[:, :, :-1], None, None, 1, True, 0.3),
            (q, k[:, :, :1], v[:, :, :1], None, None, 2, True, 0.3),
        ]
        self.raises("latent_decode_cpu", op, *self.rng.choice(cases))

    # --- mlra::latent_decode_step_cpu -------------------------------------------------------------------

    def step_weights(self, H, G, R, d, dh, fold_q, fold_o):
        """Step weights of H heads of width dh (H·dh = d for a whole layer, other widths for a subset of its heads:
        W_O's columns of those heads, [d, H·dh])."""
        hpg, gr = H // G, G * R
        n_in = (H * R if fold_q else gr) + 2 * gr
        maybe = lambda t: t if self.rng.random() < 0.6 else None  # noqa: E731
        w_in = self.randn(n_in, d) / math.sqrt(d)
        b_in = maybe(self.randn(n_in) * 0.3)
        m = None if fold_q else self.randn(G, hpg * R, R) / math.sqrt(R)
        beta = None if fold_q else maybe(self.randn(G, hpg * R) * 0.3)
        w_v = None if fold_o else self.randn(H, dh, R) / math.sqrt(R)
        b_v = None if fold_o else maybe(self.randn(H, dh) * 0.3)
        w_out = self.randn(d, H * R if fold_o else H * dh) / math.sqrt(d)
        b_out = maybe(self.randn(d) * 0.3)
        return [w_in, b_in, m, beta, w_v, b_v, w_out, b_out]

    def step_reference(self, x, weights, k_cache, v_cache, seqlens, pos, H, scale):
        torch = self.torch
        w_in, b_in, m, beta, w_v, b_v, w_out, b_out = (w.double() if w is not None else None for w in weights)
        B, t, d = x.shape
        G, R = k_cache.shape[1], k_cache.shape[3]
        hpg, gr = H // G, G * R
        y = x.double() @ w_in.t() + (b_in if b_in is not None else 0.0)
        n_q = y.shape[-1] - 2 * gr
        lat = y[..., n_q:].reshape(B, t, 2, G, R)
        k_new, v_new = k_cache.double().clone(), v_cache.double().clone()
        k_new[:, :, pos:pos + t], v_new[:, :, pos:pos + t] = lat[:, :, 0].transpose(1, 2), lat[:, :, 1].transpose(1, 2)
        lens = seqlens.long() + t
        if m is not None:
            q = torch.einsum("btgl,gjl->btgj", y[..., :gr].reshape(B, t, G, R), m)
            q = (q + (beta if beta is not None else 0.0)).reshape(B, t, G, hpg, R)
        else:
            q = y[..., :H * R].reshape(B, t, G, hpg, R)
        q = q.permute(0, 2, 3, 1, 4).reshape(B, G, hpg * t, R)
        z = self.decode_reference(q, k_new, v_new, None, lens, t, True, scale).view(B, G, hpg, t, R)
        z = z.permute(0, 3, 1, 2, 4).reshape(B, t, H, R)
        if w_v is not None:
            z = torch.einsum("bthr,hdr->bthd", z, w_v) + (b_v if b_v is not None else 0.0)
        out = z.reshape(B, t, -1) @ w_out.t() + (b_out if b_out is not None else 0.0)
        return out, k_new, v_new, lens

    def step_caches(self, B, G, cap, R):
        torch = self.torch
        kind = self.rng.choice(["separate", "side-by-side", "token-major", "padded"])
        if kind == "side-by-side":  # k and v halves of one buffer's rows
            buf = self.randn(B, G, cap, 2 * R)
            return buf[..., :R], buf[..., R:]
        if kind == "token-major":
            return (self.randn(B, cap, G, R).transpose(1, 2) for _ in range(2))
        if kind == "padded":
            out = []
            for _ in range(2):
                buf = torch.full((B + 1, G, cap + 3, R), float("nan"))
                view = buf[:B, :, :cap]
                view.copy_(self.randn(B, G, cap, R))
                out.append(view)
            return out
        return self.randn(B, G, cap, R), self.randn(B, G, cap, R)

    def step_setup(self):
        H = self.rng.choice([1, 2, 3, 4, 6])
        G = self.rng.choice([g for g in (1, 2, 3, 6) if H % g == 0])
        R = self.rng.choice([1, 4, 8, 13, 16, 32])
        d = H * self.rng.choice([1, 3, 8, 16, 20])
        dh = self.rng.choice([d // H, d // H, 1, 3, 8, 16])  # not d/H: the heads are a subset of a layer's
        B, t = self.rng.choice([(1, 1), (2, 1), (3, 2), (2, 3), (9, 2)])
        cap = self.rng.choice([t, t + 1, 40, 90, 300])
        pos = self.rng.randint(0, cap - t)
        weights = self.step_weights(H, G, R, d, dh, self.rng.random() < 0.5, self.rng.random() < 0.5)
        k_cache, v_cache = self.step_caches(B, G, cap, R)
        seqlens = self.torch.full((B,), pos, dtype=self.torch.int32)  # every sequence holds pos positions
        x = self.layout((B, t, d), self.torch.float32, keep_last=self.rng.random() < 0.7)
        return x, weights, k_cache, v_cache, seqlens, pos, H, self.rng.uniform(0.05, 0.6)

    def step_case(self) -> None:
        torch = self.torch
        x, weights, k_cache, v_cache, seqlens, pos, H, scale = self.step_setup()
        out_ref, k_ref, v_ref, lens_ref = self.step_reference(x, weights, k_cache, v_cache, seqlens, pos, H, scale)
        out = torch.ops.mlra.latent_decode_step_cpu(x, *weights, k_cache, v_cache, seqlens, pos, H, scale)
        where = (f"latent_decode_step_cpu(x {tuple(x.shape)}, H={H}, caches {tuple(k_cache.shape)}, pos={pos}, "
                 f"weights {[None if w is None else tuple(w.shape) for w in weights]})")
        assert torch.equal(seqlens.long(), lens_ref), f"{where}: seqlens {seqlens} != {lens_ref}"
        for name, got, ref in (("k_cache", k_cache, k_ref), ("v_cache", v_cache, v_ref)):
            err = (got.double() - ref).abs().max().item()
            assert err <= 1e-4 * (1.0 + ref.abs().max().item()), f"{where}: {name} error {err}"
        err = (out.double() - out_ref).abs().max().item()
        tol = 3e-4 * (1.0 + out_ref.abs().max().item())
        assert err <= tol, f"{where}: output error {err} > {tol}"
        self.count("latent_decode_step_cpu")

    def step_invalid(self) -> None:
        torch = self.torch
        x, weights, k_cache, v_cache, seqlens, pos, H, scale = self.step_setup()
        B, t = x.shape[0], x.shape[1]
        cap = k_cache.shape[2]
        args = [x, *weights, k_cache, v_cache, seqlens, pos, H, scale]
        case = self.rng.randrange(12)
        if case == 0:
            other = (pos + 1) % (cap - t + 1) if cap > t else -1  # in range, but not pos
            seqlens[self.rng.randrange(B)] = self.rng.choice([2**31 - 1, -1, cap - t + 1, -(2**31), other])
        elif case == 1:
            args[12] = self.rng.choice([2**63 - 1, -1, cap - t + 1, -(2**63)])
        elif case == 2:
            args[14] = self.rng.choice([float("nan"), float("-inf"), -1.0, 0.0, 1e300])
        elif case == 3:
            args[10] = k_cache  # v_cache is k_cache
        elif case == 4:
            args[9] = k_cache[:, :, :1].expand(k_cache.shape) if cap > 1 else k_cache.expand(2, *k_cache.shape)
        elif case == 5:
            args[13] = self.rng.choice([2 * H, H + 1, 0, -H])
        elif case == 6:
            args[11] = seqlens.long()
        elif case == 7:
            args[1] = weights[0][:-1]  # w_in one row short
        elif case == 8:
            args[7] = weights[6].double()  # w_out
        elif case == 9:  # beta without m, or b_v without w_v
            if weights[2] is None:
                args[4] = self.randn(3)
            else:
                args[5], args[6] = None, self.randn(3)
        elif case == 10:
            args[0] = self.rng.choice([x.double(), x[:, :0]])
        elif k_cache.is_contiguous():  # seqlens in k_cache's memory
            args[11] = k_cache.view(-1)[:B].view(torch.int32)
            args[11].zero_()
        else:
            args[11] = seqlens.view(B, 1)
        snapshot = [k_cache.clone(), v_cache.clone(), seqlens.clone()]
        try:
            torch.ops.mlra.latent_decode_step_cpu(*args)
        except RuntimeError:
            self.count("latent_decode_step_cpu (refused)")
        else:
            raise AssertionError(f"latent_decode_step_cpu: invalid case {case} did not raise (x {tuple(x.shape)}, "
                                 f"H={H}, caches {tuple(k_cache.shape)} strides {k_cache.stride()}, pos={pos})")
        for before, after in zip(snapshot, (k_cache, v_cache, seqlens)):
            assert torch.equal(before.nan_to_num(), after.nan_to_num()), f"step invalid case {case} wrote its outputs"


def run_child(args) -> int:
    start = time.time()
    build_and_load(pathlib.Path(args.csrc).resolve(), pathlib.Path(args.build_dir).resolve())
    import torch

    print(f"sanitize: built and loaded in {time.time() - start:.0f}s ({torch.get_num_threads()} threads)", flush=True)
    assert hasattr(torch.ops.mlra, "latent_decode_step_cpu")
    fuzz = Fuzz(args.seed)
    plan = ([fuzz.tev_case] * 5 + [fuzz.tev_invalid] + [fuzz.decode_case] * 6 + [fuzz.decode_invalid] * 2
            + [fuzz.step_case] * 4 + [fuzz.step_invalid] * 2)
    start = time.time()
    for i in range(args.calls):
        fuzz.rng.choice(plan)()
    summary = ", ".join(f"{n} {what}" for what, n in sorted(fuzz.counts.items()))
    print(f"sanitize: {args.calls} cases ({summary}) in {time.time() - start:.0f}s: no report, every check passed")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="random cases to run (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--build-dir", default=str(ROOT / "build" / "sanitize"))
    parser.add_argument("--csrc", default=str(ROOT / "csrc"), help="the sources to build (default: the checkout's)")
    args = parser.parse_args()
    if os.environ.get(CHILD) == "1":
        return run_child(args)
    return run_parent(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
