"""Property tests of mlra_attention: random valid shapes, masks and dtypes on every CPU path, forward
and every gradient against the float64 oracle, with the tolerance rule of tests/helpers.py.

Example counts are bounded (the Triton interpreter runs a few seconds per example), the seed is fixed
(``derandomize``) and no example database is written, so a run is repeatable and leaves no files.
"""

import torch

import pytest  # noqa: E402

hypothesis = pytest.importorskip("hypothesis", reason="the property tests need hypothesis (the test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import mlra_kernels  # noqa: E402
from mlra_kernels.ops.mlra import backend, use_backend  # noqa: E402
from mlra_kernels.ops.mlra.reference import mlra_attention_reference  # noqa: E402
from tests.helpers import assert_close_rel, key_padding, make_inputs, max_abs_score, run_case  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = ["out", "dx", "ddown", "dup", "dbias"]
SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw, max_t=40, fused=False, narrow=False):
    """``fused``: what torch's fused CPU attention takes (no key padding, T >= 2); ``narrow``: also a
    latent at most half a head wide."""
    H = draw(st.sampled_from([1, 2, 4]))
    g = draw(st.sampled_from([c for c in (1, 2, 4) if H % c == 0]))
    dh = draw(st.sampled_from([8, 16, 24, 32]))
    d = H * dh
    r = draw(st.integers(1, dh // 2 if narrow else min(48, d)))
    fused = fused or narrow
    return dict(
        B=draw(st.integers(1, 2)), T=draw(st.integers(2 if fused else 1, max_t)), H=H, g=g, dh=dh, r=r,
        dtype=draw(st.sampled_from(sorted(DTYPES))), causal=draw(st.booleans()), bias=draw(st.booleans()),
        kpm=None if fused else draw(st.sampled_from([None, "random", "left", "float"])),
        seed=draw(st.integers(0, 2**16)),
        scale=draw(st.sampled_from([None, 0.05, 0.5])),
    )


def _check(case, path):
    c = case
    x, down, up, b, go = make_inputs(c["B"], c["T"], c["H"], c["g"], c["r"], c["dh"], bias=c["bias"],
                                     seed=c["seed"], device="cpu")
    mask = key_padding(c["kpm"], c["B"], c["T"], device="cpu", seed=c["seed"] + 1)
    kw = dict(num_heads=c["H"], latent_groups=c["g"], causal=c["causal"], scale=c["scale"])
    ins = [x, down, up, b]
    dt = DTYPES[c["dtype"]]
    exact = run_case(mlra_attention_reference, ins, torch.float64, go, mask, **kw)
    low = run_case(mlra_attention_reference, ins, dt, go, mask, **kw)
    with use_backend(path):
        got = run_case(mlra_kernels.mlra_attention, ins, dt, go, mask, **kw)
    smax = max_abs_score(*ins, **kw)
    for name, a, lo, ex in zip(NAMES, got, low, exact):
        if ex is None:
            continue
        assert a.dtype == dt and a.shape == ex.shape, name
        assert_close_rel(f"{path} {name} {c}", a, lo, ex, score_max=0.0 if name == "out" else smax)


@settings(max_examples=40, **SETTINGS)
@given(case=cases())
def test_torch_path_on_random_shapes(case):
    _check(case, "torch")


@settings(max_examples=25, **SETTINGS)
@given(case=cases(fused=True))
def test_fused_cpu_path_on_random_shapes(case):
    _check(case, "torch-cpu")


@settings(max_examples=25, **SETTINGS)
@given(case=cases(narrow=True))
def test_latent_cpu_path_on_random_shapes(case):
    _check(case, "torch-cpu-latent")


@settings(max_examples=25, **SETTINGS)
@given(case=cases(fused=True))
def test_sdpa_path_on_random_shapes(case):
    _check(case, "sdpa")


@pytest.mark.skipif(torch.cuda.is_available() or not backend.triton_available(),
                    reason="the Triton interpreter runs the kernels on CPU machines only")
@settings(max_examples=8, **SETTINGS)
@given(case=cases(max_t=24))
def test_triton_kernels_under_the_interpreter_on_random_shapes(case):
    if not backend.triton_interpreted():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: the kernels run compiled")
    _check(case, "triton-interpreter")
