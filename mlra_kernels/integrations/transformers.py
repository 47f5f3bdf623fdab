"""Hugging Face transformers: convert a GPT-2 to MLRA, and a TEV ``TrainerCallback``.

Needs ``transformers`` 5.x (an optional extra: ``pip install mlra-kernels[transformers]``).

What the converted attention supports:

- the ``eager`` and ``sdpa`` attention implementations. A forward over a sequence with nothing cached
  yet for the layer (training, evaluation, the prefill of ``generate()``; the empty ``DynamicCache``
  that ``GPT2Model`` makes by default counts as nothing cached) calls the fused ``mlra_attention``
  when the attention mask is None or exactly causal, optionally with key padding (the 4-D masks that
  ``create_causal_mask`` builds from a 2-D ``attention_mask``, boolean or additive); padding goes in as
  ``key_padding_mask``. The latents are still written to the cache. A padding query whose keys are
  all padding then outputs zeros, where the dense path outputs an arbitrary average; real tokens are
  unaffected. Decode steps (tokens already cached) and any other mask go through the same
  ``ALL_ATTENTION_FUNCTIONS`` interface as ``GPT2Attention``, so masks mean exactly what they mean
  there; a general mask warns once that the fused op is not used;
- ``past_key_values`` as a ``DynamicCache`` (the default of ``generate()``): each layer stores the
  latents ``c_K, c_V`` as ``[B, 1, S, g·r]`` in the cache's key/value slots, so the cache holds
  ``2·g·r`` numbers per token and layer instead of ``2·d``; sequence length, cropping and beam
  reordering work unchanged. A ``StaticCache`` preallocates ``[B, H, S, d_h]`` and is not supported;
- self-attention only: the cross-attention of ``add_cross_attention`` models is left dense;
- ``reorder_and_upcast_attn`` is ignored (the attention interface computes in the input dtype);
- ``torch.compile``: a mask tensor cannot be inspected while tracing, so any layer that receives one
  takes the dense attention, without a warning (a warning would break the graph). With ``eager``
  attention GPT-2 always builds a 4-D mask. For the fused op under compile, use
  ``attn_implementation="sdpa"`` and no padding: the layers then receive no mask.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any, Optional

import torch
from torch import Tensor, nn

from mlra_kernels._mask_memo import memo_by_tensor
from mlra_kernels._warnings import warn_once
from mlra_kernels.nn.attention import default_rank, factorize_in_proj
from mlra_kernels.ops.mlra import mlra_attention

try:
    import transformers
    from transformers import TrainerCallback
except ImportError as _err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "mlra_kernels.integrations.transformers needs the transformers package: pip install transformers"
    ) from _err

from transformers.cache_utils import EncoderDecoderCache
from transformers.models.gpt2 import modeling_gpt2


_INITS = ("svd", "random")


def _causal_padding(mask: Any, batch: int, length: int) -> tuple[bool, Optional[Tensor]]:
    """``_inspect_mask``, memoised per mask tensor: ``GPT2Model`` hands every layer the same mask, so it
    is read on the host (one device sync) once per forward, not once per layer (under
    ``torch.inference_mode`` once per layer: inference tensors cannot be memoised).

    Under ``torch.compile`` a mask tensor is not read at all (that would break the graph): the layer
    takes the dense attention, which applies the mask as given.
    """
    if not isinstance(mask, Tensor):
        return _inspect_mask(mask, batch, length)
    if torch.compiler.is_compiling():
        return False, None
    return memo_by_tensor(("gpt2-causal-padding", batch, length), mask, lambda: _inspect_mask(mask, batch, length))


def _inspect_mask(mask: Any, batch: int, length: int) -> tuple[bool, Optional[Tensor]]:
    """Whether ``mask`` is causal attention with (optional) key padding, and that padding.

    ``mask`` is what ``GPT2Model`` hands its attention layers for a prefill: None, or a ``[B | 1, 1, T, T]``
    mask, boolean (True = attend) or additive float (0 = attend, a large negative number or -inf =
    masked). Returns ``(True, None)`` for None or a purely causal mask, ``(True, key_padding_mask)``
    (``[B, T]`` bool, True = padding) when the mask is exactly ``causal & ~key_padding_mask``, and
    ``(False, None)`` for anything else. The last query's row gives the padding, since under the causal
    mask it sees every key; one comparison over the ``T × T`` mask checks the rest.
    """
    if mask is None:
        return True, None
    if (
        not isinstance(mask, Tensor) or mask.dim() != 4 or mask.shape[1] != 1
        or mask.shape[0] not in (1, batch) or tuple(mask.shape[2:]) != (length, length)
    ):
        return False, None
    m = mask[:, 0]
    if m.dtype == torch.bool:
        allowed, odd = m, None
    elif m.is_floating_point():
        allowed = m == 0
        odd = ~(allowed | (m <= torch.finfo(m.dtype).min / 2))  # a bias that is neither 0 nor "masked"
    else:
        return False, None
    keep = allowed[:, -1, :]  # [B | 1, T]: True = a real (non-padding) key
    causal = torch.ones(length, length, dtype=torch.bool, device=m.device).tril()
    mismatch = allowed != (causal & keep[:, None, :])
    if odd is not None:
        mismatch = mismatch | odd
    general, no_padding = torch.stack([mismatch.any(), keep.all()]).tolist()  # one host sync
    if general:
        return False, None
    if no_padding:
        return True, None
    return True, (~keep).expand(batch, length).contiguous()


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def _check_args(rank: Any, latent_groups: Any, init: Any, embed_dim: int, num_heads: int) -> tuple[int, int]:
    """Validate the conversion arguments; returns ``(rank, latent_groups)`` as plain ints."""
    rank = _positive_int("rank", rank)
    if rank > embed_dim:
        raise ValueError(f"rank must be in [1, embed_dim={embed_dim}], got {rank}")
    latent_groups = _positive_int("latent_groups", latent_groups)
    if num_heads % latent_groups != 0:
        raise ValueError(f"latent_groups={latent_groups} must divide num_heads={num_heads}")
    if not isinstance(init, str) or init not in _INITS:
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    return rank, latent_groups


class MLRAGPT2Attention(nn.Module):
    """GPT-2 self-attention with MLRA Q/K/V projections; the output projection ``c_proj`` is kept.

    Parameters: ``down`` ``[3·g·r, d]``, ``up`` ``[3, d, r]``, ``qkv_bias`` ``[3·d]`` (layouts of
    ``mlra_kernels/ops/mlra/reference.py``), and the original ``c_proj`` (a ``Conv1D``).
    """

    def __init__(self, attn: nn.Module, rank: int, latent_groups: int = 1, init: str = "svd") -> None:
        super().__init__()
        if getattr(attn, "is_cross_attention", False):
            raise ValueError("MLRAGPT2Attention replaces self-attention only")
        d, H = attn.embed_dim, attn.num_heads
        rank, latent_groups = _check_args(rank, latent_groups, init, d, H)
        self.config = attn.config
        self.layer_idx = attn.layer_idx
        self.embed_dim, self.num_heads, self.head_dim = d, H, d // H
        self.rank, self.latent_groups = rank, latent_groups
        self.scaling = attn.scaling
        self.is_causal = True
        self.is_cross_attention = False
        self.attn_dropout = attn.attn_dropout
        self.resid_dropout = attn.resid_dropout
        self.c_proj = attn.c_proj
        w = attn.c_attn.weight  # Conv1D: [d, 3·d], y = x @ w + b
        self.down = nn.Parameter(torch.empty(3 * latent_groups * rank, d, device=w.device, dtype=w.dtype))
        self.up = nn.Parameter(torch.empty(3, d, rank, device=w.device, dtype=w.dtype))
        self.qkv_bias = nn.Parameter(attn.c_attn.bias.detach().clone())
        self.svd_error: Optional[dict[str, float]] = None
        with torch.no_grad():
            if init == "svd":
                down, up, self.svd_error = factorize_in_proj(w.detach().t(), rank, latent_groups, H)
                self.down.copy_(down)
                self.up.copy_(up)
            else:  # "random" (checked above)
                nn.init.normal_(self.down, std=0.02)
                nn.init.normal_(self.up, std=0.02)
                self.qkv_bias.zero_()

    def _expand(self, c: Tensor, p: int) -> Tensor:
        """Latent ``[B, S, g·r]`` of projection ``p`` to heads ``[B, H, S, d_h]``."""
        B, S, _ = c.shape
        H, g, r, dh = self.num_heads, self.latent_groups, self.rank, self.head_dim
        out = torch.einsum("bsgr,ghdr->bghsd", c.view(B, S, g, r), self.up[p].view(g, H // g, dh, r))
        out = out.reshape(B, H, S, dh)
        return out + self.qkv_bias[p * self.embed_dim:(p + 1) * self.embed_dim].view(1, H, 1, dh)

    @staticmethod
    def _warn_general_mask(mask: Any) -> None:
        what = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        warn_once(
            "hf-general-mask",
            f"MLRAGPT2Attention: the attention mask ({what}) is not causal attention with key padding, so "
            "the fused mlra_attention is not used; this layer runs the dense attention (per-head q/k/v "
            "and the T×S scores in memory).",
        )

    def forward(
        self,
        hidden_states: Tensor,
        past_key_values: Optional[Any] = None,
        attention_mask: Optional[Tensor] = None,
        encoder_hidden_states: Optional[Tensor] = None,
        encoder_attention_mask: Optional[Tensor] = None,
        output_attentions: Optional[bool] = False,
        **kwargs: Any,
    ) -> tuple[Tensor, Optional[Tensor]]:
        if encoder_hidden_states is not None:
            raise ValueError("MLRAGPT2Attention is self-attention; cross-attention stays a GPT2Attention")
        B, T, d = hidden_states.shape
        dropout = self.attn_dropout.p if self.training else 0.0
        cache = past_key_values
        if isinstance(cache, EncoderDecoderCache):
            cache = cache.self_attention_cache
        cached = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        if cached == 0 and not output_attentions:
            # Nothing cached for this layer: training, evaluation, or the prefill of generate().
            fused, key_padding_mask = _causal_padding(attention_mask, B, T)
            if fused:
                out = mlra_attention(
                    hidden_states, self.down, self.up, self.qkv_bias, num_heads=self.num_heads,
                    latent_groups=self.latent_groups, causal=True, key_padding_mask=key_padding_mask,
                    dropout_p=dropout, scale=self.scaling,
                )
                if cache is not None:
                    # The op keeps its latents on chip; the cache gets c_K, c_V from one more GEMM.
                    gr = self.latent_groups * self.rank
                    c_k, c_v = (hidden_states @ self.down[gr:].t()).chunk(2, dim=-1)
                    cache.update(c_k.unsqueeze(1), c_v.unsqueeze(1), self.layer_idx)
                return self.resid_dropout(self.c_proj(out)), None
            if not torch.compiler.is_compiling():
                self._warn_general_mask(attention_mask)

        c_q, c_k, c_v = (hidden_states @ self.down.t()).chunk(3, dim=-1)  # 3 × [B, T, g·r]
        if cache is not None:
            # The latents ride in the cache's key/value slots as [B, 1, S, g·r].
            c_k, c_v = cache.update(c_k.unsqueeze(1), c_v.unsqueeze(1), self.layer_idx)
            c_k, c_v = c_k.squeeze(1), c_v.squeeze(1)
        q, k, v = self._expand(c_q, 0), self._expand(c_k, 1), self._expand(c_v, 2)
        interface = modeling_gpt2.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, modeling_gpt2.eager_attention_forward
        )
        out, weights = interface(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs)
        out = out.reshape(B, T, d).contiguous()
        return self.resid_dropout(self.c_proj(out)), weights


def _check_transformers_version() -> None:
    params = inspect.signature(modeling_gpt2.GPT2Attention.forward).parameters
    if "past_key_values" not in params:
        raise ImportError(
            f"convert_gpt2 needs transformers 5.x (GPT2Attention with a Cache API); found {transformers.__version__}"
        )


def convert_gpt2(model: nn.Module, rank: Optional[int] = None, latent_groups: int = 1, init: str = "svd") -> nn.Module:
    """Replace the self-attention of a Hugging Face GPT-2 with MLRA, in place; returns ``model``.

    Args:
        model: a ``GPT2LMHeadModel``, ``GPT2Model`` or any model with a ``transformer.h`` /
            ``h`` list of ``GPT2Block``.
        rank: rank per latent group, an int in ``[1, n_embd]``; default ``max(1, n_embd // 4)``.
        latent_groups: number of latent groups ``g``, a positive int that divides ``n_head``.
        init: ``"svd"`` factorises the trained ``c_attn`` (a ``Conv1D``, ``[d, 3·d]``) by truncated SVD,
            exact at ``rank = n_embd``; ``"random"`` draws the factors from N(0, 0.02) and zeroes the
            Q/K/V bias. ``c_proj`` is kept in both cases.

    The relative error of each projection is stored as ``block.attn.svd_error``. See the module
    docstring for what the converted attention supports.

    Example::

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100))
        >>> hf = convert_gpt2(hf, rank=64)
        >>> out = hf.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    """
    _check_transformers_version()
    body = getattr(model, "transformer", model)
    blocks = getattr(body, "h", None)
    if blocks is None or not all(isinstance(b, modeling_gpt2.GPT2Block) for b in blocks):
        raise TypeError(f"model must be a transformers GPT-2 (with GPT2Block layers), got {type(model).__name__}")
    if rank is None:
        rank = default_rank(body.config.n_embd)
    # Checked before any block is replaced, so a bad argument leaves the model untouched.
    rank, latent_groups = _check_args(rank, latent_groups, init, body.config.n_embd, body.config.n_head)
    for block in blocks:
        if isinstance(block.attn, MLRAGPT2Attention):
            raise ValueError("the model is already converted to MLRA")
        block.attn = MLRAGPT2Attention(block.attn, rank, latent_groups, init)
    cfg = model.config
    cfg.mlra_rank, cfg.mlra_latent_groups = rank, latent_groups
    return model


class TEVTrainerCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that logs µ_TEV / σ_TEV with a :class:`TEVMonitor`.

    Args:
        path: JSONL file (written on the main process only).
        every: record every ``every`` optimizer steps.
        name: run name for the log header.

    The latest training loss that the Trainer logged is attached to each record. µ_TEV and σ_TEV
    are also added to the Trainer's own logs (``tev_mean``, ``tev_std``) at its logging steps.

    Example::

        >>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[TEVTrainerCallback("runs/tev.jsonl")])
    """

    def __init__(self, path: Optional[str] = None, every: int = 10, name: Optional[str] = None) -> None:
        self.path, self.every, self.name = path, every, name
        self.monitor = None
        self._loss: Optional[float] = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from mlra_kernels.monitor import TEVMonitor

        if model is not None and state.is_world_process_zero:
            self.monitor = TEVMonitor(model, every=self.every, path=self.path, name=self.name)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._loss = float(logs["loss"])
        if self.monitor is not None and logs is not None and self.monitor.records:
            last = self.monitor.records[-1]
            logs.setdefault("tev_mean", last["tev_mean"])
            logs.setdefault("tev_std", last["tev_std"])

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.step(state.global_step, loss=self._loss)

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()
