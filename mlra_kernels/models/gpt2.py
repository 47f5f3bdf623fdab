"""A small, clean pre-LN GPT-2 whose attention is either standard multi-head attention or MLRA."""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlra_kernels.nn.fold import ClearsStepMemo, foldable_output
from mlra_kernels.nn.projection import MLRAProjection, move_flat_factors
from mlra_kernels.ops.mlra import LatentCache, StepWeightsMemo, decode_step, kv_latents, mlra_attention
from mlra_kernels.ops.mlra.layout import check_config, positive_int

@dataclass
class GPT2Config:
    """Configuration of :class:`GPT2`. The defaults are GPT-2 small (124M with ``attention="mha"``).

    Args:
        vocab_size: number of tokens (256 for byte-level text).
        block_size: context length ``T``.
        n_layer: depth.
        n_head: heads per layer.
        n_embd: width ``d``.
        dropout: dropout on embeddings, attention probabilities and residual branches.
        bias: biases in the linear layers and LayerNorms.
        attention: ``"mha"`` (dense Q/K/V) or ``"mlra"`` (Multi-head Low-Rank Attention).
        rank: MLRA rank per latent group; default ``n_embd // 4``.
        latent_groups: MLRA latent groups ``g`` (must divide ``n_head``).
    """

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    attention: str = "mha"
    rank: Optional[int] = None
    latent_groups: int = 1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer"):
            positive_int(f"GPT2Config.{name}", getattr(self, name))
        if self.attention not in ("mha", "mlra"):
            raise ValueError(f"GPT2Config.attention must be 'mha' or 'mlra', got {self.attention!r}")
        _, _, self.rank, _ = check_config(self.n_embd, self.n_head, self.rank, self.latent_groups,
                                          prefix="GPT2Config.", names=("n_embd", "n_head"))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPT2Config.dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class LayerCache:
    """One layer's KV cache, preallocated for ``capacity`` positions and written in place.

    MHA layers store ``k, v`` ``[B, H, S, d_h]``; MLRA layers store the latents ``c_K, c_V`` group-major,
    ``[B, g, S, r]`` (both: sequence dim 2). ``cache[0]`` / ``cache[1]`` are views of the filled
    part; :meth:`buffers` are the whole preallocated tensors and ``seqlens`` (int32 ``[B]``, on the
    cache's device) how much of them is filled. A step appends by writing into the buffers, never by
    concatenation, so a decode step costs the new tokens' writes, not a copy of everything cached.
    """

    def __init__(self, capacity: int, seq_dim: int, layout: Optional[tuple] = None) -> None:
        self.capacity, self.seq_dim, self._length = capacity, seq_dim, 0
        # What the buffers hold, as the layer that made the cache says: ("heads", H, d_h) for K/V,
        # ("latents", g, r) for c_K/c_V; None: not said (a cache made by hand).
        self.layout = layout
        self._k: Optional[Tensor] = None
        self._v: Optional[Tensor] = None
        # The filled length again, on the device and updated in place: a decode kernel reads it there, so
        # a step needs no host sync and hands the kernel tensors of the same shapes at every length.
        self.seqlens: Optional[Tensor] = None

    @property
    def length(self) -> int:
        """Positions filled (the same for every sequence of the batch)."""
        return self._length

    @length.setter
    def length(self, n: int) -> None:
        # Rewinding (the decode benchmark does) keeps the device copy in step; fill_ does not sync.
        self._length = n
        if self.seqlens is not None:
            self.seqlens.fill_(n)

    def check_room(self, t: int) -> None:
        if self._length + t > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions; {self._length} + {t} do not fit")

    def allocate(self, shape: tuple, like: Tensor) -> None:
        """Allocate the buffers: ``shape`` with ``capacity`` positions in ``seq_dim``, ``like``'s dtype and device."""
        shape = list(shape)
        shape[self.seq_dim] = self.capacity
        self._k, self._v = like.new_empty(shape), like.new_empty(shape)
        self.seqlens = torch.full((shape[0],), self._length, dtype=torch.int32, device=like.device)

    def advance(self, t: int) -> None:
        """Count ``t`` positions that a step op wrote into the buffers itself (it also grew ``seqlens``)."""
        self.check_room(t)
        self._length += t

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k``, ``v`` after what is cached; returns views of everything cached."""
        t = k.shape[self.seq_dim]
        self.check_room(t)
        if self._k is None:
            shape = list(k.shape)
            shape[self.seq_dim] = self.capacity
            self._k, self._v = k.new_empty(shape), v.new_empty(shape)
            self.seqlens = torch.zeros(k.shape[0], dtype=torch.int32, device=k.device)
        self._k.narrow(self.seq_dim, self._length, t).copy_(k)
        self._v.narrow(self.seq_dim, self._length, t).copy_(v)
        self._length += t
        self.seqlens.add_(t)
        return self[0], self[1]

    def check_for(self, layout: tuple, x: Tensor) -> None:
        """Raise unless this cache can take a step of ``x`` ``[B, t, d]`` in a layer whose cache ``layout`` it
        is: the same kind and shape of entries, batch, dtype and device, and ``seqlens`` equal to ``length``
        (read where that costs no device sync: on the CPU)."""
        made = getattr(self, "layout", None)
        if made is not None and made != layout:
            raise ValueError(f"the cache holds {_describe_layout(made)}, but this layer keeps {_describe_layout(layout)}: "
                             "it was made by another model; start a new cache with this model (use_cache=True)")
        if self._k is None:
            return
        B = x.shape[0]
        if self._k.shape[0] != B:
            raise ValueError(f"the cache holds {self._k.shape[0]} sequences, but the new tokens are a batch of {B}: "
                             "pass the cache of this batch")
        if self._k.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):  # autocast: mlra_decode casts
            raise TypeError(f"cache_k is {self._k.dtype} but x is {x.dtype}: a cache keeps the dtype it was made in; "
                            f"run the model in {self._k.dtype} or start a new cache")
        if self._k.device != x.device:
            raise ValueError(f"cache_k is on {self._k.device} but x is on {x.device}: a cache stays on the device it "
                             "was made on; start a new cache")
        if self.seqlens is not None and self.seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
            if any(n != self._length for n in self.seqlens.tolist()):  # B numbers: cheaper than a reduction
                raise ValueError(f"the cache's seqlens {self.seqlens.tolist()} disagree with its length "
                                 f"{self._length}: set cache.length (it keeps seqlens in step), not seqlens")

    def buffers(self) -> tuple[Tensor, Tensor]:
        """The whole preallocated buffers, ``capacity`` positions each, of which ``seqlens`` are filled."""
        return self._k, self._v

    def __getitem__(self, i: int) -> Tensor:
        buf = (self._k, self._v)[i]
        return buf.narrow(self.seq_dim, 0, self._length)

    def __len__(self) -> int:
        return 2


# One LayerCache per layer.
KVCache = list[LayerCache]


def _describe_layout(layout: tuple) -> str:
    kind, n, width = layout
    if kind == "heads":
        return f"per-head keys and values [B, H={n}, S, d_h={width}] (an MHA layer's)"
    return f"latents c_K, c_V [B, g={n}, S, r={width}] (an MLRA layer's)"


def _cached_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
    """Causal attention of ``t`` new queries against ``S >= t`` keys, the queries being the last ``t``."""
    t, S = q.shape[2], k.shape[2]
    if t == S:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if t == 1:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    allowed = torch.ones(t, S, dtype=torch.bool, device=q.device).tril(S - t)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)


class MHASelfAttention(nn.Module):
    """Causal self-attention with a dense ``c_attn`` (``[3·d, d]``, q/k/v stacked like GPT-2)."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.block_size = cfg.block_size
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.cache_layout = ("heads", cfg.n_head, cfg.n_embd // cfg.n_head)  # what its LayerCache holds

    def forward(self, x: Tensor, cache: Optional[LayerCache] = None, use_cache: bool = False):
        B, T, d = x.shape
        H = self.n_head
        q, k, v = self.c_attn(x).view(B, T, 3, H, d // H).permute(2, 0, 3, 1, 4)  # 3 × [B, H, T, d_h]
        if cache is not None:
            cache.check_for(self.cache_layout, x)
        if use_cache or cache is not None:
            cache = cache if cache is not None else LayerCache(self.block_size, seq_dim=2, layout=self.cache_layout)
            k, v = cache.append(k, v)
        p = self.dropout if self.training else 0.0
        y = _cached_attention(q, k, v, p)
        y = self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, d)))
        return y, cache


class MLRASelfAttention(ClearsStepMemo, nn.Module):
    """Causal Multi-head Low-Rank self-attention; the factors are an :class:`MLRAProjection` (``qkv``).

    Training and a prefill call the fused ``mlra_kernels.mlra_attention``. With a KV cache the cache
    holds the latents ``c_K, c_V`` (``g·r`` numbers each per token), and later tokens attend them in the
    absorbed form: K and V themselves are never rebuilt. A cached step is one call of ``decode_step``,
    which folds a plain ``c_proj`` into its step weights where it can, and calls it otherwise.
    """

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.n_head, self.n_embd, self.latent_groups, self.rank = cfg.n_head, cfg.n_embd, cfg.latent_groups, cfg.rank
        self.block_size = cfg.block_size
        self.dropout = cfg.dropout
        self.qkv = MLRAProjection(cfg.n_embd, cfg.n_head, cfg.rank, cfg.latent_groups, bias=cfg.bias,
                                  prefix="GPT2Config.", names=("n_embd", "n_head"))
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self._scale = 1.0 / math.sqrt(cfg.n_embd // cfg.n_head)
        self.cache_layout = ("latents", cfg.latent_groups, cfg.rank)  # what its LayerCache holds
        self._step_memo = StepWeightsMemo()  # the decode step's pre-multiplied weights
        self._register_load_state_dict_pre_hook(partial(move_flat_factors, ("down", "up", "qkv_bias")))

    def forward(self, x: Tensor, cache: Optional[LayerCache] = None, use_cache: bool = False):
        qkv = self.qkv
        down, up, bias, H, g = qkv.op_factors()  # under tensor parallelism, this rank's heads
        p = self.dropout if self.training else 0.0
        if cache is None:
            y = mlra_attention(x, down, up, bias, num_heads=H, latent_groups=g, causal=True, dropout_p=p)
            if use_cache:
                cache = LayerCache(self.block_size, seq_dim=2, layout=self.cache_layout)
                cache.append(*kv_latents(x, down, g, group_major=True))
                if not torch.compiler.is_compiling():
                    self._step_memo.clear()  # a prefill: the steps that follow form the step weights afresh
        else:
            cache.check_for(self.cache_layout, x)
            B, t = x.shape[0], x.shape[1]
            cache.check_room(t)
            if cache.buffers()[0] is None:  # a cache made by hand, nothing written yet
                cache.allocate((B, g, 0, self.rank), x)
            k, v = cache.buffers()
            tp = qkv._tp  # tensor parallelism: W_O's columns of this rank's heads, then the sum over the ranks
            if tp is None:
                out_proj = self.c_proj
                out_weights = foldable_output(self.c_proj, nn.Linear, owner="MLRASelfAttention", training=self.training)
            else:
                out_proj, out_weights = None, tp.output_columns(self.c_proj)
            y, _ = decode_step(
                x, down, up, bias, cache=LatentCache(k, v, cache.seqlens, cache.length), num_heads=H,
                latent_groups=g, out_proj=out_proj, memo=self._step_memo, scale=self._scale, dropout_p=p,
                out_weights=out_weights)
            if tp is not None:
                y = tp.sum_output(y, self.c_proj.bias)
            cache.advance(t)  # the step wrote the latents and grew seqlens
            return (self.resid_dropout(y) if self.training else y), cache  # dropout is the identity in eval mode
        return self.resid_dropout(self.c_proj(y)), cache

class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = MHASelfAttention(cfg) if cfg.attention == "mha" else MLRASelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cache=None, use_cache: bool = False):
        a, new_cache = self.attn(self.ln_1(x), cache, use_cache)
        x = x + a
        return x + self.mlp(self.ln_2(x)), new_cache


class GPT2(nn.Module):
    """Pre-LN GPT-2 with tied token embeddings and GPT-2 init, with MHA or MLRA attention.

    Init: every weight N(0, 0.02) (the MLRA factors included), biases zero, and the residual
    projections (``attn.c_proj``, ``mlp.c_proj``) N(0, 0.02/sqrt(2·n_layer)).

    Args:
        config: a :class:`GPT2Config`.

    Example::

        >>> cfg = GPT2Config(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32, attention="mlra")
        >>> model = GPT2(cfg)
        >>> idx = torch.randint(0, 256, (2, 16))
        >>> logits, loss = model(idx, targets=idx)
        >>> logits.shape
        torch.Size([2, 16, 256])
        >>> model.generate(idx[:, :4], max_new_tokens=5).shape
        torch.Size([2, 9])
    """

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        if not isinstance(config, GPT2Config):
            raise TypeError(f"config must be a GPT2Config, got {type(config).__name__}")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                if "ln_" in name and name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=resid_std)
            else:
                nn.init.normal_(p, std=0.02)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def num_parameters(self) -> int:
        """Number of distinct parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """Logits ``[B, T, V]`` for tokens ``idx`` ``[B, T]``, and the mean cross-entropy against
        ``targets`` ``[B, T]`` (``-1`` = ignored) when given."""
        logits, _ = self.forward_cached(idx)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def forward_cached(
        self, idx: Tensor, cache: Optional[KVCache] = None, use_cache: bool = False
    ) -> tuple[Tensor, Optional[KVCache]]:
        """Run ``idx`` ``[B, t]`` after the ``S`` tokens held in ``cache``; returns logits and the cache.

        The cache (one preallocated :class:`LayerCache` per layer) is written in place and returned: a
        later call continues from everything this one appended. To continue one prefix two ways, keep a
        copy (``copy.deepcopy(cache)``) before the first continuation. Token ids outside ``[0, vocab_size)`` raise ``ValueError`` (checked with one min/max, which
        waits for the device; skipped while ``torch.compile`` traces).
        """
        self._check_idx(idx)
        if cache is not None:
            self._check_cache(cache, idx.shape[0])
        return self._forward_cached(idx, cache, use_cache)

    def _check_cache(self, cache: KVCache, batch: int) -> None:
        n = self.config.n_layer
        if not isinstance(cache, (list, tuple)) or len(cache) != n or not all(isinstance(c, LayerCache) for c in cache):
            what = f"{len(cache)} entries" if isinstance(cache, (list, tuple)) else type(cache).__name__
            raise TypeError(f"cache must be the list of {n} LayerCache (one per layer) that forward_cached returned, "
                            f"got {what}")
        lengths = {c.length for c in cache}
        if len(lengths) > 1:
            raise ValueError(f"the cache's layers hold different lengths {sorted(lengths)} (a step that failed part "
                             "way through?); rewind every layer to one length (cache[i].length = n) or start anew")
        x = self.wte.weight.new_empty(batch, 0, 0)  # the new tokens' batch, dtype and device
        for c, block in zip(cache, self.h):  # every layer, before any is written
            c.check_for(block.attn.cache_layout, x)

    def _check_idx(self, idx: Tensor) -> None:
        if not isinstance(idx, Tensor) or idx.dtype not in (torch.int64, torch.int32):
            what = str(idx.dtype).replace("torch.", "") if isinstance(idx, Tensor) else type(idx).__name__
            raise TypeError(f"idx must hold integer token ids (int64 or int32), got {what}")
        if idx.dim() != 2:
            raise ValueError(f"idx must be integer tokens [B, T], got shape {list(idx.shape)}")
        if idx.numel() == 0 or torch.compiler.is_compiling():
            return
        lo, hi = torch.stack(torch.aminmax(idx)).tolist()  # one host sync for both
        V = self.config.vocab_size
        if lo < 0 or hi >= V:
            raise ValueError(f"token ids must be in [0, vocab_size={V}); idx holds ids in [{lo}, {hi}]")

    def _forward_cached(
        self, idx: Tensor, cache: Optional[KVCache] = None, use_cache: bool = False
    ) -> tuple[Tensor, Optional[KVCache]]:
        B, t = idx.shape
        past = 0 if cache is None else cache[0].length
        if past + t > self.config.block_size:
            raise ValueError(
                f"sequence length {past + t} exceeds the context length block_size={self.config.block_size}"
            )
        use_cache = use_cache or cache is not None
        pos = torch.arange(past, past + t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        new_cache: KVCache = []
        for i, block in enumerate(self.h):
            x, c = block(x, None if cache is None else cache[i], use_cache)
            new_cache.append(c)
        logits = self.lm_head(self.ln_f(x))
        return logits, (new_cache if use_cache else None)

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` ``[B, T]``; returns ``[B, T + max_new_tokens]``.

        ``temperature=0`` picks the most likely token. With ``use_cache`` the keys and values (for
        MLRA: the latents) of past tokens are kept; once the context is full the window slides and
        the cache is rebuilt from the last ``block_size`` tokens.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if top_k is not None:
            try:
                k = operator.index(top_k)  # an int, a numpy or torch integer
            except TypeError:
                k = None
            if k is None or isinstance(top_k, bool) or k < 1:
                raise ValueError(f"top_k must be None (no limit) or an int >= 1, got {top_k!r}")
            top_k = k
        self._check_idx(idx)  # once: the sampled tokens are in range by construction
        block = self.config.block_size
        cache, cached = None, 0
        for _ in range(max_new_tokens):
            if cache is not None:
                logits, cache = self._forward_cached(idx[:, -1:], cache)
                cached += 1
            else:
                context = idx[:, -block:]
                logits, cache = self._forward_cached(context, use_cache=use_cache)
                cached = context.shape[1]
            if cached >= block:
                cache = None  # the next token would not fit: rebuild from a slid window
            logits = logits[:, -1, :]
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
