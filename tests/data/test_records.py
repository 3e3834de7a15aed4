"""Record corpora: JSON Lines (plain, gzip, zstd) and Parquet give the same documents, and so the
same tokens, as each other; a directory names the files it does not read."""

from __future__ import annotations

import gzip
import json
import logging

import numpy as np
import pytest

from aoe.data import DataError, DocStats, Source, prepare_tokens

from .conftest import make_text

RECORDS = [{"text": make_text(i, 60), "id": i} for i in range(30)]
RECORDS[3]["text"] = "héllo wörld — ünïcode ✓\n" * 5
RECORDS[7]["text"] = None  # an empty document, as JSON null
RECORDS[9]["text"] = "   \n"  # whitespace only: dropped too


def _jsonl_bytes(records=RECORDS) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def write(path, records=RECORDS):
    """``records`` in the format ``path``'s suffix names."""
    name = path.name
    if name.endswith(".jsonl"):
        path.write_bytes(_jsonl_bytes(records))
    elif name.endswith(".jsonl.gz"):
        path.write_bytes(gzip.compress(_jsonl_bytes(records)))
    elif name.endswith(".jsonl.zst"):
        zstandard = pytest.importorskip("zstandard")
        path.write_bytes(zstandard.ZstdCompressor().compress(_jsonl_bytes(records)))
    elif name.endswith(".parquet"):
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        table = pa.table({"id": [r["id"] for r in records], "text": [r["text"] for r in records]})
        pq.write_table(table, path, row_group_size=7)  # several row groups and batches
    return path


FORMATS = ["corpus.jsonl", "corpus.jsonl.gz", "corpus.jsonl.zst", "corpus.parquet"]


@pytest.mark.parametrize("name", FORMATS[1:])
def test_every_format_gives_the_documents_of_plain_json_lines(tmp_path, name):
    plain = list(Source(write(tmp_path / "corpus.jsonl")).documents())
    stats = DocStats()
    assert list(Source(write(tmp_path / name)).documents(stats=stats)) == plain
    assert len(plain) == 28 and stats.empty == 2 and stats.documents == 28


@pytest.mark.parametrize("name", FORMATS[1:])
def test_every_format_gives_byte_identical_tokens(tmp_path, cache_dir, name):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    plain = prepare_tokens(write(tmp_path / "a" / "corpus.jsonl"), tmp_path / "plain", vocab_size=300,
                           cache_dir=cache_dir)
    other = prepare_tokens(write(tmp_path / "b" / name), tmp_path / "other", vocab_size=300, cache_dir=cache_dir)
    assert other.tokenizer.hash == plain.tokenizer.hash
    assert np.array_equal(other.train, plain.train) and np.array_equal(other.val, plain.val)


def test_a_directory_reads_every_record_format_and_names_what_it_skips(tmp_path, caplog):
    for name in FORMATS:
        write(tmp_path / name)
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    (tmp_path / "notes.docx").write_bytes(b"PK\x03\x04")
    with caplog.at_level(logging.WARNING, logger="aoe.data.sources"):
        source = Source(tmp_path)
    assert sorted(p.name for p in source.files) == sorted(FORMATS)
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "read 4 file(s) with a suffix in .txt .md .rst .py .jsonl .jsonl.gz .jsonl.zst .parquet" in message
    assert "skipped 2 other file(s) (notes.docx, table.csv)" in message
    assert len(list(source.documents())) == 4 * 28


def test_a_parquet_file_without_the_text_column_names_its_columns(tmp_path):
    path = write(tmp_path / "corpus.parquet")
    with pytest.raises(DataError, match=r"has no column text_field='body' \(columns: 'id', 'text'\): set data.text_field"):
        list(Source(path, text_field="body").documents())
    with pytest.raises(DataError, match=r"column 'id' holds int64, expected strings"):
        list(Source(path, text_field="id").documents())


def test_a_damaged_compressed_file_is_named(tmp_path):
    path = write(tmp_path / "corpus.jsonl.gz")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match=r"cannot read source file .*corpus.jsonl.gz"):
        list(Source(path).documents())
