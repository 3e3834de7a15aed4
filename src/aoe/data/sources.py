"""Document sources: stream documents (``str``) from a corpus spec, never the whole corpus at once.

Source specs (``open_source(spec)``):

* ``"stdlib"`` (the default corpus): every ``.py`` file of the running interpreter's standard
  library (``sysconfig.get_paths()["stdlib"]``), one document per file, in sorted relative-path
  order. Directories named ``site-packages``, ``dist-packages``, ``__pycache__`` and the test
  directories ``test``, ``tests`` and ``idle_test`` are skipped: the tests are ~60% of the bytes
  (CPython 3.11: 19 of 31 MB) and hold deliberately odd files (bad encodings, huge data
  literals); what remains (~12 MB, ~730 files) is ordinary library code. To use a path that is
  literally called ``stdlib``, write ``./stdlib``.
* a text file: one document (a ``.jsonl`` file: one document per line, see below).
* a directory: recursively, every file whose suffix is in ``extensions`` (default
  ``.txt .md .rst .py .jsonl``, case-insensitive), hidden files/directories (``.*``) skipped,
  sorted by relative path.
* a glob (the spec contains ``*``, ``?`` or ``[`` and is not an existing path): the matching
  files (``**`` recursive), any suffix, sorted.
* ``.jsonl`` files (in any of the above): one JSON object per non-blank line; the document is
  the string under ``text_field`` (default ``"text"``); ``null`` counts as an empty document.
* ``"hf:NAME"``, ``"hf:NAME:SPLIT"`` or ``"hf:NAME:CONFIG:SPLIT"`` (split defaults to
  ``train``): a Hugging Face ``datasets`` dataset, loaded with ``streaming=True``; needs the
  optional ``datasets`` package. Its fingerprint is the spec itself (hub datasets are assumed
  immutable). Stream large ones with ``max_bytes``.

Decoding: bytes are decoded as UTF-8 (a leading BOM is dropped). A document with undecodable
bytes is either decoded with U+FFFD replacements (``on_decode_error="replace"``, default) or
dropped (``"skip"``); both are counted in :class:`DocStats`. Whitespace-only documents are
dropped and counted as ``empty``. A source without any non-empty document raises
:class:`DataError`.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import importlib.util
import json
import os
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

from aoe.utils.files import file_sha256

from aoe.data.errors import DataError

__all__ = [
    "DEFAULT_EXTENSIONS",
    "STDLIB_SKIP_DIRS",
    "DocStats",
    "Source",
    "open_source",
    "iter_documents",
]

DEFAULT_EXTENSIONS: tuple[str, ...] = (".txt", ".md", ".rst", ".py", ".jsonl")
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
DECODE_ERROR_MODES = ("replace", "skip")
FINGERPRINT_MODES = ("stat", "content")
_GLOB_CHARS = "*?["


@dataclass
class DocStats:
    """Counters filled while a source is iterated.

    documents: non-empty documents yielded; bytes: their total UTF-8 size; empty: whitespace-only
    documents dropped; decode_replaced / decode_skipped: documents with undecodable bytes that
    were decoded with U+FFFD / dropped; capped: iteration stopped early at ``max_bytes``.
    """

    documents: int = 0
    bytes: int = 0
    empty: int = 0
    decode_replaced: int = 0
    decode_skipped: int = 0
    capped: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


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
            self.files = _walk(path, self.extensions, skip_dirs=frozenset(), skip_hidden=True)
            if not self.files:
                raise DataError(
                    f"directory {spec!r} contains no files with a suffix in {self.extensions} (searched recursively)"
                )
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
        """
        for text, _ in self.documents_with_size(max_bytes, stats):
            yield text

    def documents_with_size(
        self, max_bytes: int | None = None, stats: DocStats | None = None
    ) -> Iterator[tuple[str, int]]:
        """Like :meth:`documents` but yields ``(text, utf8_byte_count)`` pairs."""
        max_bytes = check_max_bytes(max_bytes)
        stats = DocStats() if stats is None else stats
        start_docs, start_bytes = stats.documents, stats.bytes
        raw = self._raw()
        while True:
            if max_bytes is not None and stats.bytes - start_bytes >= max_bytes:
                stats.capped = True
                break
            try:
                value, bad_bytes = next(raw)
            except StopIteration:
                break
            text, nbytes = self._decode(value, bad_bytes, stats)
            if text is None:
                continue
            stats.documents += 1
            stats.bytes += nbytes
            yield text, nbytes
        if stats.documents == start_docs:
            raise DataError(
                f"source {self.spec!r} has no non-empty documents "
                f"({stats.empty} empty, {stats.decode_skipped} skipped for undecodable bytes)"
            )

    def __iter__(self) -> Iterator[str]:
        return self.documents()

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

    def _raw(self) -> Iterator[tuple[bytes | str | None, bool]]:
        """(bytes | str | None, bad_bytes) per candidate document, lazily (nothing read ahead)."""
        if self.kind == "hf":
            yield from self._raw_hf()
            return
        for path in self.files:
            if path.suffix.lower() == ".jsonl":
                yield from self._raw_jsonl(path)
            else:
                try:
                    data = path.read_bytes()
                except OSError as e:
                    raise DataError(f"cannot read source file {str(path)!r}: {e}") from e
                yield data, False

    def _raw_jsonl(self, path: Path) -> Iterator[tuple[bytes | str | None, bool]]:
        try:
            f = open(path, "rb")
        except OSError as e:
            raise DataError(f"cannot read source file {str(path)!r}: {e}") from e
        with f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    line_text, bad = line.decode("utf-8-sig" if lineno == 1 else "utf-8"), False
                except UnicodeDecodeError:
                    if self.on_decode_error == "skip":
                        yield None, True  # counted as skipped, the line is not parsed
                        continue
                    line_text, bad = line.decode("utf-8", errors="replace"), True
                yield self._json_text(where, line_text), bad

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

    def _raw_hf(self) -> Iterator[tuple[bytes | str | None, bool]]:
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
            yield value, False


def _walk(root: Path, extensions: tuple[str, ...], *, skip_dirs: frozenset, skip_hidden: bool = False) -> list[Path]:
    """Files under ``root`` with a suffix in ``extensions``, sorted by relative posix path."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not (skip_hidden and d.startswith("."))]
        for name in filenames:
            if skip_hidden and name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in extensions:
                path = Path(dirpath, name)
                if path.is_file():
                    found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda t: t[0])
    return [p for _, p in found]


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
