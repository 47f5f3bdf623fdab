"""Property tests of mlra_kernels.tev against the float64 reference, on inputs drawn by hypothesis.

Tolerance rule. The kernel reads every element exactly in its own dtype and accumulates in fp32 with fp64
folds (rows whose fp32 squares overflow or underflow are redone in fp64), and the reference works in
float64 on the same stored values, so the storage dtype adds no error: the bound is set by the fp32
accumulation. Each fp32 lane sums at most 16 terms before they are added into fp64, so TEV_i is within
RTOL = 16 * 2^-24 (about 9.5e-7) of the reference, relative, and that bound also covers the rounding of
the fp32 per-token output (2^-24), plus one fp32 subnormal step (2^-149) for per-token values below FLT_MIN.
µ_TEV, a mean of the TEV_i, meets the same relative bound. σ_TEV is 1-Lipschitz in the TEV_i (in the RMS
norm), so it is within RTOL * max_i TEV_i, absolute. A dropped, underflowed or misread row misses these
bounds by orders of magnitude.
"""

import math

import pytest
import torch

from mlra_kernels.ops.tev import tev, tev_reference

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

RTOL = 16 * 2.0**-24
SUBNORMAL_STEP = 2.0**-149
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# log10 of the row scales drawn for each dtype: from subnormal values to near the largest finite ones
# (fp16 rows beyond 65504 become Inf, and are then counted as non-finite by both sides).
LOG_SCALES = {"fp32": (-42.0, 33.0), "bf16": (-40.0, 33.0), "fp16": (-7.5, 3.5)}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

SETTINGS = settings(
    max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    v = draw(st.integers(1, 300))
    d = draw(st.integers(1, 300))
    lo, hi = LOG_SCALES[dtype]
    return dict(
        dtype=dtype,
        v=v,
        d=d,
        device=draw(st.sampled_from(DEVICES)),
        layout=draw(st.sampled_from(["contiguous", "transposed", "column_slice", "every_other_row"])),
        seed=draw(st.integers(0, 2**31 - 1)),
        log_scale=draw(st.floats(lo, hi)),
        spread=draw(st.floats(0.0, 3.0)),  # decades between the rows' scales
        offset=draw(st.sampled_from([0.0, 1.0, 100.0, 1e4])),  # row mean, in units of the row's scale
        bad=draw(st.lists(st.tuples(st.integers(0, v - 1), st.integers(0, d - 1), st.sampled_from(
            [math.nan, math.inf, -math.inf])), max_size=3)),
        rows=draw(st.none() | st.lists(st.integers(0, v - 1), min_size=1, max_size=2 * v)),
        unbiased=draw(st.booleans()),
    )


def build(p):
    g = torch.Generator().manual_seed(p["seed"])
    v, d = p["v"], p["d"]
    scale = 10.0 ** (p["log_scale"] + p["spread"] * torch.rand(v, 1, generator=g, dtype=torch.float64))
    sign = torch.randn(v, 1, generator=g, dtype=torch.float64).sign()
    x = torch.randn(v, d, generator=g, dtype=torch.float64) * scale + p["offset"] * sign * scale
    for i, j, value in p["bad"]:
        x[i, j] = value
    w = x.to(DTYPES[p["dtype"]]).to(p["device"])
    nan = float("nan")  # padding read by mistake would show as a non-finite row
    if p["layout"] == "transposed":
        w = w.t().contiguous().t()
    elif p["layout"] == "column_slice":
        wide = torch.full((v, d + 5), nan, dtype=w.dtype, device=w.device)
        wide[:, 3 : 3 + d] = w
        w = wide[:, 3 : 3 + d]
    elif p["layout"] == "every_other_row":
        tall = torch.full((2 * v, d), nan, dtype=w.dtype, device=w.device)
        tall[::2] = w
        w = tall[::2]
    return w


@SETTINGS
@given(problems())
def test_tev_matches_the_float64_reference(p):
    w = build(p)
    rows = None if p["rows"] is None else torch.tensor(p["rows"], device=w.device)
    got = tev(w, rows=rows, unbiased=p["unbiased"], per_token=True)
    ref = tev_reference(w.cpu(), rows=None if rows is None else rows.cpu(), unbiased=p["unbiased"])

    assert (got.rows, got.nonfinite_rows) == (ref.rows, ref.nonfinite_rows)
    pt, rt = got.per_token.cpu().double(), ref.per_token
    assert pt.shape == rt.shape
    assert torch.equal(pt.isnan(), rt.isnan())
    ok = ~rt.isnan()
    err = (pt[ok] - rt[ok]).abs()
    bound = RTOL * rt[ok] + SUBNORMAL_STEP
    assert bool((err <= bound).all()), f"TEV_i off by {(err / rt[ok].clamp_min(1e-300)).max().item():.3g} relative"

    if ref.rows == 0:
        assert math.isnan(got.mean) and math.isnan(got.std)
        return
    assert abs(got.mean - ref.mean) <= RTOL * ref.mean, (got.mean, ref.mean)
    if math.isnan(ref.std):  # one row and the unbiased estimate
        assert math.isnan(got.std)
    else:
        assert abs(got.std - ref.std) <= RTOL * rt[ok].max().item(), (got.std, ref.std)
