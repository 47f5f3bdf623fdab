"""torch.nn modules built on the MLRA ops."""

from mlra_kernels.nn.attention import MLRAttention, factorize_in_proj
from mlra_kernels.nn.convert import replace_mha
from mlra_kernels.nn.projection import MLRAProjection
from mlra_kernels.ops.mlra.layout import default_rank

__all__ = ["MLRAttention", "MLRAProjection", "default_rank", "factorize_in_proj", "replace_mha"]
