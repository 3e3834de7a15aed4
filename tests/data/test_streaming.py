"""Streaming preparation gives byte-for-byte what encoding every document whole in memory gives.

The reference below is the straightforward path: read every file whole, decode it, encode each
document with ``tokenizer.encode`` in one call, split by the documented rule. The pipeline runs
with tiny chunk sizes, so every boundary (file reads, cut pieces, encode batches) is crossed many
times inside documents, inside multi-byte characters and inside runs of whitespace.
"""

import hashlib
import itertools
import json
import logging
import random

import numpy as np
import pytest

from aoe.data import ChunkSizes, DocStats, Source, Tokenizer, prepare_tokens, train_tokenizer
from aoe.data.chunks import SAFE_CUT, split_pieces

SMALL = ChunkSizes(read_bytes=64, piece_chars=16, max_piece_chars=200, batch_chars=300, batch_pieces=5)
WHOLE = ChunkSizes(piece_chars=1 << 40, max_piece_chars=1 << 40)  # never cuts: the in-memory reference
VOCAB = 600
FRAGMENTS = ["the", "model", "routes", " token", "héllo", "wörld", "日本語", "🚀", "x=1;", "don't", "'s", "'ll",
             "it's", " 42", "3.14", "12345", "def f(a, b):", "<|endoftext|>", " ", "  ", "\t", "\r\n", "\n", "\n\n",
             "    ", " \u00a0 ", "\u3000", "—", "(", ")", "[]", "_x_", "A1b2", "'9", "é́"]


def tricky_text(seed: int, n_fragments: int) -> str:
    """Text of random fragments, joined with or without spaces, a line break every 20 fragments
    (so no stretch is long enough to need a forced cut at SMALL's sizes)."""
    rng = random.Random(seed)
    out = []
    for i in range(n_fragments):
        out.append(rng.choice(FRAGMENTS))
        out.append(rng.choice(["", " ", ""]))
        if i % 20 == 19:
            out.append("\n")
    return "".join(out)


def write_mixed_corpus(root):
    """Many small documents, documents far larger than every SMALL size, unicode, CRLF, a BOM,
    undecodable bytes, empty and whitespace-only files (small and large), and a JSON Lines file."""
    root.mkdir()
    for i in range(25):
        (root / f"small{i:02d}.txt").write_text(tricky_text(i, 1 + i * 3), encoding="utf-8")
    for i in range(3):
        (root / f"large{i}.md").write_text(tricky_text(100 + i, 1500), encoding="utf-8")
    (root / "bom.txt").write_bytes(b"\xef\xbb\xbf" + tricky_text(200, 300).encode())
    (root / "badbytes.txt").write_bytes(tricky_text(201, 300).encode() + b" \xff\xfe " + tricky_text(202, 50).encode())
    (root / "empty.txt").write_text("")
    (root / "blank_small.txt").write_text(" \n\t ")
    (root / "blank_large.txt").write_text(" \n\t\r\n\u3000" * 100)
    rows = [{"text": tricky_text(300, 800)}, {"text": None}, {"text": "  "}, {"text": "short one"},
            {"text": tricky_text(301, 5)}]
    (root / "rows.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(rows)) + "\n")


def reference_documents(root) -> list[str]:
    """The non-empty documents of a directory source, every file read and decoded whole."""
    return [t for t in reference_candidates(root) if t is not None and t.strip()]


def reference_candidates(root) -> list[str | None]:
    """Every document of a directory source, empty ones included."""
    docs = []
    for path in Source(root).files:
        raw = path.read_bytes()
        if path.suffix == ".jsonl":
            texts = [json.loads(line)["text"] for line in raw.split(b"\n") if line.strip()]
        else:
            try:
                texts = [raw.decode("utf-8-sig")]
            except UnicodeDecodeError:
                texts = [raw.decode("utf-8-sig", errors="replace")]
        docs += texts
    return docs


def is_val(index: int, val_fraction: float) -> bool:
    digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8, person=b"aoe-split").digest()
    return int.from_bytes(digest, "little") / 2.0**64 < val_fraction


def reference_splits(docs: list[str], tok: Tokenizer, val_fraction: float) -> dict:
    """{split: (tokens as bytes, documents, UTF-8 bytes)} by the rule of aoe.data.tokens, in memory."""
    dtype = np.uint16
    ids = [np.array(tok.encode(d) + [tok.eos_id], dtype=dtype) for d in docs]
    sizes = [len(d.encode()) for d in docs]
    parts = {"train": [], "val": []}
    for i, (a, n) in enumerate(zip(ids, sizes)):
        parts["val" if is_val(i, val_fraction) else "train"].append((a, n))
    if len(docs) == 1 and val_fraction > 0:
        (a, n), = parts["train"] + parts["val"]
        cut = min(max(1, round(len(a) * (1 - val_fraction))), len(a) - 1)
        train_bytes = round(n * cut / len(a))
        parts = {"train": [(a[:cut], train_bytes)], "val": [(a[cut:], n - train_bytes)]}
    elif val_fraction > 0:
        for empty, other in (("val", "train"), ("train", "val")):
            if not parts[empty] and len(parts[other]) >= 2:
                parts[empty].append(parts[other].pop())
    return {s: (b"".join(a.tobytes() for a, _ in p), len(p), sum(n for _, n in p)) for s, p in parts.items()}


def assert_matches_reference(data, out, docs, tok, val_fraction):
    ref = reference_splits(docs, tok, val_fraction)
    for split in ("train", "val"):
        tokens, documents, nbytes = ref[split]
        assert (out / f"{split}.bin").read_bytes() == tokens, split
        info = data.manifest["splits"][split]
        assert (info["tokens"], info["documents"], info["bytes"]) == (len(tokens) // 2, documents, nbytes)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed") / "corpus"
    write_mixed_corpus(root)
    docs = reference_documents(root)
    assert max(len(d) for d in docs) > 20 * SMALL.max_piece_chars > 20 * SMALL.read_bytes
    tok = train_tokenizer(docs, VOCAB, chunk_sizes=WHOLE)
    return root, docs, tok


@pytest.mark.parametrize("val_fraction", [0.0, 0.1, 0.6])
def test_streamed_files_and_tokenizer_equal_whole_document_reference(mixed, tmp_path, val_fraction):
    root, docs, tok = mixed
    out = tmp_path / "out"
    data = prepare_tokens(root, out, vocab_size=VOCAB, val_fraction=val_fraction, cache_dir=tmp_path / "cache",
                          chunk_sizes=SMALL)
    assert data.tokenizer.hash == tok.hash  # trained on pieces, identical to training on whole documents
    assert_matches_reference(data, out, docs, tok, val_fraction)
    m = data.manifest
    assert m["forced_cuts"] == 0 and m["binary_files_skipped"] == 0
    n_empty = len(reference_candidates(root)) - len(docs)
    assert n_empty >= 5 and m["documents"] == {"total": len(docs), "empty": n_empty, "decode_replaced": 1,
                                               "decode_skipped": 0, "capped": False}
    # the default sizes give the same files, and so does encoding without a look-ahead thread
    again = prepare_tokens(root, tmp_path / "default", tokenizer_path=out / "tokenizer.json",
                           val_fraction=val_fraction, cache_dir=tmp_path / "cache", num_workers=1)
    for split in ("train", "val"):
        assert np.array_equal(again.split(split), data.split(split))


@pytest.mark.parametrize("val_fraction", [0.1, 0.6])  # document 0 goes to train / to val before the split
def test_single_large_document_split_inside(tmp_path, val_fraction):
    f = tmp_path / "one.txt"
    f.write_text(tricky_text(7, 3000), encoding="utf-8")
    docs = [f.read_bytes().decode()]
    tok = train_tokenizer(docs, VOCAB, chunk_sizes=WHOLE)
    data = prepare_tokens(f, tmp_path / "out", vocab_size=VOCAB, val_fraction=val_fraction,
                          cache_dir=tmp_path / "cache", chunk_sizes=SMALL)
    assert data.tokenizer.hash == tok.hash and data.manifest["single_document_split"]
    assert_matches_reference(data, tmp_path / "out", docs, tok, val_fraction)


@pytest.mark.parametrize("val_fraction", [0.05, 0.9])  # both documents land in train / in val first
def test_last_document_moved_to_empty_split(tmp_path, val_fraction):
    root = tmp_path / "two"
    root.mkdir()
    (root / "a.txt").write_text(tricky_text(8, 900), encoding="utf-8")
    (root / "b.txt").write_text(tricky_text(9, 700), encoding="utf-8")
    docs = reference_documents(root)
    tok = train_tokenizer(docs, VOCAB, chunk_sizes=WHOLE)
    data = prepare_tokens(root, tmp_path / "out", tokenizer_path=tok.save(tmp_path / "tok"),
                          val_fraction=val_fraction, cache_dir=tmp_path / "cache", chunk_sizes=SMALL)
    assert data.manifest["splits"]["train"]["documents"] == 1 == data.manifest["splits"]["val"]["documents"]
    assert_matches_reference(data, tmp_path / "out", docs, tok, val_fraction)


def test_safe_cuts_keep_ids_and_other_cuts_do_not(mixed):
    _, _, tok = mixed
    rng = random.Random(1)
    changed_by_any_cut = 0
    for seed in range(300):
        text = tricky_text(1000 + seed, rng.randint(1, 40))
        whole = tok.encode(text)
        safe = {m.end() for m in SAFE_CUT.finditer(text)}
        for cut in range(1, len(text)):
            cut_ids = tok.encode(text[:cut]) + tok.encode(text[cut:])
            if cut in safe:
                assert cut_ids == whole, (text, cut)
            else:
                changed_by_any_cut += cut_ids != whole
    assert changed_by_any_cut > 100  # the test text is hard enough for cuts to matter


def test_split_pieces_bounds_and_forced_cuts():
    sizes = ChunkSizes(piece_chars=10, max_piece_chars=50)
    text = tricky_text(5, 400)
    chunks = [text[i:i + 7] for i in range(0, len(text), 7)]
    pieces = list(split_pieces(chunks, sizes))
    assert "".join(pieces) == text
    assert all(10 <= len(p) <= 50 for p in pieces[:-1]) and 0 < len(pieces[-1]) <= 50
    cuts = list(itertools.accumulate(len(p) for p in pieces[:-1]))
    assert all(SAFE_CUT.match(text, cut - 1) for cut in cuts)  # every cut is a safe one
    forced = []
    run = "日本語" * 40  # 120 characters with no safe cut
    assert list(split_pieces(["ab " + run + " cd"], sizes, forced.append)) == ["ab " + run[:47], run[47:97],
                                                                                run[97:] + " cd"]
    assert forced == [50, 100]


def test_forced_cut_is_counted_and_decodes_exactly(tmp_path, caplog):
    f = tmp_path / "run.txt"
    text = "start " + "a" * 1000 + " end\n"
    f.write_text(text)
    with caplog.at_level(logging.WARNING, logger="aoe.data"):
        data = prepare_tokens(f, tmp_path / "out", vocab_size=300, val_fraction=0.0, cache_dir=tmp_path / "cache",
                              chunk_sizes=SMALL)
    assert data.manifest["forced_cuts"] == 5  # 1000 letters in pieces of at most 200 characters
    assert "no safe place to cut" in caplog.text and "run.txt" in caplog.text
    assert data.tokenizer.decode(data.train) == text + "<|endoftext|>"


def _prefix_space_tokenizer(tok: Tokenizer) -> Tokenizer:
    config = json.loads(tok.backend.to_str())
    config["pre_tokenizer"]["add_prefix_space"] = True
    return Tokenizer.from_str(json.dumps(config))


def test_tokenizer_without_proven_cuts_encodes_documents_whole(mixed, tmp_path):
    root, docs, tok = mixed
    assert tok.piecewise
    other = _prefix_space_tokenizer(tok)
    assert not other.piecewise
    text = docs[-1]  # cutting would change the ids of this tokenizer
    cut = next(m.end() for m in SAFE_CUT.finditer(text) if m.end() > 10)
    assert other.encode(text[:cut]) + other.encode(text[cut:]) != other.encode(text)
    data = prepare_tokens(root, tmp_path / "out", tokenizer_path=other.save(tmp_path / "tok"), val_fraction=0.1,
                          cache_dir=tmp_path / "cache", chunk_sizes=SMALL)
    assert_matches_reference(data, tmp_path / "out", docs, other, 0.1)


def test_stream_reads_large_files_in_chunks(mixed):
    root, _, _ = mixed
    path = root / "large0.md"
    doc = next(Source(path).stream(read_bytes=64))
    chunks = list(doc.chunks())
    assert len(chunks) > 50 and max(len(c) for c in chunks) <= 64
    assert "".join(chunks) == path.read_bytes().decode() and doc.nbytes == path.stat().st_size


@pytest.mark.parametrize("on_decode_error", ["replace", "skip"])
def test_chunked_decoding_equals_whole_decoding(tmp_path, on_decode_error):
    rng = random.Random(3)
    pieces = [b"ok ", b"text ", b"more ", "é".encode(), "日".encode(), "🚀".encode(), b"\n", b"  ",
              b"\xff", b"\xe6\x97", b"\xc3"]
    for i in range(40):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 120)))
        if i % 3 == 0:
            data = b"\xef\xbb\xbf" + data
        (tmp_path / f"f{i:02d}.txt").write_bytes(data)
    whole_stats, chunked_stats = DocStats(), DocStats()
    src = Source(tmp_path, on_decode_error=on_decode_error)
    whole = [(d.text(), d.nbytes) for d in src.stream(stats=whole_stats)]
    chunked = [(d.text(), d.nbytes) for d in src.stream(stats=chunked_stats, read_bytes=5)]
    assert chunked == whole and chunked_stats == whole_stats
    assert whole_stats.decode_replaced + whole_stats.decode_skipped > 10
