"""The byte-level BPE of mlra_kernels.data: trained on the text, cached by its hash, round-trips."""

import pytest

tokenizers = pytest.importorskip("tokenizers", reason="the BPE vocabulary needs Hugging Face tokenizers (the test extra)")

from mlra_kernels import data  # noqa: E402

TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 200
        + "rare_identifier_once = 'ünïcödé ✓'\n").encode()


def test_bpe_round_trips_and_has_at_most_the_asked_size():
    # This short text runs out of pairs seen twice before 300 tokens; a real corpus fills the size.
    tok = data.train_bpe(TEXT, 300)
    assert 256 < tok.get_vocab_size() <= 300
    ids = data.encode_bpe(tok, TEXT)
    assert ids.dtype.is_floating_point is False and len(ids) < len(TEXT) / 2  # merges shorten the text
    assert tok.decode(ids.tolist()).encode() == TEXT


def test_cache_is_reused_and_keyed_by_text_and_size(tmp_path):
    train, val = TEXT[:-200], TEXT[-200:]
    a_train, a_val, a = data.bpe_tokens(train, val, 300, tmp_path)
    b_train, b_val, b = data.bpe_tokens(train, val, 300, tmp_path)
    assert not a["from_cache"] and b["from_cache"] and a["cache"] == b["cache"]
    assert a_train.equal(b_train) and a_val.equal(b_val) and a["train_tokens"] == len(a_train)
    _, _, c = data.bpe_tokens(train, val, 320, tmp_path)
    _, _, d = data.bpe_tokens(train + b"x", val, 300, tmp_path)
    assert len({a["cache"], c["cache"], d["cache"]}) == 3


def test_a_torn_cache_is_trained_again(tmp_path, capsys):
    train, val = TEXT[:-200], TEXT[-200:]
    ids, _, info = data.bpe_tokens(train, val, 300, tmp_path)
    npz = info["cache"].replace(".tokenizer.json", ".ids.npz")
    with open(npz, "r+b") as f:
        f.truncate(10)
    again, _, info2 = data.bpe_tokens(train, val, 300, tmp_path)
    assert not info2["from_cache"] and again.equal(ids)
    assert "could not be read" in capsys.readouterr().out


@pytest.mark.parametrize("size", [256, 100, 3.5, True])
def test_vocab_size_is_checked(size):
    with pytest.raises(ValueError, match="vocab_size must be an int above 256"):
        data.train_bpe(TEXT, size)
