"""replace_mha on plain models and on stock nn.TransformerEncoder / nn.TransformerDecoder."""

import warnings

import pytest
import torch
from torch import nn

from mlra_kernels.nn import MLRAttention, replace_mha

D, H = 32, 4
DT = torch.float64


def _encoder(batch_first, norm_first=False):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, H, dim_feedforward=64, dropout=0.0, batch_first=batch_first,
                                       norm_first=norm_first, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return enc


@pytest.mark.parametrize("mode", ["train", "eval", "eval-no-grad"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "seqfirst"])
def test_encoder_outputs_unchanged_at_full_rank(mode, batch_first):
    enc = _encoder(batch_first)
    enc.train(mode == "train")
    B, T = 3, 7
    x = torch.randn((B, T, D) if batch_first else (T, B, D), dtype=DT)
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[1, 5:] = True  # left-aligned padding: the condition for the nested-tensor fast path
    causal = nn.Transformer.generate_square_subsequent_mask(T, dtype=DT)
    cases = [dict(src_key_padding_mask=kpm), dict(mask=causal, is_causal=True), dict()]
    grad = torch.no_grad() if mode == "eval-no-grad" else torch.enable_grad()
    with grad:
        refs = [enc(x, **kw) for kw in cases]
        assert replace_mha(enc, rank=D) == 2
        assert all(isinstance(layer.self_attn, MLRAttention) for layer in enc.layers)
        assert enc.use_nested_tensor is False
        outs = [enc(x, **kw) for kw in cases]
    for kw, ref, out in zip(cases, refs, outs):
        assert out.shape == ref.shape
        if "src_key_padding_mask" in kw:
            # The nested-tensor fast path zeroes padded positions; compare the real tokens.
            keep = ~kpm if batch_first else ~kpm.t()
            ref, out = ref[keep], out[keep]
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_encoder_layer_fast_path_is_never_taken(monkeypatch):
    enc = _encoder(batch_first=True).eval()
    replace_mha(enc, rank=8)

    def boom(*args, **kwargs):
        raise AssertionError("fast path taken")

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", boom)
    monkeypatch.setattr(torch, "_native_multi_head_attention", boom)
    x = torch.randn(2, 5, D, dtype=DT)
    with torch.no_grad():
        out = enc(x, src_key_padding_mask=torch.tensor([[False] * 5, [False] * 3 + [True] * 2]))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_decoder_outputs_unchanged_at_full_rank(mode):
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(D, H, dim_feedforward=64, dropout=0.0, batch_first=True, dtype=DT)
    dec = nn.TransformerDecoder(layer, 2).train(mode == "train")
    tgt = torch.randn(2, 6, D, dtype=DT)
    memory = torch.randn(2, 9, D, dtype=DT)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(6, dtype=DT)
    mem_kpm = torch.zeros(2, 9, dtype=torch.bool)
    mem_kpm[0, 7:] = True
    ref = dec(tgt, memory, tgt_mask=tgt_mask, tgt_is_causal=True, memory_key_padding_mask=mem_kpm)
    assert replace_mha(dec, rank=D) == 4  # self- and cross-attention of both layers
    out = dec(tgt, memory, tgt_mask=tgt_mask, tgt_is_causal=True, memory_key_padding_mask=mem_kpm)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    if mode == "train":
        out.square().mean().backward()
        assert dec.layers[0].multihead_attn.down_proj_weight.grad.abs().sum() > 0


def test_replace_in_custom_model_low_rank_and_random_init():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.MultiheadAttention(D, H, batch_first=True, dtype=DT)
            self.blocks = nn.ModuleList([nn.MultiheadAttention(D, H, dtype=DT) for _ in range(2)])

    torch.manual_seed(0)
    net = Net()
    assert replace_mha(net, rank=4, latent_groups=2) == 3
    assert net.a.rank == 4 and net.a.latent_groups == 2 and net.a.batch_first
    assert not net.blocks[0].batch_first and 0 < net.blocks[0].svd_error["q"] < 1
    assert replace_mha(net, rank=4) == 0
    net2 = Net()
    ref_w = net2.a.out_proj.weight.detach().clone()
    assert replace_mha(net2, rank=8, init="random") == 3
    assert net2.a.svd_error is None and not torch.equal(net2.a.out_proj.weight, ref_w)
    with pytest.raises(ValueError, match="init must be"):
        replace_mha(net2, rank=8, init="zeros")
    with pytest.raises(TypeError, match="from_mha"):
        replace_mha(nn.MultiheadAttention(D, H), rank=8)


def test_decoder_cross_attention_is_explained_once_at_replace_time(monkeypatch):
    """nn.Transformer's cross-attention cannot take the fused op (its query and memory differ): replace_mha
    says so once, naming the layers, and their calls do not warn again with advice the user cannot follow."""
    from mlra_kernels import _warnings

    monkeypatch.setattr(_warnings, "_WARNED", set())
    torch.manual_seed(0)
    model = nn.Transformer(D, H, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64, dropout=0.0,
                           batch_first=True, dtype=DT)
    with pytest.warns(UserWarning) as record:
        assert replace_mha(model, rank=8) == 5  # encoder self-attention, decoder self- and cross-attention
    assert len(record) == 1 and record[0].filename == __file__, [str(w.message) for w in record]
    message = str(record[0].message)
    for part in ("cross-attention", "decoder.layers.0.multihead_attn", "decoder.layers.1.multihead_attn",
                 "dense path", "memory"):
        assert part in message, (part, message)
    assert "attn(x, x, x" not in message
    src, tgt = torch.randn(2, 9, D, dtype=DT), torch.randn(2, 6, D, dtype=DT)
    mask = nn.Transformer.generate_square_subsequent_mask(6, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model(src, tgt, tgt_mask=mask, tgt_is_causal=True)
    assert out.shape == tgt.shape and torch.isfinite(out).all()
