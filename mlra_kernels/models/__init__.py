"""Reference models built on the package's modules and ops."""

from mlra_kernels.models.gpt2 import GPT2, GPT2Config

__all__ = ["GPT2", "GPT2Config"]
