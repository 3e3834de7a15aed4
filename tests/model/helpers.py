"""Small model configs for the model tests."""

from aoe.config import ModelConfig
from aoe.model import Transformer

FFNS = ("dense", "moe", "aoe")


def small_config(ffn: str = "aoe", **overrides) -> ModelConfig:
    kw = dict(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=None, max_seq_len=48, ffn=ffn,
        d_ffn=48, n_experts=4, top_k=2, d_low=8,
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def small_model(ffn: str = "aoe", **overrides) -> Transformer:
    return Transformer(small_config(ffn, **overrides))
