"""Tensor parallelism (``mlra_kernels.distributed``) over 2 CPU processes (gloo, TP = 2) against one process."""

import os
import pathlib
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

from mlra_kernels.models import GPT2, GPT2Config
from tests.helpers import gloo_worker

pytestmark = [pytest.mark.distributed, pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")]

CFGS = {g: dict(vocab_size=97, block_size=24, n_layer=2, n_head=4, n_embd=32, attention="mlra", rank=8,
                latent_groups=g) for g in (1, 2)}
STEPS = 3


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 97, (3, 13), generator=g) for _ in range(STEPS)]


def train(model, local):
    """AdamW steps; returns the losses, the last step's gradients and the final parameters (unsharded)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for idx in batches():
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        grads = {n: local(p.grad).reshape(-1).clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, grads, {n: local(p).detach().reshape(-1).clone() for n, p in model.named_parameters()}


def _body(rank, world, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from mlra_kernels.distributed import tensor_parallel

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    res = {}
    for g, cfg in CFGS.items():
        torch.manual_seed(0)
        model = tensor_parallel(GPT2(GPT2Config(**cfg)).double(), mesh["tp"])
        attn = model.h[0].attn
        down, up, bias, H, G = attn.qkv.op_factors()
        local = {"down": tuple(down.shape), "up": tuple(up.shape), "bias": tuple(bias.shape), "H": H, "g": G}
        # The checkpoint of the initial model holds the unsharded tensors under the usual keys.
        ck = os.path.join(out_dir, f"ck{g}")
        sd = {k: full(v).clone() for k, v in model.state_dict().items()}
        dcp.save(get_model_state_dict(model), checkpoint_id=ck)
        # docs/scaling.md's one-file save: called on every rank, the whole tensors kept on rank 0 only.
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        whole = {k: v.clone() for k, v in get_model_state_dict(model, options=options).items()}
        losses, grads, params = train(model, full)
        # A fresh sharded model loads the checkpoint back.
        torch.manual_seed(7)
        fresh = tensor_parallel(GPT2(GPT2Config(**cfg)).double(), mesh["tp"])
        state = get_model_state_dict(fresh)
        dcp.load(state, checkpoint_id=ck)
        set_model_state_dict(fresh, state)
        reloaded = {k: full(v).clone() for k, v in fresh.state_dict().items()}
        model.eval()
        prompt = batches()[0][:, :5]
        tokens = model.generate(prompt, max_new_tokens=20, temperature=0)  # slides past block_size=24
        # float32: the decode step folds this rank's columns of c_proj into its step weights.
        fresh.float().eval()
        tokens32 = fresh.generate(prompt, max_new_tokens=8, temperature=0)
        res[g] = dict(local=local, sd=sd, whole=whole, losses=losses, grads=grads, params=params,
                      reloaded=reloaded, tokens=tokens, tokens32=tokens32, folded=fresh.h[0].attn._step_memo.formed,
                      updated=_steps_across_an_update(fresh))
    res["attention_module"] = _mlra_attention_module(mesh["tp"], full)
    errors = {}
    for name, cfg in (("heads", dict(CFGS[1], n_head=3, n_embd=24)), ("groups", dict(CFGS[1], n_head=6,
                                                                                      n_embd=36, latent_groups=3))):
        try:
            tensor_parallel(GPT2(GPT2Config(**cfg)), mesh["tp"])
        except ValueError as e:
            errors[name] = str(e)
    res["errors"] = errors
    torch.save(res, pathlib.Path(out_dir) / f"rank{rank}.pt")


@torch.no_grad()
def _steps_across_an_update(model):
    """Decode steps with in-place updates of the factors and of ``c_proj`` between some of them: the logits of
    each step and how often layer 0 formed its step weights."""
    idx = batches()[1][:, :10]
    attn = model.h[0].attn
    updates = {2: lambda: (attn.qkv.up.mul_(2), attn.qkv.bias.add_(0.1)),
               4: lambda: (attn.qkv.down.add_(0.01), attn.c_proj.weight.mul_(0.5))}
    _, cache = model.forward_cached(idx[:, :5], use_cache=True)
    outs = []
    for i in range(5):
        if i in updates:
            updates[i]()
        logits, cache = model.forward_cached(idx[:, 5 + i:6 + i], cache)
        outs.append(logits)
    return outs, attn._step_memo.formed


def _mlra_attention_module(mesh, full):
    """MLRAttention under MLRAttentionParallel against its unsharded copy: output and every gradient."""
    import copy

    from torch.distributed.tensor.parallel import parallelize_module

    from mlra_kernels.distributed import MLRAttentionParallel
    from mlra_kernels.nn import MLRAttention

    torch.manual_seed(2)
    ref = MLRAttention(32, 4, rank=8, latent_groups=2, batch_first=True).double()
    tp = parallelize_module(copy.deepcopy(ref), mesh, MLRAttentionParallel())
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64)
    outs, grads = [], []
    for m in (ref, tp):
        q = x.clone().requires_grad_()
        y, _ = m(q, q, q, attn_mask=mask, is_causal=True, need_weights=False)
        (y * torch.arange(32, dtype=torch.float64)).sum().backward()
        outs.append(y.detach())
        grads.append([q.grad] + [full(p.grad).reshape(-1) for p in m.parameters()])
    try:
        tp(x, x, x, need_weights=True)
        refused = False
    except NotImplementedError:
        refused = True
    return {"out": max((a - b).abs().max().item() for a, b in zip(outs[0], outs[1])),
            "grads": max((a.reshape(-1) - b.reshape(-1)).abs().max().item() for a, b in zip(*grads)),
            "refused": refused}


def test_tensor_parallel_matches_one_process(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(gloo_worker, args=(_body, 2, str(tmp_path / "pg_init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for g, cfg in CFGS.items():
        torch.manual_seed(0)
        model = GPT2(GPT2Config(**cfg)).double()
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        # The sharded model's DCP checkpoint, read in one process, holds the unsharded model's tensors.
        plain = {k: torch.full_like(v, float("nan")) for k, v in sd.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is not initialized: loading in one process"
            dcp.load(plain, checkpoint_id=str(tmp_path / f"ck{g}"), no_dist=True)
        for k, v in sd.items():
            assert torch.equal(plain[k], v), k
        losses, grads, params = train(model, lambda t: t)
        model.eval()
        tokens = model.generate(batches()[0][:, :5], max_new_tokens=20, temperature=0)
        torch.manual_seed(0)
        model32 = GPT2(GPT2Config(**cfg)).eval()
        tokens32 = model32.generate(batches()[0][:, :5], max_new_tokens=8, temperature=0)
        # One prefill: the step weights are formed once and then found in the memo at every step.
        assert model32.h[0].attn._step_memo.formed == 1
        (updated, updated_formed) = _steps_across_an_update(model32)
        assert updated_formed == 1 + 1 + 2  # generate's prefill, the prefill of these steps, one per update
        assert results[1][g]["whole"] == {} and set(results[0][g]["whole"]) == set(sd)
        for k, v in sd.items():
            whole = results[0][g]["whole"][k]
            assert type(whole) is torch.Tensor and torch.equal(whole, v), k
        for res in (r[g] for r in results):
            # Each rank holds half the heads (g = 1: the whole latent; g = 2: one group of two).
            assert res["local"] == {"down": (3 * (1 if g == 1 else g // 2) * 8, 32), "up": (3, 16, 8), "bias": (48,),
                                    "H": 2, "g": 1}
            assert set(res["sd"]) == set(sd)
            for k, v in sd.items():
                assert res["sd"][k].shape == v.shape and torch.equal(res["sd"][k], v), k
                assert torch.equal(res["reloaded"][k], v), k
            torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(losses), rtol=1e-12, atol=0)
            for n, grad in grads.items():
                assert grad.abs().sum() > 0, n
                torch.testing.assert_close(res["grads"][n], grad, rtol=1e-9, atol=1e-12, msg=n)
                torch.testing.assert_close(res["params"][n], params[n], rtol=1e-9, atol=1e-12, msg=n)
            assert torch.equal(res["tokens"], tokens)
            assert torch.equal(res["tokens32"], tokens32) and res["folded"] > 0
            # Under TP too, the step weights are formed once per prefill and again after an in-place update.
            assert res["folded"] == 1
            outs, formed = res["updated"]
            assert formed == updated_formed
            for a, b in zip(outs, updated):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for res in results:
        module = res["attention_module"]
        assert module["out"] < 1e-12 and module["grads"] < 1e-12 and module["refused"]
        assert "tp_mesh" in res["errors"]["heads"] and "n_head=3" in res["errors"]["heads"]
        assert "tp_mesh" in res["errors"]["groups"] and "latent_groups=3" in res["errors"]["groups"]
