"""``TEVMonitor``: log Token Embedding Variability (µ_TEV, σ_TEV) from a training loop to JSONL."""

from __future__ import annotations

import errno
import json
import math
import operator
import os
import time
import warnings
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from mlra_kernels._warnings import warn_once

try:  # POSIX; on Windows there is no fcntl and logs are not locked
    import fcntl
except ImportError:  # pragma: no cover - exercised only on Windows
    fcntl = None

_EMBEDDING_NAMES = ("wte", "tok_embeddings", "embed_tokens", "word_embeddings", "token_embedding", "embed_in")


def find_token_embedding(model_or_embedding: Union[nn.Module, Tensor]) -> Tensor:
    """Return the token-embedding matrix ``[V, d]`` of a model, an ``nn.Embedding`` or a tensor.

    Models are searched in this order: ``get_input_embeddings()`` (Hugging Face and
    :class:`mlra_kernels.models.GPT2`), an ``nn.Embedding`` named like a token embedding
    (``wte``, ``tok_embeddings``, ``embed_tokens``, ...), the only ``nn.Embedding`` of the model.
    Wrappers with a ``.module`` (DistributedDataParallel) are unwrapped. Under FSDP2 the result is the
    model's current parameter: a ``DTensor`` shard, or between forward and backward the gathered tensor.
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
    weight: Tensor,
    rows: Optional[Union[Tensor, Sequence[int]]] = None,
    unbiased: bool = False,
    use_op: bool = True,
    process_group=None,
) -> tuple[float, float, int, bool]:
    """``(µ_TEV, σ_TEV, nonfinite_rows, op_used)`` of ``weight`` through the ``mlra_kernels.tev`` op.

    When the op cannot run (its compiled extension is missing) this warns and computes the same
    statistics with the float64 reference, so that a training run is never stopped by its monitor;
    ``op_used`` then comes back False and later calls skip the op. float64 weights, which the op
    does not take, also go to the reference. A DTensor, or a shard with a ``process_group``, is merged
    over its ranks either way (see :func:`mlra_kernels.tev`): every rank of the group must call this.
    """
    from mlra_kernels.ops.tev import tev, tev_reference
    from mlra_kernels.ops.tev.api import check_rows, tev_stats
    from mlra_kernels.ops.tev.sharded import is_dtensor

    w = weight.detach()
    if use_op and w.dtype in (torch.float32, torch.float16, torch.bfloat16):
        try:
            stats = tev(w, rows=rows, unbiased=unbiased, process_group=process_group)
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
    if process_group is not None or is_dtensor(w):
        stats = tev_stats(w, rows=rows, unbiased=unbiased, process_group=process_group, kernel=False)
    else:
        stats = tev_reference(w, rows=check_rows(rows, w.shape[0], who="compute_tev"), unbiased=unbiased)
    return float(stats.mean), float(stats.std), int(stats.nonfinite_rows), use_op


def distributed_initialized() -> bool:
    """Whether torch.distributed has a default process group in this process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def is_log_rank() -> bool:
    """Whether this process writes the log: global rank 0 of torch.distributed, or when no process group is
    initialised, the process whose ``RANK`` environment variable (set by torchrun) is unset or 0."""
    if distributed_initialized():
        import torch.distributed as dist

        return dist.get_rank() == 0
    from mlra_kernels.ops.mlra import config

    return config.launcher_rank() == 0


_MODES = ("x", "a", "w")


# Keys the monitor writes itself; "meta" marks a header line. An extra under one of them is left out.
_OWN_KEYS = frozenset({"step", "tev_mean", "tev_std", "nonfinite_rows", "loss", "time", "monitor_ms", "meta"})
_MAX_EXTRA_ELEMENTS = 10_000  # a larger tensor or array given as an extra is left out, not written per record


def _plain(obj: Any, depth: int = 0) -> Any:
    """``obj`` as data json can write: a one-element tensor or numpy value becomes a number, a larger one a
    (nested) list, a dict gets str keys, and anything else json cannot write becomes its repr. Never raises."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if depth > 32:  # deep or circular containers
        return repr(obj)
    try:
        if isinstance(obj, dict):
            return {k if isinstance(k, str) else str(k): _plain(v, depth + 1) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [_plain(v, depth + 1) for v in obj]
        if isinstance(obj, Tensor):
            obj = obj.detach()
            return _plain(obj.item() if obj.numel() == 1 else obj.cpu().tolist(), depth + 1)
        for attr in ("item", "tolist"):  # numpy scalars and arrays
            try:
                return _plain(getattr(obj, attr)(), depth + 1)
            except Exception:
                pass
    except Exception:
        pass
    return repr(obj)


def _elements(obj: Any) -> int:
    """Elements of a tensor or numpy array, items of a list, tuple or dict (nested ones counted once each
    level, up to the cap), 0 for anything else."""
    if isinstance(obj, Tensor):
        return obj.numel()
    if isinstance(obj, (list, tuple, dict)):
        items = obj.values() if isinstance(obj, dict) else obj
        n = 0
        for item in items:
            n += max(1, _elements(item))
            if n > _MAX_EXTRA_ELEMENTS:
                break
        return n
    size = getattr(obj, "size", None) if hasattr(obj, "tolist") else None
    return size if isinstance(size, int) else 0


def _finite(obj: Any) -> Any:
    """``obj`` with NaN and ±inf as None: JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _json_line(obj: dict) -> bytes:
    try:
        text = json.dumps(obj, allow_nan=False)
    except ValueError:  # NaN or inf somewhere
        text = json.dumps(_finite(obj), allow_nan=False)
    return (text + "\n").encode("utf-8")


def _step_number(step: Any) -> int:
    """``step`` as an int: a Python or NumPy integer, or a 0-d integer tensor; anything else
    (a float would be truncated, a string fails oddly in ``%``) is refused."""
    if not isinstance(step, bool):
        try:
            return operator.index(step)
        except TypeError:
            pass
    raise TypeError(f"step must be an int (the training step), got {type(step).__name__} {step!r}")


class TEVMonitor:
    """Record µ_TEV and σ_TEV of a model's token embedding every ``every`` steps, as JSONL.

    Each record is one JSON line: ``step``, ``tev_mean``, ``tev_std``, ``nonfinite_rows``, ``loss``
    (when given), ``time`` (seconds since the monitor started), ``monitor_ms`` (the monitor's own
    cost for this record) and any extra keyword given to :meth:`step`. Each monitor writes a
    ``{"meta": {...}}`` header line first; a file continued with ``mode="a"`` holds one header per run.

    Extra values are stored as plain data: a one-element tensor or numpy value as a number, a larger
    one as a (nested) list, anything else JSON cannot hold as its ``repr``. Nothing given to
    :meth:`step` stops training: an extra over 10000 elements, an extra named like a field of the
    record (``tev_mean``, ``meta``, ...) and a ``loss`` that is not one number are left out, with one
    warning each. NaN and ±inf, which JSON has no numbers for, are written as ``null`` (the records in
    memory keep them), so that every line is strict JSON.

    The TEV comes from the ``mlra_kernels.tev`` op: one streaming read of the embedding. The
    monitor's cost is measured per record (after waiting for queued GPU work, which is not counted)
    and reported by :attr:`cost_per_call_ms`.

    Every argument is checked here, at construction (rows against the vocabulary, the embedding's
    dtype and device), so a mistake fails before training starts rather than at the first record.

    Under ``torch.distributed``, build the monitor and call :meth:`step` on every rank, at the same steps:

    - The embedding is looked up in the model at each record, so a parameter replaced after the monitor
      was built (``fully_shard`` of FSDP2, a resized vocabulary) is the one measured.
    - A ``DTensor`` embedding (FSDP2, tensor parallelism, or both on a 2-D mesh) is merged over its device
      mesh exactly, with no ``process_group`` argument; only partial statistics cross the network.
    - A plain tensor with ``process_group``: each rank holds one vocab shard, merged over the group.
    - A plain tensor without ``process_group``: each rank's tensor is taken as its own whole matrix (DDP
      replicas are identical), and nothing is communicated.
    - Only global rank 0 opens and writes ``path`` (without a process group, the process whose ``RANK``
      environment variable is unset or 0): the other ranks open, lock and truncate nothing, and keep
      their records in memory (:attr:`records`, the same values on every rank where they are merged).
      :attr:`writes_log` says which. A process whose ``RANK`` is not 0 and that has no process group (nothing
      merged: its tensor is its own) warns once that it writes nothing; ``rank_zero_only=False`` makes
      every rank write its own ``path``.

    The log, written so that a record once returned is never lost or torn:

    - Each record is written with one ``os.write`` of its whole line, straight to the OS (no Python
      buffer): a process killed at any point (``kill -9``) leaves every returned record on disk. A
      kill during that write may leave the record being written as a partial last line (POSIX makes
      no write to a regular file atomic; a large record is the likeliest to be cut): :func:`read_jsonl`
      and ``mlra plot`` skip such a line with a warning, and ``mode="a"`` cuts it off before appending.
      (There is no fsync, so a power cut may still lose what the OS had not stored.)
    - On POSIX the file is locked (``fcntl.flock``, exclusive, non-blocking) while the monitor is open,
      and a second monitor on the same path is refused with RuntimeError instead of interleaving lines.
      The lock is released by :meth:`close` (and at exit). Without ``fcntl`` (Windows) there is no lock.
    - If a write fails (disk full: ENOSPC, EFBIG, EDQUOT, or any other OSError), the monitor cuts the
      file back to its last complete line, warns once (the path, the error, and that logging stopped
      while training goes on) and writes no more; records keep accumulating in :attr:`records`, and
      the error is kept in :attr:`write_error`. Once the log is open, it never stops training.

    Args:
        model_or_embedding: a model (see :func:`find_token_embedding`), an ``nn.Embedding`` or a
            ``[V, d]`` tensor (or DTensor) of a floating dtype, with real data on the CPU or a CUDA device.
            A model's or an ``nn.Embedding``'s current parameter is found again at each record, so
            training updates and replaced parameters are seen; a tensor is held as given.
        every: record when ``step % every == 0`` (a positive int).
        path: JSONL file to write (its folder is created), by global rank 0 only; ``None`` keeps records
            in memory only.
        rows: optional token ids to include (for example, the tokens that occur in the data): an integer
            tensor, numpy array or sequence, each in [0, V).
        unbiased: unbiased σ_TEV across rows.
        name: run name stored in the header (used by ``mlra plot`` as the label).
        mode: what to do with an existing ``path``. ``"x"`` (default): refuse a file that exists and is
            not empty (FileExistsError), so that a log is never lost by accident. ``"a"``: append, for a
            resumed run: the existing records stay, this monitor adds its header and records after them
            (a torn last line left by an earlier crash is cut off first), and :func:`read_jsonl` reads
            the whole file. ``"w"``: overwrite.
        process_group: for a plain tensor that is one vocab shard on each rank, the ProcessGroup to merge
            over (``rows`` then index each rank's shard); see :func:`mlra_kernels.tev`. Default None; must
            be None for a DTensor, whose mesh says where it lives.
        rank_zero_only: only global rank 0 writes ``path`` (default). ``False``: every rank writes its own
            ``path`` (give each rank its own), for example to log each rank's own tensor.

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
        rows: Optional[Union[Tensor, Sequence[int]]] = None,
        unbiased: bool = False,
        name: Optional[str] = None,
        mode: str = "x",
        process_group=None,
        rank_zero_only: bool = True,
    ) -> None:
        from mlra_kernels.ops.tev.api import check_process_group, check_rows, check_weight
        from mlra_kernels.ops.tev.sharded import check as check_dtensor
        from mlra_kernels.ops.tev.sharded import is_dtensor

        self._fd: Optional[int] = None  # first, so that close() / __del__ work whatever fails below
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if not isinstance(unbiased, bool):
            raise TypeError(f"TEVMonitor: unbiased must be a bool, got {type(unbiased).__name__}")
        if not isinstance(rank_zero_only, bool):
            raise TypeError(f"TEVMonitor: rank_zero_only must be a bool, got {type(rank_zero_only).__name__}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"TEVMonitor: name must be a str or None, got {type(name).__name__}")
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"TEVMonitor: path must be a str, an os.PathLike or None, got {type(path).__name__}")
        if mode not in _MODES:
            raise ValueError(
                f"TEVMonitor: mode must be 'x' (refuse an existing log), 'a' (append) or 'w' (overwrite), "
                f"got {mode!r}"
            )
        weight = find_token_embedding(model_or_embedding)
        check_weight(weight, model_or_embedding, who="TEVMonitor")
        if not weight.is_floating_point():
            raise TypeError(
                f"TEVMonitor: the token embedding has dtype {str(weight.dtype).replace('torch.', '')}; TEV is "
                "defined on a floating-point embedding (float32, float16 or bfloat16; others through the slower "
                "float64 reference): dequantize it first, or pass the floating-point embedding"
            )
        if weight.numel() == 0:
            raise ValueError(f"TEVMonitor: the token embedding is empty (shape {list(weight.shape)})")
        check_process_group(process_group, weight, who="TEVMonitor")
        if is_dtensor(weight):
            check_dtensor(weight, rows is not None, False, who="TEVMonitor")
        V, d = weight.shape
        rows_t = check_rows(rows, int(V), who="TEVMonitor")
        if process_group is not None:  # the header gives the whole vocabulary, not this rank's shard
            import torch.distributed as dist

            total = torch.tensor([int(V)], dtype=torch.int64, device=weight.device)
            dist.all_reduce(total, group=process_group)
            V = int(total.item())
        self._source = model_or_embedding
        self.process_group = process_group
        self.writes_log = is_log_rank() or not rank_zero_only
        if path is not None and not self.writes_log and not distributed_initialized():
            # No process group: this process measures its own tensor, which rank 0's log does not hold.
            warn_once(f"tev-monitor-rank-log:{os.fspath(path)}",
                      f"TEVMonitor: this process is not rank 0, so it does not write {os.fspath(path)}; its records "
                      "(of this rank's own tensor) stay in monitor.records. Pass rank_zero_only=False, with a path "
                      "per rank, to write one log per rank.")
        self.every = every
        self.rows = rows_t.to(weight.device) if rows_t is not None else None
        self.unbiased = unbiased
        self.name = name
        self.mode = mode
        self.records: list[dict[str, Any]] = []
        self.write_error: Optional[OSError] = None
        self.path = os.fspath(path) if path is not None else None
        self._size = 0  # bytes of the log up to its last complete line
        self._start = time.perf_counter()
        self._cost_s = 0.0
        self._use_op = True
        self._left_out: set[str] = set()
        if self.path is not None and self.writes_log:
            self._open(mode)
            meta = {"name": name, "vocab_size": int(V), "embed_dim": int(d), "every": every,
                    "dtype": str(weight.dtype).replace("torch.", ""), "device": str(weight.device)}
            self._write({"meta": meta})

    def _open(self, mode: str) -> None:
        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        # No O_TRUNC: nothing is cut before the lock is held and the mode allows it.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
        try:
            self._lock(fd)
            size = os.fstat(fd).st_size
            if size and mode == "x":
                raise FileExistsError(
                    errno.EEXIST,
                    f"TEVMonitor: {self.path} already holds a log ({size} bytes); pass mode='a' to append to it "
                    "(a resumed run) or mode='w' to overwrite it, or choose another path",
                    self.path,
                )
            if mode == "w":
                os.ftruncate(fd, 0)
                size = 0
            elif size:
                size = _complete_prefix(fd, size, self.path)
            os.lseek(fd, size, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._size = fd, size

    def _lock(self, fd: int) -> None:
        if fcntl is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                warn_once(f"tev-monitor-lock-{err.errno}",
                          f"TEVMonitor: cannot lock {self.path} ({err}); writing it without a lock", stacklevel=5)
                return
            raise RuntimeError(
                f"TEVMonitor: {self.path} is open in another TEVMonitor (it holds the file's lock); two monitors "
                "writing one log would corrupt it: give each its own path, or close the other monitor first"
            ) from None

    def _write(self, obj: dict) -> None:
        if self._fd is None:
            return
        data = _json_line(obj)
        try:
            done = 0
            while done < len(data):  # a short write is followed by another (which raises if the disk is full)
                done += os.write(self._fd, data[done:])
        except OSError as err:
            self._stop_writing(err)
        else:
            self._size += len(data)

    def _stop_writing(self, err: OSError) -> None:
        """Cut the log back to its last complete line, warn once, and stop writing; records stay in memory."""
        fd, self._fd, self.write_error = self._fd, None, err
        try:
            os.ftruncate(fd, self._size)
        except OSError:
            pass  # the torn last line stays; read_jsonl skips it with a warning
        try:
            os.close(fd)
        except OSError:
            pass
        warnings.warn(
            f"TEVMonitor: writing {self.path} failed ({err}); logging to it has stopped, training continues, "
            f"and the records are kept in memory (monitor.records). The file holds every record up to the "
            "failure, with no partial line.",
            RuntimeWarning,
            stacklevel=4,
        )

    @property
    def weight(self) -> Tensor:
        """The token embedding now: found again in the model (or ``nn.Embedding``) at each call."""
        return find_token_embedding(self._source)

    @weight.setter
    def weight(self, value: Union[nn.Module, Tensor]) -> None:
        """Measure ``value`` from now on: a model, an ``nn.Embedding`` or a tensor, as the constructor takes."""
        from mlra_kernels.ops.tev.api import check_weight

        check_weight(find_token_embedding(value), value, who="TEVMonitor.weight")
        self._source = value

    def _tev(self, weight: Tensor) -> tuple[float, float, int]:
        mean, std, bad, self._use_op = compute_tev(weight, self.rows, self.unbiased, self._use_op, self.process_group)
        return mean, std, bad

    def record(self, step: int, loss: Optional[Union[float, Tensor]] = None, **extra: Any) -> dict[str, Any]:
        """Measure and write a record now, whatever ``every`` says (on every rank, see the class notes)."""
        step = _step_number(step)
        weight = self.weight
        if weight.is_cuda:
            torch.cuda.synchronize(weight.device)  # queued training work is not the monitor's cost
        t0 = time.perf_counter()
        mean, std, bad = self._tev(weight)
        cost = time.perf_counter() - t0
        self._cost_s += cost
        rec: dict[str, Any] = {"step": step, "tev_mean": mean, "tev_std": std, "nonfinite_rows": bad}
        if loss is not None:
            value = _plain(loss) if _elements(loss) <= 1 and not isinstance(loss, (str, bytes)) else None
            if isinstance(value, (int, float)):
                rec["loss"] = float(value)
            else:
                self._leave_out("loss", f"loss is {_describe(loss)}, not one number")
        rec["time"] = round(time.perf_counter() - self._start, 6)
        rec["monitor_ms"] = round(cost * 1e3, 6)
        for key, value in extra.items():
            if key in _OWN_KEYS:
                self._leave_out(key, f"the extra metric {key!r} has the name of a field the monitor writes itself")
            elif _elements(value) > _MAX_EXTRA_ELEMENTS:
                self._leave_out(key, f"the extra metric {key!r} is {_describe(value)}, over the "
                                     f"{_MAX_EXTRA_ELEMENTS} numbers an extra may hold")
            else:
                rec[key] = _plain(value)
        self.records.append(rec)
        self._write(rec)
        return rec

    def _leave_out(self, key: str, why: str) -> None:
        if key not in self._left_out:  # once per name and monitor
            self._left_out.add(key)
            warnings.warn(f"TEVMonitor: {why}; it is left out of the records (training goes on)",
                          RuntimeWarning, stacklevel=4)

    def step(self, step: int, loss: Optional[Union[float, Tensor]] = None, **extra: Any) -> Optional[dict[str, Any]]:
        """Call once per training step; records (and returns the record) when ``step % every == 0``."""
        step = _step_number(step)
        if step % self.every != 0:
            return None
        return self.record(step, loss, **extra)

    @property
    def cost_per_call_ms(self) -> float:
        """Mean wall time of the monitor's own work per record, in milliseconds."""
        return 1e3 * self._cost_s / len(self.records) if self.records else 0.0

    def close(self) -> None:
        """Close the log and release its lock (records stay in :attr:`records`)."""
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            try:
                os.close(fd)
            except OSError as err:  # some file systems report a failed write only here
                warnings.warn(f"TEVMonitor: closing {self.path} failed ({err})", RuntimeWarning, stacklevel=2)

    def __enter__(self) -> "TEVMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _describe(obj: Any) -> str:
    if isinstance(obj, Tensor) or (hasattr(obj, "tolist") and hasattr(obj, "shape")):
        return f"a {type(obj).__name__} of shape {list(obj.shape)} ({_elements(obj)} elements)"
    return f"a {type(obj).__name__}"


def _complete_prefix(fd: int, size: int, path: str) -> int:
    """Bytes of the file up to its last newline; a torn last line (from a crash) is cut off, with a warning."""
    os.lseek(fd, size - 1, os.SEEK_SET)
    if os.read(fd, 1) == b"\n":
        return size
    end, block = size, 1 << 16
    while end > 0:
        start = max(0, end - block)
        os.lseek(fd, start, os.SEEK_SET)
        chunk = os.read(fd, end - start)
        i = chunk.rfind(b"\n")
        if i >= 0:
            keep = start + i + 1
            break
        end = start
    else:
        keep = 0
    warnings.warn(f"TEVMonitor: {path} ends in a partial line ({size - keep} bytes, from an interrupted write); "
                  "it is cut off before appending", RuntimeWarning, stacklevel=5)
    os.ftruncate(fd, keep)
    return keep


def read_jsonl(path: Union[str, os.PathLike]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read a monitor log: returns ``(meta, records)``.

    A file continued with ``TEVMonitor(..., mode="a")`` holds one header per run: ``meta`` merges them
    (a later header's keys win), and ``records`` are all records in file order. A torn last line (a
    write cut short by a crash or a full disk) is skipped with a warning; any other line that is not a
    JSON object raises ValueError naming the file and the line number.
    """
    meta: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            if i == last:
                warnings.warn(f"{path}:{i + 1}: the last line is not complete JSON ({err}), a write cut short; "
                              "it is skipped", RuntimeWarning, stacklevel=2)
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON line ({err})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{i + 1}: not a JSON object")
        if "meta" in obj:
            meta.update(obj["meta"])
        elif "step" in obj:
            records.append(obj)
    return meta, records
