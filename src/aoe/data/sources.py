"""Document sources: stream documents (``str``) from a corpus spec, never the whole corpus at once.

(One module of about 570 lines, on purpose: every kind of source below shares one streaming
decoder, its binary-file and decode-error rules and its statistics; split, they would each need
all of it.)

Source specs (``open_source(spec)``):

* ``"stdlib"`` (the default corpus): every ``.py`` file of the running interpreter's standard
  library (``sysconfig.get_paths()["stdlib"]``), one document per file, in sorted relative-path
  order. Directories named ``site-packages``, ``dist-packages``, ``__pycache__`` and the test
  directories ``test``, ``tests`` and ``idle_test`` are skipped: the tests are ~60% of the bytes
  (CPython 3.11: 19 of 31 MB) and hold deliberately odd files (bad encodings, huge data
  literals); what remains (~12 MB, ~730 files) is ordinary library code. To use a path that is
  literally called ``stdlib``, write ``./stdlib``.
* a text file: one document (a ``.jsonl`` file: one document per line, see below).
* a directory: recursively, every file whose name ends with one of ``extensions`` (default
  ``.txt .md .rst .py .jsonl .jsonl.gz .jsonl.zst .parquet``, case-insensitive), hidden
  files/directories (``.*``) skipped, sorted by relative path; the other files are named in one
  warning (how many, the first few, the suffixes that are read).
* a glob (the spec contains ``*``, ``?`` or ``[`` and is not an existing path): the matching
  files (``**`` recursive), any suffix, sorted.
* ``.jsonl`` files, also gzip- or zstd-compressed (``.jsonl.gz``, ``.jsonl.zst``), in any of the
  above: one JSON object per non-blank line; the document is the string under ``text_field``
  (default ``"text"``); ``null`` counts as an empty document.
* ``.parquet`` files (the format of Hugging Face datasets): one document per row, the string in
  the column ``text_field``; a null counts as an empty document. Record files are read a line or
  a batch of rows at a time (``aoe.data.records``); zstd needs ``zstandard``, Parquet ``pyarrow``.
* ``"hf:NAME"``, ``"hf:NAME:SPLIT"`` or ``"hf:NAME:CONFIG:SPLIT"`` (split defaults to
  ``train``): a Hugging Face ``datasets`` dataset, loaded with ``streaming=True``; needs the
  optional ``datasets`` package. Its fingerprint is the spec itself (hub datasets are assumed
  immutable). Stream large ones with ``max_bytes``.

Decoding: bytes are decoded as UTF-8 (a leading BOM is dropped). A document with undecodable
bytes is either decoded with U+FFFD replacements (``on_decode_error="replace"``, default) or
dropped (``"skip"``); both are counted in :class:`DocStats`. Whitespace-only documents are
dropped and counted as ``empty``. A source without any non-empty document raises
:class:`DataError`.

Binary files: a file (of any suffix, ``.jsonl`` included) whose first 8 KiB hold a NUL byte, or
whose first 8 KiB decode to at least 64 characters of which more than a quarter are replacements
for bytes that are not UTF-8, is skipped with a warning naming it and counted as
``binary_skipped``: it is not text, or is text in another encoding (UTF-16; a mostly non-Latin
8-bit code page). A text file with a few bad bytes is still decoded as described above.

Streaming: :meth:`Source.stream` yields :class:`Document` objects whose text comes in chunks of at
most ``read_bytes`` bytes, so a file of any size is never held whole. A file larger than one chunk
is read twice: once to check its bytes (decode errors, whitespace only, UTF-8 size), once to
yield its text.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import importlib.util
import json
import logging
import os
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

from aoe.utils.files import file_sha256

from aoe.data.documents import DocStats, Document
from aoe.data.errors import DataError
from aoe.data.records import RECORD_SUFFIXES, is_jsonl, is_parquet, open_jsonl, parquet_texts
from aoe.data.text_files import (  # noqa: F401  (binary_reason and the SNIFF_* limits: re-exported)
    SNIFF_BYTES, SNIFF_MAX_UNDECODABLE, SNIFF_MIN_CHARS, _decoded_chunks, _file_size, _scan, _walk, binary_reason,
)

__all__ = [
    "DEFAULT_EXTENSIONS",
    "STDLIB_SKIP_DIRS",
    "READER_VERSION",
    "DocStats",
    "Document",
    "Source",
    "open_source",
    "iter_documents",
]

log = logging.getLogger(__name__)

#: What a source yields for given files and settings; part of the cache keys of tokenizers and
#: token files. 2: files that look binary are skipped.
READER_VERSION = 2
DEFAULT_EXTENSIONS: tuple[str, ...] = (".txt", ".md", ".rst", ".py", *RECORD_SUFFIXES)
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
DECODE_ERROR_MODES = ("replace", "skip")
FINGERPRINT_MODES = ("stat", "content")
_GLOB_CHARS = "*?["
READ_BYTES = 1 << 20


def _check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise DataError(f"{name}={value!r} is not one of {choices}")


def check_max_bytes(max_bytes: int | None, name: str = "max_bytes") -> int | None:
    """Validate an optional positive byte cap."""
    if max_bytes is None:
        return None
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise DataError(f"{name} must be a positive int or None, got {max_bytes!r}")
    return max_bytes


class Source:
    """A resolved corpus spec (see the module docstring for the spec forms).

    Attributes: ``spec`` (str), ``kind`` ("stdlib" | "file" | "dir" | "glob" | "hf"), ``root``
    (Path or None: the directory that relative paths are taken from), ``files`` (sorted list of
    Path; empty for "hf"), ``text_field``, ``on_decode_error``.
    Construction lists the files (cheap: no file is read) and fails fast on a missing source.
    """

    def __init__(
        self,
        spec: str | os.PathLike = "stdlib",
        *,
        text_field: str = "text",
        on_decode_error: str = "replace",
        extensions: Iterable[str] = DEFAULT_EXTENSIONS,
        fingerprint_mode: str = "stat",
    ) -> None:
        _check_choice("on_decode_error", on_decode_error, DECODE_ERROR_MODES)
        _check_choice("fingerprint_mode", fingerprint_mode, FINGERPRINT_MODES)
        if not isinstance(text_field, str) or not text_field:
            raise DataError(f"text_field must be a non-empty str, got {text_field!r}")
        self.spec = os.fspath(spec)
        self.text_field = text_field
        self.on_decode_error = on_decode_error
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        self.fingerprint_mode = fingerprint_mode
        self.root: Path | None = None
        self.files: list[Path] = []
        self._hf: tuple[str, str | None, str] | None = None
        self._fingerprint: str | None = None
        self._resolve()

    # ------------------------------------------------------------------ resolution
    def _resolve(self) -> None:
        spec = self.spec
        if spec == "stdlib":
            self.kind = "stdlib"
            self.root = Path(sysconfig.get_paths()["stdlib"])
            if not self.root.is_dir():
                raise DataError(f"standard library directory not found: {str(self.root)!r}")
            self.files = _walk(self.root, (".py",), skip_dirs=STDLIB_SKIP_DIRS)
            if not self.files:
                raise DataError(f"no .py files under the standard library directory {str(self.root)!r}")
            return
        if spec.startswith("hf:"):
            self.kind = "hf"
            self._hf = _parse_hf(spec)
            if importlib.util.find_spec("datasets") is None:
                raise ImportError(
                    f"source {spec!r} needs the Hugging Face `datasets` package, which is not installed: "
                    "pip install datasets"
                )
            return
        path = Path(spec).expanduser()
        if path.is_file():
            self.kind = "file"
            self.files = [path]
            return
        if path.is_dir():
            self.kind = "dir"
            self.root = path
            skipped: list[Path] = []
            self.files = _walk(path, self.extensions, skip_dirs=frozenset(), skip_hidden=True, skipped=skipped)
            if not self.files:
                raise DataError(
                    f"directory {spec!r} contains no files with a suffix in {self.extensions} (searched recursively; "
                    f"{len(skipped)} file(s) of other suffixes)"
                )
            _report_skipped(path, self.extensions, len(self.files), skipped)
            return
        if any(c in spec for c in _GLOB_CHARS):
            self.kind = "glob"
            matches = sorted(_glob.glob(os.path.expanduser(spec), recursive=True))
            self.files = [Path(m) for m in matches if os.path.isfile(m)]
            if not self.files:
                raise DataError(f"glob {spec!r} matched no files")
            return
        raise DataError(
            f"source not found: {spec!r} (expected 'stdlib', 'hf:NAME[:SPLIT]', an existing file or directory, or a glob)"
        )

    # ------------------------------------------------------------------ fingerprint
    @property
    def fingerprint(self) -> str:
        """sha256 hex over the file list with (relative path, size, mtime_ns) per file
        (``fingerprint_mode="stat"``, default) or (relative path, content sha256) per file
        (``"content"``); for "hf" sources, over the spec. Any added, removed, resized or touched
        file changes it. Computed once per Source object."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(f"aoe-source-v1\0{self.kind}\0{self.fingerprint_mode}\0".encode())
            if self.kind == "hf":
                h.update(self.spec.encode())
            else:
                if self.root is not None:
                    h.update(f"{self.root.resolve()}\0".encode())
                for path in self.files:
                    h.update(self._rel(path).encode() + b"\0")
                    try:
                        if self.fingerprint_mode == "stat":
                            st = path.stat()
                            h.update(f"{st.st_size}\0{st.st_mtime_ns}\0".encode())
                        else:
                            h.update(file_sha256(path).encode() + b"\0")
                    except OSError as e:
                        raise DataError(f"cannot stat source file {str(path)!r}: {e}") from e
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def _rel(self, path: Path) -> str:
        if self.root is not None:
            return path.relative_to(self.root).as_posix()
        return str(path.resolve())

    def describe(self) -> dict:
        """JSON-able summary: spec, kind, root, number of files, fingerprint."""
        return {
            "spec": self.spec,
            "kind": self.kind,
            "root": None if self.root is None else str(self.root),
            "files": len(self.files),
            "fingerprint": self.fingerprint,
        }

    def __repr__(self) -> str:
        return f"Source(spec={self.spec!r}, kind={self.kind!r}, files={len(self.files)})"

    # ------------------------------------------------------------------ iteration
    def documents(self, max_bytes: int | None = None, stats: DocStats | None = None) -> Iterator[str]:
        """Stream the non-empty documents in a deterministic order.

        max_bytes: stop before the first document that starts at or after ``max_bytes`` UTF-8
        bytes of earlier documents (the document crossing the cap is kept whole, later files are
        not even read). stats: a :class:`DocStats` to fill (counts accumulate into it).
        Raises DataError (naming the spec) at the end if no non-empty document was found.
        Each document is one ``str``: use :meth:`stream` for documents too large for memory.
        """
        for doc in self.stream(max_bytes, stats):
            yield doc.text()

    def stream(self, max_bytes: int | None = None, stats: DocStats | None = None, *,
               read_bytes: int = READ_BYTES) -> Iterator["Document"]:
        """The documents of :meth:`documents` as :class:`Document` objects, whose text is read in
        chunks of at most ``read_bytes`` bytes. Read a document's chunks (or not at all) before
        asking for the next one."""
        max_bytes = check_max_bytes(max_bytes)
        if isinstance(read_bytes, bool) or not isinstance(read_bytes, int) or read_bytes < 1:
            raise DataError(f"read_bytes must be a positive int, got {read_bytes!r}")
        stats = DocStats() if stats is None else stats
        start_docs, start_bytes = stats.documents, stats.bytes
        candidates = self._candidates(stats, read_bytes)
        while True:
            if max_bytes is not None and stats.bytes - start_bytes >= max_bytes:
                stats.capped = True
                break
            try:
                doc = next(candidates)
            except StopIteration:
                break
            if doc is None:
                continue
            stats.documents += 1
            stats.bytes += doc.nbytes
            yield doc
        if stats.documents == start_docs:
            raise DataError(
                f"source {self.spec!r} has no non-empty documents "
                f"({stats.empty} empty, {stats.decode_skipped} skipped for undecodable bytes, "
                f"{stats.binary_skipped} binary files skipped)"
            )

    def __iter__(self) -> Iterator[str]:
        return self.documents()

    def _candidates(self, stats: DocStats, read_bytes: int) -> Iterator["Document | None"]:
        """Per candidate document, lazily (nothing read ahead): a Document, or None for one that
        was dropped (counted in ``stats``)."""
        if self.kind == "hf":
            for where, value, bad in self._raw_hf():
                yield self._value_document(where, value, bad, stats)
            return
        for path in self.files:
            if is_jsonl(path):
                for where, value, bad in self._raw_jsonl(path, stats):
                    yield self._value_document(where, value, bad, stats)
            elif is_parquet(path):
                for where, value in parquet_texts(path, self.text_field):
                    yield self._value_document(where, value, False, stats)
            else:
                yield self._file_document(path, stats, read_bytes)

    def _value_document(self, where: str, value: bytes | str | None, bad: bool, stats: DocStats) -> "Document | None":
        text, nbytes = self._decode(value, bad, stats)
        return None if text is None else Document.from_text(where, text, nbytes)

    def _file_document(self, path: Path, stats: DocStats, read_bytes: int) -> "Document | None":
        """A text file as one document: read whole when it fits in one read, else checked in a
        first pass and streamed in a second (see the module docstring)."""
        try:
            with open(path, "rb") as f:
                head = f.read(read_bytes)
        except OSError as e:
            raise DataError(f"cannot read source file {str(path)!r}: {e}") from e
        reason = binary_reason(head)
        if reason is not None:
            _skip_binary(path, reason, stats)
            return None
        if len(head) < read_bytes:  # the whole file
            return self._value_document(str(path), head, False, stats)
        size = _file_size(path)
        errors = "strict"
        try:
            nbytes, has_text = _scan(path, errors, read_bytes)
        except UnicodeDecodeError:
            if self.on_decode_error == "skip":
                stats.decode_skipped += 1
                return None
            errors = "replace"
            nbytes, has_text = _scan(path, errors, read_bytes)
            stats.decode_replaced += 1
        if not has_text:
            stats.empty += 1
            return None
        return Document(str(path), nbytes, lambda: _decoded_chunks(path, errors, read_bytes, expect_size=size))

    def _decode(self, value: bytes | str | None, bad_bytes: bool, stats: DocStats) -> tuple[str | None, int]:
        """(text, utf8 size), or (None, 0) for a dropped document; updates the counters.

        value: file bytes, a str (JSON field; ``bad_bytes`` says its line had undecodable bytes
        and was decoded with replacements) or None (JSON null)."""
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8-sig")
            except UnicodeDecodeError:
                bad_bytes = True
                value = None if self.on_decode_error == "skip" else value.decode("utf-8-sig", errors="replace")
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates from JSON escapes such as "\udcff"
                bad_bytes = True
                if self.on_decode_error == "replace":
                    value = value.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")
                else:
                    value = None
        if bad_bytes:
            if self.on_decode_error == "skip":
                stats.decode_skipped += 1
                return None, 0
            stats.decode_replaced += 1
        if value is None or not value.strip():
            stats.empty += 1
            return None, 0
        return value, len(value.encode("utf-8"))

    def _raw_jsonl(self, path: Path, stats: DocStats) -> Iterator[tuple[str, str | None, bool]]:
        """(where, text or None, bad_bytes) per non-blank line (of the decompressed file: .jsonl,
        .jsonl.gz, .jsonl.zst); nothing for a binary file."""
        with open_jsonl(path) as f:
            reason = binary_reason(f.read(SNIFF_BYTES))
        if reason is not None:
            _skip_binary(path, reason, stats)
            return
        with open_jsonl(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    line_text, bad = line.decode("utf-8-sig" if lineno == 1 else "utf-8"), False
                except UnicodeDecodeError:
                    if self.on_decode_error == "skip":
                        yield where, None, True  # counted as skipped, the line is not parsed
                        continue
                    line_text, bad = line.decode("utf-8", errors="replace"), True
                yield where, self._json_text(where, line_text), bad

    def _json_text(self, where: str, line: str) -> str | None:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if self.text_field not in obj:
            keys = ", ".join(repr(k) for k in list(obj)[:10])
            raise DataError(f"{where}: no field text_field={self.text_field!r} (fields: {keys})")
        value = obj[self.text_field]
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: field {self.text_field!r} is {type(value).__name__}, expected a string")
        return value

    def _raw_hf(self) -> Iterator[tuple[str, str | None, bool]]:
        import datasets  # optional dependency, presence checked in __init__

        name, config, split = self._hf
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        for i, row in enumerate(ds):
            where = f"{self.spec}[{i}]"
            if self.text_field not in row:
                raise DataError(f"{where}: no field text_field={self.text_field!r} (fields: {list(row)[:10]})")
            value = row[self.text_field]
            if value is not None and not isinstance(value, str):
                raise DataError(f"{where}: field {self.text_field!r} is {type(value).__name__}, expected a string")
            yield where, value, False


def _skip_binary(path: Path, reason: str, stats: DocStats) -> None:
    stats.binary_skipped += 1
    log.warning("skipping source file %r: it looks binary (%s); convert it to UTF-8 text or remove it",
                str(path), reason)


def _report_skipped(root: Path, extensions: tuple[str, ...], read: int, skipped: list[Path]) -> None:
    """One warning for a directory's files that are not read: how many, a few of them, and the
    suffixes that are."""
    if not skipped:
        return
    names = sorted(p.relative_to(root).as_posix() for p in skipped)
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    log.warning("directory %r: read %d file(s) with a suffix in %s; skipped %d other file(s) (%s%s): rename them, "
                "or pass the suffixes to read (Source(extensions=...))", str(root), read, " ".join(extensions),
                len(names), ", ".join(names[:3]), more)


def _parse_hf(spec: str) -> tuple[str, str | None, str]:
    parts = spec[3:].split(":")
    if any(not p for p in parts) or not 1 <= len(parts) <= 3:
        raise DataError(f"bad Hugging Face source {spec!r}: expected 'hf:NAME', 'hf:NAME:SPLIT' or 'hf:NAME:CONFIG:SPLIT'")
    if len(parts) == 1:
        return parts[0], None, "train"
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return parts[0], parts[1], parts[2]


def open_source(spec: "str | os.PathLike | Source" = "stdlib", **kwargs) -> Source:
    """A :class:`Source` for ``spec`` (returned unchanged if it already is one; then ``kwargs``
    must be empty). kwargs: text_field, on_decode_error, extensions, fingerprint_mode."""
    if isinstance(spec, Source):
        if kwargs:
            raise DataError(f"open_source got a Source object and options {sorted(kwargs)}; set them on the Source")
        return spec
    return Source(spec, **kwargs)


def iter_documents(
    spec: "str | os.PathLike | Source" = "stdlib",
    *,
    max_bytes: int | None = None,
    stats: DocStats | None = None,
    **kwargs,
) -> Iterator[str]:
    """Stream the documents of ``spec`` (see :meth:`Source.documents`)."""
    return open_source(spec, **kwargs).documents(max_bytes=max_bytes, stats=stats)
