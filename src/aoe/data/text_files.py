"""Reading a corpus's text files: whether a file looks binary (its head sniffed: a NUL byte, or
too many bytes that are not UTF-8), its text decoded as UTF-8 in chunks of bounded size, its
size, and a directory's files with the suffixes read (``aoe.data.sources`` uses these)."""

from __future__ import annotations

import codecs
import os
from pathlib import Path
from typing import Iterator

from aoe.data.errors import DataError

SNIFF_BYTES = 8192  # the head of a file that is checked for being binary
SNIFF_MIN_CHARS = 64  # a shorter head is too small a sample for the undecodable share
SNIFF_MAX_UNDECODABLE = 0.25  # share of U+FFFD (from bad bytes) in the decoded head above which a file is binary
_REPLACEMENT_UTF8 = "\ufffd".encode("utf-8")


def binary_reason(head: bytes) -> str | None:
    """Why a file that starts with ``head`` looks binary (see the module docstring), or None."""
    sample = head[:SNIFF_BYTES]
    if b"\x00" in sample:
        return f"a NUL byte in its first {len(sample)} bytes"
    text = codecs.getincrementaldecoder("utf-8")("replace").decode(sample)  # a character cut at the end is no error
    if len(text) < SNIFF_MIN_CHARS:
        return None
    undecodable = text.count("\ufffd") - sample.count(_REPLACEMENT_UTF8)
    if undecodable > SNIFF_MAX_UNDECODABLE * len(text):
        return f"{undecodable} of the first {len(text)} characters are not valid UTF-8"
    return None


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise DataError(f"cannot stat source file {str(path)!r}: {e}") from e


def _decoded_chunks(path: Path, errors: str, read_bytes: int, expect_size: int | None = None) -> Iterator[str]:
    """The text of a file decoded as UTF-8 (BOM dropped; ``errors`` "strict" or "replace"), as
    strings of at most ``read_bytes`` characters. expect_size: the file's size in bytes when it
    was checked; a file that has changed size since then raises DataError."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors)
    size = 0
    try:
        with open(path, "rb") as f:
            while raw := f.read(read_bytes):
                size += len(raw)
                text = decoder.decode(raw)
                if text:
                    yield text
    except OSError as e:
        raise DataError(f"cannot read source file {str(path)!r}: {e}") from e
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail
    if expect_size is not None and size != expect_size:
        raise DataError(f"source file {str(path)!r} changed while it was being read ({expect_size} bytes, "
                        f"then {size}): run again")


def _scan(path: Path, errors: str, read_bytes: int) -> tuple[int, bool]:
    """(UTF-8 size of the decoded text, whether it holds any non-whitespace) of a file;
    raises UnicodeDecodeError with ``errors="strict"`` on the first undecodable byte."""
    nbytes, has_text = 0, False
    for text in _decoded_chunks(path, errors, read_bytes):
        nbytes += len(text.encode("utf-8"))
        has_text = has_text or not text.isspace()
    return nbytes, has_text


def _walk(root: Path, extensions: tuple[str, ...], *, skip_dirs: frozenset, skip_hidden: bool = False,
          skipped: list[Path] | None = None) -> list[Path]:
    """Files under ``root`` whose name ends with one of ``extensions`` (case-insensitive), sorted by
    relative posix path; the other (not hidden) files are appended to ``skipped`` when given."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not (skip_hidden and d.startswith("."))]
        for name in filenames:
            if skip_hidden and name.startswith("."):
                continue
            path = Path(dirpath, name)
            if name.lower().endswith(extensions):
                if path.is_file():
                    found.append((path.relative_to(root).as_posix(), path))
            elif skipped is not None:
                skipped.append(path)
    found.sort(key=lambda t: t[0])
    return [p for _, p in found]
