"""The auxiliary terms a layer adds to its loss besides L_aux: Ent_conf (entropy_loss_coef, any
rule) and MoE's ERC loss (erc_loss_coef), their per-layer metrics and their FLOPs."""

import pytest
import torch

from aoe.config import ConfigError, RunConfig, load_config
from aoe.model import Transformer
from aoe.nn import AoE, MoE
from aoe.nn.erc import draw_noise, erc_flops, erc_loss_reference, noise_bounds
from aoe.train.metrics import RoutingStats


def _x(T=24, D=16, seed=0):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layer_cls", [MoE, AoE])
@pytest.mark.parametrize("selection", ["top_k", "top_p", "expert_choice"])
def test_entropy_loss_is_the_weighted_mean_entropy_of_the_selection_softmax(layer_cls, selection):
    torch.manual_seed(0)
    kw = dict(d_ffn=24, selection=selection, top_p=0.6 if selection == "top_p" else None)
    layer = layer_cls(16, 4, 4, 2, entropy_loss_coef=1e-2, **kw) if layer_cls is AoE else layer_cls(16, 24, 4, 2, **{
        k: v for k, v in kw.items() if k != "d_ffn"}, entropy_loss_coef=1e-2)
    x = _x()
    layer(x)
    p = layer.last_routing.probs.double()
    expected = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(layer.aux_loss.double(), 1e-2 * expected, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(layer.last_loss_terms["entropy"].double(), expected, rtol=1e-5, atol=1e-9)
    layer.aux_loss.backward()  # the term has a gradient into the scores' parameters
    scored = layer.router if layer_cls is MoE else layer.w_down
    assert scored.grad is not None and float(scored.grad.abs().sum()) > 0


def test_erc_loss_is_added_in_training_only_with_the_layers_own_weights():
    torch.manual_seed(0)
    layer = MoE(16, 24, 4, 2, erc_loss_coef=0.5, erc_alpha=0.8, aux_loss_coef=0.01)
    x = _x()
    torch.manual_seed(7)
    layer.train()(x)
    with_erc = layer.aux_loss
    torch.manual_seed(7)  # the forward's draw of the noise (its only use of the RNG)
    noise = draw_noise(layer.router, noise_bounds(layer.router))
    ref = erc_loss_reference(layer.router.detach(), layer.w_gate.detach(), noise, alpha=0.8)
    torch.testing.assert_close(layer.last_loss_terms["erc"].double(), ref, rtol=1e-5, atol=1e-8)
    layer.eval()(x)
    assert "erc" not in layer.last_loss_terms
    torch.testing.assert_close(with_erc - layer.aux_loss, 0.5 * ref.float(), rtol=1e-4, atol=1e-7)


def test_erc_loss_of_a_factorized_gate_uses_the_product():
    torch.manual_seed(1)
    layer = MoE(16, 24, 4, 2, gate_rank=6, erc_loss_coef=1.0)
    delta = torch.ones(16, 4)
    got = layer.erc_terms(delta).loss
    ref = erc_loss_reference(layer.router.detach(), (layer.w_down @ layer.w_up).detach(), delta)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-8)


def test_bad_erc_options_are_refused_with_the_key():
    with pytest.raises(ValueError, match="router_hidden"):
        MoE(16, 24, 4, 2, router_hidden=8, erc_loss_coef=1.0)
    with pytest.raises(ValueError, match="erc_alpha"):
        MoE(16, 24, 4, 2, erc_alpha=0.0)
    with pytest.raises(ConfigError, match="model.erc_loss_coef"):
        load_config(None, ["model.ffn=aoe", "model.erc_loss_coef=1.0"])
    with pytest.raises(ConfigError, match="model.erc_loss_coef"):
        load_config(None, ["model.ffn=moe", "model.moe_router_hidden=8", "model.erc_loss_coef=1.0"])
    with pytest.raises(ConfigError, match="train.expert_parallel"):
        load_config(None, ["model.ffn=moe", "model.erc_loss_coef=1.0", "train.expert_parallel=2"])
    with pytest.raises(ConfigError, match="model.entropy_loss_coef"):
        load_config(None, ["model.entropy_loss_coef=-1"])


def _model(*overrides):
    cfg = load_config("tiny", ["model.n_layers=2", "model.vocab_size=4096", *overrides])
    return Transformer(cfg.model)


def test_per_layer_metrics_log_each_term_that_is_on():
    model = _model("model.ffn=moe", "model.erc_loss_coef=1.0", "model.entropy_loss_coef=1e-4").train()
    stats = RoutingStats(model)
    idx = torch.randint(0, 4096, (2, 16))
    for _ in range(2):
        model(idx, targets=idx)
        stats.collect()
    layers = stats.summary()
    assert [sorted(k for k in l if k in ("entropy_loss", "erc_loss", "erc_eps")) for l in layers] == [
        ["entropy_loss", "erc_eps", "erc_loss"]] * 2
    assert all(l["erc_eps"] > 0 and l["erc_loss"] >= 0 for l in layers)
    assert layers[0]["entropy_loss"] == pytest.approx(layers[0]["ent_conf"], rel=1e-5)
    plain = _model("model.ffn=moe").train()
    plain_stats = RoutingStats(plain)
    plain(idx, targets=idx)
    plain_stats.collect()
    assert not any(k in l for l in plain_stats.summary() for k in ("entropy_loss", "erc_loss", "erc_eps"))


def test_step_flops_count_the_erc_loss_per_layer_per_step():
    model = _model("model.ffn=moe", "model.erc_loss_coef=1.0")
    m = model.config
    assert model.step_flops() == 2 * 3 * erc_flops(m.n_experts, m.d_model, m.d_ffn)
    assert _model("model.ffn=moe").step_flops() == 0 and _model("model.ffn=aoe").step_flops() == 0
    assert isinstance(RunConfig().model.erc_alpha, float)


def test_erc_flops_are_counted_once_per_micro_batch_on_every_rank():
    from aoe.train.build import flops_per_token

    model = _model("model.ffn=moe", "model.erc_loss_coef=1.0")
    base, erc = model.flops_per_token(128), model.step_flops()
    one = load_config("tiny", ["train.batch_size=16", "train.seq_len=128"]).train
    four = load_config("tiny", ["train.batch_size=16", "train.seq_len=128", "train.micro_batch_size=4"]).train
    assert flops_per_token(model, one) == pytest.approx(base + erc / (16 * 128))
    assert flops_per_token(model, four) == pytest.approx(base + 4 * erc / (16 * 128))  # 4 micro-batches
    assert flops_per_token(model, four, world_size=2) == pytest.approx(base + 4 * erc / (16 * 128))  # 2 x 2
