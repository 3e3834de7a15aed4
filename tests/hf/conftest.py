import pytest
import torch

import aoe.hf  # noqa: F401  (registers "aoe" with the Auto classes)

torch.set_num_threads(1)


def tiny_aoe_config(**kw):
    from aoe.hf import AoEConfig

    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64, ffn_type="aoe", intermediate_size=48, num_experts=4,
                num_experts_per_tok=2, d_low=8)
    base.update(kw)
    return AoEConfig(**base)


@pytest.fixture
def tiny_config():
    return tiny_aoe_config

