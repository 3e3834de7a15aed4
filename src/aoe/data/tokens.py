"""Tokenize a corpus once into memory-mapped ``train.bin`` / ``val.bin`` plus ``manifest.json``.

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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from aoe.utils.files import atomic_write_text, file_lock, fsync_file, tmp_sibling
from aoe.data.errors import DataError
from aoe.data.sources import DocStats, Source, check_max_bytes, open_source
from aoe.data.tokenizer import (TOKENIZER_FILE, Tokenizer, check_vocab_size, default_cache_dir,
                                load_or_train_tokenizer)

__all__ = ["FORMAT_VERSION", "SPLITS", "TokenData", "prepare_tokens", "default_token_dir", "token_dtype",
           "check_token_ids"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "val")
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".prepare.lock"
_SPLIT_RULE = "blake2b-doc-index-v1"
_ENCODE_BATCH_DOCS = 512
_ENCODE_BATCH_BYTES = 8 << 20
_CHECK_CHUNK = 1 << 24


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65535), else uint32."""
    if vocab_size <= 0:
        raise DataError(f"vocab_size must be positive, got {vocab_size!r}")
    if vocab_size <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if vocab_size <= np.iinfo(np.uint32).max:
        return np.dtype(np.uint32)
    raise DataError(f"vocab_size={vocab_size} does not fit in uint32 token files")


def _is_val(index: int, val_fraction: float) -> bool:
    digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8, person=b"aoe-split").digest()
    return int.from_bytes(digest, "little") / 2.0**64 < val_fraction


def check_token_ids(tokens: np.ndarray, vocab_size: int, name: str = "tokens") -> None:
    """Raise DataError if any id in the 1-D array ``tokens`` is >= vocab_size (chunked max, so a
    memmap is scanned without loading it whole)."""
    for start in range(0, len(tokens), _CHECK_CHUNK):
        chunk = np.asarray(tokens[start:start + _CHECK_CHUNK])
        top = int(chunk.max())
        if top >= vocab_size:
            pos = start + int(np.argmax(chunk >= vocab_size))
            raise DataError(
                f"{name}: token id {int(tokens[pos])} at position {pos} is out of range for vocab_size={vocab_size} "
                "(corrupt file, or produced by a different tokenizer)"
            )


@dataclass
class TokenData:
    """A prepared token directory, opened read-only.

    train, val: 1-D ``np.memmap`` (dtype uint16/uint32, shape [n_tokens]) of token ids with an
    EOS after every document (an empty split is a 0-length ndarray). tokenizer: :class:`Tokenizer`.
    manifest: dict (``manifest.json``). reused: True when :func:`prepare_tokens` found the
    directory up to date and did not tokenize.
    """

    path: Path
    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    manifest: dict
    reused: bool = False

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def dtype(self) -> np.dtype:
        return self.train.dtype

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def bytes_per_token(self, split: str = "val") -> float:
        """UTF-8 bytes of document text per token (EOS tokens included in the count); converts a
        loss in nats/token to bits/byte: ``bpb = nats / ln(2) / bytes_per_token``."""
        info = self.manifest["splits"][split]
        if info["tokens"] == 0:
            raise DataError(f"split {split!r} of {str(self.path)!r} is empty")
        return info["bytes"] / info["tokens"]

    @classmethod
    def open(cls, path: str | os.PathLike, *, check_ids: bool = True, reused: bool = False) -> "TokenData":
        """Open ``path`` (an ``out_dir`` of :func:`prepare_tokens`) read-only; verifies the
        format version, the tokenizer hash, the file sizes and (``check_ids``) that every id is
        < vocab_size. Raises DataError naming the file on any mismatch."""
        path = Path(path)
        manifest = _read_manifest(path)
        if manifest is None:
            raise DataError(f"{str(path / MANIFEST_FILE)!r} not found: run prepare_tokens first")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{str(path / MANIFEST_FILE)!r} has format_version={manifest.get('format_version')!r}, "
                f"expected {FORMAT_VERSION}: re-run prepare_tokens"
            )
        tokenizer = Tokenizer.load(path / TOKENIZER_FILE)
        if tokenizer.hash != manifest["tokenizer"]["hash"]:
            raise DataError(f"{str(path / TOKENIZER_FILE)!r} does not match the tokenizer hash in the manifest")
        dtype = np.dtype(manifest["dtype"])
        if dtype != token_dtype(tokenizer.vocab_size):
            raise DataError(f"manifest dtype {dtype} does not match vocab_size={tokenizer.vocab_size}")
        arrays = {}
        for split in SPLITS:
            file = path / f"{split}.bin"
            n = int(manifest["splits"][split]["tokens"])
            size = file.stat().st_size if file.is_file() else None
            if size != n * dtype.itemsize:
                raise DataError(
                    f"{str(file)!r}: size {size} bytes, expected {n * dtype.itemsize} ({n} tokens of {dtype}) "
                    "from the manifest: re-run prepare_tokens"
                )
            arr = np.memmap(file, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype=dtype)
            if check_ids:
                check_token_ids(arr, tokenizer.vocab_size, name=repr(str(file)))
            arrays[split] = arr
        return cls(path=path, train=arrays["train"], val=arrays["val"], tokenizer=tokenizer, manifest=manifest,
                   reused=reused)


def _read_manifest(out_dir: Path) -> dict | None:
    file = out_dir / MANIFEST_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{str(file)!r} is not a readable manifest: {e}") from e


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
    """Appends documents' token arrays to a temporary file, holding the latest one back in memory
    so it can still be moved to the other split at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "wb", buffering=1 << 20)
        self.held: tuple[np.ndarray, int] | None = None
        self.documents = 0
        self.tokens = 0
        self.bytes = 0

    def add(self, ids: np.ndarray, nbytes: int) -> None:
        if self.held is not None:
            self.file.write(self.held[0].tobytes())
        self.held = (ids, nbytes)
        self.documents += 1
        self.tokens += len(ids)
        self.bytes += nbytes

    def pop_held(self) -> tuple[np.ndarray, int]:
        ids, nbytes = self.held
        self.held = None
        self.documents -= 1
        self.tokens -= len(ids)
        self.bytes -= nbytes
        return ids, nbytes

    def close(self) -> None:
        if self.held is not None:
            self.file.write(self.held[0].tobytes())
            self.held = None
        self.file.close()
        fsync_file(self.path)


def _batches(docs: Iterator[tuple[str, int]]) -> Iterator[list[tuple[str, int]]]:
    batch: list[tuple[str, int]] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += doc[1]
        if len(batch) >= _ENCODE_BATCH_DOCS or size >= _ENCODE_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


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
) -> TokenData:
    """Tokenize ``source`` into ``out_dir`` (see the module docstring) and open the result.

    source: a spec or :class:`Source` (see ``aoe.data.sources``). vocab_size: BPE size to train
    (ignored with ``tokenizer_path``, a tokenizer.json file or a directory holding one).
    max_bytes: use only the first ``max_bytes`` UTF-8 bytes of documents (deterministic, whole
    documents in source order). tokenizer_max_bytes: training cap for the tokenizer (default: the
    same documents as ``max_bytes``). num_workers: threads of tokenizers' Rust pool (None: its
    default, all cores; 1: no parallelism; other values only take effect if the pool has not
    started yet in this process). cache_dir: where trained tokenizers are cached (default
    :func:`default_cache_dir`). out_dir None: :func:`default_token_dir`.

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
    with file_lock(out_dir / LOCK_FILE):
        return _prepare_locked(src, out_dir, vocab_size=vocab_size, tokenizer_path=tokenizer_path,
                               val_fraction=val_fraction, max_bytes=max_bytes,
                               tokenizer_max_bytes=tokenizer_max_bytes, num_workers=num_workers, cache_dir=cache_dir)


def _prepare_locked(src: Source, out_dir: Path, *, vocab_size, tokenizer_path, val_fraction, max_bytes,
                    tokenizer_max_bytes, num_workers, cache_dir) -> TokenData:
    fingerprint = src.fingerprint
    train_cap = max_bytes if tokenizer_max_bytes is None else tokenizer_max_bytes
    settings = {
        "tokenizer": "file" if tokenizer_path is not None else "trained",
        "vocab_size": None if tokenizer_path is not None else vocab_size,
        "tokenizer_max_bytes": None if tokenizer_path is not None else train_cap,
        "val_fraction": float(val_fraction),
        "max_bytes": max_bytes,
        "text_field": src.text_field,
        "on_decode_error": src.on_decode_error,
        "split_rule": _SPLIT_RULE,
    }
    try:
        manifest = _read_manifest(out_dir)
    except DataError as e:  # unreadable manifest: rebuild
        log.warning("%s; re-tokenizing", e)
        manifest = None

    t0 = time.perf_counter()
    if tokenizer_path is not None:
        tok = Tokenizer.load(tokenizer_path)
    elif _up_to_date(out_dir, manifest, fingerprint, settings, None):
        tok = Tokenizer.load(out_dir / TOKENIZER_FILE)  # the manifest's own tokenizer, checked below
    else:
        tok = load_or_train_tokenizer(src, cache_dir, vocab_size=vocab_size, max_bytes=train_cap)
    tokenizer_seconds = time.perf_counter() - t0

    if _up_to_date(out_dir, manifest, fingerprint, settings, tok):
        log.info("token files in %s are up to date; not re-tokenizing", out_dir)
        return TokenData.open(out_dir, reused=True)

    t1 = time.perf_counter()
    dtype = token_dtype(tok.vocab_size)
    eos = np.array([tok.eos_id], dtype=dtype)
    stats = DocStats()
    tmp = {s: tmp_sibling(out_dir / f"{s}.bin") for s in SPLITS}
    saved_env = _set_workers(num_workers)
    writers: dict[str, _SplitWriter] = {}
    try:
        for s in SPLITS:
            writers[s] = _SplitWriter(tmp[s])
        index = 0
        for batch in _batches(src.documents_with_size(max_bytes=max_bytes, stats=stats)):
            encoded = tok.encode_batch([text for text, _ in batch])
            for (_, nbytes), ids in zip(batch, encoded):
                arr = np.concatenate([np.asarray(ids, dtype=dtype), eos])
                writers["val" if _is_val(index, val_fraction) else "train"].add(arr, nbytes)
                index += 1
        single_document = index == 1 and val_fraction > 0
        if single_document:
            _split_single_document(writers, val_fraction)
        elif val_fraction > 0:
            for empty, other in (("val", "train"), ("train", "val")):
                if writers[empty].documents == 0 and writers[other].documents >= 2:
                    writers[empty].add(*writers[other].pop_held())
        for w in writers.values():
            w.close()
        # commit: drop the old manifest first, then move the files, then write the new manifest
        (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
        for s in SPLITS:
            os.replace(tmp[s], out_dir / f"{s}.bin")
        tok.save(out_dir)
        tokenize_seconds = time.perf_counter() - t1
        new_manifest = {
            "format_version": FORMAT_VERSION,
            "source": src.describe(),
            "settings": settings,
            "tokenizer": {"hash": tok.hash, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                          "path": None if tokenizer_path is None else str(tokenizer_path)},
            "vocab_size": tok.vocab_size,
            "dtype": dtype.name,
            "splits": {s: {"tokens": writers[s].tokens, "documents": writers[s].documents, "bytes": writers[s].bytes}
                       for s in SPLITS},
            "documents": {"total": stats.documents, "empty": stats.empty, "decode_replaced": stats.decode_replaced,
                          "decode_skipped": stats.decode_skipped, "capped": stats.capped},
            "single_document_split": single_document,
            "timings": {"tokenizer_s": round(tokenizer_seconds, 3), "tokenize_s": round(tokenize_seconds, 3)},
            "created_unix": round(time.time(), 3),
        }
        atomic_write_text(out_dir / MANIFEST_FILE, json.dumps(new_manifest, indent=2))
    finally:
        _restore_env(saved_env)
        for w in writers.values():
            if not w.file.closed:
                w.file.close()
        for path in tmp.values():
            if path.exists():
                path.unlink()
    log.info("tokenized %d documents into %s: %d train / %d val tokens in %.1fs", stats.documents, out_dir,
             new_manifest["splits"]["train"]["tokens"], new_manifest["splits"]["val"]["tokens"], tokenize_seconds)
    return TokenData.open(out_dir)


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


def _split_single_document(writers: dict, val_fraction: float) -> None:
    """Split the only document (held back by its writer) at the token level."""
    owner = writers["train"] if writers["train"].documents else writers["val"]
    ids, nbytes = owner.pop_held()
    cut = min(max(1, round(len(ids) * (1.0 - val_fraction))), len(ids) - 1)
    train_bytes = round(nbytes * cut / len(ids))
    writers["train"].add(ids[:cut], train_bytes)
    writers["val"].add(ids[cut:], nbytes - train_bytes)
