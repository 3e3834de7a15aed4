"""Tokenize a corpus once into memory-mapped ``train.bin`` / ``val.bin`` plus ``manifest.json``.

(The writer and a preparation that runs under one lock; the format's constants, id checks and
reader, ``TokenData``, are ``aoe.data.token_files``, re-exported here.)

Layout of ``out_dir``::

    train.bin      flat token ids, dtype uint16 (vocab_size <= 65535) or uint32, native byte order
    val.bin        same for the validation documents
    tokenizer.json the tokenizer that produced them (hash recorded in the manifest)
    manifest.json  format version, source fingerprint, settings, tokenizer hash, dtype, counts

Every document is followed by one EOS id. The split is by document: document ``i`` (0-based, in
source order) goes to validation when ``blake2b(i) / 2**64 < val_fraction``. If that leaves a
split empty and the other split has >= 2 documents, the other split's last document is moved
over, so both splits are non-empty whenever the corpus has >= 2 documents. A one-document corpus
is split inside the document instead (first ``1 - val_fraction`` of its tokens to train).
``val_fraction=0`` means no validation split at all (``val`` is empty).

Files are written under temporary names and moved into place with ``os.replace``; the old
manifest is deleted first and the new one is written last, so a crash never leaves a manifest
describing files other than the ones on disk.

Streaming: the corpus is read in chunks (``ChunkSizes.read_bytes``), long documents are cut into
pieces where the tokenizer's pre-tokenizer cuts anyway (``aoe.data.chunks``), pieces are encoded
in batches by the library's thread pool (the next batch while the previous one is written) and
the ids are appended to the files as they come. Memory is bounded by the chunk sizes, not by the
corpus or document size, and the files are byte-identical to encoding every document whole
(except after a *forced* cut, counted in the manifest as ``forced_cuts``; see ``aoe.data.chunks``).
Two exceptions hold a whole document in memory: a JSON Lines line is parsed whole, and a
tokenizer for which cutting is not proven exact (``Tokenizer.piecewise`` False: another
pre-tokenizer, a normalizer, truncation...) gets every document whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from aoe.utils.files import atomic_write_text, describe_os_error, file_lock, fsync_file, tmp_sibling
from aoe.data.chunks import DEFAULT_CHUNK_SIZES, ChunkSizes, ForcedCuts, split_pieces
from aoe.data.errors import DataError
from aoe.data.sources import READER_VERSION, DocStats, Document, Source, check_max_bytes, open_source
from aoe.data.token_files import (  # noqa: F401  (TokenData, token_dtype, check_token_ids: re-exported)
    _IO_TOKENS, FORMAT_VERSION, MANIFEST_FILE, SPLITS, TokenData, _read_manifest, check_token_ids, token_dtype,
)
from aoe.data.tokenizer import (TOKENIZER_FILE, Tokenizer, check_vocab_size, default_cache_dir,
                                load_or_train_tokenizer)

__all__ = ["FORMAT_VERSION", "SPLITS", "TokenData", "prepare_tokens", "default_token_dir", "token_dtype",
           "check_token_ids"]

log = logging.getLogger(__name__)

LOCK_FILE = ".prepare.lock"
_SPLIT_RULE = "blake2b-doc-index-v1"


def _is_val(index: int, val_fraction: float) -> bool:
    digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8, person=b"aoe-split").digest()
    return int.from_bytes(digest, "little") / 2.0**64 < val_fraction


def _up_to_date(out_dir: Path, manifest: dict | None, fingerprint: str, settings: dict, tok: Tokenizer | None) -> bool:
    if manifest is None or manifest.get("format_version") != FORMAT_VERSION:
        return False
    if manifest.get("settings") != settings or manifest.get("source", {}).get("fingerprint") != fingerprint:
        return False
    if tok is not None and manifest.get("tokenizer", {}).get("hash") != tok.hash:
        return False
    try:
        itemsize = np.dtype(manifest["dtype"]).itemsize
        return all(
            (out_dir / f"{s}.bin").stat().st_size == manifest["splits"][s]["tokens"] * itemsize for s in SPLITS
        ) and (out_dir / TOKENIZER_FILE).is_file()
    except (OSError, KeyError, TypeError):
        return False


class _SplitWriter:
    """Appends token ids to a temporary file, document by document. The last complete document
    can be moved to another split and a one-document file cut down, both by copying in chunks,
    so no document is ever held in memory whole.

    Counters: documents, tokens, bytes (UTF-8 bytes of the documents' text).
    """

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path = path
        self.dtype = dtype
        self.file = open(path, "w+b", buffering=1 << 20)
        self.documents = 0
        self.tokens = 0
        self.bytes = 0
        self._doc_start = 0  # token offset of the document being written
        self._last: tuple[int, int] | None = None  # (first token, nbytes) of the last complete document

    def write(self, ids: np.ndarray) -> None:
        """Append ``ids`` (1-D, ``self.dtype``) to the document being written."""
        self.file.write(np.ascontiguousarray(ids, dtype=self.dtype).data)
        self.tokens += len(ids)

    def end_document(self, nbytes: int) -> None:
        """The document being written is complete; its text had ``nbytes`` UTF-8 bytes."""
        self._last = (self._doc_start, nbytes)
        self._doc_start = self.tokens
        self.documents += 1
        self.bytes += nbytes

    def copy_to(self, other: "_SplitWriter", start: int, stop: int) -> None:
        """Append tokens [start, stop) of this file to the document ``other`` is writing."""
        itemsize = self.dtype.itemsize
        self.file.flush()
        for lo in range(start, stop, _IO_TOKENS):
            self.file.seek(lo * itemsize)
            raw = self.file.read((min(lo + _IO_TOKENS, stop) - lo) * itemsize)
            other.write(np.frombuffer(raw, dtype=self.dtype))
        self.file.seek(0, os.SEEK_END)

    def move_last_to(self, other: "_SplitWriter") -> None:
        """Move the last complete document to the end of ``other``."""
        start, nbytes = self._last
        self.copy_to(other, start, self.tokens)
        other.end_document(nbytes)
        self._truncate(start)
        self.documents -= 1
        self.bytes -= nbytes
        self._last = None

    def keep_only(self, start: int, stop: int, nbytes: int) -> None:
        """Make the file tokens [start, stop) of itself, as one document of ``nbytes`` bytes."""
        itemsize = self.dtype.itemsize
        self.file.flush()
        if start:  # shift left in place: reads stay ahead of writes
            for lo in range(start, stop, _IO_TOKENS):
                self.file.seek(lo * itemsize)
                raw = self.file.read((min(lo + _IO_TOKENS, stop) - lo) * itemsize)
                self.file.seek((lo - start) * itemsize)
                self.file.write(raw)
        self._truncate(stop - start)
        self.documents, self.bytes, self._last = 1, nbytes, (0, nbytes)

    def _truncate(self, tokens: int) -> None:
        self.file.flush()
        self.file.truncate(tokens * self.dtype.itemsize)
        self.file.seek(0, os.SEEK_END)
        self.tokens = self._doc_start = tokens

    def close(self) -> None:
        self.file.close()
        fsync_file(self.path)


Piece = tuple[int, str, "int | None"]  # (document index, text, the document's nbytes on its last piece else None)


def _pieces(docs: Iterator[Document], tok: Tokenizer, sizes: ChunkSizes, forced: ForcedCuts) -> Iterator[Piece]:
    """Every document's text in order, as pieces that encode to the document's ids (a tokenizer
    that is not ``piecewise`` gets every document whole)."""
    for index, doc in enumerate(docs):
        if tok.piecewise:
            pieces = split_pieces(doc.chunks(), sizes, forced.callback(doc.name))
        else:
            pieces = iter((doc.text(),))
        piece = next(pieces)
        for following in pieces:
            yield index, piece, None
            piece = following
        yield index, piece, doc.nbytes


def _batches(pieces: Iterator[Piece], sizes: ChunkSizes) -> Iterator[list[Piece]]:
    """Consecutive pieces grouped up to ``sizes.batch_pieces`` pieces or ``sizes.batch_chars`` characters."""
    batch: list[Piece] = []
    chars = 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece[1])
        if len(batch) >= sizes.batch_pieces or chars >= sizes.batch_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _batch_encoder(tok: Tokenizer) -> Callable[[list[str]], list]:
    """texts -> one ``tokenizers.Encoding`` per text (``.ids``; no special tokens added), encoded
    in parallel by the library's thread pool; without offsets where the library can skip them."""
    backend = tok.backend
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return lambda texts: encode(texts, add_special_tokens=False)


def _set_workers(num_workers: int | None) -> dict:
    """Apply num_workers to tokenizers' Rust thread pool; returns the env values to restore."""
    saved = {}
    if num_workers is None:
        return saved
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise DataError(f"num_workers must be a positive int or None, got {num_workers!r}")
    names = {"RAYON_NUM_THREADS": str(num_workers)}  # only honoured before the pool first starts
    names["TOKENIZERS_PARALLELISM"] = "false" if num_workers == 1 else "true"
    for k, v in names.items():
        saved[k] = os.environ.get(k)
        os.environ[k] = v
    return saved


def _restore_env(saved: dict) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def prepare_tokens(
    source: "str | os.PathLike | Source" = "stdlib",
    out_dir: str | os.PathLike | None = None,
    *,
    vocab_size: int = 4096,
    tokenizer_path: str | os.PathLike | None = None,
    val_fraction: float = 0.05,
    max_bytes: int | None = None,
    tokenizer_max_bytes: int | None = None,
    text_field: str = "text",
    on_decode_error: str = "replace",
    num_workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    chunk_sizes: ChunkSizes | None = None,
) -> TokenData:
    """Tokenize ``source`` into ``out_dir`` (see the module docstring) and open the result.

    source: a spec or :class:`Source` (see ``aoe.data.sources``). vocab_size: BPE size to train
    (ignored with ``tokenizer_path``, a tokenizer.json file or a directory holding one).
    max_bytes: use only the first ``max_bytes`` UTF-8 bytes of documents (deterministic, whole
    documents in source order). tokenizer_max_bytes: training cap for the tokenizer (default: the
    same documents as ``max_bytes``). num_workers: threads of tokenizers' Rust pool (None: its
    default, all cores; 1: no parallelism, not even encoding ahead; other values only take effect
    if the pool has not started yet in this process). cache_dir: where trained tokenizers are cached (default
    :func:`default_cache_dir`). out_dir None: :func:`default_token_dir`. chunk_sizes: how much
    text is read, cut and encoded at once (default ``aoe.data.chunks.DEFAULT_CHUNK_SIZES``; the
    files do not depend on it, bar forced cuts).

    If ``out_dir`` already holds a manifest with the same source fingerprint, tokenizer hash and
    settings and files of the recorded sizes, nothing is re-tokenized (``result.reused``).
    Concurrent calls on one ``out_dir`` (e.g. all DDP ranks) are serialized by a lock file
    ``out_dir/.prepare.lock``: one process tokenizes, the others reuse its result.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    check_max_bytes(max_bytes)
    check_max_bytes(tokenizer_max_bytes, "tokenizer_max_bytes")
    if tokenizer_path is None:
        check_vocab_size(vocab_size)
    # a Source object carries its own text_field / on_decode_error
    src = source if isinstance(source, Source) else open_source(
        source, text_field=text_field, on_decode_error=on_decode_error)
    if out_dir is None:
        out_dir = default_token_dir(src, cache_dir, vocab_size=vocab_size, tokenizer_path=tokenizer_path,
                                    val_fraction=val_fraction, max_bytes=max_bytes,
                                    tokenizer_max_bytes=tokenizer_max_bytes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = dict(vocab_size=vocab_size, tokenizer_path=tokenizer_path, val_fraction=val_fraction,
                    max_bytes=max_bytes, tokenizer_max_bytes=tokenizer_max_bytes)
    try:
        lock = file_lock(out_dir / LOCK_FILE).__enter__()
    except OSError as e:  # a read-only cache (a shared mount): usable as it is when it is complete
        return _open_read_only(src, out_dir, e, **settings)
    try:
        return _prepare_locked(src, out_dir, **settings, num_workers=num_workers, cache_dir=cache_dir,
                               sizes=chunk_sizes or DEFAULT_CHUNK_SIZES)
    finally:
        lock.__exit__(None, None, None)


def _open_read_only(src: Source, out_dir: Path, cause: OSError, *, vocab_size, tokenizer_path, val_fraction,
                    max_bytes, tokenizer_max_bytes) -> TokenData:
    """The token files of a directory this process cannot lock (nor so write): opened when they
    are up to date, else a DataError naming the directory, the cause and what to do."""
    train_cap = max_bytes if tokenizer_max_bytes is None else tokenizer_max_bytes
    settings = _settings(src, tokenizer_path=tokenizer_path, vocab_size=vocab_size, train_cap=train_cap,
                         val_fraction=val_fraction, max_bytes=max_bytes)
    manifest = _previous_manifest(out_dir)
    tok = Tokenizer.load(tokenizer_path) if tokenizer_path is not None else None
    if _up_to_date(out_dir, manifest, src.fingerprint, settings, tok):
        return TokenData.open(out_dir, reused=True)
    why = describe_os_error(cause.errno) if cause.errno else str(cause)
    raise DataError(f"the token cache {str(out_dir)!r} cannot be written ({why}) "
                    "and does not hold these tokens yet: point --cache-dir or $AOE_CACHE at a writable directory")


def _prepare_locked(src: Source, out_dir: Path, *, vocab_size, tokenizer_path, val_fraction, max_bytes,
                    tokenizer_max_bytes, num_workers, cache_dir, sizes: ChunkSizes) -> TokenData:
    fingerprint = src.fingerprint
    train_cap = max_bytes if tokenizer_max_bytes is None else tokenizer_max_bytes
    settings = _settings(src, tokenizer_path=tokenizer_path, vocab_size=vocab_size, train_cap=train_cap,
                         val_fraction=val_fraction, max_bytes=max_bytes)
    manifest = _previous_manifest(out_dir)

    t0 = time.perf_counter()
    if tokenizer_path is not None:
        tok = Tokenizer.load(tokenizer_path)
    elif _up_to_date(out_dir, manifest, fingerprint, settings, None):
        tok = Tokenizer.load(out_dir / TOKENIZER_FILE)  # the manifest's own tokenizer, checked below
    else:
        tok = load_or_train_tokenizer(src, cache_dir, vocab_size=vocab_size, max_bytes=train_cap, chunk_sizes=sizes)
    tokenizer_seconds = time.perf_counter() - t0

    if _up_to_date(out_dir, manifest, fingerprint, settings, tok):
        log.info("token files in %s are up to date; not re-tokenizing", out_dir)
        return TokenData.open(out_dir, reused=True)

    t1 = time.perf_counter()
    files = _write_token_files(src, out_dir, tok, val_fraction=val_fraction, max_bytes=max_bytes,
                               num_workers=num_workers, sizes=sizes)
    tokenize_seconds = time.perf_counter() - t1
    new_manifest = {
        "format_version": FORMAT_VERSION,
        "source": src.describe(),
        "settings": settings,
        "tokenizer": {"hash": tok.hash, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                      "path": None if tokenizer_path is None else str(tokenizer_path)},
        "vocab_size": tok.vocab_size,
        **files,
        "timings": {"tokenizer_s": round(tokenizer_seconds, 3), "tokenize_s": round(tokenize_seconds, 3)},
        "created_unix": round(time.time(), 3),
    }
    atomic_write_text(out_dir / MANIFEST_FILE, json.dumps(new_manifest, indent=2))
    log.info("tokenized %d documents into %s: %d train / %d val tokens in %.1fs", files["documents"]["total"],
             out_dir, files["splits"]["train"]["tokens"], files["splits"]["val"]["tokens"], tokenize_seconds)
    return TokenData.open(out_dir)


def _settings(src: Source, *, tokenizer_path, vocab_size, train_cap, val_fraction, max_bytes) -> dict:
    """The manifest's ``settings``: everything besides the source and tokenizer that the files depend on."""
    return {
        "tokenizer": "file" if tokenizer_path is not None else "trained",
        "vocab_size": None if tokenizer_path is not None else vocab_size,
        "tokenizer_max_bytes": None if tokenizer_path is not None else train_cap,
        "val_fraction": float(val_fraction),
        "max_bytes": max_bytes,
        "text_field": src.text_field,
        "on_decode_error": src.on_decode_error,
        "split_rule": _SPLIT_RULE,
        "reader": READER_VERSION,
    }


def _previous_manifest(out_dir: Path) -> dict | None:
    """``out_dir``'s manifest; None when there is none, or when it cannot be read (then all is rebuilt)."""
    try:
        return _read_manifest(out_dir)
    except DataError as e:  # unreadable manifest: rebuild
        log.warning("%s; re-tokenizing", e)
        return None


def _write_token_files(src: Source, out_dir: Path, tok: Tokenizer, *, val_fraction, max_bytes, num_workers,
                       sizes: ChunkSizes) -> dict:
    """Tokenize ``src`` into ``out_dir``'s split files and tokenizer.json, deleting the old manifest
    first (the caller writes the new one last); returns the manifest's entries on the files:
    dtype, splits, documents, binary_files_skipped, forced_cuts, single_document_split."""
    dtype = token_dtype(tok.vocab_size)
    stats = DocStats()
    forced = ForcedCuts(sizes)
    tmp = {s: tmp_sibling(out_dir / f"{s}.bin") for s in SPLITS}
    saved_env = _set_workers(num_workers)
    writers: dict[str, _SplitWriter] = {}
    try:
        for s in SPLITS:
            writers[s] = _SplitWriter(tmp[s], dtype)
        docs = src.stream(max_bytes=max_bytes, stats=stats, read_bytes=sizes.read_bytes)
        n_docs = _write_tokens(_pieces(docs, tok, sizes, forced), tok, writers, val_fraction, sizes,
                               ahead=num_workers != 1)
        single_document = _fill_both_splits(writers, n_docs, val_fraction)
        for w in writers.values():
            w.close()
        # commit: drop the old manifest first, then move the files (the new manifest comes last)
        (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
        for s in SPLITS:
            os.replace(tmp[s], out_dir / f"{s}.bin")
        tok.save(out_dir)
    finally:
        _restore_env(saved_env)
        for w in writers.values():
            if not w.file.closed:
                w.file.close()
        for path in tmp.values():
            if path.exists():
                path.unlink()
    return {
        "dtype": dtype.name,
        "splits": {s: {"tokens": writers[s].tokens, "documents": writers[s].documents, "bytes": writers[s].bytes}
                   for s in SPLITS},
        "documents": {"total": stats.documents, "empty": stats.empty, "decode_replaced": stats.decode_replaced,
                      "decode_skipped": stats.decode_skipped, "capped": stats.capped},
        "binary_files_skipped": stats.binary_skipped,
        "forced_cuts": forced.count,
        "single_document_split": single_document,
    }


def _fill_both_splits(writers: dict[str, _SplitWriter], n_docs: int, val_fraction: float) -> bool:
    """With a validation split, leave neither split empty when the corpus allows (see the module
    docstring); returns whether the only document was split at the token level."""
    if n_docs == 1 and val_fraction > 0:
        _split_single_document(writers, val_fraction)
        return True
    if val_fraction > 0:
        for empty, other in (("val", "train"), ("train", "val")):
            if writers[empty].documents == 0 and writers[other].documents >= 2:
                writers[other].move_last_to(writers[empty])
    return False


def default_token_dir(source: Source, cache_dir: str | os.PathLike | None = None, **settings) -> Path:
    """``cache_dir/tokens/<key>``: key = sha256 of the source spec (made absolute for paths) and
    the keyword settings, so one spec + settings always maps to one directory (re-tokenized in
    place when the source changes)."""
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    spec = source.spec if source.kind in ("stdlib", "hf") else os.path.abspath(os.path.expanduser(source.spec))
    payload = {"spec": spec, "text_field": source.text_field, "on_decode_error": source.on_decode_error,
               **{k: (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in settings.items()}}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir / "tokens" / key


def _encode_ahead(batches: Iterator[list[Piece]], encode: Callable[[list[str]], list],
                  ahead: bool) -> Iterator[tuple[list[Piece], list]]:
    """(batch, its encodings) in order. With ``ahead``, each batch is encoded in a worker thread
    (the library releases the GIL) while the caller writes the previous one and the next one is
    read and cut, so the library's threads are not idle during that Python work."""
    if not ahead:
        for batch in batches:
            yield batch, encode([text for _, text, _ in batch])
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in batches:
            future = pool.submit(encode, [text for _, text, _ in batch])
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (batch, future)
        if pending is not None:
            yield pending[0], pending[1].result()


def _write_tokens(pieces: Iterator[Piece], tok: Tokenizer, writers: dict[str, _SplitWriter], val_fraction: float,
                  sizes: ChunkSizes, ahead: bool = True) -> int:
    """Encode the pieces batch by batch and append each document's ids plus EOS to its split's
    writer; returns the number of documents. ahead: encode the next batch during the writing
    (see :func:`_encode_ahead`)."""
    encode = _batch_encoder(tok)
    dtype = writers["train"].dtype
    eos = np.array([tok.eos_id], dtype=dtype)
    n_docs, writer = 0, None
    for batch, encodings in _encode_ahead(_batches(pieces, sizes), encode, ahead):
        for (index, _, nbytes), encoding in zip(batch, encodings):
            if writer is None:
                writer = writers["val" if _is_val(index, val_fraction) else "train"]
            writer.write(np.array(encoding.ids, dtype=dtype))
            if nbytes is not None:
                writer.write(eos)
                writer.end_document(nbytes)
                n_docs, writer = index + 1, None
    return n_docs


def _split_single_document(writers: dict[str, _SplitWriter], val_fraction: float) -> None:
    """Split the only document at the token level: its first ``1 - val_fraction`` to train."""
    train, val = writers["train"], writers["val"]
    owner = train if train.documents else val
    n, nbytes = owner.tokens, owner.bytes
    cut = min(max(1, round(n * (1.0 - val_fraction))), n - 1)
    train_bytes = round(nbytes * cut / n)
    if owner is train:
        train.copy_to(val, cut, n)
        val.end_document(nbytes - train_bytes)
        train.keep_only(0, cut, train_bytes)
    else:
        val.copy_to(train, 0, cut)
        train.end_document(train_bytes)
        val.keep_only(cut, n, nbytes - train_bytes)
