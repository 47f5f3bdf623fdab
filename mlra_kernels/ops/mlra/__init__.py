"""Multi-head Low-Rank Attention op."""

from mlra_kernels.ops.mlra.reference import mlra_attention_reference as mlra_attention

__all__ = ["mlra_attention"]
