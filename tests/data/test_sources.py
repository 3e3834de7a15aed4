import json
import logging
import os
import sysconfig

import numpy as np
import pytest

from aoe.data import DataError, DocStats, Source, iter_documents, open_source
from aoe.data.sources import STDLIB_SKIP_DIRS


def test_text_file_is_one_document(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello world\nsecond line\n")
    src = open_source(f)
    assert src.kind == "file"
    assert list(src.documents()) == ["hello world\nsecond line\n"]


def test_directory_recursive_sorted_and_filtered(corpus):
    src = Source(corpus)
    assert src.kind == "dir"
    rel = [p.relative_to(corpus).as_posix() for p in src.files]
    assert rel == sorted(rel) and len(rel) == 20
    assert not any(r.endswith(".bin") or ".hidden" in r for r in rel)
    docs = list(src.documents())
    assert len(docs) == 20
    assert docs[0] == (corpus / rel[0]).read_text()


def test_glob_plain_and_recursive(corpus):
    top = Source(str(corpus / "*.txt"))
    assert top.kind == "glob"
    assert all(p.parent == corpus and p.suffix == ".txt" for p in top.files)
    deep = Source(str(corpus / "**" / "*.md"))
    assert {p.parent.name for p in deep.files} == {"corpus", "sub"}
    with pytest.raises(DataError, match=r"matched no files"):
        Source(str(corpus / "*.nothing"))


def test_jsonl_text_field(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{"content": "first doc", "id": 1}, {"content": None}, {"content": "  "}, {"content": "third"}]
    f.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[2:]) + "\n")
    stats = DocStats()
    docs = list(iter_documents(f, text_field="content", stats=stats))
    assert docs == ["first doc", "third"]
    assert stats.documents == 2 and stats.empty == 2
    with pytest.raises(DataError, match=r"d.jsonl:1: no field text_field='text'"):
        list(iter_documents(f))


def test_jsonl_bad_json_names_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        list(iter_documents(f))


def test_jsonl_inside_directory(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "b.txt").write_text("three")
    assert list(iter_documents(tmp_path)) == ["one", "two", "three"]


def test_stdlib_with_cap_is_deterministic():
    src = Source("stdlib")
    assert src.root == __import__("pathlib").Path(sysconfig.get_paths()["stdlib"])
    rel = [p.relative_to(src.root).as_posix() for p in src.files]
    assert rel == sorted(rel) and all(r.endswith(".py") for r in rel)
    assert not any(set(r.split("/")[:-1]) & STDLIB_SKIP_DIRS for r in rel)
    s1, s2 = DocStats(), DocStats()
    d1 = list(src.documents(max_bytes=200_000, stats=s1))
    d2 = list(Source("stdlib").documents(max_bytes=200_000, stats=s2))
    assert d1 == d2 and s1 == s2
    assert s1.capped and s1.bytes >= 200_000
    assert s1.bytes - len(d1[-1].encode()) < 200_000  # only the document crossing the cap is extra
    assert d1[0] == src.files[0].read_bytes().decode("utf-8-sig")


def test_undecodable_bytes_replaced_and_counted(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"good text")
    (tmp_path / "b.txt").write_bytes(b"bad \xff\xfe bytes")
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "line \xff one"}\n{"text": "fine"}\n{"text": "sur \\udcff"}\n')
    stats = DocStats()
    docs = list(iter_documents(tmp_path, stats=stats))
    assert docs[0] == "good text"
    assert docs[1] == "bad \ufffd\ufffd bytes"
    assert docs[2] == "line \ufffd one" and docs[3] == "fine" and "\ufffd" in docs[4]
    assert stats.decode_replaced == 3 and stats.decode_skipped == 0 and stats.documents == 5


def test_undecodable_bytes_skipped_and_counted(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"good text")
    (tmp_path / "b.txt").write_bytes(b"bad \xff bytes")
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "line \xff one"}\n{"text": "fine"}\n')
    stats = DocStats()
    docs = list(iter_documents(tmp_path, on_decode_error="skip", stats=stats))
    assert docs == ["good text", "fine"]
    assert stats.decode_skipped == 2 and stats.decode_replaced == 0


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(DataError, match="source not found: '.*nope'"):
        Source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="contains no files"):
        Source(tmp_path / "empty")
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("")
    (blank / "b.txt").write_text("  \n\t\n")
    with pytest.raises(DataError, match=r"no non-empty documents \(2 empty"):
        list(Source(blank).documents())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_bytes(b"\xff\xff")
    with pytest.raises(DataError, match=r"1 skipped for undecodable"):
        list(iter_documents(bad, on_decode_error="skip"))


def test_bad_options_named():
    with pytest.raises(DataError, match="on_decode_error='ignore'"):
        Source("stdlib", on_decode_error="ignore")
    with pytest.raises(DataError, match="max_bytes must be a positive int or None, got 0"):
        list(Source("stdlib").documents(max_bytes=0))
    with pytest.raises(DataError, match="bad Hugging Face source 'hf:'"):
        Source("hf:")


def test_hf_without_datasets_says_install():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install datasets"):
            Source("hf:some/dataset:train")
    else:
        pytest.skip("datasets is installed; the network path is not tested")


def test_fingerprint_detects_changes(corpus):
    fp = Source(corpus).fingerprint
    assert Source(corpus).fingerprint == fp  # stable
    target = corpus / "doc000.txt"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touch only
    fp_touched = Source(corpus).fingerprint
    assert fp_touched != fp
    target.write_text(target.read_text() + "more\n")
    assert Source(corpus).fingerprint not in (fp, fp_touched)
    (corpus / "new.txt").write_text("new file")
    fp_added = Source(corpus).fingerprint
    c1 = Source(corpus, fingerprint_mode="content").fingerprint
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert Source(corpus).fingerprint != fp_added
    assert Source(corpus, fingerprint_mode="content").fingerprint == c1  # content mode ignores mtimes


def _write_binary_lookalikes(root):
    """Text files, a text file with one bad byte, and three binary files with text suffixes."""
    root.mkdir(exist_ok=True)
    (root / "a.txt").write_text("good text " * 20)
    (root / "fewbad.txt").write_bytes(b"mostly fine text " * 10 + b"\xff")  # text with a slip: decoded
    (root / "nul.txt").write_bytes(b"looks like text\x00" + b"x" * 100)
    (root / "latin.txt").write_bytes(bytes(range(0x80, 0x100)) * 40)  # 5 KB, none of it UTF-8
    (root / "rows.jsonl").write_bytes(b'{"text": "a"}\n' + bytes(range(256)))


@pytest.mark.parametrize("read_bytes", [1 << 20, 64])  # read whole / streamed
def test_binary_files_skipped_with_a_warning(tmp_path, caplog, read_bytes):
    _write_binary_lookalikes(tmp_path)
    stats = DocStats()
    with caplog.at_level(logging.WARNING, logger="aoe.data"):
        docs = [d.text() for d in Source(tmp_path).stream(stats=stats, read_bytes=read_bytes)]
    assert docs == ["good text " * 20, "mostly fine text " * 10 + "\ufffd"]
    assert stats.binary_skipped == 3 and stats.decode_replaced == 1 and stats.documents == 2
    for name in ("nul.txt", "latin.txt", "rows.jsonl"):
        assert f"skipping source file '{tmp_path / name}': it looks binary" in caplog.text
    assert "fewbad" not in caplog.text and "a.txt" not in caplog.text


def test_binary_files_counted_in_manifest_and_error(tmp_path):
    from aoe.data import prepare_tokens

    _write_binary_lookalikes(tmp_path / "c")
    data = prepare_tokens(tmp_path / "c", tmp_path / "out", vocab_size=300, cache_dir=tmp_path / "cache")
    assert data.manifest["binary_files_skipped"] == 3 and data.manifest["documents"]["total"] == 2
    text = data.tokenizer.decode(np.concatenate([data.train, data.val]))
    assert "\x00" not in text and "good text" in text
    only = tmp_path / "only"
    only.mkdir()
    (only / "blob.txt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match=r"no non-empty documents \(0 empty, 0 skipped for undecodable bytes, "
                                        r"1 binary files skipped\)"):
        list(Source(only).documents())
