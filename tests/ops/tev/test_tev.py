"""mlra_kernels.tev on the CPU against the float64 reference (DESIGN.md's TEV)."""

import math

import numpy as np
import pytest
import torch
from torch import Tensor

import mlra_kernels
from mlra_kernels.ops.tev import TEVStats, tev, tev_reference
from mlra_kernels.ops.tev.op import ensure_loaded
from mlra_kernels.ops.tev.stats import merge_partials

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Inputs are read exactly and accumulated in fp32 / fp64, so every dtype meets the same bound against a
# float64 reference computed on the same (rounded) values. torch's own fp32 one-liner misses it on the
# offset rows below (checked in test_offset_rows_fp32).
RTOL = 1e-6


def make(v, d, dtype=torch.float32, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    scale = 0.5 + torch.rand(v, 1, generator=g, dtype=torch.float64)  # rows of different spread
    x = torch.randn(v, d, generator=g, dtype=torch.float64) * scale + offset
    return x.to(dtype)


def rel(a, b):
    return abs(a - b) / abs(b)


def check_per_token_fp32(got: Tensor, ref: Tensor):
    """TEV_i comes back in fp32: compare with the float64 value rounded to fp32, within RTOL or one subnormal step."""
    torch.testing.assert_close(got, ref.float(), rtol=RTOL, atol=2.0**-149)


def check(got: TEVStats, ref: TEVStats, rtol=RTOL):
    assert got.rows == ref.rows
    assert got.nonfinite_rows == ref.nonfinite_rows
    assert rel(got.mean, ref.mean) <= rtol, (got.mean, ref.mean)
    assert rel(got.std, ref.std) <= rtol, (got.std, ref.std)
    if got.per_token is not None:
        pt, rt = got.per_token.double(), ref.per_token
        assert pt.shape == rt.shape
        assert torch.equal(torch.isnan(pt), torch.isnan(rt))
        ok = ~torch.isnan(rt)
        check_per_token_fp32(got.per_token[ok], rt[ok])


SHAPES = [
    pytest.param(1, 1, id="1x1"),
    pytest.param(1, 5, id="1x5"),
    pytest.param(3, 5, id="3x5"),
    pytest.param(7, 63, id="7x63"),
    pytest.param(1000, 64, id="1000x64"),
    pytest.param(257, 80, id="257x80"),
    pytest.param(129, 1000, id="129x1000"),
    pytest.param(50257, 768, id="50257x768"),
]


@pytest.mark.parametrize("v,d", SHAPES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_shapes(v, d, dtype, poison_empty):
    w = make(v, d, DTYPES[dtype], seed=v * 7 + d)
    got = tev(w, per_token=True)
    ref = tev_reference(w)
    if d == 1:  # a one-element row has std 0
        assert got.mean == 0.0 and got.std == 0.0 and torch.equal(got.per_token, torch.zeros(v))
        return
    if v == 1:  # one row: σ of a single value is 0 (population)
        assert got.std == 0.0 and rel(got.mean, ref.mean) <= RTOL
        return
    check(got, ref)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("v,d", [(300, 17), (64, 4096), (5000, 768)], ids=["300x17", "64x4096", "5000x768"])
def test_every_dtype(v, d, dtype, poison_empty):
    w = make(v, d, DTYPES[dtype], seed=d)
    check(tev(w, per_token=True), tev_reference(w))


def test_offset_rows_fp32():
    # Rows offset by 1e4: a naive sum of squares in fp32 loses everything; we must match float64 to 1e-6.
    w = make(4096, 768, torch.float32, seed=3, offset=1e4)
    got, ref = tev(w), tev_reference(w)
    check(got, ref)
    one_mean, one_std = (t.item() for t in mlra_kernels.ops.tev.reference.tev_one_liner(w))
    # The tolerance is strict enough to fail the plain fp32 one-liner on the same data.
    assert rel(one_mean, ref.mean) > RTOL or rel(one_std, ref.std) > RTOL


@pytest.mark.slow
def test_128k_x_4096_bf16():
    g = torch.Generator().manual_seed(11)
    w = torch.empty(131072, 4096, dtype=torch.bfloat16)
    for i in range(0, w.shape[0], 16384):  # fill in blocks to keep the float32 temporary small
        w[i : i + 16384] = torch.randn(16384, 4096, generator=g) * (0.02 + 0.01 * (i / w.shape[0]))
    check(tev(w), tev_reference(w, chunk_elems=1 << 25))


@pytest.mark.parametrize(
    "view",
    ["row_stride", "col_slice", "every_other_row", "transposed", "offset_start", "expanded"],
)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_strided_views(view, dtype, poison_empty):
    base = make(600, 160, DTYPES[dtype], seed=5)
    w = {
        "row_stride": base[:, :100],  # rows 160 apart, 100 wide
        "col_slice": base[:, 3:99],
        "every_other_row": base[::2],
        "transposed": base[:, :90].t(),  # element stride 160
        "offset_start": base[1:, 1:],  # storage offset, misaligned start
        "expanded": base[7:8].expand(50, 160),  # row stride 0
    }[view]
    assert not w.is_contiguous()
    got = tev(w, per_token=True)
    ref = tev_reference(w)
    if view == "expanded":  # every row identical: σ is exactly 0
        assert got.std == 0.0 and rel(got.mean, ref.mean) <= RTOL
        return
    check(got, ref)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_nonfinite_rows_counted_and_left_out(dtype, poison_empty):
    w = make(500, 96, DTYPES[dtype], seed=9)
    w[3, 10] = float("nan")
    w[17, 0] = float("inf")  # the first element too: it is part of the row's shift
    w[250, 95] = float("-inf")
    w[499, :] = float("nan")
    got = tev(w, per_token=True)
    ref = tev_reference(w)
    assert got.nonfinite_rows == 4 and got.rows == 496
    assert math.isfinite(got.mean) and math.isfinite(got.std)
    check(got, ref)
    assert torch.isnan(got.per_token[[3, 17, 250, 499]]).all()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("view", ["contiguous", "strided"])
def test_huge_finite_rows_are_counted_not_dropped(dtype, view, poison_empty):
    # Squares of |x| ~ 1e19 .. 1e30 overflow fp32; such a row is finite and must be counted (TEV is
    # there to flag a blow-up, not to hide it), while a NaN row is still left out.
    w = make(300, 64, torch.float64, seed=21)
    w[5] *= 1e19
    w[77] = w[77] * 1e30 + 3e30
    w[140, 7] = float("nan")
    w = w.to(DTYPES[dtype])
    if view == "strided":
        w = w.t().contiguous().t()
    got = tev(w, per_token=True)
    ref = tev_reference(w)
    assert got.nonfinite_rows == 1 and got.rows == 299
    check(got, ref)
    per_row = w.double().std(dim=1, unbiased=False)
    assert rel(got.per_token[5].item(), per_row[5].item()) <= 1e-5
    assert rel(got.per_token[77].item(), per_row[77].item()) <= 1e-5


# Scales of rows whose squares underflow fp32 (std below ~1.1e-19), and two just above the bound
# (needs_fp64 in csrc/tev/tev_common.h) that take the fp32 path and must still be exact. 1e-40 fp32 and
# 1e-39 bf16 values are subnormal; fp16 subnormal values (1e-6) square to normal fp32 numbers.
TINY_SCALES = {
    "fp32": [1e-18, 3e-19, 1e-21, 1e-25, 1e-30, 1e-40],
    "bf16": [1e-21, 1e-30, 1e-39],
    "fp16": [1e-6],
}



@pytest.mark.parametrize("view", ["contiguous", "strided"])
@pytest.mark.parametrize(
    "dtype, scale", [pytest.param(k, s, id=f"{k}-{s:g}") for k, v in TINY_SCALES.items() for s in v]
)
def test_tiny_rows_keep_their_precision(dtype, scale, view, poison_empty):
    # Squares of |x| below ~1e-19 are subnormal or 0 in fp32: such rows came out as TEV 0 (or a few digits)
    # before they were redone in fp64. Every row here is tiny, so mean and std are those of the tiny rows.
    w = (make(200, 101, torch.float64, seed=31) * scale).to(DTYPES[dtype])
    if view == "strided":
        w = w.t().contiguous().t()
    got = tev(w, per_token=True)
    ref = tev_reference(w)
    assert got.rows == 200 and got.nonfinite_rows == 0
    assert rel(got.mean, ref.mean) <= RTOL and rel(got.std, ref.std) <= RTOL, (got, ref.mean, ref.std)
    check_per_token_fp32(got.per_token, ref.per_token)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_constant_and_tiny_rows_among_ordinary_ones(dtype, poison_empty):
    w = make(400, 64, torch.float64, seed=23)
    w[3] = 0.375  # constant rows: TEV exactly 0, also where the rows are redone
    w[4] = 0.0
    w[5] = -3e-41 if dtype != "fp16" else -3e-7  # a constant subnormal row
    w[6] *= 1e-30 if dtype != "fp16" else 1e-6
    w[7] = w[7] * 1e-40 + 1e-39 if dtype != "fp16" else w[7] * 1e-7
    w[8] = 0.0  # zeros but one subnormal element: not constant, though every fp32 square is 0
    w[8, 40] = 1e-40 if dtype != "fp16" else 1e-7
    w = w.to(DTYPES[dtype])
    got = tev(w, per_token=True)
    ref = tev_reference(w)
    check(got, ref)
    assert torch.equal(got.per_token[3:6], torch.zeros(3))
    check_per_token_fp32(got.per_token[6:9], ref.per_token[6:9])
    assert (got.per_token[6:9] > 0).all()


def test_all_rows_nonfinite_gives_nan_and_count():
    w = torch.full((4, 8), float("nan"))
    got = tev(w)
    assert got.rows == 0 and got.nonfinite_rows == 4
    assert math.isnan(got.mean) and math.isnan(got.std)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_rows_subset(index_dtype, poison_empty):
    w = make(2000, 128, torch.float32, seed=13)
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 2000, (700,), generator=g).to(index_dtype)  # unsorted, with repeats
    got = tev(w, rows=rows, per_token=True)
    ref = tev_reference(w, rows=rows)
    assert got.rows == 700 and got.per_token.shape == (700,)
    check(got, ref)
    # A strided index and a Python list give the same answer.
    assert tev(w, rows=rows.repeat_interleave(2)[::2]).mean == got.mean
    assert tev(w, rows=rows.tolist()).mean == got.mean


def test_unbiased():
    w = make(300, 40, seed=21)
    ref = tev_reference(w, unbiased=True)
    got = tev(w, unbiased=True)
    assert rel(got.std, ref.std) <= RTOL
    assert rel(got.std, tev(w).std * math.sqrt(300 / 299)) <= 1e-12


def test_embedding_module_and_requires_grad():
    emb = torch.nn.Embedding(100, 32)
    got = tev(emb)
    check(got, tev_reference(emb.weight.detach()))
    assert emb.weight.grad is None


def test_public_name_and_result_type():
    w = make(10, 8)
    s = mlra_kernels.tev(w)
    assert isinstance(s, mlra_kernels.TEVStats)
    assert isinstance(s.mean, float) and isinstance(s.std, float) and s.per_token is None


def test_deterministic_across_thread_counts():
    w = make(3000, 300, torch.bfloat16, seed=2)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tev(w)
        torch.set_num_threads(max(2, old))
        many = tev(w)
    finally:
        torch.set_num_threads(old)
    assert (one.mean, one.std) == (many.mean, many.std)


def test_shard_partials_merge_to_whole():
    w = make(1001, 50, seed=4)
    w[500, 3] = float("nan")
    parts = torch.stack([torch.ops.mlra.tev_partials(s, None, False)[0] for s in torch.tensor_split(w, 3)])
    whole = torch.ops.mlra.tev_partials(w, None, False)[0]
    torch.testing.assert_close(merge_partials(parts), whole, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "make_bad, exc, match",
    [
        (lambda: torch.randn(10), ValueError, "2-D"),
        (lambda: torch.randn(2, 3, 4), ValueError, "2-D"),
        (lambda: torch.randint(0, 5, (4, 4)), TypeError, "dtype"),
        (lambda: torch.randn(4, 4, dtype=torch.float64), TypeError, "dtype"),
        (lambda: torch.randn(0, 8), ValueError, "empty"),
        (lambda: torch.randn(8, 0), ValueError, "empty"),
        (lambda: [[1.0, 2.0]], TypeError, "tensor"),
    ],
    ids=["1d", "3d", "int", "float64", "no_rows", "no_cols", "list"],
)
def test_bad_weight(make_bad, exc, match):
    with pytest.raises(exc, match=match):
        tev(make_bad())


@pytest.mark.parametrize(
    "rows, exc, match",
    [
        ([0, 5, 10], IndexError, r"1 entries of `rows` are outside \[0, 10\)"),
        ([-1, 2], IndexError, "outside"),
        (np.array([3, 10]), IndexError, "outside"),
        ([], ValueError, "no rows"),
        (np.array([], dtype=np.int64), ValueError, "no rows"),
        (torch.tensor([True, False]), TypeError, r"mask\.nonzero\(\)\[:, 0\]"),
        ([True, False, True], TypeError, r"boolean mask.*mask\.nonzero\(\)\[:, 0\]"),
        ([True, 2], TypeError, "boolean mask"),
        (np.array([True, False, True]), TypeError, r"boolean mask.*flatnonzero"),
        (torch.tensor([1.0]), TypeError, "`rows` must hold integer row indices.*int32 or int64"),
        ([0.9, 2.7], TypeError, "`rows` must hold integer row indices.*never truncated"),
        ((1, 2.0), TypeError, "`rows` must hold integer"),
        (np.array([0.9, 2.7]), TypeError, "`rows` must hold integer.*float64"),
        (np.float32(2.0), TypeError, "`rows` must hold integer"),
        (torch.tensor([1], dtype=torch.uint8), TypeError, r"uint8.*rows\.long\(\)"),
        ("0,1", TypeError, "`rows` must hold integer"),
        ([1, "a"], TypeError, "`rows` must be a tensor, numpy array or sequence"),
        (torch.tensor([1], device="meta"), ValueError, "`rows` is on the meta device"),
    ],
    ids=["too_big", "negative", "numpy_too_big", "empty", "numpy_empty", "bool", "bool_list", "bool_in_int_list",
         "bool_numpy", "float", "float_list", "float_in_tuple", "float_numpy", "numpy_float_scalar", "uint8",
         "str", "str_in_list", "meta"],
)
def test_bad_rows(rows, exc, match):
    with pytest.raises(exc, match=match):
        tev(make(10, 4), rows=rows)


@pytest.mark.parametrize(
    "rows",
    [
        [3, 0, 9, 3],
        (3, 0, 9, 3),
        np.array([3, 0, 9, 3]),
        np.array([3, 0, 9, 3], dtype=np.uint16),
        [np.int64(3), np.int32(0), 9, 3],
        torch.tensor([3, 0, 9, 3], dtype=torch.int16),
    ],
    ids=["list", "tuple", "numpy", "numpy_uint16", "numpy_scalars", "int16"],
)
def test_rows_of_every_integer_kind_read_the_same(rows):
    w = make(10, 6, seed=8)
    want = tev(w, rows=torch.tensor([3, 0, 9, 3]), per_token=True)
    got = tev(w, rows=rows, per_token=True)
    assert (got.mean, got.std, got.rows) == (want.mean, want.std, 4)
    assert torch.equal(got.per_token, want.per_token)
    assert tev(w, rows=range(2, 7)).mean == tev(w, rows=torch.arange(2, 7)).mean


def test_meta_weight_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="weight is on the meta device.*real values on the CPU or a CUDA device"):
        tev(torch.empty(10, 4, device="meta"))
    with torch.device("meta"):
        emb = torch.nn.Embedding(10, 4)
    with pytest.raises(ValueError, match="meta device"):
        tev(emb)


@pytest.mark.parametrize("group", ["WORLD", 0, 3, object()], ids=["str", "zero", "int", "object"])
def test_process_group_of_the_wrong_type(group):
    with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup.*or None"):
        tev(make(10, 4), process_group=group)


def test_op_checks_its_arguments():
    ensure_loaded()
    with pytest.raises(RuntimeError, match="2-D"):
        torch.ops.mlra.tev_partials(torch.randn(3), None, False)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.mlra.tev_partials(torch.ones(3, 3, dtype=torch.int32), None, False)
    with pytest.raises(RuntimeError, match="empty"):
        torch.ops.mlra.tev_partials(torch.ones(0, 3), None, False)
    stats, _ = torch.ops.mlra.tev_partials(torch.randn(4, 3), torch.tensor([0, 9, -2]), False)
    assert stats[4].item() == 2  # out-of-range indices are reported in the stats


@pytest.mark.parametrize(
    "args",
    [
        lambda: (make(50, 24), None, True),
        lambda: (make(50, 24, torch.bfloat16)[:, :20], torch.tensor([3, 1, 49]), True),
        lambda: (make(33, 16, torch.float16), torch.tensor([0, 32], dtype=torch.int32), False),
    ],
    ids=["fp32", "bf16_strided_rows", "fp16_int32_rows"],
)
def test_opcheck(args):
    ensure_loaded()
    torch.library.opcheck(torch.ops.mlra.tev_partials.default, args())


def test_torch_compile_fullgraph():
    ensure_loaded()

    def f(w):
        stats, pt = torch.ops.mlra.tev_partials(w, None, True)
        return stats[1] * 2, pt + 1

    w = make(64, 32)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    a, b = compiled(w)
    ea, eb = f(w)
    assert torch.equal(a, ea) and torch.equal(b, eb)


def test_cuda_weight_with_a_cpu_only_extension_says_how_to_rebuild(monkeypatch):
    from mlra_kernels import _ext
    from mlra_kernels.ops.tev import op

    class LooksCuda(torch.Tensor):  # what tev_partials sees of a CUDA tensor, without a GPU
        @property
        def is_cuda(self):
            return True

    ensure_loaded()
    monkeypatch.setattr(_ext, "build_info_file", lambda: {"with_cuda": False})
    w = torch.Tensor._make_subclass(LooksCuda, torch.randn(4, 8))
    with pytest.raises(_ext.ExtensionNotAvailableError, match="built without CUDA.*pip install --no-build-isolation"):
        op.tev_partials(w)


def test_reference_refuses_rows_it_would_misread():
    w = make(10, 4)
    with pytest.raises(TypeError, match="integer row indices"):
        tev_reference(w, rows=[0.9, 2.7])
    with pytest.raises(TypeError, match="integer row indices"):
        tev_reference(w, rows=torch.tensor([True, False]))
    with pytest.raises(IndexError, match="outside"):
        tev_reference(w, rows=[-1])


def test_rows_on_the_meta_device_is_a_clear_error_and_a_meta_weight_gives_meta_shapes():
    from mlra_kernels.ops.tev.op import tev_partials

    ensure_loaded()
    w = make(10, 4)
    meta_rows = torch.tensor([1, 2], device="meta")
    for call in (lambda: tev_partials(w, meta_rows), lambda: torch.ops.mlra.tev_partials(w, meta_rows, True)):
        with pytest.raises(ValueError, match=r"`rows` is on the meta device.*on weight's device \(cpu\)"):
            call()
    meta_w = torch.empty(10, 4, device="meta")
    stats, pt = tev_partials(meta_w, None, True)  # shapes only, as any op on meta tensors
    assert (stats.device.type, stats.shape, stats.dtype, pt.shape) == ("meta", (5,), torch.float64, (10,))
    assert tev_partials(meta_w, meta_rows, True)[1].shape == (2,)
    with pytest.raises(ValueError, match=r"`rows` is on cpu but weight is on meta"):
        tev_partials(meta_w, torch.tensor([1, 2]))
