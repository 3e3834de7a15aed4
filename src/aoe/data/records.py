"""Record files of a corpus: JSON Lines (plain, gzip or zstd) and Parquet, read streaming.

    .jsonl  .jsonl.gz  .jsonl.zst   one JSON object per non-blank line, the text under text_field
    .parquet                        one row per document, the text in the column text_field

(the formats Hugging Face datasets come in). A record file is read a line, or a Parquet batch
of ``PARQUET_BATCH_ROWS`` rows of the one column, at a time, so memory stays bounded whatever its
size. zstd needs the ``zstandard`` package and Parquet ``pyarrow`` (the ``data`` extra); a file
that needs a missing one raises DataError saying what to install.
"""

from __future__ import annotations

import contextlib
import gzip
import io
from pathlib import Path
from typing import BinaryIO, Iterator

from aoe.data.errors import DataError

__all__ = ["JSONL_SUFFIXES", "PARQUET_SUFFIX", "RECORD_SUFFIXES", "is_jsonl", "is_parquet", "open_jsonl",
           "parquet_texts", "record_suffix"]

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIX = ".parquet"
RECORD_SUFFIXES = (*JSONL_SUFFIXES, PARQUET_SUFFIX)
PARQUET_BATCH_ROWS = 256


def record_suffix(path: Path) -> str | None:
    """The record suffix ``path``'s name ends with (case-insensitive), or None."""
    name = path.name.lower()
    return next((s for s in RECORD_SUFFIXES if name.endswith(s)), None)


def is_jsonl(path: Path) -> bool:
    return record_suffix(path) in JSONL_SUFFIXES


def is_parquet(path: Path) -> bool:
    return record_suffix(path) == PARQUET_SUFFIX


def _missing(package: str, path: Path, what: str) -> DataError:
    return DataError(f"{str(path)!r} is {what}, which needs the {package!r} package: pip install {package} "
                     "(or the 'data' extra: pip install 'autonomy-of-experts[data]')")


@contextlib.contextmanager
def open_jsonl(path: Path) -> Iterator[BinaryIO]:
    """The decompressed bytes of a JSON Lines file (by its suffix: none, .gz or .zst), for reading
    line by line; an unreadable or damaged file raises DataError naming it."""
    try:
        with _open_decompressed(path) as f:
            yield f
    except (OSError, EOFError) as e:  # gzip reports a damaged stream as OSError / EOFError
        raise DataError(f"cannot read source file {str(path)!r}: {e}") from e
    except Exception as e:
        if type(e).__module__.startswith("zstandard"):
            raise DataError(f"cannot read source file {str(path)!r} as zstd ({e}): the file is damaged") from e
        raise


@contextlib.contextmanager
def _open_decompressed(path: Path) -> Iterator[BinaryIO]:
    suffix = record_suffix(path)
    if suffix == ".jsonl.gz":
        with gzip.open(path, "rb") as f:
            yield f
    elif suffix == ".jsonl.zst":
        try:
            import zstandard
        except ImportError:
            raise _missing("zstandard", path, "zstd-compressed") from None
        with open(path, "rb") as raw:
            yield io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw), buffer_size=1 << 20)
    else:
        with open(path, "rb") as f:
            yield f


def parquet_texts(path: Path, column: str) -> Iterator[tuple[str, str | None]]:
    """(``path[row]``, the row's text or None) for every row of a Parquet file's ``column``,
    read a batch at a time; DataError naming the file for a missing or non-text column."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise _missing("pyarrow", path, "a Parquet file") from None
    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not Parquet
        raise DataError(f"cannot read {str(path)!r} as Parquet ({e}): the file is damaged or not Parquet") from e
    _check_column(file.schema_arrow, column, path)
    row = 0
    for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
        for value in batch.column(0).to_pylist():
            yield f"{path}[{row}]", value
            row += 1


def _check_column(schema, column: str, path: Path) -> None:
    import pyarrow as pa

    if column not in schema.names:
        shown = ", ".join(repr(n) for n in schema.names[:10])
        raise DataError(f"{str(path)!r} has no column text_field={column!r} (columns: {shown}): set data.text_field")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{str(path)!r}: column {column!r} holds {kind}, expected strings")
