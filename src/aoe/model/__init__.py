"""The decoder-only language model: ``Transformer`` (dense, MoE or AoE FFNs), its KV cache and sampling."""

from aoe.model.attention import Attention, KVCache, RotaryEmbedding
from aoe.model.generate import generate, sample_next
from aoe.model.transformer import Block, ModelOutput, RMSNorm, Transformer, build_ffn, ffn_forward_flops

__all__ = [
    "Transformer", "ModelOutput", "generate", "KVCache",
    "Attention", "Block", "RMSNorm", "RotaryEmbedding", "build_ffn", "ffn_forward_flops", "sample_next",
]
