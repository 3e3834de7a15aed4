"""The prepared token directory's format and its reader: ``train.bin`` / ``val.bin`` (flat token
ids, uint16 or uint32 by the vocabulary), ``tokenizer.json`` and ``manifest.json`` (layout and
split rule: ``aoe.data.tokens``, which writes them); ``TokenData.open`` checks a directory (format
version, tokenizer hash, file sizes, every id below the vocabulary) and memory-maps its splits.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aoe.data.errors import DataError
from aoe.data.tokenizer import TOKENIZER_FILE, Tokenizer

__all__ = ["FORMAT_VERSION", "SPLITS", "MANIFEST_FILE", "TokenData", "token_dtype", "check_token_ids"]

FORMAT_VERSION = 1
SPLITS = ("train", "val")
MANIFEST_FILE = "manifest.json"
_CHECK_CHUNK = 1 << 24
_IO_TOKENS = 1 << 22  # tokens per read when token files are copied or checked


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65535), else uint32."""
    if vocab_size <= 0:
        raise DataError(f"vocab_size must be positive, got {vocab_size!r}")
    if vocab_size <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if vocab_size <= np.iinfo(np.uint32).max:
        return np.dtype(np.uint32)
    raise DataError(f"vocab_size={vocab_size} does not fit in uint32 token files")


def check_token_ids(tokens: np.ndarray, vocab_size: int, name: str = "tokens") -> None:
    """Raise DataError if any id in the 1-D array ``tokens`` is >= vocab_size (chunked max, so a
    memmap is scanned without loading it whole)."""
    for start in range(0, len(tokens), _CHECK_CHUNK):
        _check_chunk(np.asarray(tokens[start:start + _CHECK_CHUNK]), start, vocab_size, name)


def _check_file_ids(file: Path, dtype: np.dtype, n: int, vocab_size: int) -> None:
    """:func:`check_token_ids` on the ``n`` tokens of a token file, read in chunks with ordinary
    reads: unlike a scan through a memory map, this leaves none of the file resident in the process."""
    with open(file, "rb") as f:
        for start in range(0, n, _IO_TOKENS):
            chunk = np.fromfile(f, dtype=dtype, count=min(_IO_TOKENS, n - start))
            _check_chunk(chunk, start, vocab_size, repr(str(file)))


def _check_chunk(chunk: np.ndarray, start: int, vocab_size: int, name: str) -> None:
    """Raise DataError naming the first id >= vocab_size in ``chunk`` (whose first token is at ``start``)."""
    if len(chunk) and int(chunk.max()) >= vocab_size:
        i = int(np.argmax(chunk >= vocab_size))
        raise DataError(
            f"{name}: token id {int(chunk[i])} at position {start + i} is out of range for vocab_size={vocab_size} "
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
            if check_ids:
                _check_file_ids(file, dtype, n, tokenizer.vocab_size)
            arrays[split] = np.memmap(file, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype=dtype)
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
