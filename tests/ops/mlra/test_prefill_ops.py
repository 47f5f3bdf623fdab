"""The prefill op layer: ``backend.PREFILL_OPS`` maps every path to its entry point, each path runs its own
registered op pair (each op with a fake and the forward with its backward), and each path's forward keeps
for the backward what its design says (never a ``T×T`` matrix)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import mlra_kernels
from mlra_kernels.ops.mlra import backend, use_backend
from tests.helpers import key_padding, make_inputs

# The op pair each path's entry point runs (``<name>_fwd``, ``<name>_bwd``); "sdpa" runs plain torch.
OPS = {
    "sdpa": None,
    "triton": "mlra_attention_triton",
    "triton-interpreter": "mlra_attention_triton",
    "torch-cpu": "mlra_attention_torch_cpu",
    "torch-cpu-latent": "mlra_attention_torch_cpu_latent",
    "torch": "mlra_attention_torch",
}
CPU_PATHS = ("torch", "torch-cpu", "torch-cpu-latent")
# 2·max(16, r) <= d_h, so the latent path applies too; T = 20 is not a multiple of a tile.
B, T, H, G, R, DH = 2, 20, 4, 2, 8, 32
D, SCALE = H * DH, 0.2
WIDTH = max(16, R)  # the CPU latent path's head width


def _ins():
    """float32 ``[x, down, up, bias, go]``."""
    return [t.float() for t in make_inputs(B, T, H, G, R, DH, device="cpu")]


def _fwd_args(path, x, down, up, b):
    """A forward op's arguments; the torch path's with key padding and a dropout seed."""
    if path == "torch":
        kpm = torch.zeros(B, T).masked_fill(key_padding("random", B, T, device="cpu"), float("-inf"))
        return (x, down, up, b, kpm, None, torch.tensor([7]), H, G, True, 0.1, SCALE)
    if path == "triton":
        return (x, down, up, b, None, None, H, G, True, 0.0, SCALE)
    return (x, down, up, b, H, G, True, SCALE)


def _bwd_args(path, go, fwd_args, outs):
    x, down, up, b = fwd_args[:4]
    if path == "torch":
        return (go, *fwd_args)
    if path == "triton":
        return (go, *fwd_args[:6], *outs, *fwd_args[6:])
    if path == "torch-cpu":
        return (go, x, down, up, *outs, *fwd_args[4:])
    return (go, x, down, up, b, *outs[1:], *fwd_args[4:])


# The forward op's outputs: ``o`` first, then what the backward reads.
OUT_SHAPES = {
    "torch": [(B, T, D)],
    "triton": [(B, T, D), (B, H, T)],
    "torch-cpu": [(B, T, D), (B, H, T), (3 * G, B * T, D // G), (B, T, 3 * G * R)],
    "torch-cpu-latent": [(B, T, D), (B, H, T), (B, T, 3 * G * R), (B, T, H, WIDTH)],
}


def _op(path, part):
    return getattr(torch.ops.mlra, f"{OPS[path]}_{part}")


def test_the_table_covers_exactly_the_paths():
    assert set(backend.PREFILL_OPS) == set(backend.PATHS) == set(OPS)
    assert all(callable(fn) for fn in backend.PREFILL_OPS.values())
    # The interpreter is a mode of Triton: both Triton paths share one entry; every other path has its own.
    assert backend.PREFILL_OPS["triton"] is backend.PREFILL_OPS["triton-interpreter"]
    assert len(set(backend.PREFILL_OPS.values())) == len(backend.PATHS) - 1


class _Ops(TorchDispatchMode):
    """Records the ``mlra`` ops dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "mlra":
            self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", CPU_PATHS + ("sdpa",))
def test_each_path_runs_its_own_op_pair(path):
    x, down, up, b, go = _ins()
    leaves = [t.requires_grad_() for t in (x, down, up, b)]
    with use_backend(path), _Ops() as seen:
        out = mlra_kernels.mlra_attention(*leaves, num_heads=H, latent_groups=G)
    assert seen.names == ([f"mlra.{OPS[path]}_fwd.default"] if OPS[path] else [])
    with _Ops() as seen:
        out.backward(go)
    assert seen.names == ([f"mlra.{OPS[path]}_bwd.default"] if OPS[path] else [])
    assert all(torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in leaves)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_opcheck_forward_and_backward(path):
    """The forward op with inputs that require grad (its fake, autograd registration and schema), then
    its backward op on the forward's outputs."""
    x, down, up, b, go = _ins()
    fwd_args = _fwd_args(path, *(t.requires_grad_() for t in (x, down, up, b)))
    torch.library.opcheck(_op(path, "fwd").default, fwd_args)
    fwd_args = _fwd_args(path, *(t.detach() for t in (x, down, up, b)))
    outs = _op(path, "fwd")(*fwd_args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    assert [tuple(t.shape) for t in outs] == OUT_SHAPES[path]
    torch.library.opcheck(_op(path, "bwd").default, _bwd_args(path, go, fwd_args, outs))


@pytest.mark.parametrize("path", ["torch", "torch-cpu", "torch-cpu-latent", "triton"])
def test_every_op_has_a_fake(path):
    """Under FakeTensorMode only the registered fakes run (the Triton op's too, with no kernel launched)."""
    with FakeTensorMode():
        x, down, up, b, go = (torch.empty(t.shape) for t in _ins())
        fwd_args = _fwd_args(path, x, down, up, b)
        outs = _op(path, "fwd")(*fwd_args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = _op(path, "bwd")(*_bwd_args(path, go, fwd_args, outs))
    assert [tuple(t.shape) for t in outs] == OUT_SHAPES[path]
    assert outs[0].dtype == torch.float32 and all(t.dtype == torch.float32 for t in outs[1:2])
    assert [tuple(t.shape) for t in grads] == [(B, T, D), (3 * G * R, D), (3, D, R), (3 * D,)]


def _triton_path():
    if backend.triton_available() and torch.cuda.is_available():
        return "triton"
    if backend.triton_available() and backend.triton_interpreted():
        return "triton-interpreter"
    pytest.skip("the Triton kernels need CUDA, or TRITON_INTERPRET=1 set before triton is imported")


# What each path's forward keeps for the backward besides the inputs.
KEPT = {
    "torch": [],
    "triton": [(B, T, D), (B, H, T)],  # o, lse
    "torch-cpu": OUT_SHAPES["torch-cpu"],  # o, lse, qkv, c
    "torch-cpu-latent": OUT_SHAPES["torch-cpu-latent"][1:],  # lse, c, z
}
KEPT["triton-interpreter"] = KEPT["triton"]


@pytest.mark.parametrize("path", CPU_PATHS + ("triton",))
def test_what_each_path_keeps_for_the_backward(path):
    """Besides the inputs: nothing on the torch path (it recomputes), ``o`` and the log-sum-exp on the
    Triton paths, and on the CPU paths what torch's fused CPU attention's backward reads (per-head q, k, v
    and the latents; or the latents and the latent-wide ``Z``)."""
    device = "cpu"
    if path == "triton":
        path = _triton_path()
        device = "cuda" if path == "triton" else "cpu"
    x, down, up, b, go = (t.to(device) for t in _ins())
    leaves = [t.requires_grad_() for t in (x, down, up, b)]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with use_backend(path), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = mlra_kernels.mlra_attention(*leaves, num_heads=H, latent_groups=G)
    inputs = {t.data_ptr() for t in leaves}
    assert sorted(tuple(t.shape) for t in saved if t.data_ptr() not in inputs) == sorted(KEPT[path])
    out.backward(go)
    assert all(torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_compile_fullgraph_matches_eager(path):
    x, down, up, b, go = _ins()

    def f(*t):
        return (mlra_kernels.mlra_attention(*t, num_heads=H, latent_groups=G) * go).sum()

    with use_backend(path):
        leaves = [t.clone().requires_grad_() for t in (x, down, up, b)]
        f(*leaves).backward()
        eager = [t.grad for t in leaves]
        torch._dynamo.reset()
        leaves = [t.clone().requires_grad_() for t in (x, down, up, b)]
        torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves).backward()
    for a, e in zip((t.grad for t in leaves), eager):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
