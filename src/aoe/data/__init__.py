"""Data pipeline: corpus sources -> byte-level BPE -> memory-mapped token files -> batches.

Typical use::

    data = prepare_tokens("stdlib", "runs/data", vocab_size=4096, max_bytes=8_000_000)
    sampler = BatchSampler(data.train, batch_size=32, seq_len=256, seed=0)
    x, y = next(sampler)                       # int64 [32, 256] each
    for x, y in iter_eval_batches(data.val, 32, 256, max_batches=10): ...
"""

from aoe.data.chunks import DEFAULT_CHUNK_SIZES, ChunkSizes
from aoe.data.errors import DataError
from aoe.data.loader import BatchSampler, iter_eval_batches, num_eval_batches, num_eval_windows
from aoe.data.sources import DEFAULT_EXTENSIONS, DocStats, Document, Source, iter_documents, open_source
from aoe.data.stats import bits_per_byte, token_counts, unigram_cross_entropy, unigram_entropy
from aoe.data.tokenizer import EOS_TOKEN, Tokenizer, default_cache_dir, load_or_train_tokenizer, train_tokenizer
from aoe.data.tokens import TokenData, check_token_ids, default_token_dir, prepare_tokens, token_dtype

__all__ = [
    "DataError",
    "ChunkSizes",
    "DEFAULT_CHUNK_SIZES",
    "DEFAULT_EXTENSIONS",
    "DocStats",
    "Document",
    "Source",
    "open_source",
    "iter_documents",
    "EOS_TOKEN",
    "Tokenizer",
    "train_tokenizer",
    "load_or_train_tokenizer",
    "default_cache_dir",
    "TokenData",
    "prepare_tokens",
    "default_token_dir",
    "token_dtype",
    "check_token_ids",
    "BatchSampler",
    "iter_eval_batches",
    "num_eval_batches",
    "num_eval_windows",
    "token_counts",
    "unigram_entropy",
    "unigram_cross_entropy",
    "bits_per_byte",
]
