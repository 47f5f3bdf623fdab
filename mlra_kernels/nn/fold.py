"""Whether a layer may hand its output projection's weights to ``decode_step`` instead of being called.

A decode step that folds ``W_O`` into its step weights reads the projection's ``weight`` and ``bias`` and
never calls it: that is right only for a plain layer of the expected class, with its class's ``forward``,
plain tensor weights and no forward hook (a LoRA or quantized wrapper, ``weight_norm`` or offloading hooks
would be skipped). The module decides that here; the op never inspects modules.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mlra_kernels._warnings import warn_once
from mlra_kernels.ops.mlra.step import OutputProjection


def _plain_tensor(t: Optional[Tensor]) -> bool:
    return t is None or type(t) in (torch.Tensor, nn.Parameter)


def _not_plain(layer: nn.Module, layer_type: type) -> Optional[str]:
    """Why reading ``layer``'s ``weight`` and ``bias`` instead of calling it would skip something (None:
    it would not)."""
    from torch.nn.modules import module as nn_module

    if type(layer) is not layer_type:
        return f"is a {type(layer).__name__}, not a plain {layer_type.__name__}"
    if "forward" in vars(layer):
        return f"is a {layer_type.__name__} whose forward was replaced on the instance"
    if layer._forward_hooks or layer._forward_pre_hooks:
        return f"is a {layer_type.__name__} with forward hooks"
    if getattr(nn_module, "_global_forward_hooks", None) or getattr(nn_module, "_global_forward_pre_hooks", None):
        return "would run global module forward hooks"
    for name in ("weight", "bias"):
        if not _plain_tensor(getattr(layer, name, None)):
            return f"has a {name} of type {type(getattr(layer, name)).__name__}"
    return None


def foldable_output(layer: nn.Module, layer_type: type, *, owner: str, training: bool,
                    transposed: bool = False) -> Optional[OutputProjection]:
    """``layer``'s weights for ``decode_step`` to fold, or None: in training mode (the weights change at
    every step), while ``torch.compile`` traces (the compiled step runs op by op), or when ``layer`` is not
    a plain ``layer_type`` (warned once per reason: the step then calls it). ``transposed``: the weight is
    ``[in, out]`` (a Hugging Face ``Conv1D``)."""
    if training or torch.compiler.is_compiling():
        return None
    why = _not_plain(layer, layer_type)
    if why is not None:
        warn_once(f"decode-step-{owner}-out-layer-{why}",
                  f"{owner}: its output projection {why}; so that it runs as it is, a decode step calls it after "
                  "mlra_decode instead of running on the pre-multiplied step weights (slower: more weights read, "
                  "more calls).")
        return None
    return OutputProjection(layer.weight, layer.bias, transposed)


class ClearsStepMemo:
    """Mixin for a layer that keeps its decode step weights in ``_step_memo``: ``.to()``, ``.half()`` and the
    like clear them (the weights are a derived copy)."""

    def _apply(self, fn, *args, **kwargs):
        memo = getattr(self, "_step_memo", None)  # None during __init__
        if memo is not None:
            memo.clear()
        return super()._apply(fn, *args, **kwargs)
