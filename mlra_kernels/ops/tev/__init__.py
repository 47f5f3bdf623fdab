"""TEV (Token Embedding Variability): a streaming C++ / CUDA reduction of the embedding matrix."""

from .api import tev
from .reference import tev_reference
from .stats import TEVStats

__all__ = ["tev", "TEVStats", "tev_reference"]
