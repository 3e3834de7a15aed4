import json
import time

import pytest

from aoe.data import EOS_TOKEN, DataError, Source, Tokenizer, load_or_train_tokenizer, train_tokenizer
from aoe.data.tokenizer import default_cache_dir

from .conftest import make_text

SAMPLES = [
    "def f(x):\n    return x  # comment\n",
    "unicode: héllo wörld — 日本語 🚀 \u00a0tabs\tand\r\nCRLF",
    "literal <|endoftext|> in text",
    "",
    " leading spaces and trailing   ",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer((make_text(i) for i in range(30)), vocab_size=400)


def test_train_round_trip(tok):
    assert tok.eos_id == 0 and tok.eos_id == tok.backend.token_to_id(EOS_TOKEN)
    assert 257 < tok.vocab_size <= 400
    for s in SAMPLES + [make_text(99)]:
        ids = tok.encode(s)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == s
    # the literal special string in text is ordinary bytes, never the EOS id
    assert tok.eos_id not in tok.encode("a <|endoftext|> b")
    assert tok.decode([tok.eos_id]) == EOS_TOKEN
    assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]
    # merges were learned: common words compress
    assert len(tok.encode("the model routes")) < len("the model routes")


def test_training_is_deterministic(tok):
    again = train_tokenizer((make_text(i) for i in range(30)), vocab_size=400)
    assert again.hash == tok.hash


def test_save_load_file_and_dir(tok, tmp_path):
    path = tok.save(tmp_path / "tk")
    assert path.name == "tokenizer.json"
    for where in (tmp_path / "tk", path):
        loaded = Tokenizer.load(where)
        assert loaded.hash == tok.hash and loaded.vocab_size == tok.vocab_size and loaded.eos_id == tok.eos_id
        assert loaded.encode(SAMPLES[1]) == tok.encode(SAMPLES[1])
    import hashlib
    assert tok.hash == hashlib.sha256(path.read_bytes()).hexdigest()


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="cannot load tokenizer: '.*missing.json' not found"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="has no tokenizer.json"):
        Tokenizer.load(tmp_path / "d")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        Tokenizer.load(tmp_path / "bad.json")


def test_missing_eos_rejected(tok, tmp_path):
    data = json.loads(tok.backend.to_str())
    data["added_tokens"] = []
    del data["model"]["vocab"][EOS_TOKEN]
    with pytest.raises(DataError, match=r"no '<\|endoftext\|>' token"):
        Tokenizer.from_str(json.dumps(data))


def test_vocab_size_validated():
    with pytest.raises(DataError, match="vocab_size must be an int >= 257.*got 100"):
        train_tokenizer(["abc"], vocab_size=100)


def test_cache_reuses_trained_tokenizer(corpus, cache_dir):
    src = Source(corpus)
    a = load_or_train_tokenizer(src, cache_dir, vocab_size=300)
    files = list((cache_dir / "tokenizers").glob("*/tokenizer.json"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    time.sleep(0.01)
    b = load_or_train_tokenizer(Source(corpus), cache_dir, vocab_size=300)
    assert b.hash == a.hash and files[0].stat().st_mtime_ns == mtime
    load_or_train_tokenizer(src, cache_dir, vocab_size=320)  # another key
    assert len(list((cache_dir / "tokenizers").glob("*/tokenizer.json"))) == 2


def test_default_cache_dir(monkeypatch, tmp_path):
    """Where data.cache_dir=None caches: $AOE_CACHE, else $AOE_CACHE_DIR, else ~/.cache/aoe."""
    monkeypatch.setenv("AOE_CACHE", str(tmp_path / "env"))
    monkeypatch.setenv("AOE_CACHE_DIR", str(tmp_path / "old"))
    assert default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("AOE_CACHE")
    assert default_cache_dir() == tmp_path / "old"
    monkeypatch.delenv("AOE_CACHE_DIR")
    assert default_cache_dir().parts[-2:] == (".cache", "aoe")
