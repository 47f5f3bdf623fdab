"""``TEVMonitor``: log Token Embedding Variability (µ_TEV, σ_TEV) from a training loop to JSONL."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from mlra_kernels._warnings import warn_once

_EMBEDDING_NAMES = ("wte", "tok_embeddings", "embed_tokens", "word_embeddings", "token_embedding", "embed_in")


def find_token_embedding(model_or_embedding: Union[nn.Module, Tensor]) -> Tensor:
    """Return the token-embedding matrix ``[V, d]`` of a model, an ``nn.Embedding`` or a tensor.

    Models are searched in this order: ``get_input_embeddings()`` (Hugging Face and
    :class:`mlra_kernels.models.GPT2`), an ``nn.Embedding`` named like a token embedding
    (``wte``, ``tok_embeddings``, ``embed_tokens``, ...), the only ``nn.Embedding`` of the model.
    Wrappers with a ``.module`` (DistributedDataParallel) are unwrapped.
    """
    obj = model_or_embedding
    if isinstance(obj, Tensor):
        if obj.dim() != 2:
            raise ValueError(f"the token embedding must be a 2-D [V, d] tensor, got shape {list(obj.shape)}")
        return obj
    if not isinstance(obj, nn.Module):
        raise TypeError(f"model_or_embedding must be an nn.Module or a [V, d] tensor, got {type(obj).__name__}")
    while isinstance(getattr(obj, "module", None), nn.Module) and not isinstance(obj, nn.Embedding):
        obj = obj.module
    if isinstance(obj, nn.Embedding):
        return obj.weight
    getter = getattr(obj, "get_input_embeddings", None)
    if callable(getter):
        emb = getter()
        if isinstance(emb, nn.Embedding):
            return emb.weight
    embeddings = [(n, m) for n, m in obj.named_modules() if isinstance(m, nn.Embedding)]
    for name, module in embeddings:
        if name.rsplit(".", 1)[-1] in _EMBEDDING_NAMES:
            return module.weight
    if len(embeddings) == 1:
        return embeddings[0][1].weight
    found = ", ".join(n for n, _ in embeddings) or "none"
    raise ValueError(
        f"cannot tell which nn.Embedding of {type(obj).__name__} holds the token embedding (found: {found}); "
        "pass the embedding module or its weight instead"
    )


def compute_tev(
    weight: Tensor, rows: Optional[Tensor] = None, unbiased: bool = False, use_op: bool = True
) -> tuple[float, float, int, bool]:
    """``(µ_TEV, σ_TEV, nonfinite_rows, op_used)`` of ``weight`` through the ``mlra_kernels.tev`` op.

    When the op cannot run (its compiled extension is missing) this warns and computes the same
    statistics with the float64 reference, so that a training run is never stopped by its monitor;
    ``op_used`` then comes back False and later calls skip the op. float64 weights, which the op
    does not take, also go to the reference.
    """
    from mlra_kernels.ops.tev import tev, tev_reference

    w = weight.detach()
    if use_op and w.dtype in (torch.float32, torch.float16, torch.bfloat16):
        try:
            stats = tev(w, rows=rows, unbiased=unbiased)
            return float(stats.mean), float(stats.std), int(stats.nonfinite_rows), True
        except ImportError as err:  # the compiled extension is missing, stale, or lacks CUDA
            warn_once(
                "tev-monitor-no-extension",
                f"{err} TEVMonitor computes TEV with the float64 torch reference meanwhile, which is slower.",
                stacklevel=4,
            )
            use_op = False
    elif w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        warn_once(
            f"tev-monitor-dtype-{w.dtype}",
            f"TEVMonitor: the embedding is {w.dtype}, which the streaming TEV op does not take (float32, "
            "float16 or bfloat16); TEV is computed with the float64 torch reference, which is slower.",
            stacklevel=4,
        )
    stats = tev_reference(w, rows=rows, unbiased=unbiased)
    return float(stats.mean), float(stats.std), int(stats.nonfinite_rows), use_op


class TEVMonitor:
    """Record µ_TEV and σ_TEV of a model's token embedding every ``every`` steps, as JSONL.

    Each record is one JSON line: ``step``, ``tev_mean``, ``tev_std``, ``nonfinite_rows``, ``loss``
    (when given), ``time`` (seconds since the monitor started), ``monitor_ms`` (the monitor's own
    cost for this record) and any extra keyword given to :meth:`step`. The first line is a
    ``{"meta": {...}}`` header.

    The TEV comes from the ``mlra_kernels.tev`` op: one streaming read of the embedding. The
    monitor's cost is measured per record (after waiting for queued GPU work, which is not counted)
    and reported by :attr:`cost_per_call_ms`.

    Args:
        model_or_embedding: a model (see :func:`find_token_embedding`), an ``nn.Embedding`` or a
            ``[V, d]`` tensor. The parameter is read at each record, so training updates are seen.
        every: record when ``step % every == 0``.
        path: JSONL file to write (its folder is created); ``None`` keeps records in memory only.
        rows: optional token ids to include (for example, the tokens that occur in the data).
        unbiased: unbiased σ_TEV across rows.
        name: run name stored in the header (used by ``mlra plot`` as the label).

    Example::

        >>> model = torch.nn.Embedding(100, 16)
        >>> mon = TEVMonitor(model, every=10)
        >>> rec = mon.step(0, loss=2.5)
        >>> sorted(k for k in rec if k.startswith("tev"))
        ['tev_mean', 'tev_std']
    """

    def __init__(
        self,
        model_or_embedding: Union[nn.Module, Tensor],
        every: int = 100,
        path: Optional[Union[str, os.PathLike]] = None,
        *,
        rows: Optional[Tensor] = None,
        unbiased: bool = False,
        name: Optional[str] = None,
    ) -> None:
        if not isinstance(every, int) or every <= 0:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.weight = find_token_embedding(model_or_embedding)
        self.every = every
        self.rows = rows
        self.unbiased = unbiased
        self.name = name
        self.records: list[dict[str, Any]] = []
        self.path = os.fspath(path) if path is not None else None
        self._file = None
        self._start = time.perf_counter()
        self._cost_s = 0.0
        self._use_op = True
        if self.path is not None:
            folder = os.path.dirname(self.path)
            if folder:
                os.makedirs(folder, exist_ok=True)
            self._file = open(self.path, "w", encoding="utf-8")
            V, d = self.weight.shape
            meta = {"name": name, "vocab_size": int(V), "embed_dim": int(d), "every": every,
                    "dtype": str(self.weight.dtype).replace("torch.", ""), "device": str(self.weight.device)}
            self._write({"meta": meta})

    def _write(self, obj: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(obj) + "\n")
            self._file.flush()

    def _tev(self) -> tuple[float, float, int]:
        mean, std, bad, self._use_op = compute_tev(self.weight, self.rows, self.unbiased, self._use_op)
        return mean, std, bad

    def record(self, step: int, loss: Optional[Union[float, Tensor]] = None, **extra: Any) -> dict[str, Any]:
        """Measure and write a record now, whatever ``every`` says."""
        if self.weight.is_cuda:
            torch.cuda.synchronize(self.weight.device)  # queued training work is not the monitor's cost
        t0 = time.perf_counter()
        mean, std, bad = self._tev()
        cost = time.perf_counter() - t0
        self._cost_s += cost
        rec: dict[str, Any] = {"step": int(step), "tev_mean": mean, "tev_std": std, "nonfinite_rows": bad}
        if loss is not None:
            rec["loss"] = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        rec["time"] = round(time.perf_counter() - self._start, 6)
        rec["monitor_ms"] = round(cost * 1e3, 6)
        for key, value in extra.items():
            rec[key] = float(value.detach()) if isinstance(value, Tensor) else value
        self.records.append(rec)
        self._write(rec)
        return rec

    def step(self, step: int, loss: Optional[Union[float, Tensor]] = None, **extra: Any) -> Optional[dict[str, Any]]:
        """Call once per training step; records (and returns the record) when ``step % every == 0``."""
        if step % self.every != 0:
            return None
        return self.record(step, loss, **extra)

    @property
    def cost_per_call_ms(self) -> float:
        """Mean wall time of the monitor's own work per record, in milliseconds."""
        return 1e3 * self._cost_s / len(self.records) if self.records else 0.0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "TEVMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def read_jsonl(path: Union[str, os.PathLike]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read a monitor log: returns ``(meta, records)``."""
    meta: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not a JSON line ({err})") from None
            if "meta" in obj:
                meta.update(obj["meta"])
            elif "step" in obj:
                records.append(obj)
    return meta, records
