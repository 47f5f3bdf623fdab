"""A Lightning callback that logs µ_TEV / σ_TEV with a :class:`~mlra_kernels.TEVMonitor`.

``TEVLightningCallback`` exists when ``lightning`` (or the older ``pytorch_lightning``) is installed;
this package does not depend on it. The hook logic lives in :class:`TEVLightningHooks`, which
needs nothing from Lightning.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from mlra_kernels.monitor import TEVMonitor, distributed_initialized


class TEVLightningHooks:
    """Lightning hook methods: record TEV (and the training loss) every ``every`` optimizer steps.

    Under ``torch.distributed`` a monitor runs on every rank, so that a sharded embedding (FSDP2's
    ``DTensor``) is merged over its ranks, and only global rank 0 writes the log; without a process group,
    only the trainer's global zero records. See :class:`~mlra_kernels.TEVMonitor`.

    Args:
        path: JSONL file (written on global rank 0 only).
        every: record when ``trainer.global_step % every == 0``, once per optimizer step.
        name: run name for the log header.
        log_to_module: also ``pl_module.log`` ``tev_mean`` / ``tev_std`` at each record.
        mode: an existing log at ``path``: ``"x"`` refuses it, ``"a"`` appends (a run resumed from a
            checkpoint), ``"w"`` overwrites; see :class:`~mlra_kernels.TEVMonitor`.
    """

    def __init__(self, path: Optional[str] = None, every: int = 10, name: Optional[str] = None,
                 log_to_module: bool = True, mode: str = "x") -> None:
        super().__init__()
        self.path, self.every, self.name, self.log_to_module = path, every, name, log_to_module
        self.mode = mode
        self.monitor: Optional[TEVMonitor] = None
        self._last_step: Optional[int] = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if getattr(trainer, "is_global_zero", True) or distributed_initialized():
            self.monitor = TEVMonitor(pl_module, every=self.every, path=self.path, name=self.name, mode=self.mode)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if self.monitor is None or step == self._last_step:
            return  # gradient accumulation: one record per optimizer step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        rec = self.monitor.step(step, loss=loss if isinstance(loss, (Tensor, float, int)) else None)
        if rec is not None:
            self._last_step = step
            if self.log_to_module and hasattr(pl_module, "log"):
                pl_module.log("tev_mean", rec["tev_mean"], rank_zero_only=True)
                pl_module.log("tev_std", rec["tev_std"], rank_zero_only=True)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()


def _lightning_callback_base():
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError:
            return None
    return Callback


_Callback = _lightning_callback_base()

if _Callback is not None:

    class TEVLightningCallback(TEVLightningHooks, _Callback):
        """``lightning.pytorch.Callback`` logging TEV; see :class:`TEVLightningHooks` for the arguments.

        Example::

            >>> trainer = lightning.Trainer(callbacks=[TEVLightningCallback("runs/tev.jsonl", every=50)])
        """

    __all__ = ["TEVLightningHooks", "TEVLightningCallback"]
else:
    __all__ = ["TEVLightningHooks"]

    def __getattr__(name: str):
        if name == "TEVLightningCallback":
            raise ImportError("TEVLightningCallback needs Lightning: pip install lightning")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
