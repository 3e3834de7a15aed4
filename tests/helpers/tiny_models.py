"""A tiny BPE tokenizer and a tiny random AoE language model, for the tests that load, evaluate and
export models (tests/eval, tests/io, tests/hf). Plain functions: each folder's conftest makes its
fixtures from them."""

from __future__ import annotations

import random

import torch

WORDS = ("the cat sat on a mat while experts route each token to themselves by norm "
         "model answer question paris rome berlin red blue green yes no because").split()


def make_lines(seed: int = 0, n: int = 300) -> list[str]:
    """n short sentences of WORDS, the same for the same seed."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(n)]


def word_bpe_tokenizer():
    """A 320-token BPE tokenizer trained on make_lines()."""
    from aoe.data.tokenizer import train_tokenizer

    return train_tokenizer(make_lines(), vocab_size=320)


def pangram_tokenizer():
    """A 300-token BPE tokenizer trained on two repeated sentences."""
    from aoe.data.tokenizer import train_tokenizer

    text = ["the quick brown fox jumps over the lazy dog. " * 4, "hello world, hello there. " * 4]
    return train_tokenizer(text, vocab_size=300, min_frequency=1)


def random_aoe_lm(vocab_size: int):
    """A 2-layer AoE model (4 experts, top-2) with a large init, so its predictions are peaked and
    distinguishable; in eval mode."""
    from aoe.config import ModelConfig
    from aoe.model.transformer import Transformer

    torch.manual_seed(1234)
    cfg = ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                      ffn="aoe", d_ffn=64, n_experts=4, top_k=2, d_low=8, init_std=0.5)
    return Transformer(cfg).eval()
