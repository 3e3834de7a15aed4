"""A tiny random AoE model and a tiny BPE tokenizer for the evaluation tests."""

from __future__ import annotations

import random

import pytest
import torch

from aoe.config import ModelConfig
from aoe.data.tokenizer import train_tokenizer
from aoe.model.transformer import Transformer

torch.set_num_threads(1)

WORDS = ("the cat sat on a mat while experts route each token to themselves by norm "
         "model answer question paris rome berlin red blue green yes no because").split()


def make_lines(seed: int = 0, n: int = 300) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(n)]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(make_lines(), vocab_size=320)


@pytest.fixture(scope="session")
def model(tokenizer):
    torch.manual_seed(1234)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                      ffn="aoe", d_ffn=64, n_experts=4, top_k=2, d_low=8,
                      init_std=0.5)  # a large init: peaked, distinguishable predictions
    return Transformer(cfg).eval()
