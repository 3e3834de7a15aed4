"""Byte-level BPE tokenizer: train (with an on-disk cache), load, save, and a small wrapper.

The trained tokenizer is GPT-2 style: the GPT-2 pre-tokenization regex over bytes mapped to
printable characters (every byte is in the base alphabet, so any string round-trips exactly
and there is no unknown token), BPE merges learned with ``tokenizers``' ``BpeTrainer``, and
one special token ``<|endoftext|>`` (id 0) used as document separator / EOS.

Text that happens to contain the literal string ``<|endoftext|>`` is encoded as ordinary bytes
(``encode_special_tokens``), so the only EOS ids in a token stream are the separators added by
the pipeline.

Training streams: long documents are fed to the trainer in pieces cut where the pre-tokenizer
cuts anyway (``aoe.data.chunks``), so the word counts, and hence the merges, are those of the
whole documents, in memory bounded by the piece size rather than the document size.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from aoe.utils.files import atomic_write_text
from aoe.data.chunks import DEFAULT_CHUNK_SIZES, ChunkSizes, ForcedCuts, split_pieces
from aoe.data.errors import DataError
from aoe.data.sources import READER_VERSION, DocStats, Document, Source, check_max_bytes

__all__ = [
    "EOS_TOKEN",
    "MIN_VOCAB_SIZE",
    "Tokenizer",
    "cuts_keep_ids",
    "train_tokenizer",
    "load_or_train_tokenizer",
    "tokenizer_cache_key",
    "default_cache_dir",
]

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
MIN_VOCAB_SIZE = 257  # 256 byte symbols + <|endoftext|>
TOKENIZER_FILE = "tokenizer.json"
_TRAINER_VERSION = "bytelevel-bpe-v1"


def default_cache_dir() -> Path:
    """``$AOE_CACHE`` (as in ``aoe.config``), else ``$AOE_CACHE_DIR``, else ``~/.cache/aoe``."""
    path = os.environ.get("AOE_CACHE") or os.environ.get("AOE_CACHE_DIR") or "~/.cache/aoe"
    return Path(path).expanduser()


class Tokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer``.

    encode(str) -> list[int]; decode(list[int]) -> str; ``vocab_size`` (int, includes special
    tokens; every id is in [0, vocab_size)); ``eos_id`` (int); ``hash`` (sha256 hex of the
    canonical tokenizer.json text, the exact bytes :meth:`save` writes); ``piecewise`` (bool:
    encoding the pieces of ``aoe.data.chunks.split_pieces`` gives the ids of the whole text, see
    :func:`cuts_keep_ids`).
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, eos_token: str = EOS_TOKEN) -> None:
        eos_id = backend.token_to_id(eos_token)
        if eos_id is None:
            raise DataError(f"tokenizer has no {eos_token!r} token (needed as document separator / EOS)")
        # work on a copy rebuilt from the canonical JSON, so the hash describes exactly this object
        self._json = backend.to_str()
        self._tok = tokenizers.Tokenizer.from_str(self._json)
        if hasattr(self._tok, "encode_special_tokens"):
            self._tok.encode_special_tokens = True
        self.eos_token = eos_token
        self.eos_id: int = int(eos_id)
        self.hash: str = hashlib.sha256(self._json.encode("utf-8")).hexdigest()
        self.vocab_size: int = int(self._tok.get_vocab_size(with_added_tokens=True))

    @functools.cached_property
    def piecewise(self) -> bool:
        """Whether text cut at ``aoe.data.chunks.SAFE_CUT`` encodes to the ids of the whole text."""
        return cuts_keep_ids(json.loads(self._json), getattr(self._tok, "encode_special_tokens", False))

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no EOS added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no EOS added); parallel over texts in Rust threads."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (EOS ids are rendered as ``<|endoftext|>``)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/tokenizer.json`` atomically; returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(directory / TOKENIZER_FILE, self._json)

    @classmethod
    def from_str(cls, json_text: str, *, eos_token: str = EOS_TOKEN) -> "Tokenizer":
        try:
            backend = tokenizers.Tokenizer.from_str(json_text)
        except Exception as e:  # tokenizers raises a plain Exception on bad JSON
            raise DataError(f"not a valid tokenizer.json: {e}") from e
        return cls(backend, eos_token=eos_token)

    @classmethod
    def load(cls, path: str | os.PathLike, *, eos_token: str = EOS_TOKEN) -> "Tokenizer":
        """Load a ``tokenizer.json`` file, or a directory containing one."""
        path = Path(path).expanduser()
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            where = f"directory {str(path)!r} has no {TOKENIZER_FILE}" if path.is_dir() else f"{str(path)!r} not found"
            raise DataError(f"cannot load tokenizer: {where}")
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read tokenizer file {str(file)!r}: {e}") from e
        try:
            return cls.from_str(text, eos_token=eos_token)
        except DataError as e:
            raise DataError(f"{str(file)!r}: {e}") from e

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, hash={self.hash[:12]})"


def cuts_keep_ids(config: dict, encode_special_tokens: bool) -> bool:
    """Whether a tokenizer (``config``: its parsed tokenizer.json) encodes text cut at
    ``aoe.data.chunks.SAFE_CUT`` into the same ids as the whole text: no normalizer, the GPT-2
    byte-level pre-tokenizer without a prefix space (the one those cuts are proven for), no
    truncation or padding, and no added token that is matched in text (all are special tokens
    and special tokens are encoded as text). The model (BPE or other) works on each pre-token
    alone, so any model qualifies."""
    pre = config.get("pre_tokenizer") or {}
    return (
        config.get("normalizer") is None
        and pre.get("type") == "ByteLevel" and pre.get("use_regex") is True and pre.get("add_prefix_space") is False
        and config.get("truncation") is None and config.get("padding") is None
        and bool(encode_special_tokens) and all(t.get("special") for t in config.get("added_tokens") or [])
    )


def check_vocab_size(vocab_size: int) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (256 bytes + EOS), got {vocab_size!r}")
    return vocab_size


def train_tokenizer(documents: Iterable[str], vocab_size: int = 4096, *, min_frequency: int = 2,
                    chunk_sizes: ChunkSizes = DEFAULT_CHUNK_SIZES) -> Tokenizer:
    """Train a byte-level BPE on ``documents``.

    The result has at most ``vocab_size`` tokens (fewer when the corpus runs out of pairs seen at
    least ``min_frequency`` times); ``<|endoftext|>`` is id 0, the 256 byte symbols follow.
    Documents longer than ``chunk_sizes.max_piece_chars`` are fed in pieces (same result).
    """
    forced = ForcedCuts(chunk_sizes)
    pieces = (piece for i, doc in enumerate(documents)
              for piece in split_pieces((doc,), chunk_sizes, forced.callback(f"document {i}")))
    return _train_pieces(pieces, vocab_size, min_frequency)


def document_pieces(docs: Iterable[Document], chunk_sizes: ChunkSizes, forced: ForcedCuts) -> Iterator[str]:
    """The text of every document, as the pieces of :func:`aoe.data.chunks.split_pieces`."""
    for doc in docs:
        yield from split_pieces(doc.chunks(), chunk_sizes, forced.callback(doc.name))


def _train_pieces(pieces: Iterable[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    """Train the byte-level BPE of :func:`train_tokenizer` on texts that are fed as they are."""
    check_vocab_size(vocab_size)
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(pieces, trainer=trainer)
    return Tokenizer(backend)


def tokenizer_cache_key(source: Source, vocab_size: int, max_bytes: int | None, min_frequency: int = 2) -> str:
    """Cache key of a trained tokenizer: sha256 over the source fingerprint, the decoding
    settings, vocab_size, the training byte cap, the trainer version and the source reader's
    version (first 24 hex)."""
    payload = {
        "trainer": _TRAINER_VERSION,
        "reader": READER_VERSION,
        "fingerprint": source.fingerprint,
        "text_field": source.text_field,
        "on_decode_error": source.on_decode_error,
        "vocab_size": vocab_size,
        "max_bytes": max_bytes,
        "min_frequency": min_frequency,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def load_or_train_tokenizer(
    source: Source,
    cache_dir: str | os.PathLike | None = None,
    *,
    vocab_size: int = 4096,
    max_bytes: int | None = None,
    min_frequency: int = 2,
    chunk_sizes: ChunkSizes = DEFAULT_CHUNK_SIZES,
) -> Tokenizer:
    """The tokenizer trained on ``source`` (its first ``max_bytes`` bytes of documents, see
    :meth:`Source.documents`), from ``cache_dir/tokenizers/<key>/tokenizer.json`` when cached,
    else trained and cached there. ``cache_dir`` defaults to :func:`default_cache_dir`.
    The source is streamed (``chunk_sizes``): memory does not grow with the corpus or document
    size, only with the number of distinct pre-tokens (words) the trainer counts."""
    check_vocab_size(vocab_size)
    check_max_bytes(max_bytes)
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    entry = cache_dir / "tokenizers" / tokenizer_cache_key(source, vocab_size, max_bytes, min_frequency)
    if (entry / TOKENIZER_FILE).is_file():
        try:
            return Tokenizer.load(entry)
        except DataError as e:  # a corrupt cache entry is rebuilt, not fatal
            log.warning("ignoring unreadable cached tokenizer: %s", e)
    stats = DocStats()
    forced = ForcedCuts(chunk_sizes)
    t0 = time.perf_counter()
    docs = source.stream(max_bytes=max_bytes, stats=stats, read_bytes=chunk_sizes.read_bytes)
    tok = _train_pieces(document_pieces(docs, chunk_sizes, forced), vocab_size, min_frequency)
    seconds = time.perf_counter() - t0
    log.info("trained tokenizer (vocab %d) on %d documents, %.1f MB in %.1fs", tok.vocab_size, stats.documents,
             stats.bytes / 1e6, seconds)
    entry.mkdir(parents=True, exist_ok=True)
    meta = {"source": source.describe(), "vocab_size": tok.vocab_size, "requested_vocab_size": vocab_size,
            "max_bytes": max_bytes, "min_frequency": min_frequency, "hash": tok.hash, "train_stats": stats.as_dict(),
            "forced_cuts": forced.count, "train_seconds": round(seconds, 3)}
    atomic_write_text(entry / "meta.json", json.dumps(meta, indent=2))
    tok.save(entry)  # tokenizer.json last: its presence marks a complete entry
    return tok
