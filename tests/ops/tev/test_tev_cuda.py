"""The CUDA TEV kernel against the float64 reference. Skipped with a reason when no GPU is visible."""

import pytest
import torch

from mlra_kernels.ops.tev import tev, tev_reference
from mlra_kernels.ops.tev.op import ensure_loaded, tev_partials

pytestmark = pytest.mark.gpu

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RTOL = 1e-6


def make(v, d, dtype, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    scale = 0.5 + torch.rand(v, 1, generator=g, dtype=torch.float64)
    x = torch.randn(v, d, generator=g, dtype=torch.float64) * scale + offset
    return x.to(dtype).cuda()


def check(got, ref):
    assert got.rows == ref.rows and got.nonfinite_rows == ref.nonfinite_rows
    assert abs(got.mean - ref.mean) <= RTOL * abs(ref.mean), (got.mean, ref.mean)
    assert abs(got.std - ref.std) <= RTOL * abs(ref.std), (got.std, ref.std)
    if got.per_token is not None:
        pt, rt = got.per_token.double().cpu(), ref.per_token.cpu()
        assert torch.equal(torch.isnan(pt), torch.isnan(rt))
        ok = ~torch.isnan(rt)
        torch.testing.assert_close(pt[ok], rt[ok], rtol=RTOL, atol=0)


@pytest.fixture(autouse=True)
def _loaded():
    ensure_loaded()
    from mlra_kernels import _ext

    if not _ext.built_with_cuda():
        pytest.fail("a GPU is visible but mlra_kernels._C was built without CUDA; rebuild with nvcc available")


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(
    "v,d", [(1, 8), (7, 63), (1000, 64), (50257, 768), (3, 100000)], ids=["1x8", "7x63", "1000x64", "50257x768", "3x1e5"]
)
def test_shapes(v, d, dtype, poison_empty):
    w = make(v, d, DTYPES[dtype], seed=v + d)
    got, ref = tev(w, per_token=True), tev_reference(w)
    if v == 1:
        assert got.std == 0.0 and abs(got.mean - ref.mean) <= RTOL * ref.mean
        return
    check(got, ref)


def test_offset_rows_fp32():
    w = make(4096, 768, torch.float32, seed=3, offset=1e4)
    check(tev(w), tev_reference(w))


def test_128k_x_4096_bf16():
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(131072, 4096, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    check(tev(w), tev_reference(w, chunk_elems=1 << 26))


@pytest.mark.parametrize("view", ["row_stride", "misaligned", "transposed", "every_other_row", "expanded"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_strided_views(view, dtype, poison_empty):
    base = make(600, 160, DTYPES[dtype], seed=5)
    w = {
        "row_stride": base[:, :128],  # 16-byte loads, row stride 160
        "misaligned": base[:, 1:121],  # row starts not 16-byte aligned: scalar path
        "transposed": base[:, :90].t(),
        "every_other_row": base[::2],
        "expanded": base[7:8].expand(50, 160),
    }[view]
    got, ref = tev(w, per_token=True), tev_reference(w)
    if view == "expanded":
        assert got.std == 0.0
        return
    check(got, ref)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_nonfinite_rows(dtype, poison_empty):
    w = make(500, 96, DTYPES[dtype], seed=9)
    w[3, 10] = float("nan")
    w[17, 0] = float("inf")
    w[250, 95] = float("-inf")
    got, ref = tev(w, per_token=True), tev_reference(w)
    assert got.nonfinite_rows == 3
    check(got, ref)


def test_huge_finite_rows_are_counted_not_dropped(poison_empty):
    w = make(300, 64, torch.float32, seed=21).double()
    w[5] *= 1e19
    w[77] = w[77] * 1e30 + 3e30
    w[140, 7] = float("nan")
    for dtype in (torch.float32, torch.bfloat16):
        wd = w.to(dtype)
        got, ref = tev(wd.cuda()), tev_reference(wd)
        assert got.nonfinite_rows == 1 and got.rows == 299
        assert abs(got.mean - ref.mean) <= 1e-6 * ref.mean and abs(got.std - ref.std) <= 1e-6 * ref.std


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_rows_subset_and_bad_index(index_dtype, poison_empty):
    w = make(2000, 128, torch.bfloat16, seed=13)
    rows = torch.randint(0, 2000, (700,), generator=torch.Generator().manual_seed(1)).to(index_dtype).cuda()
    check(tev(w, rows=rows, per_token=True), tev_reference(w, rows=rows))
    with pytest.raises(IndexError, match="outside"):
        tev(w, rows=torch.tensor([0, 2000], dtype=index_dtype, device="cuda"))


def test_matches_cpu_kernel():
    w = make(3000, 200, torch.bfloat16, seed=8)
    a, b = tev(w), tev(w.cpu())
    assert abs(a.mean - b.mean) <= 1e-7 * b.mean and abs(a.std - b.std) <= 1e-6 * b.std


def test_no_host_sync_in_the_op():
    w = make(4096, 768, torch.bfloat16, seed=1)
    tev_partials(w, None, True)  # warm up allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats, pt = tev_partials(w, torch.arange(100, device="cuda"), True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats.is_cuda and pt.is_cuda and pt.shape == (100,)


def test_opcheck_cuda():
    w = make(50, 24, torch.bfloat16)
    torch.library.opcheck(torch.ops.mlra.tev_partials.default, (w, None, True))
    torch.library.opcheck(torch.ops.mlra.tev_partials.default, (w[:, :20], torch.tensor([1, 3], device="cuda"), False))


@pytest.mark.parametrize("view", ["vectorised", "strided"])
@pytest.mark.parametrize(
    "dtype, scale",
    [("fp32", 1e-21), ("fp32", 1e-25), ("fp32", 1e-30), ("fp32", 1e-40), ("bf16", 1e-30), ("bf16", 1e-39)],
    ids=["fp32-1e-21", "fp32-1e-25", "fp32-1e-30", "fp32-1e-40", "bf16-1e-30", "bf16-1e-39"],
)
def test_tiny_rows_are_redone_in_fp64(dtype, scale, view, poison_empty):
    # fp32 squares of |x| below ~1e-19 underflow; such rows are redone in fp64 (needs_fp64), in both kernels.
    w = (make(300, 128, torch.float64, seed=17).cpu() * scale).to(DTYPES[dtype]).cuda()
    w[5] = 0.0  # a constant row: TEV exactly 0
    if view == "strided":
        w = w.t().contiguous().t()
    got, ref = tev(w, per_token=True), tev_reference(w)
    assert got.rows == 300 and got.nonfinite_rows == 0 and got.per_token[5].item() == 0.0
    assert abs(got.mean - ref.mean) <= RTOL * ref.mean and abs(got.std - ref.std) <= RTOL * ref.std
    torch.testing.assert_close(got.per_token.cpu(), ref.per_token.cpu().float(), rtol=RTOL, atol=2.0**-149)
