"""Bad inputs to ``mlra_decode`` on the CPU: each a clear error naming the argument, on every path."""

import pytest
import torch

from mlra_kernels.ops.mlra import mlra_decode, use_backend
from tests.helpers import decode_case

CPU_PATHS = ["torch", "auto"]  # "auto": the C++ kernel where the extension is built, else the torch path


BAD_LENGTHS = {"negative": (1, -1), "zero": (1, 0), "below-t": (2, 1), "above-S": (1, 13), "huge": (2, 2**40)}


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("t,bad", list(BAD_LENGTHS.values()), ids=list(BAD_LENGTHS))
def test_cache_seqlens_outside_t_to_S_is_an_error(path, t, bad):
    B, S, H, g, r, dh = 2, 8, 2, 1, 8, 8
    x, down, up, bias, c_k, c_v = decode_case(B, t, S, H, g, r, dh)
    lengths = torch.tensor([S, bad], dtype=torch.int64)
    with use_backend(path), torch.no_grad(), pytest.raises(
            ValueError, match=rf"cache_seqlens\[1\] = {bad} is outside \[t, S\] = \[{t}, {S}\]"):
        mlra_decode(x, down, up, bias, cache_k=c_k, cache_v=c_v, num_heads=H, latent_groups=g, cache_seqlens=lengths)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_cache_seqlens_at_both_ends_of_the_range_is_accepted(path):
    B, t, S, H, g, r, dh = 2, 2, 8, 2, 1, 8, 8
    x, down, up, bias, c_k, c_v = decode_case(B, t, S, H, g, r, dh)
    lengths = torch.tensor([t, S], dtype=torch.int32)
    with use_backend(path), torch.no_grad():
        out, _ = mlra_decode(x, down, up, bias, cache_k=c_k, cache_v=c_v, num_heads=H, cache_seqlens=lengths)
    assert out.shape == (B, t, H * dh) and torch.isfinite(out).all()
