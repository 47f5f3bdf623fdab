"""Swap ``nn.MultiheadAttention`` modules of a model for ``MLRAttention``."""

from __future__ import annotations

import logging
from typing import Optional

from torch import nn

from mlra_kernels._warnings import warn_once
from mlra_kernels.nn.attention import MLRAttention

logger = logging.getLogger(__name__)


def replace_mha(
    model: nn.Module,
    rank: Optional[int] = None,
    latent_groups: int = 1,
    *,
    init: str = "svd",
) -> int:
    """Replace every ``nn.MultiheadAttention`` inside ``model`` with an :class:`MLRAttention`, in place.

    Args:
        model: any module; ``model`` itself cannot be the attention (wrap it or use
            :meth:`MLRAttention.from_mha`).
        rank: rank per latent group; default ``embed_dim // 4`` (see ``default_rank``).
        latent_groups: number of latent groups ``g`` (must divide each module's ``num_heads``).
        init: ``"svd"`` (default) converts the trained weights with :meth:`MLRAttention.from_mha`,
            so at ``rank = embed_dim`` the model's outputs do not change; ``"random"`` starts from
            the MLRA default init N(0, 0.02), keeping only ``batch_first``, dropout and bias.

    Returns:
        The number of modules replaced.

    ``nn.TransformerEncoder`` objects that hold a replaced layer get ``use_nested_tensor = False``:
    their nested-tensor fast path reads ``in_proj_weight``, which MLRA does not have.

    The cross-attention of an ``nn.TransformerDecoderLayer`` (``multihead_attn``, also inside
    ``nn.Transformer``) runs MLRA's unfused dense path, since its query (the decoder's input) and its
    key and value (the encoder's memory) differ; the fused op covers self-attention. This is said once,
    in a warning here, and those layers do not warn again at each call.

    Example::

        >>> layer = nn.TransformerEncoderLayer(32, 4, batch_first=True)
        >>> enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        >>> replace_mha(enc, rank=32)
        2
    """
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    if isinstance(model, nn.MultiheadAttention):
        raise TypeError("model is itself an nn.MultiheadAttention; use MLRAttention.from_mha(model, rank)")
    count = 0
    cross = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.MultiheadAttention):
                continue
            where = f"{parent_name}.{name}" if parent_name else name
            if init == "svd":
                new = MLRAttention.from_mha(child, rank, latent_groups)
                logger.info("replaced %s: relative error %s", where, new.svd_error)
            else:
                if not child._qkv_same_embed_dim or child.bias_k is not None or child.add_zero_attn:
                    raise ValueError(
                        f"{where}: MLRAttention needs kdim == vdim == embed_dim, no add_bias_kv and no add_zero_attn"
                    )
                new = MLRAttention(
                    child.embed_dim, child.num_heads, rank=rank, latent_groups=latent_groups,
                    dropout=child.dropout, bias=child.in_proj_bias is not None, batch_first=child.batch_first,
                    device=child.out_proj.weight.device, dtype=child.out_proj.weight.dtype,
                )
                new.train(child.training)
            if isinstance(parent, nn.TransformerDecoderLayer) and name == "multihead_attn":
                new._cross_attention_expected = True
                cross.append(where)
            setattr(parent, name, new)
            count += 1
    if cross:
        listed = ", ".join(cross[:4]) + (f" and {len(cross) - 4} more" if len(cross) > 4 else "")
        warn_once(
            "replace_mha:decoder-cross-attention",
            f"replace_mha: the cross-attention of nn.TransformerDecoderLayer ({listed}) runs MLRAttention's "
            "unfused dense path (mlra_attention_dense), because its query (the decoder's input) and its key and "
            "value (the encoder's memory) are different tensors; the fused MLRA op covers self-attention (the "
            "self_attn layers run it).",
        )
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
            isinstance(getattr(layer, "self_attn", None), MLRAttention) for layer in module.layers
        ):
            module.use_nested_tensor = False
    return count
