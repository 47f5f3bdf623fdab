"""Autotuning of the prefill kernels: keyed by a sequence-length bucket, configs pruned per architecture.

These run on CPU. The launch test drives the installed Triton's own ``Autotuner.run`` (its key and its
cache) through the real launcher, with the kernel launch and the timing replaced by stubs.
"""

import types

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402

from mlra_kernels.ops.mlra import launcher  # noqa: E402

AUTOTUNED = ("_mlra_fwd_kernel", "_mlra_fwd_absorbed_kernel", "_mlra_bwd_dkdv_kernel", "_mlra_bwd_dq_kernel")


@pytest.mark.parametrize("T, bucket", [(1, 64), (63, 64), (64, 64), (65, 128), (1000, 1024), (1024, 1024), (1025, 2048)])
def test_seq_bucket(T, bucket):
    assert launcher.seq_bucket(T) == bucket


@pytest.mark.parametrize("name", AUTOTUNED)
def test_autotune_key_has_the_bucket_and_neither_length_is_specialised(name):
    kern = getattr(launcher.kernels(), name)
    assert "T_BUCKET" in kern.keys and "T" not in kern.keys
    jit = kern.fn
    # JITFunction keeps the list as an attribute; the interpreter's wrapper keeps the decorator's kwargs.
    names = getattr(jit, "do_not_specialize", None) or jit.kwargs.get("do_not_specialize", ())
    assert {"T", "T_BUCKET"} <= set(names), "a new length or bucket would recompile the kernel"


def _stub_autotuner(monkeypatch, kern):
    """Two configs to choose from, an empty cache, no timing and no launch; returns the launches seen."""
    launches = []
    configs = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1),
               triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    monkeypatch.setattr(kern, "configs", configs)
    monkeypatch.setattr(kern, "cache", {})
    monkeypatch.setattr(kern, "_bench", lambda *args, config, **meta: [1.0, 1.0, 1.0])
    monkeypatch.setattr(kern.fn, "run", lambda *args, **kwargs: launches.append(dict(zip(kern.arg_names, args))))
    return launches


def _latents(T, r, g=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(T)
    return torch.randn(1, T, 3 * g * r, generator=gen, dtype=dtype)


def test_each_length_bucket_is_tuned_once(monkeypatch):
    """The first length seen no longer fixes the config for every later one; lengths in one bucket share it."""
    H, d, r = 2, 32, 8
    up = torch.randn(3, d, r, generator=torch.Generator().manual_seed(0))
    kern = getattr(launcher.kernels(), "_mlra_fwd_absorbed_kernel" if launcher.fwd_variant(r, d // H) == "absorbed"
                   else "_mlra_fwd_kernel")
    launches = _stub_autotuner(monkeypatch, kern)
    seen = []
    for T in (40, 50, 200, 64, 129, 600):
        launcher.mlra_fwd(_latents(T, r), up, None, None, num_heads=H, latent_groups=1, causal=True, scale=0.25,
                          dropout_p=0.0, seed=0)
        seen.append(len(kern.cache))
    assert [run["T_BUCKET"] for run in launches] == [64, 64, 256, 64, 256, 1024]
    assert seen == [1, 1, 2, 2, 2, 3], "one tuning per bucket, reused by later lengths of the same bucket"
    assert sorted(key[0] for key in kern.cache) == [64, 256, 1024]
