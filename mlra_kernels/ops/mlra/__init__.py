"""Multi-head Low-Rank Attention op: ``mlra_attention`` (Triton on CUDA, reference on CPU)."""

from mlra_kernels.ops.mlra.functional import factors_from_dense, mlra_attention

__all__ = ["mlra_attention", "factors_from_dense"]
