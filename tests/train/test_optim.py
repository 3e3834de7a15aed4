import math

import pytest
import torch

from aoe.config import ModelConfig, TrainConfig
from aoe.model import Transformer
from aoe.train.optim import build_optimizer, lr_at


def test_schedule_warmup_then_cosine_to_min():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_at(4, cfg) == pytest.approx(1.0)
    assert lr_at(13, cfg) == pytest.approx(0.1)  # the last step reaches min_lr
    mid = 4 + (13 - 4) / 2
    assert lr_at(int(mid), cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * (int(mid) - 4) / 9)))
    lrs = [lr_at(s, cfg) for s in range(4, 14)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_no_warmup():
    cfg = TrainConfig(lr=2.0, warmup_steps=0, max_steps=5, min_lr_ratio=0.0)
    assert lr_at(0, cfg) == pytest.approx(2.0)
    assert lr_at(4, cfg) == pytest.approx(0.0, abs=1e-12)


def test_weight_decay_on_matrices_only_and_tied_once():
    model = Transformer(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, d_ffn=32, n_experts=2,
                                    top_k=1, d_low=4, max_seq_len=16, tie_embeddings=True))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
    assert any(p is model.embed_tokens.weight for p in decay["params"])
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)
