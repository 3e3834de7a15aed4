"""A tiny random AoE model and a tiny BPE tokenizer for the evaluation tests."""

from __future__ import annotations

import pytest
import torch

from helpers.tiny_models import random_aoe_lm, word_bpe_tokenizer

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="session")
def tokenizer():
    return word_bpe_tokenizer()


@pytest.fixture(scope="session")
def model(tokenizer):
    return random_aoe_lm(tokenizer.vocab_size)
