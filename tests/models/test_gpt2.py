"""GPT-2 with MHA or MLRA: init, weight tying, training step, KV cache (latents for MLRA)."""

import contextlib
import copy
import math
import warnings

import torch

import pytest  # noqa: E402

from mlra_kernels.models import GPT2, GPT2Config  # noqa: E402
from mlra_kernels.ops.mlra.reference import mlra_attention_reference  # noqa: E402
from tests.helpers import need_cpu_decode_kernel  # noqa: E402


@pytest.fixture
def reference_path(monkeypatch):
    """Run mlra_attention's pure-torch path on CPU: this test is about the model, not the kernels, which
    the Triton interpreter (TRITON_INTERPRET=1, set by the kernel tests) would make slow."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _cfg(attention, **kw):
    base = dict(vocab_size=61, block_size=16, n_layer=2, n_head=4, n_embd=32, attention=attention, rank=8)
    base.update(kw)
    return GPT2Config(**base)


def test_config_validation_and_default_rank():
    assert GPT2Config(n_embd=64, n_head=4, attention="mlra").rank == 16
    with pytest.raises(ValueError, match="attention must be 'mha' or 'mlra'"):
        GPT2Config(attention="mqa")
    with pytest.raises(ValueError, match="GPT2Config.rank must be in \\[1, n_embd=32\\], got 33"):
        _cfg("mlra", rank=33)
    with pytest.raises(ValueError, match="n_head=5 must divide n_embd=32"):
        _cfg("mha", n_head=5)
    with pytest.raises(ValueError, match="latent_groups=3 must divide n_head=4"):
        _cfg("mlra", latent_groups=3)


@pytest.mark.parametrize("attention", ["mha", "mlra"])
def test_init_and_tied_embeddings(attention):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=512, block_size=64, n_layer=8, n_head=4, n_embd=128, attention=attention)
    m = GPT2(cfg)
    assert m.lm_head.weight is m.wte.weight
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)
    params = dict(m.named_parameters())
    assert "lm_head.weight" not in params
    for name, p in params.items():
        if p.dim() == 1:
            if "ln_" in name and name.endswith("weight"):
                assert torch.all(p == 1.0), name
            else:
                assert torch.all(p == 0.0), name
            continue
        std = resid if name.endswith("c_proj.weight") else 0.02
        assert abs(p.std().item() - std) < 0.12 * std, (name, p.std().item(), std)
    if attention == "mlra":
        assert params["h.0.attn.qkv.down"].shape == (3 * 32, 128) and params["h.0.attn.qkv.up"].shape == (3, 128, 32)
    assert m.num_parameters() == sum(p.numel() for p in params.values())


@pytest.mark.usefixtures("reference_path")
@pytest.mark.parametrize("attention", ["mha", "mlra"])
def test_loss_at_init_is_near_uniform_and_one_step_lowers_it(attention):
    torch.manual_seed(0)
    m = GPT2(_cfg(attention))
    idx = torch.randint(0, 61, (4, 16))
    x, y = idx[:, :-1], idx[:, 1:]
    logits, loss = m(x, y)
    assert logits.shape == (4, 15, 61)
    assert abs(loss.item() - math.log(61)) < 0.1
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        m(x, y)[1].backward()
        opt.step()
    assert m(x, y)[1].item() < loss.item() - 0.2


def test_mlra_block_attention_is_the_reference_op():
    torch.manual_seed(0)
    m = GPT2(_cfg("mlra", latent_groups=2)).double()
    attn = m.h[0].attn
    with torch.no_grad():
        attn.qkv.bias.normal_()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    y, _ = attn(x)
    ref = attn.c_proj(
        mlra_attention_reference(x, attn.qkv.down, attn.qkv.up, attn.qkv.bias, num_heads=4, latent_groups=2, causal=True)
    )
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    y_cached, cache = attn(x, use_cache=True)
    torch.testing.assert_close(y_cached, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("attention,groups", [("mha", 1), ("mlra", 1), ("mlra", 2)])
def test_incremental_decoding_matches_full_forward(attention, groups):
    torch.manual_seed(0)
    m = GPT2(_cfg(attention, latent_groups=groups)).double().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.normal_(std=0.1)
    idx = torch.randint(0, 61, (2, 12))
    full, _ = m(idx)
    logits, cache = m.forward_cached(idx[:, :5], use_cache=True)
    steps = [logits]
    for t in range(5, 12, 3):  # chunks of 3, then 1
        logits, cache = m.forward_cached(idx[:, t:t + 3], cache)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-9, atol=1e-9)
    per_token = cache[0][0].shape
    if attention == "mlra":
        assert per_token == (2, groups, 12, 8)  # the latent c_K [B, g, S, r]: g·r numbers per token, not d
    else:
        assert per_token == (2, 4, 12, 8)


@pytest.mark.usefixtures("reference_path")
@pytest.mark.parametrize("attention", ["mha", "mlra"])
def test_generate_with_cache_matches_without(attention):
    torch.manual_seed(0)
    m = GPT2(_cfg(attention)).eval()
    prompt = torch.randint(0, 61, (3, 5))
    # 20 new tokens overflow block_size=16, exercising the sliding window.
    a = m.generate(prompt, 20, temperature=0)
    b = m.generate(prompt, 20, temperature=0, use_cache=False)
    assert a.shape == (3, 25) and torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b)
    torch.manual_seed(1)
    s1 = m.generate(prompt, 6, temperature=0.8, top_k=5)
    torch.manual_seed(1)
    s2 = m.generate(prompt, 6, temperature=0.8, top_k=5, use_cache=False)
    assert torch.equal(s1, s2)


def test_mlra_training_step_through_the_fused_op_matches_float64(monkeypatch):
    """float32 through mlra_attention's kernels (GPU, or the Triton interpreter) against float64."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from mlra_kernels.ops.mlra import kernel_path

    if device == "cuda":
        monkeypatch.setenv("MLRA_BACKEND", "triton")  # the CUDA default is SDPA's composition

    if not kernel_path(torch.zeros(1, 1, 1, device=device)).startswith("triton"):
        pytest.skip("the Triton kernels are not active (no GPU, and TRITON_INTERPRET=1 was not set before import)")
    torch.manual_seed(0)
    m64 = GPT2(_cfg("mlra", latent_groups=2, n_layer=1, block_size=12)).double()
    m32 = GPT2(_cfg("mlra", latent_groups=2, n_layer=1, block_size=12)).to(device)
    m32.load_state_dict(m64.state_dict())
    idx = torch.randint(0, 61, (2, 13))
    loss64 = m64(idx[:, :-1], idx[:, 1:])[1]
    loss64.backward()
    loss32 = m32(idx[:, :-1].to(device), idx[:, 1:].to(device))[1]
    loss32.backward()
    assert abs(loss32.item() - loss64.item()) < 1e-5
    for (name, p64), p32 in zip(m64.named_parameters(), m32.parameters()):
        torch.testing.assert_close(p32.grad.double().cpu(), p64.grad, rtol=1e-3, atol=1e-6, msg=name)


def test_bad_inputs():
    m = GPT2(_cfg("mlra"))
    with pytest.raises(ValueError, match="exceeds the context length block_size=16"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(TypeError, match="idx must hold integer token ids \\(int64 or int32\\), got float32"):
        m(torch.randn(1, 4))
    with pytest.raises(TypeError, match="got uint8"):
        m.generate(torch.ones(1, 4, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="idx must be integer tokens \\[B, T\\], got shape \\[4\\]"):
        m(torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="GPT2Config"):
        GPT2({"n_layer": 2})


@pytest.mark.usefixtures("reference_path")
@pytest.mark.parametrize("attention", ["mha", "mlra"])
def test_token_ids_out_of_range_are_a_clear_error(attention):
    """nn.Embedding would raise a bare IndexError on CPU (a device-side assert on CUDA): the model names
    vocab_size and the range of ids it was given, in forward, forward_cached and generate."""
    m = GPT2(_cfg(attention)).eval()
    for bad, lo, hi in ((torch.tensor([[0, 5, 61]]), 0, 61), (torch.tensor([[-1, 3]]), -1, 3),
                        (torch.tensor([[2, 70]], dtype=torch.int32), 2, 70)):
        msg = f"token ids must be in \\[0, vocab_size=61\\); idx holds ids in \\[{lo}, {hi}\\]"
        with pytest.raises(ValueError, match=msg):
            m(bad)
        with pytest.raises(ValueError, match=msg):
            m.forward_cached(bad, use_cache=True)
        with pytest.raises(ValueError, match=msg):
            m.generate(bad, 2)
    ok = torch.tensor([[0, 60]])
    assert m(ok)[0].shape == (1, 2, 61)
    assert m.generate(ok, 3, temperature=0).shape == (1, 5)


def test_token_id_check_compiles_without_a_graph_break():
    """Under torch.compile the host-syncing min/max is skipped, so fullgraph compilation still works."""
    torch.manual_seed(0)
    m = GPT2(_cfg("mha", n_layer=1)).eval()
    idx = torch.randint(0, 61, (2, 8))
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(idx)[0], m(idx)[0])


def _decode_spy(monkeypatch):
    """Record the shapes of the caches and lengths each MLRA decode step attends: what ``decode_step`` hands
    ``mlra_decode``'s path (``decode_on``), or on a kernel path in eager mode (the step on pre-multiplied
    weights) the kernel call ``latent_attention``."""
    import mlra_kernels.ops.mlra.step as step

    calls = []
    real, real_attention = step.decode_on, step.latent_attention

    def record(k, v, lengths):
        lens = None if lengths is None else (tuple(lengths.shape), lengths.tolist())
        calls.append(dict(k=tuple(k.shape), v=tuple(v.shape), lens=lens))

    def spy(*args, cache_k, cache_v, cache_seqlens=None, **kw):
        record(cache_k, cache_v, cache_seqlens)
        return real(*args, cache_k=cache_k, cache_v=cache_v, cache_seqlens=cache_seqlens, **kw)

    def spy_attention(path, q_abs, k, v, *, cache_seqlens=None, **kw):
        record(k, v, cache_seqlens)
        return real_attention(path, q_abs, k, v, cache_seqlens=cache_seqlens, **kw)

    monkeypatch.setattr(step, "decode_on", spy)
    monkeypatch.setattr(step, "latent_attention", spy_attention)
    return calls


def _kernel_or_skip():
    from mlra_kernels.ops.mlra import backend

    if torch.cuda.is_available():
        return "cuda", "triton"
    if not backend.triton_available() or not backend.triton_interpreted():
        pytest.skip("the decode kernel needs a GPU, or triton imported under TRITON_INTERPRET=1")
    return "cpu", "triton-interpreter"


def test_decode_kernel_gets_the_whole_cache_at_every_length(monkeypatch):
    """On the kernel path each step hands mlra_decode the preallocated buffers and the device lengths, so
    its arguments, and the kernel's grid, are the same at every length (a step fits a CUDA graph); the
    tokens decoded one by one still match the full forward."""
    from mlra_kernels.ops.mlra import launcher, use_backend

    device, kernel = _kernel_or_skip()
    torch.manual_seed(0)
    m = GPT2(_cfg("mlra", latent_groups=2, n_layer=1)).to(device).eval()
    idx = torch.randint(0, 61, (2, 9), device=device)
    calls = _decode_spy(monkeypatch)
    mod = launcher.kernels("decode_kernels")
    grids, real_plan = [], mod.plan

    def plan(*args, **kw):
        p = real_plan(*args, **kw)
        grids.append(p["grid"])
        return p

    monkeypatch.setattr(mod, "plan", plan)
    with torch.no_grad():
        full, _ = m(idx)
        with use_backend(kernel):
            logits, cache = m.forward_cached(idx[:, :6], use_cache=True)
            steps = [logits] + [m.forward_cached(idx[:, t:t + 1], cache)[0] for t in (6, 7, 8)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
    assert [c["lens"] for c in calls] == [((2,), [7, 7]), ((2,), [8, 8]), ((2,), [9, 9])]
    assert all(c["k"] == c["v"] == (2, 2, 16, 8) for c in calls)  # the capacity, block_size=16
    assert len(grids) == 3 and grids[0] == grids[1] == grids[2]


def test_generate_on_the_decode_kernel_gives_the_same_tokens():
    """Greedy tokens through the kernel path equal those of the default path, across the sliding window."""
    from mlra_kernels.ops.mlra import use_backend

    device, kernel = _kernel_or_skip()
    torch.manual_seed(0)
    m = GPT2(_cfg("mlra", n_layer=1)).to(device).eval()
    prompt = torch.randint(0, 61, (3, 5), device=device)
    expected = m.generate(prompt, 14, temperature=0, use_cache=False)
    with use_backend(kernel):
        got = m.generate(prompt, 14, temperature=0)
    assert torch.equal(got, expected)


def test_decode_torch_path_gets_views_of_the_filled_part(monkeypatch):
    """The torch path would attend every position it is given: it gets the filled part only."""
    torch.manual_seed(0)
    m = GPT2(_cfg("mlra", n_layer=1)).double().eval()
    idx = torch.randint(0, 61, (2, 7))
    calls = _decode_spy(monkeypatch)
    with torch.no_grad():
        _, cache = m.forward_cached(idx[:, :5], use_cache=True)
        for t in (5, 6):
            m.forward_cached(idx[:, t:t + 1], cache)
    assert [(c["k"], c["lens"]) for c in calls] == [((2, 1, 6, 8), None), ((2, 1, 7, 8), None)]
    assert cache[0].seqlens.tolist() == [7, 7] and cache[0].seqlens.dtype == torch.int32


def test_cache_rewind_keeps_the_device_lengths():
    from mlra_kernels.models.gpt2 import LayerCache

    cache = LayerCache(8, seq_dim=2)
    cache.append(torch.zeros(3, 1, 5, 2), torch.zeros(3, 1, 5, 2))
    assert cache.seqlens.tolist() == [5, 5, 5] and cache.buffers()[0].shape == (3, 1, 8, 2)
    cache.length = 2
    cache.append(torch.ones(3, 1, 1, 2), torch.ones(3, 1, 1, 2))
    assert cache.length == 3 and cache.seqlens.tolist() == [3, 3, 3] and cache[0].shape == (3, 1, 3, 2)


def _step_on(m, idx, cache, n, torch_path=False):
    """The logits of token ``n`` decoded on ``cache`` rewound to ``n`` positions (on decode's torch path:
    ``mlra_decode`` then ``c_proj`` called as a module, the reference of the step weights)."""
    from mlra_kernels.ops.mlra import use_backend

    for c in cache:
        c.length = n
    with torch.no_grad(), use_backend("torch") if torch_path else contextlib.nullcontext():
        return m.forward_cached(idx[:, n:n + 1], cache)[0]


def _check_step(m, idx, cache, n):
    torch.testing.assert_close(_step_on(m, idx, cache, n), _step_on(m, idx, cache, n, torch_path=True),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 4])
def test_decode_step_weights_follow_the_parameters(groups):
    """A kernel-path step runs on pre-multiplied weights formed once per prefill (two continuations of one
    prefix share them); an in-place update (an optimizer step) and load_state_dict form them again on the
    same cache, a ``.data`` write from the next prefill on, and a dtype round trip drops them."""
    need_cpu_decode_kernel()
    torch.manual_seed(0)
    m = GPT2(_cfg("mlra", latent_groups=groups, n_layer=1)).eval()
    attn = next(x for x in m.modules() if hasattr(x, "_step_memo"))
    memo = attn._step_memo
    idx = torch.randint(0, 61, (2, 10))

    def prefill():
        with torch.no_grad():
            return m.forward_cached(idx[:, :8], use_cache=True)[1]

    cache = prefill()
    with torch.no_grad():
        full = m(idx[:, :9])[0][:, -1:]
    torch.testing.assert_close(_step_on(m, idx, cache, 8), full, rtol=1e-4, atol=1e-5)
    assert memo.formed == 1
    _check_step(m, idx, cache, 8)
    other = copy.deepcopy(cache)
    for n in (8, 9):
        _check_step(m, idx, cache, n)
        _check_step(m, idx, other, n)
    assert memo.formed == 1  # the same weights: formed once for both caches
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.25)
    _check_step(m, idx, cache, 8)
    assert memo.formed == 2
    m.load_state_dict({k: v * 0.8 for k, v in m.state_dict().items()})
    _check_step(m, idx, cache, 8)
    assert memo.formed == 3
    attn.c_proj.weight.data.mul_(2.0)  # moves no version counter: seen from the next prefill on
    cache = prefill()
    _check_step(m, idx, cache, 8)
    assert memo.formed == 4
    m.double()
    assert memo._weights is None  # .to() / .double() drop the products
    m.float()
    cache = prefill()
    _check_step(m, idx, cache, 8)
    assert memo.formed == 5


def test_decode_step_on_inference_tensors():
    """A model built under inference_mode has weights without version counters; its steps still run on
    the step weights, formed once per prefill."""
    need_cpu_decode_kernel()
    torch.manual_seed(0)
    idx = torch.randint(0, 61, (2, 10))
    with torch.inference_mode():
        m = GPT2(_cfg("mlra", latent_groups=4, n_layer=1)).eval()
        _, cache = m.forward_cached(idx[:, :8], use_cache=True)
        steps = [m.forward_cached(idx[:, n:n + 1], cache)[0] for n in (8, 9)]
        full = m(idx)[0]
    attn = next(x for x in m.modules() if hasattr(x, "_step_memo"))
    assert attn.qkv.down.is_inference() and attn._step_memo.formed == 1
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 8:], rtol=1e-4, atol=1e-5)


class _DoubledLinear(torch.nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


def test_decode_step_calls_a_wrapped_or_hooked_output_projection(monkeypatch):
    """A subclass of nn.Linear as c_proj, or a hook on it, is not skipped: the step then calls it (and
    says so once) instead of reading its weight."""
    from mlra_kernels import _warnings

    monkeypatch.setattr(_warnings, "_WARNED", set())
    need_cpu_decode_kernel()
    torch.manual_seed(0)
    m = GPT2(_cfg("mlra", latent_groups=4, n_layer=1)).eval()
    attn = next(x for x in m.modules() if hasattr(x, "_step_memo"))
    idx = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        cache = m.forward_cached(idx[:, :8], use_cache=True)[1]
    plain = _step_on(m, idx, cache, 8)
    assert attn._step_memo.formed == 1

    doubled = _DoubledLinear(32, 32)
    doubled.load_state_dict(attn.c_proj.state_dict())
    attn.c_proj = doubled
    with pytest.warns(UserWarning, match="output projection is a _DoubledLinear, not a plain Linear"):
        out = _step_on(m, idx, cache, 8)
    assert not torch.allclose(out, plain, rtol=1e-3, atol=1e-3)  # the doubling took effect
    torch.testing.assert_close(out, _step_on(m, idx, cache, 8, torch_path=True), rtol=1e-4, atol=1e-5)

    plain_proj = torch.nn.Linear(32, 32)
    plain_proj.load_state_dict(doubled.state_dict())
    attn.c_proj = plain_proj
    calls = []
    handle = plain_proj.register_forward_hook(lambda mod, args, out: calls.append(1) or 2.0 * out)
    with pytest.warns(UserWarning, match="output projection is a Linear with forward hooks"):
        out = _step_on(m, idx, cache, 8)
    assert calls == [1]
    torch.testing.assert_close(out, _step_on(m, idx, cache, 8, torch_path=True), rtol=1e-4, atol=1e-5)
    handle.remove()

    real_forward = plain_proj.forward
    plain_proj.forward = lambda y: 2.0 * real_forward(y)  # as accelerate's offloading hooks do
    with pytest.warns(UserWarning, match="forward was replaced on the instance"):
        out = _step_on(m, idx, cache, 8)
    torch.testing.assert_close(out, _step_on(m, idx, cache, 8, torch_path=True), rtol=1e-4, atol=1e-5)
    del plain_proj.forward
    assert not torch.allclose(out, _step_on(m, idx, cache, 8), rtol=1e-3, atol=1e-3)
    assert attn._step_memo.formed == 2  # the plain Linear's steps, without its hook and its own forward


def test_decode_step_keeps_the_gradient_of_a_trainable_output_projection():
    """Only c_proj trainable, in evaluation mode with gradients on: the step cannot use detached step
    weights, and c_proj gets the gradient decode's torch path gives."""
    from mlra_kernels.ops.mlra import use_backend

    torch.manual_seed(0)
    m = GPT2(_cfg("mlra", latent_groups=4, n_layer=1)).eval()
    attn = next(x for x in m.modules() if hasattr(x, "_step_memo"))
    for p in m.parameters():
        p.requires_grad_(False)
    attn.c_proj.weight.requires_grad_(True)
    idx = torch.randint(0, 61, (2, 9))
    grads = []
    for torch_path in (False, True):
        cache = m.forward_cached(idx[:, :8], use_cache=True)[1]
        with use_backend("torch") if torch_path else contextlib.nullcontext():
            m.forward_cached(idx[:, 8:], cache)[0].square().sum().backward()
        grads.append(attn.c_proj.weight.grad)
        attn.c_proj.weight.grad = None
    assert grads[0] is not None and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
    assert attn._step_memo.formed == 0


def test_python_decode_step_checks_the_cache_before_writing(monkeypatch):
    """The step weights' Python step (CUDA, or a _C without the whole-step op) checks the cache as
    mlra_decode does: a cache of another dtype is a TypeError, and nothing is appended."""
    from mlra_kernels import _ext

    monkeypatch.setattr(_ext, "_STEP_OP", [False])
    need_cpu_decode_kernel()
    torch.manual_seed(0)
    m = GPT2(_cfg("mlra", latent_groups=4, n_layer=1)).eval()
    idx = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        cache = m.forward_cached(idx[:, :8], use_cache=True)[1]
        _check_step(m, idx, cache, 8)  # the Python step against decode's torch path
        cache[0]._k = cache[0]._k.double()
        cache[0].length = 8
        with pytest.raises(TypeError, match="cache_k is torch.float64 but x is torch.float32"):
            m.forward_cached(idx[:, 8:9], cache)
    assert cache[0].length == 8 and cache[0].seqlens.tolist() == [8, 8]


def test_a_build_without_the_step_op_warns_once_and_runs_the_python_step(monkeypatch):
    from mlra_kernels import _ext, _warnings

    monkeypatch.setattr(_warnings, "_WARNED", set())
    monkeypatch.setattr(_ext, "_STEP_OP", [])
    monkeypatch.setattr(_ext, "STEP_OP_NAME", "no_such_op")
    if not _ext.decode_kernel_loads():
        pytest.skip("the compiled extension is not available (the test command builds it)")
    torch.manual_seed(0)
    m = GPT2(_cfg("mlra", latent_groups=4, n_layer=1)).eval()
    idx = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        cache = m.forward_cached(idx[:, :8], use_cache=True)[1]
    with pytest.warns(UserWarning, match="no mlra::latent_decode_step_cpu"):
        _check_step(m, idx, cache, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_step(m, idx, cache, 9)


def test_a_model_that_decoded_can_be_saved_whole(tmp_path):
    """torch.save of the whole module after decode steps: the step weights are not pickled, and are formed
    again after loading."""
    torch.manual_seed(0)
    m = GPT2(_cfg("mlra", latent_groups=4, n_layer=1)).eval()
    idx = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        cache = m.forward_cached(idx[:, :8], use_cache=True)[1]
    before = _step_on(m, idx, cache, 8)
    torch.save(m, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.no_grad():
        cache = loaded.forward_cached(idx[:, :8], use_cache=True)[1]
    torch.testing.assert_close(_step_on(loaded, idx, cache, 8), before, rtol=0, atol=0)


@pytest.mark.parametrize("top_k", [0, -1, 2.5, True])
def test_generate_checks_top_k(top_k):
    m = GPT2(_cfg("mha", n_layer=1)).eval()
    with pytest.raises(ValueError, match=r"top_k must be None \(no limit\) or an int >= 1"):
        m.generate(torch.zeros(1, 2, dtype=torch.long), 1, top_k=top_k)


def test_bfloat16_decode_steps_run_on_the_step_weights_and_the_kernel():
    """A bfloat16 model's CPU steps take the Python step on its step weights with the C++ kernel reading
    the bf16 cache: within 3x the error of decode's bf16 torch path, against float64."""
    from tests.helpers import assert_within_torch_error

    need_cpu_decode_kernel()
    torch.manual_seed(0)
    m = GPT2(_cfg("mlra", latent_groups=4, n_layer=1)).eval()
    exact_model = copy.deepcopy(m).double()
    m = m.bfloat16()
    idx = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        cache = m.forward_cached(idx[:, :8], use_cache=True)[1]
        cache64 = exact_model.forward_cached(idx[:, :8], use_cache=True)[1]
    got = _step_on(m, idx, cache, 8)
    assert next(x for x in m.modules() if hasattr(x, "_step_memo"))._step_memo.formed == 1
    low = _step_on(m, idx, cache, 8, torch_path=True)
    exact = _step_on(exact_model, idx, cache64, 8, torch_path=True)
    assert got.dtype == torch.bfloat16
    assert_within_torch_error(got, low, exact, what="bf16 decode step error")


def test_generate_takes_numpy_and_torch_integers_as_top_k():
    import numpy as np

    m = GPT2(_cfg("mha", n_layer=1)).eval()
    idx = torch.zeros(1, 2, dtype=torch.long)
    for k in (np.int64(3), torch.tensor(3)):
        torch.manual_seed(0)
        assert m.generate(idx, 2, top_k=k).shape == (1, 4)


def _prefilled(cfg, seed=0, B=2, T=5):
    torch.manual_seed(seed)
    m = GPT2(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    with torch.no_grad():
        _, cache = m.forward_cached(idx, use_cache=True)
    return m, cache


@pytest.mark.parametrize("path", ["auto", "torch"])
def test_a_cache_from_another_model_is_a_cache_error(reference_path, path):
    """A cache of another rank, or an MHA model's per-head K/V (which has the latents' shapes when g = H
    and r = d_h), is named as what it is, not blamed on the weights or read as latents."""
    from mlra_kernels.ops.mlra import use_backend

    mlra, _ = _prefilled(_cfg("mlra"))
    _, other_rank = _prefilled(_cfg("mlra", rank=4))
    full, _ = _prefilled(_cfg("mlra", rank=8, latent_groups=4))  # g = H = 4, r = d_h = 8
    _, mha_cache = _prefilled(_cfg("mha"))
    mha, mlra_cache = _prefilled(_cfg("mha")), _prefilled(_cfg("mlra"))[1]
    step = torch.zeros(2, 1, dtype=torch.long)
    with use_backend(path), torch.no_grad():
        with pytest.raises(ValueError, match=r"the cache holds latents c_K, c_V \[B, g=1, S, r=4\].*"
                                             r"this layer keeps latents c_K, c_V \[B, g=1, S, r=8\].*another model"):
            mlra.forward_cached(step, other_rank)
        with pytest.raises(ValueError, match=r"the cache holds per-head keys and values \[B, H=4, S, d_h=8\]"):
            full.forward_cached(step, mha_cache)
        with pytest.raises(ValueError, match=r"this layer keeps per-head keys and values"):
            mha[0].forward_cached(step, mlra_cache)


@pytest.mark.parametrize("path", ["auto", "torch"])
def test_a_cache_whose_seqlens_disagree_with_its_length_is_an_error(reference_path, path):
    from mlra_kernels.ops.mlra import use_backend

    m, cache = _prefilled(_cfg("mlra"))
    step = torch.zeros(2, 1, dtype=torch.long)
    cache[1].seqlens[0] -= 2
    with use_backend(path), torch.no_grad(), pytest.raises(ValueError, match=r"seqlens \[3, 5\] disagree with its length 5"):
        m.forward_cached(step, cache)
    assert cache[1].length == 5 and cache[0].length == 5  # nothing was appended to the layer that raised


def test_a_cache_of_another_batch_layer_count_or_lengths_is_an_error(reference_path):
    m, cache = _prefilled(_cfg("mlra"))
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"the cache holds 2 sequences, but the new tokens are a batch of 3"):
            m.forward_cached(torch.zeros(3, 1, dtype=torch.long), cache)
        with pytest.raises(TypeError, match=r"list of 2 LayerCache .* got 1 entries"):
            m.forward_cached(torch.zeros(2, 1, dtype=torch.long), cache[:1])
        cache[1].length = 4
        with pytest.raises(ValueError, match=r"different lengths \[4, 5\]"):
            m.forward_cached(torch.zeros(2, 1, dtype=torch.long), cache)


@pytest.mark.parametrize("case", ["cpp-step", "python-step", "float64", "hooked-c_proj"])
def test_a_decode_step_enters_the_ops_once_per_layer(case, monkeypatch):
    """Followed from the model, a cached step of each attention layer calls into ``mlra_kernels/ops`` once
    (``decode_step``) and comes back once: the Python code that runs alternates models, ops, models, ... with
    one stay in ops per layer, whichever way the step runs."""
    from mlra_kernels import _ext, _warnings
    from tests.helpers import package_crossings

    need_cpu_decode_kernel()
    monkeypatch.setattr(_warnings, "_WARNED", set())
    torch.manual_seed(0)
    m = GPT2(_cfg("mlra", latent_groups=4, n_layer=2)).eval()
    if case == "float64":
        m.double()
    if case == "python-step":
        monkeypatch.setattr(_ext, "_STEP_OP", [False])
    if case == "hooked-c_proj":
        for block in m.h:
            block.attn.c_proj.register_forward_hook(lambda mod, args, out: None)
    idx = torch.randint(0, 61, (2, 10))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, cache = m.forward_cached(idx[:, :8], use_cache=True)
        m.forward_cached(idx[:, 8:9], cache)  # forms the step weights
        areas, calls = package_crossings(lambda: m.forward_cached(idx[:, 9:10], cache), "models")
    assert calls == 2 and areas == ["models", "ops", "models", "ops", "models"]
    assert cache[0].length == 10 and cache[0].seqlens.tolist() == [10, 10]


def test_a_state_dict_with_the_factors_flat_on_the_layer_loads():
    """State dicts from before ``qkv`` held the factors name them ``down``, ``up`` and ``qkv_bias``."""
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16, attention="mlra", rank=4)
    src, dst = GPT2(cfg), GPT2(cfg)
    flat = {k.replace("qkv.down", "down").replace("qkv.up", "up").replace("qkv.bias", "qkv_bias"): v
            for k, v in src.state_dict().items()}
    assert any(k.endswith("attn.down") for k in flat)
    dst.load_state_dict(flat)
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), name
