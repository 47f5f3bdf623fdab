"""Integrations with other libraries, each imported on its own so that none is required.

- ``mlra_kernels.integrations.transformers``: ``convert_gpt2``, ``TEVTrainerCallback``
- ``mlra_kernels.integrations.lightning``: ``TEVLightningCallback`` (when Lightning is installed)
"""
