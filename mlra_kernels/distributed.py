"""Tensor parallelism for MLRA on torch's own engine (DeviceMesh, DTensor, ``parallelize_module``).

Each rank of a 1-D tensor-parallel mesh holds whole latent groups of heads (``g = 1``: some heads of the
one group) and runs the head-local MLRA ops on local tensors; the output projection is row-parallel.
Parameter names stay, and state dicts hold the unsharded tensors (``state_dict()`` is then a collective: call it
on every rank). Layouts and costs: ``docs/scaling.md``.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from mlra_kernels.nn.projection import MLRAProjection
from mlra_kernels.ops.mlra.step import OutputProjection

__all__ = ["MLRAProjectionParallel", "MLRAttentionParallel", "sum_grad", "tensor_parallel"]


def sum_grad(t: Tensor, mesh: DeviceMesh) -> Tensor:
    """``t`` unchanged forward; backward, its gradient summed over ``mesh`` (all-reduce).

    For a tensor replicated over the tensor-parallel ranks that feeds head-local work: each rank's
    gradient is the part of its heads, and the sum is the whole. Written with DTensor: a ``Replicate``
    view whose local gradient is declared ``Partial``.
    """
    return DTensor.from_local(t, mesh, (Replicate(),), run_check=False).to_local(grad_placements=(Partial(),))


def _keeps_views() -> bool:
    """Whether a call may take the kept local views: no autograd (a view has none) and not while tracing."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


class _TPFactors:
    """What ``MLRAProjection.op_factors`` needs under TP: the mesh, the local head and group counts, and the
    local views handed out without autograd (:meth:`_view`)."""

    __slots__ = ("mesh", "num_heads", "latent_groups", "down_sharded", "_views")

    def __init__(self, mesh: DeviceMesh, num_heads: int, latent_groups: int, down_sharded: bool) -> None:
        self.mesh, self.num_heads, self.latent_groups, self.down_sharded = mesh, num_heads, latent_groups, down_sharded
        self._views: dict = {}

    def __getstate__(self) -> tuple:
        return self.mesh, self.num_heads, self.latent_groups, self.down_sharded  # the views hold weak references

    def __setstate__(self, state: tuple) -> None:
        self.__init__(*state)

    def _view(self, name: str, p: DTensor, shape: Optional[tuple] = None) -> Tensor:
        """``p``'s local tensor (viewed as ``shape``), the same view object while ``p`` and its local tensor keep
        their identity, storage and versions: the decode step's memo matches its weights by identity, and
        ``to_local()`` or a reshape makes a new view per call. For calls without autograd only."""
        local = p._local_tensor
        # An in-place op on the DTensor moves its own version counter, not its local tensor's.
        stamp = (local.data_ptr(),) + tuple(None if t.is_inference() else t._version for t in (p, local))
        held = self._views.get(name)
        if held is not None and held[0]() is p and held[1]() is local and held[2] == stamp:
            return held[3]
        view = local.view(shape if shape is not None else local.shape)
        self._views[name] = (weakref.ref(p), weakref.ref(local), stamp, view)
        return view

    def local_factors(self, proj: MLRAProjection):
        down, up, bias = proj.down, proj.up, proj.bias
        if _keeps_views():  # decoding: views kept between calls
            down = self._view("down", down, (-1, down.shape[-1]) if self.down_sharded else None)
            bias = self._view("bias", bias, (-1,)) if bias is not None else None
            return down, self._view("up", up), bias, self.num_heads, self.latent_groups
        if self.down_sharded:  # [3, g_loc·r, d] -> [3·g_loc·r, d]
            down = down.to_local().reshape(-1, down.shape[-1])
        else:  # replicated: every rank's gradient is its heads' part
            down = sum_grad(down.to_local(), self.mesh)
        if bias is not None:  # [3, H_loc·d_h] -> [3·H_loc·d_h]
            bias = bias.to_local().reshape(-1)
        return down, up.to_local(), bias, self.num_heads, self.latent_groups

    def output_columns(self, linear: nn.Linear) -> OutputProjection:
        """A row-parallel output projection's local ``W_O`` ``[d, H_loc·d_h]`` for ``decode_step`` to fold; the
        bias is left to :meth:`sum_output`, after the sum."""
        w = linear.weight
        return OutputProjection(self._view("out", w) if _keeps_views() else w.to_local(), None)

    def sum_output(self, y: Tensor, bias: Optional[Tensor]) -> Tensor:
        """The layer's output from this rank's part ``y`` ``[B, t, d]``: the sum over the mesh, plus the bias."""
        y = DTensor.from_local(y, self.mesh, (Partial(),), run_check=False).full_tensor()
        return y if bias is None else y + bias.to_local()


def _check_mesh(mesh: DeviceMesh, name: str = "device_mesh") -> int:
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"{name} must be a torch.distributed DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim != 1:
        raise ValueError(f"{name} must be the 1-D tensor-parallel mesh (e.g. mesh['tp']), got a {mesh.ndim}-D mesh")
    return mesh.size()


def _check_degree(tp: int, num_heads: int, latent_groups: int) -> None:
    if num_heads % tp:
        raise ValueError(f"device_mesh: the tensor-parallel degree {tp} must divide the MLRAProjection's "
                         f"num_heads={num_heads}")
    if latent_groups > 1 and latent_groups % tp:
        raise ValueError(f"device_mesh: the tensor-parallel degree {tp} must divide the MLRAProjection's "
                         f"latent_groups={latent_groups} (each rank holds whole groups); use latent_groups=1, or "
                         f"a degree dividing {latent_groups}")


class MLRAProjectionParallel(ParallelStyle):
    """Shard an :class:`~mlra_kernels.nn.MLRAProjection` by head over a 1-D tensor-parallel mesh.

    ``up`` and ``bias`` are sharded by head; ``down`` is replicated at ``g = 1`` and sharded by latent
    group when the degree divides ``g`` (``bias`` and a grouped ``down`` as ``[3, ·]`` views, ``Shard(1)``,
    so that each rank's rows of q, k and v are one block; state-dict hooks keep the flat unsharded
    tensors). ``MLRAProjection.op_factors()`` then gives this rank's local
    factors with ``num_heads = H/tp`` and ``latent_groups = g/tp`` (``1`` at ``g = 1``), and the gradient
    of a replicated ``down`` is summed over the mesh. The module that calls the op must also sum its
    input's gradient over the mesh (:func:`sum_grad`); :class:`MLRAttentionParallel` does both.
    As torch's styles, it distributes the values of rank ``src_data_rank`` (``parallelize_module``'s
    argument, default 0). ``state_dict()`` gathers the flat tensors with an all-gather over the mesh: every
    rank of the mesh must call it (one rank alone waits for the others forever).
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, MLRAProjection):
            raise TypeError(f"MLRAProjectionParallel applies to an MLRAProjection, got {type(module).__name__}")
        if module._tp is not None:
            raise ValueError("this MLRAProjection is already tensor-parallel")
        tp = _check_mesh(device_mesh)
        H, g = module.num_heads, module.latent_groups
        _check_degree(tp, H, g)
        src = self.src_data_rank

        def put(name: str, view: tuple, placement) -> None:
            p = getattr(module, name)
            dt = distribute_tensor(p.detach().view(view), device_mesh, [placement], src_data_rank=src)
            module.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))

        down_sharded = g > 1
        put("up", tuple(module.up.shape), Shard(1))
        if down_sharded:
            put("down", (3, -1, module.embed_dim), Shard(1))
        else:
            put("down", tuple(module.down.shape), Replicate())
        if module.bias is not None:
            put("bias", (3, -1), Shard(1))
        module._tp = _TPFactors(device_mesh, H // tp, max(1, g // tp), down_sharded)
        flat = ["bias"] + (["down"] if down_sharded else [])
        module.register_state_dict_post_hook(_full_flat_state(flat))
        module.register_load_state_dict_pre_hook(_sharded_view_state(flat))
        return module


def _full_flat_state(names: list):
    """State-dict hook: the ``[3, ·]`` view parameters as their unsharded flat tensors (an all-gather over the
    mesh, so ``state_dict()`` is a collective)."""

    def hook(module, state_dict, prefix, local_metadata) -> None:
        for name in names:
            key = prefix + name
            if key in state_dict and isinstance(state_dict[key], DTensor):
                t = state_dict[key]
                state_dict[key] = t.full_tensor().reshape(-1, *t.shape[2:])
    return hook


def _sharded_view_state(names: list):
    """Load hook: an unsharded flat tensor (plain or a DTensor) becomes this rank's part of the view."""

    def hook(module, state_dict, prefix, *args) -> None:
        for name in names:
            key, param = prefix + name, getattr(module, name)
            t = state_dict.get(key)
            if t is None or param is None or not isinstance(param, DTensor) or t.shape == param.shape:
                continue
            if isinstance(t, DTensor):
                t = t.full_tensor()
            if t.numel() != param.numel():
                continue  # the usual shape-mismatch error follows
            state_dict[key] = distribute_tensor(t.reshape(param.shape).to(param.dtype), param.device_mesh,
                                                param.placements, src_data_rank=None)
    return hook


_INPUTS = ("query", "key", "value")


class MLRAttentionParallel(ParallelStyle):
    """Tensor-parallel MLRA attention: an ``MLRAttention`` or GPT-2's ``MLRASelfAttention``.

    The factors (``qkv``) as :class:`MLRAProjectionParallel`, the output projection (``out_proj`` or
    ``c_proj``) as torch's ``RowwiseParallel``, and the inputs (``query, key, value``, or GPT-2's ``x``:
    local tensors, replicated over the mesh) given a gradient summed over the mesh. Outputs are local
    tensors, replicated. ``need_weights=True`` and a per-head ``[B·H, T, S]`` mask are refused under TP.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        qkv = getattr(module, "qkv", None)
        out = getattr(module, "out_proj", None)
        out = getattr(module, "c_proj", None) if out is None else out
        if not isinstance(qkv, MLRAProjection) or not isinstance(out, nn.Linear):
            raise TypeError("MLRAttentionParallel applies to a module with an MLRAProjection `qkv` and an nn.Linear "
                            f"`out_proj` or `c_proj` (MLRAttention, GPT-2's MLRASelfAttention), got "
                            f"{type(module).__name__}")
        for style, sub in ((MLRAProjectionParallel(), qkv), (RowwiseParallel(), out)):
            style.src_data_rank = self.src_data_rank
            style._apply(sub, device_mesh)
        n = 3 if hasattr(module, "out_proj") else 1
        mesh = device_mesh

        def mark_inputs(mod, args, kwargs):
            if not torch.is_grad_enabled():
                return None
            seen: dict = {}

            def mark(t):
                if not isinstance(t, Tensor):
                    return t
                if id(t) not in seen:  # query is key is value stays so: self-attention is told by identity
                    seen[id(t)] = sum_grad(t, mesh)
                return seen[id(t)]

            args = tuple(mark(a) if i < n else a for i, a in enumerate(args))
            kwargs = {k: (mark(v) if k in _INPUTS[:n] or (n == 1 and k == "x") else v) for k, v in kwargs.items()}
            return args, kwargs

        module.register_forward_pre_hook(mark_inputs, with_kwargs=True)
        return module


def tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Apply tensor parallelism in place to an MLRA :class:`~mlra_kernels.models.GPT2`; returns it.

    Per block: attention as :class:`MLRAttentionParallel` (``attn.qkv`` by head, ``attn.c_proj``
    row-parallel), ``mlp.c_fc`` column-parallel and ``mlp.c_proj`` row-parallel; embeddings, LayerNorms
    and the tied LM head stay plain replicated parameters. Parameter names are unchanged, so state dicts
    and distributed checkpoints keep their keys and unsharded shapes. Compose in torchtitan's order:
    TP, then activation checkpointing, ``torch.compile`` and FSDP2 (``fully_shard`` on the data-parallel
    mesh). Every rank of ``tp_mesh`` must see the same inputs and build the model from the same seed.

    ``model.state_dict()`` is then a collective (the grouped ``down`` and the bias are gathered over
    ``tp_mesh``): call it on every rank, never under ``if rank == 0``. To write one file, call
    ``get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))`` on
    every rank and save it from rank 0; or save a DCP checkpoint (``dcp.save``, every rank).

    Args:
        model: an MLRA ``GPT2`` (``attention="mlra"``).
        tp_mesh: the 1-D tensor-parallel mesh (``mesh["tp"]`` of a 2-D mesh); its size must divide
            ``n_head`` and, for ``latent_groups > 1``, ``latent_groups``.

    Example::

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        tensor_parallel(model, mesh["tp"])
        for block in model.h:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    """
    from mlra_kernels.models import GPT2

    if not isinstance(model, GPT2):
        raise TypeError(f"model must be an mlra_kernels.models.GPT2, got {type(model).__name__}")
    cfg = model.config
    if cfg.attention != "mlra":
        raise ValueError(f"tensor_parallel supports MLRA attention; model.config.attention is {cfg.attention!r}")
    tp = _check_mesh(tp_mesh, "tp_mesh")
    if cfg.n_head % tp:
        raise ValueError(f"tp_mesh: the tensor-parallel degree {tp} must divide n_head={cfg.n_head}")
    if cfg.latent_groups > 1 and cfg.latent_groups % tp:
        raise ValueError(f"tp_mesh: the tensor-parallel degree {tp} must divide latent_groups={cfg.latent_groups} "
                         "(each rank holds whole latent groups); use latent_groups=1 or a degree that divides it")
    plan = {"attn": MLRAttentionParallel(), "mlp.c_fc": ColwiseParallel(), "mlp.c_proj": RowwiseParallel()}
    for block in model.h:
        parallelize_module(block, tp_mesh, plan)
    return model
