"""More than 2^31 elements on the CPU: offsets past 2^31 need int64 indexing all the way down."""

import pytest
import torch

from mlra_kernels.ops.tev import tev, tev_reference


@pytest.mark.slow
def test_more_than_2_pow_31_elements_bf16():
    d = 4096
    v = (1 << 31) // d + 2  # 2^31 + 8192 elements (4 GiB in bf16); rows >= 2^31 / d start past 2^31
    period = 512
    g = torch.Generator().manual_seed(0)
    block = (torch.randn(period, d, generator=g) * (0.5 + torch.rand(period, 1, generator=g))).to(torch.bfloat16)
    try:
        w = torch.empty(v, d, dtype=torch.bfloat16)
    except RuntimeError as err:  # not enough memory on this machine
        pytest.skip(f"needs 4 GiB of free memory: {err}")
    full, rest = divmod(v, period)
    w[: full * period].view(full, period, d).copy_(block.expand(full, period, d))
    w[full * period :] = block[:rest]
    # The last two rows, wholly past element 2^31, get their own values; an int32 offset would wrap.
    tail = (torch.randn(2, d, generator=g) * torch.tensor([[3.0], [7.0]])).to(torch.bfloat16)
    w[-2:] = tail
    assert w.numel() > 2**31 and (v - 2) * d >= 2**31

    got = tev(w, per_token=True)

    # Reference without a 16 GiB float64 copy: rows repeat with period 512, except the last two.
    ref_block = tev_reference(block, chunk_elems=1 << 22).per_token
    ref_tail = tev_reference(tail).per_token
    reps = torch.arange(v - 2) % period
    per_token = torch.cat([ref_block[reps], ref_tail])
    mean = per_token.mean().item()
    std = per_token.std(unbiased=False).item()
    assert got.rows == v and got.nonfinite_rows == 0
    assert abs(got.mean - mean) <= 1e-6 * mean and abs(got.std - std) <= 1e-6 * std
    torch.testing.assert_close(got.per_token[-2:].double(), ref_tail, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.per_token[:period].double(), ref_block, rtol=1e-6, atol=0)

    # A subset reaching past 2^31 elements, with int64 indices.
    rows = torch.tensor([v - 1, 0, v - 2, v - 3], dtype=torch.int64)
    sub = tev(w, rows=rows, per_token=True)
    expect = torch.stack([ref_tail[1], ref_block[0], ref_tail[0], ref_block[(v - 3) % period]])
    torch.testing.assert_close(sub.per_token.double(), expect, rtol=1e-6, atol=0)
