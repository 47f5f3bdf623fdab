"""Autotuning of the prefill kernels: keyed by a sequence-length bucket, configs pruned per architecture.

These run on CPU. The launch test drives the installed Triton's own ``Autotuner.run`` (its key and its
cache) through the real launcher, with the kernel launch and the timing replaced by stubs.
"""

import types

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402

from mlra_kernels.ops.mlra import launcher, tuning  # noqa: E402

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


GRID = tuning.configs(interpret=False)
# GPT-2 small (d_h = 64) with r = 96, g = 1: the absorbed forward's constexprs (BLOCK_D, BLOCK_R, BLOCK_RF).
ABSORBED_R96 = dict(block_d=64, block_r=64, block_rf=128)
BWD_R96 = dict(block_d=64, block_r=64)


def _tiles(cfgs):
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in cfgs]


@pytest.mark.parametrize("capability, kib", [((8, 0), 163), ((8, 6), 99), ((8, 9), 99), ((9, 0), 227)])
def test_shared_memory_table(capability, kib):
    assert tuning.arch_for(capability) == tuning.Arch(capability, kib * 1024)


def test_an_untabled_architecture_is_named_in_the_error():
    with pytest.raises(KeyError, match=r"sm_75 .*tabled: sm_80, sm_86"):
        tuning.arch_for((7, 5))


def test_a_launch_reads_its_own_device(monkeypatch):
    props = {1: types.SimpleNamespace(major=8, minor=6, shared_memory_per_block_optin=101376)}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props[index])
    tuning.device_arch.cache_clear()
    try:
        on_gpu = types.SimpleNamespace(device=torch.device("cuda", 1))
        assert tuning.launch_arch(on_gpu) == tuning.Arch((8, 6), 101376)
        assert tuning.launch_arch(torch.empty(1)) is None, "CPU tensors (the interpreter) have no limit"
    finally:
        tuning.device_arch.cache_clear()


def test_each_architecture_keeps_what_fits_its_shared_memory():
    kept = {cap: tuning.prune("bwd", GRID, **BWD_R96, arch=tuning.arch_for(cap)) for cap in ((8, 6), (8, 0), (9, 0))}
    for cap, cfgs in kept.items():
        assert all(tuning.smem_bytes("bwd", c, **BWD_R96) <= tuning.SMEM_OPTIN[cap] for c in cfgs), cap
    assert _tiles(kept[(9, 0)]) == _tiles(GRID), "the old fixed 160 KB dropped (128, 64, 8, 3) on every GPU"
    assert _tiles(kept[(8, 0)]) == [(64, 32, 4, 3), (128, 32, 8, 2)]
    assert _tiles(kept[(8, 6)]) == [(64, 32, 4, 3)]


def test_before_hopper_wide_latents_keep_small_score_tiles():
    """The compile gate's sm_80 spills (the backward, the absorbed forward at r = 96) pruned; the rebuild
    forward at r = 192 and the absorbed one at r = 16 compiled without spills, and keep their large tiles."""
    a100 = tuning.arch_for((8, 0))
    assert (128, 64, 8, 2) not in _tiles(tuning.prune("bwd", GRID, **BWD_R96, arch=a100))
    assert (128, 64, 8, 2) not in _tiles(tuning.prune("absorbed", GRID, **ABSORBED_R96, arch=a100))
    assert (128, 64, 8, 2) in _tiles(tuning.prune("rebuild", GRID, **BWD_R96, arch=a100))
    assert (128, 64, 8, 2) not in _tiles(tuning.prune("bwd", GRID, block_d=64, block_r=16, arch=a100))
    assert (128, 64, 8, 2) in _tiles(tuning.prune("absorbed", GRID, block_d=64, block_r=16, block_rf=16, arch=a100))
    assert (128, 64, 8, 2) in _tiles(tuning.prune("bwd", GRID, **BWD_R96, arch=tuning.arch_for((9, 0))))


def test_when_nothing_fits_the_smallest_config_is_kept():
    tiny = tuning.Arch((8, 6), 1024)
    smallest = min(GRID, key=lambda c: tuning.smem_bytes("absorbed", c, **ABSORBED_R96))
    assert tuning.prune("absorbed", GRID, **ABSORBED_R96, arch=tiny) == [smallest]


def test_the_hook_reads_positional_and_keyword_arguments():
    """The launcher passes BLOCK_D/BLOCK_R/BLOCK_RF as keywords; the autotuner hands those to the hook
    apart from the positional arguments."""
    c = torch.empty(1, dtype=torch.bfloat16)
    kept = tuning.pruner("rebuild")(GRID, {"C": c, "T": 100}, BLOCK_D=128, BLOCK_R=64, CAUSAL=True)
    assert kept and all(bm * bn <= 128 * 64 for bm, bn, _, _ in _tiles(kept))
    kept = tuning.pruner("absorbed")(GRID, {"C": c, "BLOCK_D": 64}, BLOCK_R=64, BLOCK_RF=256)
    assert kept and all(bm <= 64 for bm, _, _, _ in _tiles(kept))
    assert tuning.pruner("bwd").kernel == "bwd", "the compile gate reads which rules a kernel's hook applies"
