import json
import os

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from aoe.data import DataError, Source, TokenData, check_token_ids, prepare_tokens, token_dtype

from .conftest import make_text, write_corpus


def _prep(src, out, cache_dir, **kw):
    kw.setdefault("vocab_size", 320)
    return prepare_tokens(src, out, cache_dir=cache_dir, **kw)


def test_prepare_layout_and_manifest(corpus, tmp_path, cache_dir):
    data = _prep(corpus, tmp_path / "out", cache_dir)
    assert not data.reused
    names = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    assert names == ["manifest.json", "tokenizer.json", "train.bin", "val.bin"]  # no temporaries left
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m == data.manifest and m["format_version"] == 1
    assert m["source"]["fingerprint"] == Source(corpus).fingerprint
    assert m["tokenizer"]["hash"] == data.tokenizer.hash and m["vocab_size"] == data.vocab_size
    assert data.dtype == np.uint16 and m["dtype"] == "uint16"
    assert isinstance(data.train, np.memmap) and not data.train.flags.writeable
    tr, va = m["splits"]["train"], m["splits"]["val"]
    assert tr["documents"] + va["documents"] == 20 == m["documents"]["total"]
    assert va["documents"] >= 1 and tr["tokens"] == len(data.train) and va["tokens"] == len(data.val)
    # one EOS after every document, each split ends with EOS
    assert int((data.train == data.eos_id).sum()) == tr["documents"] and data.train[-1] == data.eos_id
    assert int((data.val == data.eos_id).sum()) == va["documents"] and data.val[-1] == data.eos_id
    # the token streams decode back to exactly the documents
    texts = [p.read_text() for p in Source(corpus).files]
    pieces = data.tokenizer.decode(data.train).split("<|endoftext|>")[:-1]
    pieces += data.tokenizer.decode(data.val).split("<|endoftext|>")[:-1]
    assert sorted(pieces) == sorted(texts)
    assert tr["bytes"] + va["bytes"] == sum(len(t.encode()) for t in texts)
    assert 1.0 < data.bytes_per_token("val") < 8.0


def test_split_is_deterministic(corpus, tmp_path, cache_dir):
    a = _prep(corpus, tmp_path / "a", cache_dir, val_fraction=0.2)
    b = _prep(corpus, tmp_path / "b", cache_dir, val_fraction=0.2)
    for split in ("train", "val"):
        assert (tmp_path / "a" / f"{split}.bin").read_bytes() == (tmp_path / "b" / f"{split}.bin").read_bytes()
    assert a.manifest["splits"] == b.manifest["splits"]
    assert 1 <= a.manifest["splits"]["val"]["documents"] < 20


def test_val_non_empty_for_two_documents(tmp_path, cache_dir):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text(make_text(1))
    (tmp_path / "c" / "b.txt").write_text(make_text(2))
    data = _prep(tmp_path / "c", tmp_path / "out", cache_dir, val_fraction=0.001)
    assert data.manifest["splits"]["train"]["documents"] == 1 == data.manifest["splits"]["val"]["documents"]
    data = _prep(tmp_path / "c", tmp_path / "out2", cache_dir, val_fraction=0.999)
    assert data.manifest["splits"]["train"]["documents"] == 1 == data.manifest["splits"]["val"]["documents"]


def test_val_fraction_zero_means_no_val(corpus, tmp_path, cache_dir):
    data = _prep(corpus, tmp_path / "out", cache_dir, val_fraction=0.0)
    assert len(data.val) == 0 and data.manifest["splits"]["train"]["documents"] == 20
    assert TokenData.open(tmp_path / "out").val.shape == (0,)


def test_default_out_dir_under_cache(corpus, cache_dir):
    data = prepare_tokens(corpus, vocab_size=300, cache_dir=cache_dir)
    assert data.path.parent == cache_dir / "tokens"
    assert prepare_tokens(str(corpus), vocab_size=300, cache_dir=cache_dir).path == data.path
    assert prepare_tokens(corpus, vocab_size=300, cache_dir=cache_dir, val_fraction=0.5).path != data.path


def test_single_document_split_inside(tmp_path, cache_dir):
    f = tmp_path / "one.txt"
    f.write_text(make_text(5, 2000))
    data = _prep(f, tmp_path / "out", cache_dir, val_fraction=0.1)
    assert data.manifest["single_document_split"]
    n = len(data.train) + len(data.val)
    assert len(data.val) == n - round(n * 0.9) and len(data.train) > 0
    assert data.tokenizer.decode(np.concatenate([data.train, data.val])) == f.read_text() + "<|endoftext|>"


def test_reuse_and_retokenize_on_change(corpus, tmp_path, cache_dir):
    out = tmp_path / "out"
    first = _prep(corpus, out, cache_dir)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = _prep(corpus, out, cache_dir)
    assert again.reused and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    assert np.array_equal(again.train, first.train)
    # a changed source file changes the fingerprint: re-tokenized (and a new tokenizer trained)
    (corpus / "doc000.txt").write_text(make_text(1000) + "brand new words here\n")
    changed = _prep(corpus, out, cache_dir)
    assert not changed.reused
    assert changed.manifest["source"]["fingerprint"] != first.manifest["source"]["fingerprint"]
    assert (out / "train.bin").stat().st_mtime_ns != mtimes["train.bin"] or \
        (out / "val.bin").stat().st_mtime_ns != mtimes["val.bin"]
    # a changed setting re-tokenizes too
    assert not _prep(corpus, out, cache_dir, val_fraction=0.3).reused
    assert _prep(corpus, out, cache_dir, val_fraction=0.3).reused


def test_decode_errors_counted_in_manifest(tmp_path, cache_dir):
    c = tmp_path / "c"
    write_corpus(c, n_files=6)
    (c / "bad1.txt").write_bytes(b"bad \xff bytes " + make_text(7).encode())
    (c / "bad2.txt").write_bytes(b"\xc3\x28 more bad " + make_text(8).encode())
    (c / "empty.txt").write_text("   ")
    rep = _prep(c, tmp_path / "r", cache_dir)
    assert rep.manifest["documents"] | {} == {"total": 8, "empty": 1, "decode_replaced": 2, "decode_skipped": 0,
                                              "capped": False}
    skip = _prep(c, tmp_path / "s", cache_dir, on_decode_error="skip")
    assert skip.manifest["documents"]["total"] == 6 and skip.manifest["documents"]["decode_skipped"] == 2


def test_max_bytes_cap_and_stdlib(tmp_path, cache_dir):
    data = _prep("stdlib", tmp_path / "std", cache_dir, vocab_size=512, max_bytes=300_000)
    m = data.manifest
    assert m["documents"]["capped"] and m["settings"]["max_bytes"] == 300_000
    total = m["splits"]["train"]["bytes"] + m["splits"]["val"]["bytes"]
    assert total >= 300_000 and m["documents"]["total"] >= 2 and m["splits"]["val"]["documents"] >= 1
    assert data.vocab_size == 512 and data.dtype == np.uint16


def _big_vocab_tokenizer(path):
    """A valid byte-level tokenizer with vocab 70256 whose byte tokens have ids >= 70000."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0}
    vocab.update({f"<f{i}>": i for i in range(1, 70000)})
    vocab.update({ch: 70000 + i for i, ch in enumerate(alphabet)})
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))
    return path


def test_dtype_choice_uint16_vs_uint32(corpus, tmp_path, cache_dir):
    assert token_dtype(4096) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(200_000) == np.uint32
    big = _big_vocab_tokenizer(tmp_path / "big.json")
    data = prepare_tokens(corpus, tmp_path / "out", tokenizer_path=big, cache_dir=cache_dir)
    assert data.vocab_size == 70256 and data.dtype == np.uint32 and data.manifest["dtype"] == "uint32"
    assert int(data.train.max()) >= 70000  # would not survive uint16
    assert (tmp_path / "out" / "train.bin").stat().st_size == 4 * len(data.train)
    text = data.tokenizer.decode(data.val).split("<|endoftext|>")[0]
    assert text in [p.read_text() for p in Source(corpus).files]
    assert prepare_tokens(corpus, tmp_path / "out", tokenizer_path=big, cache_dir=cache_dir).reused


def test_out_of_range_ids_detected(corpus, tmp_path, cache_dir):
    out = tmp_path / "out"
    data = _prep(corpus, out, cache_dir)
    n, vocab = len(data.train), data.vocab_size
    del data
    mm = np.memmap(out / "train.bin", dtype=np.uint16, mode="r+")
    mm[n // 2] = vocab + 3
    mm.flush()
    del mm
    with pytest.raises(DataError, match=rf"train.bin': token id {vocab + 3} at position {n // 2} is out of range"):
        TokenData.open(out)
    TokenData.open(out, check_ids=False)  # the check can be turned off
    with pytest.raises(DataError, match="token id 7 at position 2"):
        check_token_ids(np.array([1, 2, 7, 1]), vocab_size=7)


def test_size_mismatch_and_missing_manifest(corpus, tmp_path, cache_dir):
    out = tmp_path / "out"
    _prep(corpus, out, cache_dir)
    with open(out / "val.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(DataError, match=r"val.bin': size .* expected"):
        TokenData.open(out)
    assert not _prep(corpus, out, cache_dir).reused  # a wrong size is rebuilt, not reused
    os.remove(out / "manifest.json")
    with pytest.raises(DataError, match="manifest.json' not found"):
        TokenData.open(out)


def test_bad_arguments(corpus, tmp_path):
    with pytest.raises(DataError, match="val_fraction must be in \\[0, 1\\), got 1.5"):
        prepare_tokens(corpus, tmp_path / "o", val_fraction=1.5)
    with pytest.raises(DataError, match="source not found"):
        prepare_tokens(tmp_path / "missing", tmp_path / "o")


def _prepare_in_child(args):
    corpus, out, cache_dir = args
    return prepare_tokens(corpus, out, vocab_size=320, cache_dir=cache_dir).reused


@pytest.mark.slow
def test_concurrent_prepare_tokenizes_once(corpus, tmp_path, cache_dir):
    import multiprocessing as mp

    out = tmp_path / "shared"
    with mp.get_context("spawn").Pool(2) as pool:
        reused = pool.map(_prepare_in_child, [(corpus, out, cache_dir)] * 2)
    assert sorted(reused) == [False, True]
    assert TokenData.open(out).manifest["splits"]["val"]["documents"] >= 1


def _lock_made_unopenable(out):
    """The cache as a read-only mount leaves it: the lock file cannot be opened for writing (here a
    directory stands in its place, which fails the same open for any user, root included)."""
    lock = out / ".prepare.lock"
    lock.unlink(missing_ok=True)
    lock.mkdir()


def test_a_complete_cache_that_cannot_be_locked_is_read_as_it_is(corpus, tmp_path, cache_dir):
    out = tmp_path / "out"
    first = _prep(corpus, out, cache_dir)
    _lock_made_unopenable(out)
    again = _prep(corpus, out, cache_dir)
    assert again.reused and np.array_equal(again.train, first.train)
    with pytest.raises(DataError, match=r"cannot be written \(.*\) and does not hold these tokens yet: point "
                                        r"--cache-dir or \$AOE_CACHE at a writable directory"):
        _prep(corpus, out, cache_dir, val_fraction=0.3)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory anyway")
def test_a_complete_cache_in_a_read_only_directory_is_read_as_it_is(corpus, tmp_path, cache_dir):
    out = tmp_path / "out"
    first = _prep(corpus, out, cache_dir)
    (out / ".prepare.lock").unlink()
    out.chmod(0o555)
    try:
        assert np.array_equal(_prep(corpus, out, cache_dir).train, first.train)
    finally:
        out.chmod(0o755)
