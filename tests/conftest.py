import os

import pytest
import torch

# Without CUDA, Triton kernels run under Triton's interpreter (tests/nn/test_fused_scores.py). triton
# reads the variable when it is first imported, and torch.compile's inductor imports it: set it first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two cores: keep each test process to the machine's size and deterministic; under pytest-xdist
# (-n N) the N workers share the cores.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread for the duration of a test (tiny models run faster, and do not stall
    when the other core is busy); the previous setting is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One token cache for the whole test run (the tiny corpus is tokenized once)."""
    return tmp_path_factory.mktemp("aoe-cache")


@pytest.fixture
def make_cfg(cache_dir):
    """``make_cfg(**overrides)``: the tiny trainable config (``helpers.tiny_runs.tiny_overrides``)."""
    from aoe.config import load_config
    from helpers.tiny_runs import tiny_overrides

    def make(**extra):
        return load_config("tiny", tiny_overrides(cache_dir, **extra))
    return make


# -- the tiny models and tokenizers that the eval, io and hf tests share (helpers.tiny_models) -------
@pytest.fixture(scope="session")
def tokenizer():
    """A 320-token BPE tokenizer of short English sentences."""
    from helpers.tiny_models import word_bpe_tokenizer

    return word_bpe_tokenizer()


@pytest.fixture(scope="session")
def model(tokenizer):
    """A 2-layer random AoE language model over ``tokenizer``'s vocabulary, in eval mode."""
    from helpers.tiny_models import random_aoe_lm

    return random_aoe_lm(tokenizer.vocab_size)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 300-token BPE tokenizer of two repeated sentences."""
    from helpers.tiny_models import pangram_tokenizer

    return pangram_tokenizer()
