"""Top-p and expert choice against the per-token / per-expert reference, outputs and gradients in
fp64 (<= 1e-10), for MoE and AoE, with the edge cases of each rule; their token masks, inference
fallback, balancing and counts."""

import math

import pytest
import torch

from aoe import AoE, MoE
from aoe.nn.reference import reference_forward

from .helpers import grads_of, rel_err

TOL = 1e-10
D, E, K, W, L = 12, 6, 2, 16, 4


def build(kind, **kw):
    kw.setdefault("grouped_mm", "loop")
    if kind == "moe":
        return MoE(D, W, E, K, **kw).double().train()
    return AoE(D, L, E, K, d_wide=W, **kw).double().train()


def check_against_reference(layer, lead):
    x = torch.randn(*lead, D, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    ref, routing = reference_forward(layer, x)
    assert out.shape == x.shape
    assert rel_err(out, ref) <= TOL
    info = layer.last_routing
    assert rel_err(info.probs, routing["probs"]) <= TOL
    counts = info.experts_per_token_counts().tolist()
    for t, (idx, w) in enumerate(zip(routing["indices"], routing["weights"])):
        n = counts[t]
        assert n == len(idx)
        assert info.expert_indices[t, :n].tolist() == idx.tolist()
        assert (info.expert_indices[t, n:] == -1).all() and (info.gate_weights[t, n:] == 0).all()
        if n:
            assert rel_err(info.gate_weights[t, :n], w) <= TOL
    assert int(info.tokens_per_expert.sum()) == sum(counts)
    grad_out = torch.randn_like(out)
    fast = grads_of(layer, x, out, grad_out)
    slow = grads_of(layer, x, ref, grad_out)
    for name in fast:  # a gradient that is 0 in exact arithmetic (one renormalized expert) is rounding noise
        assert (fast[name] - slow[name]).norm() <= TOL * max(float(slow[name].norm()), 1e-6), name
    return info


TOP_P_CASES = [
    dict(),                                  # p = k / E: never more than k experts
    dict(top_p=0.5),
    dict(top_p=1.0),                         # p = 1: max_k experts
    dict(top_p=1e-9),                        # p tiny: min_k experts
    dict(top_p=0.6, min_k=2, max_k=4),
    dict(top_p=1.0, max_k=3),
]


@pytest.mark.parametrize("kind", ["moe", "aoe"])
@pytest.mark.parametrize("case", TOP_P_CASES, ids=str)
@pytest.mark.parametrize("renormalize", [False, True])
def test_top_p_matches_reference(kind, case, renormalize):
    layer = build(kind, selection="top_p", renormalize=renormalize, **case)
    info = check_against_reference(layer, (3, 7))
    n = info.experts_per_token_counts()
    assert int(n.min()) >= layer.min_k and int(n.max()) <= layer.max_k
    if case.get("top_p") == 1.0:
        assert (n == layer.max_k).all()
    if case.get("top_p") == 1e-9:
        assert (n == layer.min_k).all()
    if not case:
        assert int(n.max()) <= K


EC_CASES = [
    dict(),                                 # capacity factor 1: C = n k / E
    dict(capacity_factor=0.7),
    dict(capacity_factor=100.0),            # capacity larger than the tokens: every expert takes all
    dict(capacity_factor=1e-6),             # C = 1: most tokens unchosen
]


@pytest.mark.parametrize("kind", ["moe", "aoe"])
@pytest.mark.parametrize("case", EC_CASES, ids=str)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("lead", [(3, 7), (9,), (2, 1, 5)], ids=str)
def test_expert_choice_matches_reference(kind, case, renormalize, lead):
    layer = build(kind, selection="expert_choice", renormalize=renormalize, **case)
    info = check_against_reference(layer, lead)
    n = lead[-1]
    c = min(n, math.ceil(layer.capacity_factor * n * K / E - 1e-9))
    assert info.tokens_per_expert.tolist() == [c * (math.prod(lead) // n)] * E  # balanced by construction
    if case.get("capacity_factor") == 100.0:
        assert (info.experts_per_token_counts() == E).all()
    assert not info.causal


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_expert_choice_unchosen_tokens_pass_through_the_residual_only(kind):
    """A token no expert took gets an exactly-zero output and no gradient through the experts."""
    layer = build(kind, selection="expert_choice", capacity_factor=1e-6)  # C = 1: at most E of 12 tokens
    x = torch.randn(12, D, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    unchosen = layer.last_routing.experts_per_token_counts() == 0
    assert int(unchosen.sum()) >= 12 - E
    assert torch.equal(out[unchosen], torch.zeros_like(out[unchosen]))
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad[unchosen], torch.zeros_like(grad[unchosen]))


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_expert_choice_with_no_token_to_choose(kind):
    """Every token picked by no expert: C >= 1 for any sequence with a token, so this is a batch with
    no real token (all padding); the output is exactly 0 and nothing is routed."""
    layer = build(kind, selection="expert_choice")
    x = torch.randn(4, 5, D, dtype=torch.float64, requires_grad=True)
    out = layer(x, torch.zeros(4, 5, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))
    assert int(layer.last_routing.tokens_per_expert.sum()) == 0
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("kind", ["moe", "aoe"])
@pytest.mark.parametrize("rule", [dict(selection="top_p", top_p=0.5), dict(selection="expert_choice")], ids=str)
def test_token_mask_equals_each_sequence_alone(kind, rule):
    layer = build(kind, aux_loss_coef=0.01, **rule)
    mask = torch.tensor([[1, 1, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]],
                        dtype=torch.bool)
    x = torch.randn(4, 7, D, dtype=torch.float64)
    out, aux = layer.forward_with_aux(x, mask)
    counts = layer.last_routing.tokens_per_expert.clone()
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    total = torch.zeros_like(counts)
    for b in range(4):
        if mask[b].any():
            alone = layer(x[b][mask[b]])
            assert rel_err(out[b][mask[b]], alone) <= 1e-12
            total += layer.last_routing.tokens_per_expert
    assert torch.equal(counts, total)
    if rule["selection"] == "top_p":  # one call on the real tokens alone: the same loss
        _, ref_aux = layer.forward_with_aux(x[mask])
        assert abs(float(aux.detach()) - float(ref_aux.detach())) <= 1e-12


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_expert_choice_sees_later_tokens_but_its_inference_fallback_does_not(kind):
    layer = build(kind, selection="expert_choice")
    x = torch.randn(1, 8, D, dtype=torch.float64)
    changed = x.clone()
    changed[0, 4:] = 10 * torch.randn(4, D, dtype=torch.float64)
    # training: expert choice; an earlier token's routing may depend on later ones
    early = [layer(v)[0, :4] for v in (x, changed)]
    assert not torch.allclose(early[0], early[1])
    layer.eval()  # ec_inference="top_k": each token routed by itself, as top-k does
    early = [layer(v)[0, :4] for v in (x, changed)]
    assert rel_err(early[0], early[1]) <= 1e-12  # (not bitwise: the experts' row blocks differ)
    assert layer.last_routing.rule == "top_k" and layer.last_routing.causal
    top_k = build(kind).eval()
    top_k.load_state_dict(layer.state_dict())
    assert rel_err(layer(x), top_k(x)) <= 1e-12
    layer.ec_inference = "expert_choice"
    layer(x)
    assert layer.last_routing.rule == "expert_choice"
    check_against_reference(layer, (2, 6))


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_top_k_keeps_the_fixed_fast_path(kind):
    layer = build(kind)
    scores = torch.randn(10, E, dtype=torch.float64)
    routing = layer.route(scores)
    assert routing.selection.valid_TK is None and not routing.dispatch.padded
    assert routing.dispatch.order_S.numel() == 10 * K


def test_balancing_loss_per_rule():
    """f counts the assignments the rule made; expert choice's loss is the constant 1."""
    layer = build("moe", selection="top_p", top_p=0.5, aux_loss_coef=1.0)
    x = torch.randn(20, D, dtype=torch.float64)
    _, aux = layer.forward_with_aux(x)
    info = layer.last_routing
    f = info.tokens_per_expert.double() / info.tokens_per_expert.sum()
    assert abs(float(aux.detach()) - E * float((f * info.probs.mean(0)).sum())) <= 1e-12
    ec = build("aoe", selection="expert_choice", aux_loss_coef=1.0)
    xg = torch.randn(2, 9, D, dtype=torch.float64, requires_grad=True)
    _, aux = ec.forward_with_aux(xg)
    assert abs(float(aux.detach()) - 1.0) <= 1e-12
    (g,) = torch.autograd.grad(aux, ec.w_down)
    assert float(g.abs().max()) <= 1e-12


def test_selection_bias_steps_top_p_and_is_refused_with_expert_choice():
    layer = build("moe", selection="top_p", top_p=0.5, bias_update_rate=0.1)
    layer(torch.randn(30, D, dtype=torch.float64))
    assert float(layer.load_since_update.sum()) == int(layer.last_routing.experts_per_token_counts().sum())
    layer.selection_bias += torch.linspace(-5, 5, E, dtype=layer.selection_bias.dtype)
    check_against_reference(layer, (11,))  # the bias orders the experts; the reference agrees
    with pytest.raises(ValueError, match="bias_update_rate=0.1 has no effect with selection='expert_choice'"):
        build("aoe", selection="expert_choice", bias_update_rate=0.1)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(selection="top_q"), "selection='top_q' is not a rule"),
        (dict(selection="top_p", top_p=0.0), "top_p=0.0 must be in (0, 1]"),
        (dict(selection="top_p", top_p=1.5), "top_p=1.5 must be in (0, 1]"),
        (dict(min_k=0), "min_k=0 must be an integer in"),
        (dict(min_k=3, max_k=2), "max_k=2 must be in [min_k=3, n_experts="),
        (dict(max_k=E + 1), f"max_k={E + 1} must be in [min_k=1, n_experts={E}]"),
        (dict(capacity_factor=0), "capacity_factor=0 must be a positive number"),
        (dict(ec_inference="none"), "ec_inference='none' is not a rule"),
    ],
)
def test_bad_options_are_refused(kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build("moe", **kw)


def test_counts_of_dynamic_rules():
    """Active parameters and FLOPs count top-p's bound and expert choice's mean experts per token."""
    base = build("moe")
    bound = build("moe", selection="top_p")  # p = k / E: at most k experts
    assert bound.experts_per_token_count() == K
    assert bound.num_active_params() == base.num_active_params() and bound.forward_flops() == base.forward_flops()
    wide = build("moe", selection="top_p", top_p=0.5, max_k=5)
    assert wide.experts_per_token_count() == math.ceil(0.5 * E)
    ec = build("aoe", selection="expert_choice")
    assert ec.forward_flops() == build("aoe").forward_flops()
    ec2 = build("aoe", selection="expert_choice", capacity_factor=1.5)
    assert ec2.experts_per_token_count() == 1.5 * K
