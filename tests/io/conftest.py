import pytest

from helpers.tiny_models import pangram_tokenizer, random_aoe_lm, word_bpe_tokenizer


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="session")
def tokenizer():
    return word_bpe_tokenizer()


@pytest.fixture(scope="session")
def model(tokenizer):
    return random_aoe_lm(tokenizer.vocab_size)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return pangram_tokenizer()
