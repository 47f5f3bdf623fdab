"""torch.nn modules built on the MLRA op."""

from mlra_kernels.nn.attention import MLRAttention, default_rank, factorize_in_proj
from mlra_kernels.nn.convert import replace_mha

__all__ = ["MLRAttention", "default_rank", "factorize_in_proj", "replace_mha"]
