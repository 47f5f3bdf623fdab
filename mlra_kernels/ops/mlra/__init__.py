"""Multi-head Low-Rank Attention.

- ``mlra_attention``: self-attention over a whole sequence (training, prefill); Triton on CUDA.
- ``mlra_attention_dense``: cross-attention, attention weights, general masks (scores in memory).
- ``mlra_decode``: new tokens attending the latent KV cache (absorbed form); ``kv_latents`` gives what
  the cache stores.
- ``decode_step``: a layer's whole decode step on its cache (``LatentCache``), the output projection
  included (``OutputProjection``, step weights kept in a ``StepWeightsMemo``).
- ``kernel_path`` / ``explain``: which path a call takes and why; ``use_backend`` forces one.
- ``factorize`` / ``factors_from_dense`` / ``dense_from_factors``: dense weights ↔ MLRA factors.
"""

from mlra_kernels.ops.mlra.backend import explain, kernel_path, use_backend
from mlra_kernels.ops.mlra.decode import mlra_decode
from mlra_kernels.ops.mlra.dense import mlra_attention_dense
from mlra_kernels.ops.mlra.layout import dense_from_factors, factorize, factors_from_dense, kv_latents
from mlra_kernels.ops.mlra.prefill import mlra_attention
from mlra_kernels.ops.mlra.step import LatentCache, OutputProjection, decode_step
from mlra_kernels.ops.mlra.step_weights import StepWeightsMemo

__all__ = [
    "mlra_attention", "mlra_attention_dense", "mlra_decode", "kernel_path", "explain", "use_backend",
    "factorize", "factors_from_dense", "dense_from_factors", "kv_latents", "decode_step", "LatentCache",
    "OutputProjection", "StepWeightsMemo",
]
