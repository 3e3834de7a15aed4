"""Shared experts (``aoe.nn.shared``): the module against its expert-by-expert fp64 reference, the
sparse layers with shared experts = routed + shared, their parameter and FLOP counts, the
``model:`` keys that turn them on."""

import pytest
import torch
import torch.nn.functional as F

from aoe import AoE, MoE
from aoe.config import ConfigError, ModelConfig
from aoe.nn.configs import AoEFFNConfig, MoEFFNConfig
from aoe.nn.reference import reference_forward
from aoe.nn.shared import SharedExperts, reference_shared_experts

from .helpers import grads_of, rel_err

TOL = 1e-10


def check_grads(module, x, out, ref):
    grad_out = torch.randn_like(out)
    fast, slow = grads_of(module, x, out, grad_out), grads_of(module, x, ref, grad_out)
    for name in fast:
        assert rel_err(fast[name], slow[name]) <= TOL, name
        assert fast[name].abs().sum() > 0, name  # every parameter takes part


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("gate", [False, True])
def test_shared_experts_match_the_reference(n, gate):
    torch.manual_seed(0)
    layer = SharedExperts(12, 8, n, gate=gate, init_std=0.3).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    out, ref = layer(x), reference_shared_experts(layer, x)
    assert out.shape == x.shape and rel_err(out, ref) <= TOL
    check_grads(layer, x, out, ref)


def test_n_experts_are_one_swiglu_of_n_times_the_width():
    """Expert j is columns j*F..(j+1)*F: the output is the sum of N independent SwiGLUs."""
    layer = SharedExperts(6, 4, 2, init_std=0.5).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    experts = [(F.silu(x @ layer.w_gate[:, c]) * (x @ layer.w_in[:, c])) @ layer.w_out[c] for c in (slice(0, 4), slice(4, 8))]
    assert rel_err(layer(x), experts[0] + experts[1]) <= TOL


def test_the_gate_scales_each_token_by_a_sigmoid():
    layer = SharedExperts(6, 4, gate=True, init_std=0.5).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        ungated = SharedExperts(6, 4).double()
        ungated.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "gate"})
        layer.gate.zero_()  # sigmoid(0) = 1/2
    assert rel_err(layer(x), 0.5 * ungated(x)) <= TOL


def test_shared_experts_counts_and_names():
    D, F_, n = 16, 24, 3
    plain, gated = SharedExperts(D, F_, n), SharedExperts(D, F_, n, gate=True)
    assert [name for name, _ in gated.named_parameters()] == ["w_gate", "w_in", "w_out", "gate"]
    assert (gated.w_gate.shape, gated.w_in.shape, gated.w_out.shape, gated.gate.shape) == (
        (D, n * F_), (D, n * F_), (n * F_, D), (D, 1))
    assert plain.num_params() == plain.num_active_params() == 3 * D * n * F_
    assert gated.num_params() == 3 * D * n * F_ + D
    assert plain.forward_flops() == 2 * 3 * D * n * F_ and gated.forward_flops() == 2 * 3 * D * n * F_ + 2 * D
    for bad in (dict(d_shared=0), dict(n_shared=0), dict(d_model=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SharedExperts(**{"d_model": D, "d_shared": F_, "n_shared": 1, **bad})


def test_reset_parameters_uses_out_std_for_w_out():
    torch.manual_seed(0)
    layer = SharedExperts(256, 256, gate=True)
    layer.reset_parameters(std=0.1, out_std=0.001)
    assert abs(layer.w_gate.std().item() - 0.1) < 0.01 and abs(layer.gate.std().item() - 0.1) < 0.02
    assert abs(layer.w_out.std().item() - 0.001) < 1e-4


# ---------------------------------------------------------------------------------------------
# The sparse layers with shared experts
# ---------------------------------------------------------------------------------------------
def build(kind, **shared):
    if kind == "moe":
        return MoE(16, 24, 4, 2, grouped_mm="loop", init_std=0.2, **shared).double()
    return AoE(16, 4, 4, 2, d_wide=24, grouped_mm="loop", init_std=0.2, **shared).double()


@pytest.mark.parametrize("kind", ["moe", "aoe"])
@pytest.mark.parametrize("n,d_shared,gate", [(1, None, False), (2, 8, True)])
def test_layer_output_is_routed_plus_shared(kind, n, d_shared, gate):
    torch.manual_seed(0)
    layer = build(kind, n_shared_experts=n, d_shared=d_shared, shared_gate=gate)
    assert layer.shared.d_shared == (24 if d_shared is None else d_shared) and layer.shared.gated is gate
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    out, aux = layer.forward_with_aux(x)
    routed, _ = reference_forward(layer, x)
    ref = routed + reference_shared_experts(layer.shared, x)
    assert rel_err(out, ref) <= TOL
    check_grads(layer, x, out, ref)
    # the same layer without its shared experts gives the routed part alone, with the same routing
    plain = build(kind)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shared.")})
    assert rel_err(out - plain(x), layer.shared(x)) <= TOL
    assert torch.equal(plain.last_routing.expert_indices, layer.last_routing.expert_indices)
    assert [k for k in layer.state_dict() if k.startswith("shared.")] == [
        "shared.w_gate", "shared.w_in", "shared.w_out", *(["shared.gate"] if gate else [])]


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_layer_counts_include_the_shared_experts(kind):
    D, E, k, W, n, F_ = 16, 4, 2, 24, 2, 8
    plain, layer = build(kind), build(kind, n_shared_experts=n, d_shared=F_, shared_gate=True)
    shared_params = 3 * D * n * F_ + D
    assert sum(p.numel() for p in layer.parameters()) == sum(p.numel() for p in plain.parameters()) + shared_params
    assert layer.num_active_params() == plain.num_active_params() + shared_params  # every token uses them
    assert layer.forward_flops() == plain.forward_flops() + 2 * 3 * D * n * F_ + 2 * D
    cfg = (MoEFFNConfig(D, W, E, k, n_shared_experts=n, d_shared=F_, shared_gate=True) if kind == "moe" else
           AoEFFNConfig(D, 4, E, k, W, n_shared_experts=n, d_shared=F_, shared_gate=True))
    assert (cfg.num_params(), cfg.num_active_params(), cfg.flops_per_token()) == (
        sum(p.numel() for p in layer.parameters()), layer.num_active_params(), layer.forward_flops())


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_layer_reset_parameters_initializes_the_shared_experts(kind):
    layer = build(kind, n_shared_experts=1, d_shared=64, shared_gate=True).float()
    with torch.no_grad():
        for p in layer.shared.parameters():
            p.fill_(7.0)
    layer.reset_parameters(std=0.05, out_std=0.01)
    assert abs(layer.shared.w_in.std().item() - 0.05) < 0.01 and abs(layer.shared.w_out.std().item() - 0.01) < 0.002
    assert (layer.shared.gate != 7.0).all()


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_shared_options_are_checked(kind):
    with pytest.raises(ValueError, match="n_shared_experts=-1"):
        build(kind, n_shared_experts=-1)
    with pytest.raises(ValueError, match="need n_shared_experts >= 1"):
        build(kind, d_shared=8)
    with pytest.raises(ValueError, match="need n_shared_experts >= 1"):
        build(kind, shared_gate=True)
    with pytest.raises(ValueError, match="d_shared=0"):
        build(kind, n_shared_experts=1, d_shared=0)
    assert build(kind).shared is None and "shared" not in dict(build(kind).named_modules())


# ---------------------------------------------------------------------------------------------
# The model: config keys, counts
# ---------------------------------------------------------------------------------------------
def tiny(**kw):
    base = dict(vocab_size=50, d_model=32, n_heads=4, n_layers=3, d_ffn=24, n_experts=4, top_k=2, d_low=8, d_wide=24)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("ffn", ["moe", "aoe"])
def test_model_keys_give_every_sparse_layer_shared_experts(ffn):
    from aoe.model.transformer import Transformer

    cfg = tiny(ffn=ffn, n_shared_experts=2, d_shared=40, shared_expert_gate=True, dense_layers=[0])
    model, plain = Transformer(cfg), Transformer(tiny(ffn=ffn, dense_layers=[0]))
    assert not hasattr(model.layers[0].ffn, "shared")  # a dense layer has none
    for i in (1, 2):
        shared = model.layers[i].ffn.shared
        assert (shared.n_shared, shared.d_shared, shared.gated) == (2, 40, True)
    names = [n for n, _ in model.named_parameters() if ".shared." in n]
    assert names == [f"layers.{i}.ffn.shared.{p}" for i in (1, 2) for p in ("w_gate", "w_in", "w_out", "gate")]
    per_layer = 3 * 32 * 80 + 32
    assert model.num_params() == plain.num_params() + 2 * per_layer  # counted once
    assert model.num_params(active=True) == plain.num_params(active=True) + 2 * per_layer
    assert model.flops_per_token(16) == plain.flops_per_token(16) + 3 * 2 * (2 * 3 * 32 * 80 + 2 * 32)
    assert model(torch.randint(0, 50, (2, 6))).logits.shape == (2, 6, 50)


@pytest.mark.parametrize("kw,message", [
    (dict(d_shared=8), "model.d_shared=8 applies with model.n_shared_experts >= 1 only"),
    (dict(shared_expert_gate=True), "model.shared_expert_gate=True applies with model.n_shared_experts >= 1"),
    (dict(ffn="dense", n_shared_experts=1), "model.n_shared_experts=1 applies to sparse FFNs"),
    (dict(n_shared_experts=-1), "model.n_shared_experts=-1 must be >= 0"),
    (dict(n_shared_experts=1, d_shared=0), "model.d_shared=0 must be > 0"),
])
def test_model_keys_are_checked(kw, message):
    with pytest.raises(ConfigError, match=message) as e:
        tiny(**kw)
    assert "\n" not in str(e.value)


def test_qkv_biases_start_at_zero_and_count():
    from aoe.model.transformer import Transformer

    torch.manual_seed(0)
    model, plain = Transformer(tiny(attn_qkv_bias=True)), Transformer(tiny())
    attn = model.layers[0].attn
    assert attn.o_proj.bias is None
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.bias is not None and torch.equal(proj.bias, torch.zeros_like(proj.bias))
    assert model.num_params() == plain.num_params() + 3 * 3 * 32  # 3 layers, n_kv_heads = n_heads
    x = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        before = model(x).logits
        attn.v_proj.bias.fill_(0.5)
    assert not torch.allclose(model(x).logits, before)  # the biases take part
