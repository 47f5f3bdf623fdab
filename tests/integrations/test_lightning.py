"""The Lightning TEV hook: its logic with stand-in objects, and the real callback when Lightning is here."""

from types import SimpleNamespace

import pytest
import torch

from mlra_kernels.integrations import lightning as integ
from mlra_kernels.monitor import read_jsonl


class _Module(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.wte = torch.nn.Embedding(40, 8)
        self.logged = []

    def log(self, name, value, **kw):
        self.logged.append((name, value))


def test_hooks_record_once_per_optimizer_step(tmp_path):
    hooks = integ.TEVLightningHooks(str(tmp_path / "tev.jsonl"), every=2, name="pl")
    module, trainer = _Module(), SimpleNamespace(is_global_zero=True, global_step=0)
    hooks.on_train_start(trainer, module)
    # Two micro-batches per optimizer step (gradient accumulation).
    for batch_idx in range(10):
        trainer.global_step = batch_idx // 2
        hooks.on_train_batch_end(trainer, module, {"loss": torch.tensor(5.0 - batch_idx)}, None, batch_idx)
    hooks.on_train_end(trainer, module)
    meta, records = read_jsonl(tmp_path / "tev.jsonl")
    assert meta["name"] == "pl" and [r["step"] for r in records] == [0, 2, 4]
    assert [r["loss"] for r in records] == [5.0, 1.0, -3.0]
    assert [n for n, _ in module.logged] == ["tev_mean", "tev_std"] * 3


def test_hooks_do_nothing_off_rank_zero(tmp_path):
    hooks = integ.TEVLightningHooks(str(tmp_path / "tev.jsonl"), every=1)
    trainer = SimpleNamespace(is_global_zero=False, global_step=0)
    hooks.on_train_start(trainer, _Module())
    hooks.on_train_batch_end(trainer, _Module(), torch.tensor(1.0), None, 0)
    assert hooks.monitor is None and not (tmp_path / "tev.jsonl").exists()


def test_lightning_callback_class():
    if integ._Callback is None:
        with pytest.raises(ImportError, match="needs Lightning"):
            integ.TEVLightningCallback
        pytest.skip("Lightning is not installed; the callback class is only defined with it")
    assert issubclass(integ.TEVLightningCallback, integ._Callback)


def test_hooks_pass_the_log_mode_on(tmp_path):
    log = tmp_path / "tev.jsonl"
    trainer = SimpleNamespace(is_global_zero=True, global_step=0)
    for mode, steps in (("x", [0, 1]), ("a", [2, 3])):  # a run, then the run resumed from a checkpoint
        hooks = integ.TEVLightningHooks(str(log), every=1, mode=mode)
        module = _Module()
        hooks.on_train_start(trainer, module)
        for step in steps:
            trainer.global_step = step
            hooks.on_train_batch_end(trainer, module, torch.tensor(1.0), None, step)
        hooks.on_train_end(trainer, module)
    assert [r["step"] for r in read_jsonl(log)[1]] == [0, 1, 2, 3]
    with pytest.raises(FileExistsError, match="mode='a'"):
        integ.TEVLightningHooks(str(log), every=1).on_train_start(trainer, _Module())
