"""transformers GPT-2 converted to MLRA: logits, generate(), the latent KV cache, training, callback."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is an optional dependency")

from mlra_kernels.integrations.transformers import MLRAGPT2Attention, TEVTrainerCallback, convert_gpt2  # noqa: E402
from mlra_kernels.monitor import read_jsonl  # noqa: E402
from tests.helpers import REPO, need_cpu_decode_kernel  # noqa: E402

D = 32


@pytest.fixture
def reference_path(monkeypatch):
    """Run mlra_attention's pure-torch path on CPU: this test is about the conversion, not the kernels, which
    the Triton interpreter (TRITON_INTERPRET=1, set by the kernel tests) would make slow."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _model(attn_impl="eager", seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=83, n_positions=32, n_embd=D, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = attn_impl
    model = transformers.GPT2LMHeadModel(cfg).to(dtype).eval()
    with torch.no_grad():  # trained-looking biases so that every bias path matters
        for name, p in model.named_parameters():
            if name.endswith("attn.bias"):
                p.normal_(std=0.1)
    return model


def _cache_kw(model):
    """The name under which this transformers release's model forward takes the cache."""
    import inspect

    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _copy(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("groups", [1, 2])
def test_full_rank_svd_matches_logits(attn_impl, groups):
    ref = _model(attn_impl)
    mlra = convert_gpt2(_copy(ref), rank=D, latent_groups=groups)
    assert all(isinstance(b.attn, MLRAGPT2Attention) for b in mlra.transformer.h)
    assert max(mlra.transformer.h[0].attn.svd_error.values()) < 1e-12
    ids = torch.randint(0, 83, (3, 11), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(mlra(ids).logits, ref(ids).logits, rtol=1e-9, atol=1e-9)
    # Left padding through the attention mask: compare the real tokens.
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = 0
    a, b = mlra(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], rtol=1e-9, atol=1e-9)


def test_low_rank_reports_error_and_differs():
    ref = _model()
    mlra = convert_gpt2(_copy(ref), rank=6)
    err = mlra.transformer.h[0].attn.svd_error
    assert set(err) == {"q", "k", "v"} and all(0.05 < e < 1 for e in err.values())
    assert mlra.config.mlra_rank == 6
    ids = torch.randint(0, 83, (2, 9))
    assert not torch.allclose(mlra(ids).logits, ref(ids).logits, atol=1e-4)


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_generate_gives_the_same_tokens_and_caches_latents(attn_impl):
    ref = _model(attn_impl)
    mlra = convert_gpt2(_copy(ref), rank=D, latent_groups=2)
    prompt = torch.randint(0, 83, (2, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(mlra.generate(prompt, **kw), ref.generate(prompt, **kw), rtol=0, atol=0)
    out = mlra(prompt, use_cache=True)
    cache = out.past_key_values
    assert cache.get_seq_length() == 5
    layer = cache.layers[0]
    assert layer.keys.shape == (2, 2, 5, D)  # latents c_K, [B, g, S, r]: g·r numbers per token, not H·d_h
    # Incremental decoding through the cache matches a full forward.
    nxt = torch.randint(0, 83, (2, 3))
    step = mlra(nxt, **{_cache_kw(mlra): cache}, use_cache=True).logits
    full = ref(torch.cat([prompt, nxt], dim=1)).logits[:, 5:]
    torch.testing.assert_close(step, full, rtol=1e-9, atol=1e-9)


@pytest.fixture
def fused_calls(monkeypatch):
    """Record every call of the fused op from the converted attention; start with no warning issued yet."""
    import mlra_kernels.integrations.transformers as integration
    import mlra_kernels._warnings as warnings_module

    calls = []
    real = integration.mlra_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(integration, "mlra_attention", spy)
    monkeypatch.setattr(warnings_module, "_WARNED", set())
    return calls


def _mlra_warnings(record):
    return [w for w in record if "MLRAGPT2Attention" in str(w.message)]


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_default_training_forward_calls_the_fused_op(attn_impl, fused_calls):
    # GPT2Model makes an empty DynamicCache by default (use_cache=True) and, with eager, a 4-D causal mask;
    # neither may keep the fused op out.
    ref = _model(attn_impl).train()
    mlra = convert_gpt2(_copy(ref), rank=D, latent_groups=2).train()
    ids = torch.randint(0, 83, (3, 11), generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = mlra(ids, labels=ids)
    assert not _mlra_warnings(record)
    assert len(fused_calls) == 2 and all(c["key_padding_mask"] is None for c in fused_calls)
    expected = ref(ids, labels=ids)
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-9, atol=1e-9)
    out.loss.backward()
    assert mlra.transformer.h[0].attn.qkv.down.grad.abs().sum() > 0
    # The latents were still written to the default cache.
    assert out.past_key_values.get_seq_length() == 11
    assert out.past_key_values.layers[1].keys.shape == (3, 2, 11, D)


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_padding_mask_goes_to_the_fused_op_as_key_padding(attn_impl, fused_calls):
    ref = _model(attn_impl)
    mlra = convert_gpt2(_copy(ref), rank=D)
    ids = torch.randint(0, 83, (3, 9), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    a, b = mlra(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    assert len(fused_calls) == 2
    torch.testing.assert_close(fused_calls[0]["key_padding_mask"], mask == 0, rtol=0, atol=0)
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], rtol=1e-9, atol=1e-9)
    # An all-ones mask is no padding at all.
    fused_calls.clear()
    mlra(ids, attention_mask=torch.ones_like(mask))
    assert len(fused_calls) == 2 and fused_calls[0]["key_padding_mask"] is None


def test_mask_is_inspected_once_per_forward_not_per_layer(fused_calls, monkeypatch):
    import mlra_kernels.integrations.transformers as integration

    inspected = []
    real = integration._inspect_mask
    monkeypatch.setattr(integration, "_inspect_mask", lambda *a: inspected.append(a[1:]) or real(*a))
    mlra = convert_gpt2(_model("eager"), rank=D)
    ids = torch.randint(0, 83, (3, 9), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0
    mlra(ids, attention_mask=mask)
    assert len(fused_calls) == 2 and inspected == [(3, 9)]  # two layers, one look at the 4-D mask
    mlra(ids, attention_mask=mask)  # a new forward builds a new 4-D mask: looked at again
    assert len(fused_calls) == 4 and len(inspected) == 2
    torch.testing.assert_close(fused_calls[3]["key_padding_mask"], mask == 0, rtol=0, atol=0)


@pytest.mark.usefixtures("reference_path")
@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_torch_compile_matches_eager_with_padding(attn_impl):
    """Under torch.compile a 4-D mask is not read on the host: those layers run the dense attention."""
    mlra = convert_gpt2(_model(attn_impl, dtype=torch.float32), rank=D)
    ids = torch.randint(0, 83, (3, 9), generator=torch.Generator().manual_seed(8))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :2] = 0
    expected = mlra(ids, attention_mask=mask).logits
    torch._dynamo.reset()
    compiled = torch.compile(mlra, backend="eager")
    got = compiled(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_decoding_with_a_cache_uses_the_dense_path_without_warning(attn_impl, fused_calls):
    mlra = convert_gpt2(_model(attn_impl), rank=D)
    prompt = torch.randint(0, 83, (2, 5), generator=torch.Generator().manual_seed(7))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        mlra.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert len(fused_calls) == 2  # the prefill only, once per layer
    assert not _mlra_warnings(record)


def test_general_mask_warns_once_and_runs_the_dense_attention(fused_calls):
    ref = _model("eager")
    mlra = convert_gpt2(_copy(ref), rank=D)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    bias = torch.randn(2, 1, 6, 6, dtype=torch.float64)  # an additive bias, not a causal/padding mask
    with pytest.warns(UserWarning, match=r"MLRAGPT2Attention: the attention mask \(\(2, 1, 6, 6\)\) is not causal"):
        out, _ = mlra.transformer.h[0].attn(x, attention_mask=bias)
    expected, _ = ref.transformer.h[0].attn(x, attention_mask=bias)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    assert not fused_calls
    with warnings.catch_warnings(record=True) as record:  # once only
        warnings.simplefilter("always")
        mlra.transformer.h[1].attn(x, attention_mask=bias)
    assert not _mlra_warnings(record)


def test_causal_padding_detection():
    from mlra_kernels.integrations.transformers import _causal_padding

    T = 5
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    keep = torch.tensor([[False, False, True, True, True], [True] * T])
    padded = (causal & keep[:, None, :])[:, None]  # [2, 1, T, T], True = attend
    assert _causal_padding(None, 2, T) == (True, None)
    assert _causal_padding(causal.expand(2, 1, T, T), 2, T) == (True, None)
    assert _causal_padding(causal[None, None], 2, T) == (True, None)  # broadcast over the batch
    ok, kpm = _causal_padding(padded, 2, T)
    assert ok and torch.equal(kpm, ~keep)
    additive = torch.zeros(2, 1, T, T).masked_fill(~padded, torch.finfo(torch.float32).min)
    ok, kpm = _causal_padding(additive, 2, T)
    assert ok and torch.equal(kpm, ~keep)
    ok, kpm = _causal_padding(torch.zeros(2, 1, T, T).masked_fill(~padded, float("-inf")), 2, T)
    assert ok and torch.equal(kpm, ~keep)
    general = [
        torch.ones(2, 1, T, T, dtype=torch.bool),  # bidirectional
        additive.masked_fill(padded, 0.5),  # a bias on the allowed scores
        causal.expand(2, 4, T, T),  # per head
        causal[None, None, :, :4],  # keys != queries
        causal.long()[None, None],  # integer
        causal[None],  # 3-D
    ]
    hidden_key = causal.clone()
    hidden_key[3:, 2] = False  # key 2 hidden from later queries only: not padding
    general.append(hidden_key[None, None])
    for mask in general:
        assert _causal_padding(mask, 2, T) == (False, None)


@pytest.mark.usefixtures("reference_path")
def test_converted_model_trains_one_step():
    model = convert_gpt2(_model(dtype=torch.float32).train(), rank=8, init="random")
    attn = model.transformer.h[0].attn
    assert attn.svd_error is None and torch.count_nonzero(attn.qkv.bias) == 0
    ids = torch.randint(0, 83, (4, 16), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = model(ids, labels=ids).loss
    before.backward()
    assert attn.qkv.down.grad.abs().sum() > 0 and attn.qkv.up.grad.abs().sum() > 0
    down = attn.qkv.down.detach().clone()
    opt.step()
    opt.zero_grad()
    assert not torch.equal(down, attn.qkv.down)
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert model(ids, labels=ids).loss.item() < before.item()


def test_convert_errors():
    with pytest.raises(TypeError, match="GPT2Block"):
        convert_gpt2(torch.nn.Linear(3, 3), rank=2)
    model = convert_gpt2(_model(), rank=4)
    with pytest.raises(ValueError, match="already converted"):
        convert_gpt2(model, rank=4)
    with pytest.raises(ValueError, match="rank must be in"):
        convert_gpt2(_model(), rank=D + 1)
    with pytest.raises(ValueError, match="init must be"):
        convert_gpt2(_model(), rank=4, init="zeros")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rank=8.5), TypeError, r"rank must be a positive int, got 8\.5"),
        (dict(rank="8"), TypeError, "rank must be a positive int"),
        (dict(rank=True), TypeError, "rank must be a positive int"),
        (dict(rank=0), ValueError, "rank must be a positive int, got 0"),
        (dict(rank=-3), ValueError, "rank must be a positive int"),
        (dict(rank=D + 1), ValueError, rf"rank must be in \[1, embed_dim={D}\], got {D + 1}"),
        (dict(rank=4, latent_groups=0), ValueError, "latent_groups must be a positive int, got 0"),
        (dict(rank=4, latent_groups=-2), ValueError, "latent_groups must be a positive int"),
        (dict(rank=4, latent_groups=2.0), TypeError, "latent_groups must be a positive int"),
        (dict(rank=4, latent_groups=3), ValueError, "latent_groups=3 must divide num_heads=4"),
        (dict(rank=4, init="SVD"), ValueError, "init must be 'svd' or 'random', got 'SVD'"),
        (dict(rank=4, init=None), ValueError, "init must be 'svd' or 'random', got None"),
    ],
)
def test_convert_argument_errors_name_the_argument(kwargs, error, match):
    model = _model()
    with pytest.raises(error, match=match):
        convert_gpt2(model, **kwargs)
    # Nothing was replaced.
    assert not any(isinstance(b.attn, MLRAGPT2Attention) for b in model.transformer.h)


def test_convert_accepts_integral_arguments():
    import numpy as np

    model = convert_gpt2(_model(), rank=np.int64(4), latent_groups=np.int32(2))
    attn = model.transformer.h[0].attn
    assert (attn.rank, attn.latent_groups) == (4, 2) and type(attn.rank) is int
    assert model.config.mlra_rank == 4 and type(model.config.mlra_rank) is int
    assert convert_gpt2(_model(), rank=None).transformer.h[0].attn.rank == D // 4


def test_callback_hooks_record_tev_and_loss(tmp_path):
    from transformers import TrainerControl, TrainerState

    model = _model(dtype=torch.float32)
    cb = TEVTrainerCallback(str(tmp_path / "tev.jsonl"), every=2)
    state, control = TrainerState(), TrainerControl()
    cb.on_train_begin(None, state, control, model=model)
    for step in range(1, 6):  # the Trainer's order: on_step_end, then on_log of the same step
        cb.on_step_begin(None, state, control)
        state.global_step = step
        cb.on_step_end(None, state, control)
        logs = {"loss": 4.0 - step}
        cb.on_log(None, state, control, logs=logs)
        if step >= 2:
            assert logs["tev_mean"] > 0
    cb.on_train_end(None, state, control)
    _, records = read_jsonl(tmp_path / "tev.jsonl")
    assert [r["step"] for r in records] == [2, 4] and [r["loss"] for r in records] == [2.0, 0.0]


@pytest.mark.usefixtures("reference_path")
def test_trainer_callback_logs_tev(tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    model = convert_gpt2(_model(dtype=torch.float32).train(), rank=8)
    ids = torch.randint(0, 83, (8, 16), generator=torch.Generator().manual_seed(4))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    cb = TEVTrainerCallback(str(tmp_path / "tev.jsonl"), every=1, name="hf")
    Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    meta, records = read_jsonl(tmp_path / "tev.jsonl")
    assert meta["name"] == "hf" and [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["tev_mean"] > 0 for r in records) and records[-1]["loss"] > 0


def test_transformers_range_matches_the_extras_and_is_enforced():
    import re

    from mlra_kernels.integrations import transformers as integration

    setup = (REPO / "setup.py").read_text()
    declared = re.search(r'TRANSFORMERS = "transformers([^"]+)"', setup).group(1)
    assert declared == integration.SUPPORTED_TRANSFORMERS
    with pytest.raises(ImportError, match=r"supports transformers>=5\.0,<6; found transformers 4\.57\.1, .*no Cache"):
        integration._check_transformers_version("4.57.1")
    integration._check_transformers_version("5.0.0")
    with pytest.warns(UserWarning, match=r"tested with transformers>=5\.0,<6; found transformers 6\.2\.0"):
        integration._check_transformers_version("6.2.0")


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_layer_scaling_flags_match_the_original(attn_impl):
    """scale_attn_by_inverse_layer_idx / scale_attn_weights mean what they mean to this release's own
    attention implementation (early 5.x releases applied them in eager only)."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=83, n_positions=32, n_embd=D, n_layer=2, n_head=4, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, scale_attn_by_inverse_layer_idx=True)
    cfg._attn_implementation = attn_impl
    ref = transformers.GPT2LMHeadModel(cfg).double().eval()
    mlra = convert_gpt2(_copy(ref), rank=D)
    ids = torch.randint(0, 83, (2, 9), generator=torch.Generator().manual_seed(17))
    torch.testing.assert_close(mlra(ids).logits, ref(ids).logits, rtol=1e-9, atol=1e-9)


def test_conversion_keeps_evaluation_mode():
    cfg_kw = dict(vocab_size=83, n_positions=32, n_embd=D, n_layer=2, n_head=4, attn_pdrop=0.3, resid_pdrop=0.3)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg_kw)).double().eval()
    mlra = convert_gpt2(_copy(ref), rank=D)
    assert not any(m.training for m in mlra.modules())
    ids = torch.randint(0, 83, (2, 9), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(mlra(ids).logits, ref(ids).logits, rtol=1e-9, atol=1e-9)  # no dropout ran
    train = convert_gpt2(_copy(ref).train(), rank=D)
    assert all(b.attn.training for b in train.transformer.h)


def test_output_attentions_returns_the_weights_of_every_layer(fused_calls):
    ref = _model("eager")
    mlra = convert_gpt2(_copy(ref), rank=D, latent_groups=2)
    ids = torch.randint(0, 83, (2, 7), generator=torch.Generator().manual_seed(6))
    got, expected = mlra(ids, output_attentions=True), ref(ids, output_attentions=True)
    assert len(got.attentions) == len(expected.attentions) == 2
    for a, b in zip(got.attentions, expected.attentions):
        assert a.shape == (2, 4, 7, 7)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-9, atol=1e-9)
    assert not fused_calls  # weights need the dense attention
    mlra(ids)
    assert len(fused_calls) == 2  # and without the request the fused op runs again


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_returned_attention_weights_are_on_the_path_to_the_loss(attn_impl):
    """`attentions[i].retain_grad()` then `backward()` gives each layer's returned weights P their gradient (the
    output is computed from them), and the results do not change. The output is (P·c_V)·B_Vᵀ + b_V where the
    dense layer computes P·(c_V·B_Vᵀ + b_V): equal on the rows of P, which sum to 1, so every parameter
    gets the dense model's gradient, and dL/dP differs from the dense one by dO·b_V, the same for every key."""
    ref = _model("eager").train()  # the dense reference is eager: transformers 5.0 returns no sdpa weights
    mlra = convert_gpt2(_model(attn_impl).train(), rank=D, latent_groups=2)
    ids = torch.randint(0, 83, (2, 7), generator=torch.Generator().manual_seed(6))
    plain = mlra(ids).logits.detach()
    got = []
    for model in (ref, mlra):
        model.zero_grad()
        out = model(ids, labels=ids, output_attentions=True)
        for a in out.attentions:
            a.retain_grad()
        out.loss.backward()
        assert all(a.grad is not None for a in out.attentions)
        got.append((out.logits, [a.grad for a in out.attentions], model.transformer.wte.weight.grad.clone(),
                    model.transformer.h[0].attn.c_proj.weight.grad.clone()))
    (ref_logits, ref_dp, *ref_params), (logits, dp, *params) = got
    torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logits, plain, rtol=1e-12, atol=1e-12)  # the fused op, without weights
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for a, b in zip(dp, ref_dp):
        diff = a - b
        torch.testing.assert_close(diff, diff[..., :1].expand_as(diff), rtol=1e-9, atol=1e-9)
    with torch.no_grad():  # without a graph the output is mlra_decode's own: the same numbers
        torch.testing.assert_close(mlra(ids, output_attentions=True).logits, logits, rtol=0, atol=0)


def test_conversion_after_a_forward_with_output_attentions_still_collects_the_weights():
    """transformers (the releases with output-capturing hooks) hooks a model's modules at its first forward
    that asks for attentions and does it only once: the converted layers take over the hooks of the layers
    they replace, so the weights are collected whichever came first, a forward or the conversion."""
    ref = _model("eager")
    ids = torch.randint(0, 83, (2, 7), generator=torch.Generator().manual_seed(6))
    expected = ref(ids, output_attentions=True).attentions
    model = _copy(ref)
    model(ids, output_attentions=True)
    seen = []
    model.transformer.h[1].attn.register_forward_hook(lambda mod, args, out: seen.append(type(mod).__name__))
    convert_gpt2(model, rank=D)
    got = model(ids, output_attentions=True).attentions
    assert got is not None and len(got) == 2
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert seen == ["MLRAGPT2Attention"]  # a hook registered on the replaced layer runs on its replacement
    assert len(model(ids, output_attentions=True).attentions) == 2  # and no hook runs twice


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_dense_models_cache_of_the_latents_shape_is_refused(dtype):
    """At rank = d_h and latent_groups = H a dense GPT-2's per-head keys [B, H, S, d_h] have the latents'
    shape [B, g, S, r]: the converted layers mark the cache layers they write, and refuse an unmarked one
    that holds positions, in a forward and in generate(), with a DynamicCache and a StaticCache."""
    from transformers import DynamicCache, StaticCache

    ref = _model(dtype=dtype)
    mlra = convert_gpt2(_copy(ref), rank=D // 4, latent_groups=4)
    prompt = torch.randint(0, 83, (2, 5), generator=torch.Generator().manual_seed(2))
    nxt = torch.randint(0, 83, (2, 1), generator=torch.Generator().manual_seed(3))
    dense = ref(prompt, use_cache=True).past_key_values
    assert isinstance(dense, DynamicCache) and dense.layers[0].keys.shape == (2, 4, 5, D // 4)
    match = r"layer 0\): the cache holds 5 positions .* dense \(unconverted\) GPT-2.*\[B, g, S, r\] = \[2, 4, S, 8\]"
    hand = DynamicCache()  # one built by hand from per-head K/V
    for i, layer in enumerate(dense.layers):
        hand.update(layer.keys.clone(), layer.values.clone(), i)
    for cache in (dense, hand):
        with pytest.raises(ValueError, match=match):
            mlra(nxt, **{_cache_kw(mlra): cache}, use_cache=True)
    with pytest.raises(ValueError, match=match):
        mlra.generate(torch.cat([prompt, nxt], 1), past_key_values=dense, max_new_tokens=2, do_sample=False,
                      pad_token_id=0)
    static = StaticCache(config=ref.config, max_cache_len=16)
    kw = _decode_kwargs(ref, static, 0)
    kw["position_ids"] = torch.arange(5)[None]
    if "cache_position" in kw:
        kw["cache_position"] = torch.arange(5)
    ref(prompt, **kw)
    with pytest.raises(ValueError, match=r"the cache holds 5 positions .* dense \(unconverted\)"):
        mlra(nxt, **_decode_kwargs(mlra, static, 5))
    # The latents this model wrote, in either cache, are read as before.
    own = mlra(prompt, use_cache=True).past_key_values
    assert all(getattr(layer, "_mlra_latents", False) for layer in own.layers)
    step = mlra(nxt, **{_cache_kw(mlra): own}, use_cache=True).logits
    torch.testing.assert_close(step, mlra(torch.cat([prompt, nxt], 1)).logits[:, -1:], rtol=1e-5, atol=1e-5)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(mlra.generate(prompt, cache_implementation="static", **kw),
                               mlra.generate(prompt, **kw), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_cache_of_another_shape_is_refused_in_the_callers_terms(dtype):
    """A dense model's cache, or a cache from a model converted at another rank, is refused before it is read
    or written, with the layer, the cache's shape and the latents' shape this model needs (the float32
    decode step on the step weights would otherwise fail on the weights' shapes, and the rest in torch.cat)."""
    ref = _model(dtype=dtype)
    mlra = convert_gpt2(_copy(ref), rank=D, latent_groups=2)
    other = convert_gpt2(_copy(ref), rank=D // 2, latent_groups=2)
    prompt = torch.randint(0, 83, (2, 5), generator=torch.Generator().manual_seed(2))
    cases = (
        (ref(prompt, use_cache=True).past_key_values, r"\[2, 4, 5, 8\].*per-head layout \[B, H, S, d_h\] of a dense"),
        (other(prompt, use_cache=True).past_key_values, r"\[2, 2, 5, 16\].*another rank or latent_groups"),
    )
    for cache, why in cases:
        for nxt in (prompt[:, :1], prompt[:, :3]):  # a decode step and a longer forward
            with pytest.raises(ValueError, match=r"layer 0\): the cache holds keys of shape " + why) as err:
                mlra(nxt, **{_cache_kw(mlra): cache}, use_cache=True)
            assert "[B, g, S, r] = [2, 2, S, 32]" in str(err.value) and "fresh cache" in str(err.value)
        assert cache.get_seq_length() == 5  # nothing was written


def test_a_static_cache_allocated_ahead_for_per_head_kv_is_allocated_again():
    """transformers allocates a StaticCache ahead with per-head shapes [B, H, S, d_h] (early_initialization, as
    generate() does for a chunked prefill): a layer that holds nothing yet is allocated again for the latents."""
    from transformers import StaticCache

    mlra = convert_gpt2(_model(dtype=torch.float32), rank=D // 4, latent_groups=1)
    prompt = torch.randint(1, 83, (2, 6), generator=torch.Generator().manual_seed(2))
    cache = StaticCache(config=mlra.config, max_cache_len=16)
    cache.early_initialization(2, 4, D // 4, torch.float32, torch.device("cpu"))
    kw = _decode_kwargs(mlra, cache, 0)
    kw["position_ids"] = torch.arange(6)[None]
    if "cache_position" in kw:
        kw["cache_position"] = torch.arange(6)
    got = mlra(prompt, **kw).logits
    torch.testing.assert_close(got, mlra(prompt).logits, rtol=1e-5, atol=1e-5)
    assert cache.layers[0].keys.shape == (2, 1, 16, D // 4)
    from transformers.generation.utils import GenerationMixin

    if not hasattr(GenerationMixin, "_get_static_cache_init_shape"):
        return  # releases whose generate() does not allocate ahead (5.0's chunked prefill overruns a static cache)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    torch.testing.assert_close(mlra.generate(prompt, prefill_chunk_size=4, **kw), mlra.generate(prompt, **kw),
                               rtol=0, atol=0)


def test_svd_conversion_on_the_meta_device():
    cfg = transformers.GPT2Config(vocab_size=83, n_positions=32, n_embd=D, n_layer=2, n_head=4)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(cfg)
    convert_gpt2(model, rank=8, latent_groups=2, init="svd")
    attn = model.transformer.h[1].attn
    assert attn.qkv.down.is_meta and attn.qkv.down.shape == (3 * 2 * 8, D) and attn.qkv.up.shape == (3, D, 8)
    assert attn.svd_error is None


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_static_cache_generate_matches_the_dense_model(attn_impl, fused_calls):
    ref = _model(attn_impl)
    mlra = convert_gpt2(_copy(ref), rank=D, latent_groups=2)
    prompt = torch.randint(0, 83, (2, 5), generator=torch.Generator().manual_seed(9))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, cache_implementation="static")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = mlra.generate(prompt, **kw, return_dict_in_generate=True)
    torch.testing.assert_close(got.sequences, ref.generate(prompt, **kw), rtol=0, atol=0)
    assert not _mlra_warnings(record)
    assert len(fused_calls) == 2  # the prefill into the unwritten static cache is fused
    layer = got.past_key_values.layers[0]
    assert layer.keys.shape[:2] == (2, 2) and layer.keys.shape[-1] == D  # latents [B, g, S_max, r], preallocated


def _decode_kwargs(model, cache, position):
    import inspect

    kw = {_cache_kw(model): cache, "use_cache": True, "position_ids": torch.tensor([[position]])}
    if "cache_position" in inspect.signature(type(model).forward).parameters:
        kw["cache_position"] = torch.tensor([position])
    return kw


@pytest.mark.usefixtures("reference_path")
def test_compiled_decode_step_on_a_static_cache_has_no_graph_break():
    _check_compiled_static_step()


def test_compiled_decode_step_on_the_kernel_has_no_graph_break(monkeypatch, decode_calls):
    """The step's mask becomes key padding and lengths on the device, without a host read: the kernel
    path compiles with fullgraph=True too."""
    monkeypatch.setenv("MLRA_BACKEND", _kernel_or_skip())
    with torch.no_grad():  # the kernel is forward only
        _check_compiled_static_step()
    assert decode_calls[1], "the decode kernel did not run"


def _check_compiled_static_step():
    from transformers import StaticCache

    model = convert_gpt2(_model("sdpa", dtype=torch.float32), rank=D, latent_groups=2)
    prompt = torch.randint(0, 83, (2, 6), generator=torch.Generator().manual_seed(10))
    nxt = torch.randint(0, 83, (2, 1), generator=torch.Generator().manual_seed(11))

    def prefilled():
        cache = StaticCache(config=model.config, max_cache_len=16)
        kw = _decode_kwargs(model, cache, 0)
        kw["position_ids"] = torch.arange(6)[None]
        if "cache_position" in kw:
            kw["cache_position"] = torch.arange(6)
        model(prompt, **kw)
        return cache

    expected = model(nxt, **_decode_kwargs(model, prefilled(), 6)).logits
    torch._dynamo.reset()
    step = torch.compile(model, fullgraph=True, backend="eager")
    got = step(nxt, **_decode_kwargs(model, prefilled(), 6)).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    full = model(torch.cat([prompt, nxt], dim=1)).logits[:, -1:]
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)


def test_beam_search_matches_the_dense_model():
    ref = _model("sdpa")
    mlra = convert_gpt2(_copy(ref), rank=D)
    prompt = torch.randint(0, 83, (2, 4), generator=torch.Generator().manual_seed(12))
    kw = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(mlra.generate(prompt, **kw), ref.generate(prompt, **kw), rtol=0, atol=0)


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_generate_with_left_padding_matches_the_dense_model(attn_impl, fused_calls):
    ref = _model(attn_impl)
    mlra = convert_gpt2(_copy(ref), rank=D, latent_groups=2)
    prompt = torch.randint(1, 83, (3, 7), generator=torch.Generator().manual_seed(13))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :3] = 0
    mask[2, :1] = 0
    prompt = prompt.masked_fill(mask == 0, 0)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(mlra.generate(prompt, **kw), ref.generate(prompt, **kw), rtol=0, atol=0)
    assert len(fused_calls) == 2 and fused_calls[0]["key_padding_mask"] is not None


def test_save_and_load_with_from_pretrained(tmp_path):
    from mlra_kernels.integrations.transformers import from_pretrained

    model = convert_gpt2(_model("sdpa", dtype=torch.float32), rank=8, latent_groups=2)
    ids = torch.randint(0, 83, (2, 9), generator=torch.Generator().manual_seed(14))
    model.save_pretrained(tmp_path / "saved")
    loaded = from_pretrained(tmp_path / "saved")
    assert isinstance(loaded, transformers.GPT2LMHeadModel) and not loaded.training
    assert all(isinstance(b.attn, MLRAGPT2Attention) for b in loaded.transformer.h)
    assert loaded.config.mlra_rank == 8 and loaded.config.mlra_latent_groups == 2
    for name, p in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], p, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(loaded.generate(ids, **kw), model.generate(ids, **kw), rtol=0, atol=0)
    # Saved again from the loaded model, it loads again; a dense checkpoint is refused.
    loaded.save_pretrained(tmp_path / "again")
    assert isinstance(from_pretrained(tmp_path / "again").transformer.h[0].attn, MLRAGPT2Attention)
    _model("sdpa").save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="not saved from a converted model"):
        from_pretrained(tmp_path / "dense")
    # A mistyped local folder is named as one, not passed on to the hub as a bad repo id.
    with pytest.raises(FileNotFoundError, match=r"path: no folder '.*/missing'; expected a folder written by"):
        from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"path: no folder './missing'"):
        from_pretrained("./missing")


def test_from_pretrained_expands_the_home_folder(tmp_path, monkeypatch):
    from mlra_kernels.integrations.transformers import from_pretrained

    monkeypatch.setenv("HOME", str(tmp_path))
    convert_gpt2(_model("sdpa", dtype=torch.float32), rank=8).save_pretrained(tmp_path / "saved")
    assert isinstance(from_pretrained("~/saved").transformer.h[0].attn, MLRAGPT2Attention)
    with pytest.raises(FileNotFoundError, match=f"path: no folder '{tmp_path}/missing'"):
        from_pretrained("~/missing")


@pytest.mark.parametrize("groups", [1, 2])
def test_a_saved_converted_model_loads_in_plain_transformers_as_its_dense_equivalent(tmp_path, groups):
    """save_pretrained also writes each layer's dense c_attn (the factors' product): plain
    GPT2LMHeadModel.from_pretrained gives the same logits, and from_pretrained loads the factors quietly."""
    from mlra_kernels.integrations.transformers import from_pretrained

    model = convert_gpt2(_model("sdpa", dtype=torch.float64), rank=8, latent_groups=groups)
    ids = torch.randint(0, 83, (2, 9), generator=torch.Generator().manual_seed(21))
    model.save_pretrained(tmp_path / "saved")
    plain, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "saved", output_loading_info=True,
                                                               dtype=torch.float64)
    assert type(plain) is transformers.GPT2LMHeadModel and not info["missing_keys"]
    torch.testing.assert_close(plain.eval()(ids).logits, model(ids).logits, rtol=1e-10, atol=1e-10)
    loaded, info = from_pretrained(tmp_path / "saved", output_loading_info=True, dtype=torch.float64)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    # A state_dict handed to save_pretrained (as the Trainer does) is what both loaders see, in its dtype.
    edited = {k: (v * 2 if k.endswith("qkv.down") else v).float() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "edited", state_dict=edited)
    mlra = from_pretrained(tmp_path / "edited", dtype=torch.float32)
    plain = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "edited", dtype=torch.float32).eval()
    assert plain.transformer.h[0].attn.c_attn.weight.dtype == torch.float32
    torch.testing.assert_close(plain(ids).logits, mlra(ids).logits, rtol=1e-4, atol=1e-4)
    assert (mlra(ids).logits.double() - model(ids).logits).abs().max() > 1e-2  # the edit is in both


def test_a_converted_model_pickles_whole(tmp_path):
    model = convert_gpt2(_model("sdpa", dtype=torch.float32), rank=8)
    torch.save(model, tmp_path / "model.pt")
    again = torch.load(tmp_path / "model.pt", weights_only=False)
    assert type(again) is type(model) and isinstance(again, transformers.GPT2LMHeadModel)
    ids = torch.randint(0, 83, (2, 5), generator=torch.Generator().manual_seed(22))
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_from_pretrained_reads_checkpoints_with_the_earlier_factor_names(tmp_path):
    from safetensors.torch import load_file, save_file

    from mlra_kernels.integrations.transformers import from_pretrained

    model = convert_gpt2(_model("sdpa", dtype=torch.float32), rank=8)
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    old = {k.replace("attn.qkv.down", "attn.down").replace("attn.qkv.up", "attn.up")
           .replace("attn.qkv.bias", "attn.qkv_bias"): v for k, v in load_file(weights).items()}
    assert "transformer.h.0.attn.down" in old
    save_file(old, weights, metadata={"format": "pt"})
    loaded = from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 83, (2, 7), generator=torch.Generator().manual_seed(16))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    # A checkpoint without the factors is an error, not uninitialised (NaN) attention.
    save_file({k: v for k, v in old.items() if ".attn.down" not in k}, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="holds no MLRA factors for transformer.h.0.attn.qkv.down"):
        from_pretrained(tmp_path / "m")
    # The same hook for load_state_dict.
    fresh = convert_gpt2(_model("sdpa", dtype=torch.float32), rank=8, init="random")
    fresh.load_state_dict({k: v for k, v in old.items()} | {"lm_head.weight": model.lm_head.weight}, strict=False)
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing):
        model = convert_gpt2(_model("sdpa", dtype=torch.float64), rank=8, init="svd").train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.is_gradient_checkpointing
        ids = torch.randint(0, 83, (2, 10), generator=torch.Generator().manual_seed(15))
        model(ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert set(plain) == set(ckpt) and any("attn.qkv.down" in n for n in plain)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-10, atol=1e-12, msg=n)


def test_static_cache_prefill_mask_is_read_as_causal():
    from mlra_kernels.integrations.transformers import _inspect_mask

    T, S = 4, 7
    allowed = torch.zeros(2, 1, T, S, dtype=torch.bool)
    allowed[:, :, :, :T] = torch.ones(T, T, dtype=torch.bool).tril()
    assert _inspect_mask(allowed, 2, T) == (True, None)
    padded = allowed.clone()
    padded[1, :, :, 0] = False
    ok, kpm = _inspect_mask(padded, 2, T)
    assert ok and kpm.tolist() == [[False] * T, [True] + [False] * (T - 1)]
    leaked = allowed.clone()
    leaked[0, 0, 2, T + 1] = True  # a query that sees an unwritten slot: not a prefill mask
    assert _inspect_mask(leaked, 2, T) == (False, None)
    additive = torch.zeros(2, 1, T, S).masked_fill(~allowed, torch.finfo(torch.float32).min)
    assert _inspect_mask(additive, 2, T) == (True, None)


def _kernel_or_skip():
    from mlra_kernels.ops.mlra import backend

    if torch.cuda.is_available():
        return "triton"
    if not backend.triton_available() or not backend.triton_interpreted():
        pytest.skip("the decode kernel needs a GPU, or triton imported under TRITON_INTERPRET=1")
    return "triton-interpreter"


@pytest.fixture
def decode_calls(monkeypatch):
    """Record what the converted attention hands mlra_decode (through decode_step, mlra_decode's path
    decode_on; for a step on its step weights, the kernel call latent_attention, which takes no general
    mask), and count the decode kernel's launches."""
    import mlra_kernels.integrations.transformers as integration
    import mlra_kernels.ops.mlra.decode as decode
    import mlra_kernels.ops.mlra.step as step

    calls, kernel = [], []
    real_decode, real_op, real_attention = integration.mlra_decode, decode.mlra_decode_attn, step.latent_attention
    real_decode_on = step.decode_on

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_decode(*args, **kwargs)

    def spy_attention(*args, **kwargs):
        calls.append(dict(kwargs, attn_mask=None))
        return real_attention(*args, **kwargs)

    def spy_on(*args, **kwargs):
        calls.append(kwargs)
        return real_decode_on(*args, **kwargs)

    monkeypatch.setattr(step, "latent_attention", spy_attention)
    monkeypatch.setattr(step, "decode_on", spy_on)

    def op(*args):
        kernel.append(args[0].shape)
        return real_op(*args)

    monkeypatch.setattr(integration, "mlra_decode", spy)
    monkeypatch.setattr(decode, "mlra_decode_attn", op)
    return calls, kernel


@pytest.mark.parametrize("attn_impl,static", [("eager", False), ("sdpa", False), ("sdpa", True)])
def test_left_padded_decode_steps_run_the_kernel(attn_impl, static, decode_calls):
    """The decode step's mask (causal, left padding, a StaticCache's unwritten slots) reaches mlra_decode as
    key padding, which the kernel fuses: forced, it runs every step (a general attn_mask would make it
    refuse), and the tokens are those of the default path."""
    from mlra_kernels.ops.mlra import use_backend

    kernel = _kernel_or_skip()
    mlra = convert_gpt2(_model(attn_impl, dtype=torch.float32), rank=D, latent_groups=2)
    prompt = torch.randint(1, 83, (3, 6), generator=torch.Generator().manual_seed(17))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, :3] = 0
    mask[2, :1] = 0
    prompt = prompt.masked_fill(mask == 0, 0)
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"
    expected = mlra.generate(prompt, **kw)
    calls, launches = decode_calls
    calls.clear()
    with use_backend(kernel):
        got = mlra.generate(prompt, **kw)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    steps = [c for c in calls if c["key_padding_mask"] is not None]
    assert len(steps) == len(calls) == len(launches) == 3 * 2  # 3 decode steps, 2 layers
    assert all(c["attn_mask"] is None for c in steps)
    lengths = [c["cache_seqlens"] for c in steps[::2]]  # layer 0 of each step
    if static:  # the unwritten slots are left out: each step sees the prompt and what it generated
        assert [n.tolist() for n in lengths] == [[7] * 3, [8] * 3, [9] * 3]
        assert len({c["key_padding_mask"].shape for c in steps}) == 1  # the whole preallocated cache, every step
    else:
        assert all(n.tolist() == [c["key_padding_mask"].shape[-1]] * 3 for n, c in zip(lengths, steps[::2]))


def test_step_padding_of_one_row_masks():
    from mlra_kernels.integrations.transformers import _is_one_row_per_sequence, _step_padding

    allowed = torch.tensor([[False, False, True, True, False, False], [True, True, True, True, True, False]])
    bool_mask = allowed[:, None, None, :]  # True = attend: left padding, then two unwritten slots / one
    additive = torch.zeros(2, 1, 1, 6).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    for mask in (bool_mask, additive):
        assert _is_one_row_per_sequence(mask, 2, 1)
        kpm, lengths = _step_padding(mask, 2, with_lengths=True)
        assert kpm.shape == (2, 6) and lengths.tolist() == [4, 5] and lengths.dtype == torch.int32
        assert _step_padding(mask, 2, with_lengths=False)[1] is None
    assert torch.equal(_step_padding(bool_mask, 2, True)[0], ~allowed)
    _, lengths = _step_padding(torch.zeros(1, 1, 1, 6, dtype=torch.bool), 2, True)  # no key seen, broadcast
    assert lengths.tolist() == [6, 6]
    for other, B, t in ((bool_mask.expand(2, 4, 1, 6), 2, 1), (bool_mask, 2, 2), (bool_mask.long(), 2, 1),
                        (bool_mask[:, 0], 2, 1), (None, 2, 1)):
        assert not _is_one_row_per_sequence(other, B, t)


def test_a_hooked_output_projection_runs_at_every_decode_step(monkeypatch):
    """The decode step on the step weights reads c_proj's weight; with a hook on c_proj it calls the
    module instead (warned once), so the hook sees every step and the tokens stay the same."""
    import mlra_kernels._warnings as warnings_module

    monkeypatch.setattr(warnings_module, "_WARNED", set())
    need_cpu_decode_kernel()
    mlra = convert_gpt2(_model(dtype=torch.float32), rank=D // 2, latent_groups=4)
    prompt = torch.randint(0, 83, (2, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    plain = mlra.generate(prompt, **kw)
    memos = [block.attn._step_memo for block in mlra.transformer.h]
    assert all(memo.formed == 1 for memo in memos)  # the steps ran on the step weights
    calls = []
    for block in mlra.transformer.h:
        block.attn.c_proj.register_forward_hook(lambda mod, args, out: calls.append(1))
    with pytest.warns(UserWarning, match="MLRAGPT2Attention: its output projection is a Conv1D with forward hooks"):
        hooked = mlra.generate(prompt, **kw)
    assert len(calls) == 2 * 6  # both layers, at the prefill and each of the five steps
    assert all(memo.formed == 1 for memo in memos)
    torch.testing.assert_close(hooked, plain, rtol=0, atol=0)


@pytest.mark.parametrize("prompt_len", [5, 1])
def test_a_reused_static_cache_gets_step_weights_of_the_current_weights(prompt_len):
    """One StaticCache for two generate() calls, with a write through .data (no version counter moves)
    in between: the second prefill (one token long too) forms the step weights again, so its steps score
    as the dense model."""
    from transformers import StaticCache

    need_cpu_decode_kernel()
    ref = _model(dtype=torch.float32)
    mlra = convert_gpt2(_copy(ref), rank=D, latent_groups=4, init="svd")
    prompt = torch.randint(0, 83, (2, prompt_len), generator=torch.Generator().manual_seed(4))
    cache = StaticCache(config=mlra.config, max_cache_len=16)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    mlra.generate(prompt, past_key_values=cache, **kw)
    memo = mlra.transformer.h[0].attn._step_memo
    assert memo.formed == 1
    for model in (ref, mlra):
        model.transformer.h[0].attn.c_proj.weight.data.mul_(3.0)
    cache.reset()
    got = mlra.generate(prompt, past_key_values=cache, **kw)
    assert memo.formed == 2
    want = ref.generate(prompt, **kw)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("reference_path")
@pytest.mark.parametrize(
    "every,logging",
    [(1, dict(logging_steps=1)), (1, dict(logging_steps=2)), (2, dict(logging_steps=3)),
     (2, dict(logging_strategy="epoch", eval_strategy="steps", eval_steps=2))],  # an eval log comes first at step 6
    ids=["every1-log1", "every1-log2", "every2-log3", "every2-epoch-eval"],
)
def test_trainer_callback_records_carry_the_loss_of_their_own_step(tmp_path, every, logging):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    model = convert_gpt2(_model(dtype=torch.float32).train(), rank=8)
    ids = torch.randint(0, 83, (24, 16), generator=torch.Generator().manual_seed(4))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=6,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, learning_rate=1e-2,
                             **logging)
    cb = TEVTrainerCallback(str(tmp_path / "tev.jsonl"), every=every)
    seen = []

    class Seen(transformers.TrainerCallback):  # what a later callback (a reporter) receives
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4], callbacks=[cb, Seen()])
    trainer.train()
    logged = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    _, records = read_jsonl(tmp_path / "tev.jsonl")
    assert [r["step"] for r in records] == list(range(every, 7, every))
    assert 6 in logged
    for r in records:  # the loss the Trainer logged at the record's step, or none: never an earlier one
        assert r.get("loss") == logged.get(r["step"]), (r["step"], r.get("loss"), logged)
    assert [log for log in seen if "loss" in log][-1]["tev_mean"] == records[-1]["tev_mean"]  # both at step 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_cached_step_calls_the_ops_once_per_layer(dtype):
    """The converted attention's cached step is one call of decode_step per layer (the op calls back only the
    layer's cache update, which writes the transformers cache), on the step weights or op by op."""
    from tests.helpers import package_crossings

    if dtype == torch.float32:
        need_cpu_decode_kernel()
    mlra = convert_gpt2(_model(dtype=dtype), rank=D // 4, latent_groups=4)
    prompt = torch.randint(0, 83, (2, 5), generator=torch.Generator().manual_seed(2))
    nxt = torch.randint(0, 83, (2, 1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = mlra(prompt, use_cache=True).past_key_values
        _, calls = package_crossings(lambda: mlra(nxt, **{_cache_kw(mlra): cache}, use_cache=True), "integrations")
    assert calls == 2  # two layers
    assert cache.get_seq_length() == 6
