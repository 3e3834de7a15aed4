import math

import pytest
import torch

from aoe.config import ModelConfig, TrainConfig
from aoe.model import Transformer
from aoe.train.optim import build_optimizer, lr_at, set_lr


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


def _aoe_model():
    return Transformer(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, d_ffn=32, n_experts=2,
                                   top_k=1, d_low=4, max_seq_len=16))


def test_factor_group_only_when_its_settings_differ():
    model = _aoe_model()
    assert len(build_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups) == 2
    assert len(build_optimizer(model, TrainConfig(weight_decay=0.1, factor_weight_decay=0.1)).param_groups) == 2
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1, factor_weight_decay=0.0, factor_lr_scale=3.0))
    decay, no_decay, factors = opt.param_groups
    ffn = model.layers[0].ffn
    assert [p for p in factors["params"]] == [ffn.w_down, ffn.w_up]
    assert factors["weight_decay"] == 0.0 and factors["lr_scale"] == 3.0
    assert all(p is not ffn.w_down and p is not ffn.w_up for p in decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
    set_lr(opt, 0.01)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.01, 0.03])


def test_factor_settings_step_like_a_separate_adamw():
    """One step with factor_lr_scale / factor_weight_decay moves w_down and w_up exactly as an AdamW
    of lr * scale and that decay would, and every other matrix as the plain settings would."""
    model = _aoe_model()
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, factor_weight_decay=0.5, factor_lr_scale=4.0)
    opt = build_optimizer(model, cfg, fused=False)
    set_lr(opt, cfg.lr)
    ffn = model.layers[0].ffn
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for name, lr, wd in (("layers.0.ffn.w_down", 4e-2, 0.5), ("layers.0.ffn.w_in", 1e-2, 0.1)):
        p = torch.nn.Parameter(before[name].clone())
        p.grad = grads[name]
        ref = torch.optim.AdamW([p], lr=lr, weight_decay=wd, betas=(0.9, 0.95), foreach=False)
        ref.step()
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), p.detach(), rtol=0, atol=1e-7)
    assert ffn.w_up.grad is not None


def test_optimizer_state_without_lr_scale_still_loads():
    """Optimizer states saved before lr_scale existed (two groups, no key) load and take the lr."""
    model = _aoe_model()
    opt = build_optimizer(model, TrainConfig())
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["lr_scale"]
    fresh = build_optimizer(model, TrainConfig())
    fresh.load_state_dict(state)
    set_lr(fresh, 0.5)
    assert [g["lr"] for g in fresh.param_groups] == [0.5, 0.5]
