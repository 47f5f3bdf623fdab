"""Token streams for the experiments: byte tokens, or a byte-level BPE trained on the corpus itself.

A byte vocabulary (256 tokens) has no rare tokens: every row of the embedding is updated at nearly
every step. Token Embedding Variability is about the rows that are not, so the reproduction trains a
subword vocabulary as GPT-2's is trained (byte-level BPE), with Hugging Face ``tokenizers``, on the
training text only, and caches the tokenizer and the token ids by a hash of the text. Nothing is
downloaded.
"""

from __future__ import annotations

import hashlib
import os
import io
from typing import Optional, Union

import numpy as np
import torch

from mlra_kernels._fileio import write_atomic
from mlra_kernels.ops.mlra import config

__all__ = ["default_cache_dir", "bpe_tokens", "encode_bpe", "train_bpe"]

MIN_FREQUENCY = 2
# Bump when the training or encoding changes, so that a cached vocabulary of the old rule is not reused.
FORMAT = 1
# Chunks that the tokenizer encodes in parallel; a boundary may split a word, which costs nothing
# that matters here (a few tokens per 64 KB differ from a whole-text encoding).
_CHUNK = 1 << 16


def default_cache_dir() -> str:
    """``$MLRA_CACHE_DIR``, else ``$XDG_CACHE_HOME/mlra-kernels``, else ``~/.cache/mlra-kernels``."""
    return config.cache_dir()


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("a BPE vocabulary needs Hugging Face `tokenizers`: pip install tokenizers "
                          "(or use the byte vocabulary)") from e
    return tokenizers


def _text(blob: bytes) -> str:
    # Byte-level BPE maps every byte to a symbol, but it takes text: undecodable bytes become U+FFFD.
    return blob.decode("utf-8", errors="replace")


def _chunks(text: str) -> list[str]:
    return [text[i:i + _CHUNK] for i in range(0, len(text), _CHUNK)]


def train_bpe(blob: bytes, vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``blob``: ``vocab_size`` tokens, or fewer when the
    text runs out of pairs that occur twice."""
    tk = _tokenizers()
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size <= 256:
        raise ValueError(f"vocab_size must be an int above 256 (the byte alphabet), got {vocab_size!r}")
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=MIN_FREQUENCY, show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(_chunks(_text(blob)), trainer=trainer, length=None)
    return tokenizer


def encode_bpe(tokenizer, blob: bytes) -> torch.Tensor:
    """Token ids ``[N]`` (int64) of ``blob``."""
    encodings = tokenizer.encode_batch(_chunks(_text(blob)), add_special_tokens=False)
    ids = np.fromiter((i for e in encodings for i in e.ids), dtype=np.int64)
    return torch.from_numpy(ids)


def bpe_tokens(
    train: bytes, val: bytes, vocab_size: int, cache_dir: Optional[Union[str, os.PathLike]] = None
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Train (or load from the cache) a BPE on ``train`` and encode both splits.

    Returns the train and validation ids (int64) and a description: vocabulary size, tokens per
    split, bytes per token, the cache file. The cache key is the SHA-256 of both splits, the
    vocabulary size, the ``tokenizers`` version and this module's settings, so a change to any of them
    trains anew.
    """
    tk = _tokenizers()
    h = hashlib.sha256()
    settings = f"\0{vocab_size}\0{tk.__version__}\0format {FORMAT}, min_frequency {MIN_FREQUENCY}, chunk {_CHUNK}"
    for part in (train, b"\0split\0", val, settings.encode()):
        h.update(part)
    key = h.hexdigest()[:20]
    folder = os.path.join(os.fspath(cache_dir) if cache_dir is not None else default_cache_dir(), "bpe")
    tok_path = os.path.join(folder, f"{key}.tokenizer.json")
    ids_path = os.path.join(folder, f"{key}.ids.npz")
    cached = os.path.exists(tok_path) and os.path.exists(ids_path)
    if cached:
        try:
            with np.load(ids_path) as z:
                train_ids, val_ids = torch.from_numpy(z["train"].astype(np.int64)), torch.from_numpy(z["val"].astype(np.int64))
            tokenizer = tk.Tokenizer.from_file(tok_path)
        except Exception as err:  # a torn or foreign file (numpy and tokenizers raise many kinds): train anew
            cached = False
            print(f"note: the BPE cache {ids_path} could not be read ({err}); training the tokenizer again")
    if not cached:
        tokenizer = train_bpe(train, vocab_size)
        train_ids, val_ids = encode_bpe(tokenizer, train), encode_bpe(tokenizer, val)
        os.makedirs(folder, exist_ok=True)
        ids = io.BytesIO()
        np.savez(ids, train=train_ids.numpy().astype(np.int32), val=val_ids.numpy().astype(np.int32))
        write_atomic(tok_path, tokenizer.to_str())
        write_atomic(ids_path, ids.getvalue())
    V = tokenizer.get_vocab_size()
    info = {"tokenizer": "byte-level BPE", "vocab_size": V, "train_tokens": len(train_ids), "val_tokens": len(val_ids),
            "bytes_per_token": round(len(train) / max(1, len(train_ids)), 3), "cache": tok_path, "from_cache": cached}
    return train_ids, val_ids, info
