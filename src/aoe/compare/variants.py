"""The variants of the paper's study, each a label, a sentence and config overrides on a base recipe.

Every variant shares the base config's data, seed, token budget, learning rate and schedule; only
``model.*`` keys and the factorized gates' optimizer settings (``train.factor_*``) change (an
``aoe compare --lr-sweep`` gives each variant its own learning rate). Parameter matching: MoE and AoE
variants have the same total parameters within 1% (AoE's d_wide comes from ``aoe.nn.match_d_wide``);
the dense baseline's FFN is n_experts x d_ffn wide, so its total parameters match too (every one of
them active). The two "active" dense variants are the control of the factorized gate with no
selection at all: a SwiGLU of MoE's active FFN width top_k x d_ffn, and the same with its gate
factorized at rank d_low (width matched by the same rule as AoE's).

Each variant names its ``kind`` (the FFN: "dense", "moe" or "aoe") and its ``baseline`` (the variant
the report compares it with; None for the references themselves).
"""

from __future__ import annotations

from dataclasses import dataclass

from aoe.config import ConfigError, ModelConfig
from aoe.nn import match_d_wide


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    description: str
    overrides: tuple[str, ...]
    kind: str  # the FFN: "dense", "moe" or "aoe" ("unknown" only when read from an odd results.json)
    baseline: str | None = None
    lr: float | None = None  # the learning rate a sweep chose for it (None: the base config's)

    @property
    def sparse(self) -> bool:
        return self.kind in ("moe", "aoe")

    def as_dict(self) -> dict:
        return {"name": self.name, "label": self.label, "description": self.description,
                "overrides": list(self.overrides), "kind": self.kind, "baseline": self.baseline, "lr": self.lr}


def large_router_shape(m: ModelConfig) -> tuple[int, int]:
    """(hidden width H, expert width) of "MoE + large router": the two-layer router D->H->E holds
    about AoE's w_down budget E*D*d_low, and the experts shrink so that total parameters still
    match the plain MoE's."""
    D, E, L, F = m.d_model, m.n_experts, m.d_low, m.d_ffn
    hidden = max(1, round(E * D * L / (D + E)))
    extra = D * hidden + hidden * E - D * E
    return hidden, max(1, F - round(extra / (3 * D * E)))


_BALANCED_INIT = "model.gate_init=balanced"
_AUTHORS_INIT = "model.gate_init=normal"
_NO_FACTOR_DECAY = "train.factor_weight_decay=0.0"


def _variants(m: ModelConfig) -> list[Variant]:
    """Every listed variant for the model config ``m``, in the order ``--list-variants`` shows them."""
    return [
        *_paper_suite(m),
        *_ablations(m),
        *_gate_knob_variants(m),
        *_dense_active_variants(m),
        *(_dlow_variant(r) for r in sorted({max(1, m.d_low // 2), m.d_low * 2})),
        *_selection_variants(m),
        *_erc_variants(m),
    ]


def moe_factorized_overrides(m: ModelConfig) -> tuple[str, ...]:
    """The overrides of "MoE + factorized W_g": AoE's gate factorization at rank d_low, the expert
    width matched by AoE's rule."""
    factorized_ffn = match_d_wide(m.d_model, m.d_ffn, m.d_low)
    return ("model.ffn=moe", f"model.moe_gate_rank={m.d_low}", f"model.d_ffn={factorized_ffn}")


def _paper_suite(m: ModelConfig) -> list[Variant]:
    """The paper's main comparison: dense, MoE and AoE, each layer with and without L_aux."""
    E, k, f = m.n_experts, m.top_k, m.d_ffn
    sparse = f"top-{k} of {E} experts"
    return [
        Variant("dense", "Dense", f"SwiGLU FFN of width {E * f} (= n_experts x d_ffn: total parameters matched, all active)",
                ("model.ffn=dense", f"model.dense_d_ffn={E * f}"), "dense"),
        Variant("moe", "MoE", f"router MoE, {sparse}, renormalized gate weights, no balancing loss",
                ("model.ffn=moe", "model.aux_loss_coef=0.0"), "moe"),
        Variant("moe_aux", "MoE + L_aux", f"router MoE, {sparse}, load-balancing loss 0.01",
                ("model.ffn=moe", "model.aux_loss_coef=0.01"), "moe", "moe"),
        Variant("aoe", "AoE", f"Autonomy-of-Experts, {sparse}, d_low={m.d_low}, L2 norm, no balancing loss",
                ("model.ffn=aoe", "model.aux_loss_coef=0.0"), "aoe", "moe"),
        Variant("aoe_aux", "AoE + L_aux", f"Autonomy-of-Experts, {sparse}, d_low={m.d_low}, load-balancing loss 0.01",
                ("model.ffn=aoe", "model.aux_loss_coef=0.01"), "aoe", "moe_aux"),
    ]


def _ablations(m: ModelConfig) -> list[Variant]:
    """The ablations (on request): MoE given AoE's gate or router parameters, AoE's other norms and
    gate weights not renormalized, and aux-loss-free balancing on both layers."""
    hidden, router_ffn = large_router_shape(m)
    factorized_ffn = match_d_wide(m.d_model, m.d_ffn, m.d_low)
    return [
        Variant("moe_factorized", "MoE + factorized W_g",
                f"router MoE with AoE's experts: gate = (x @ w_down) @ w_up at rank {m.d_low}, width {factorized_ffn}",
                moe_factorized_overrides(m), "moe", "moe"),
        Variant("moe_large_router", "MoE + large router",
                f"router MoE with a two-layer router {m.d_model}->{hidden}->{m.n_experts} (about AoE's w_down), "
                f"experts of width {router_ffn}",
                ("model.ffn=moe", f"model.moe_router_hidden={hidden}", f"model.d_ffn={router_ffn}"), "moe", "moe"),
        Variant("aoe_l1", "AoE (L1)", "AoE ranking experts by the L1 norm", ("model.ffn=aoe", "model.norm=l1"), "aoe", "aoe"),
        Variant("aoe_linf", "AoE (L-inf)", "AoE ranking experts by the L-infinity norm",
                ("model.ffn=aoe", "model.norm=linf"), "aoe", "aoe"),
        Variant("aoe_unnormalized", "AoE (not renormalized)",
                "AoE with the chosen softmax values as gate weights, not divided by their sum (the authors' "
                "megablocks code; Algorithm 2 renormalizes)", ("model.ffn=aoe", "model.renormalize=false"), "aoe", "aoe"),
        Variant("aoe_renorm", "AoE (renormalized)",
                "AoE with the chosen gate weights divided by their sum (Algorithm 2: the default; the name stays "
                "for older commands)", ("model.ffn=aoe", "model.renormalize=true"), "aoe", "aoe"),
        Variant("aoe_bias", "AoE + bias balancing", "AoE with aux-loss-free balancing (selection bias, rate 1e-3)",
                ("model.ffn=aoe", "model.bias_update_rate=0.001"), "aoe", "aoe"),
        Variant("moe_bias", "MoE + bias balancing", "router MoE with aux-loss-free balancing (selection bias, rate 1e-3)",
                ("model.ffn=moe", "model.bias_update_rate=0.001"), "moe", "moe"),
    ]


def _gate_knob_variants(m: ModelConfig) -> list[Variant]:
    """The factorized gate's own knobs (its init, the decay of its factors), on AoE and on
    MoE + factorized W_g."""
    moe_fact = moe_factorized_overrides(m)
    return [
        Variant("aoe_balanced", "AoE (balanced gate init)",
                "AoE with w_up ~ N(0, 1/d_low): the gate w_down @ w_up starts at an unfactorized gate's scale "
                "(the default init; the name stays for older commands)",
                ("model.ffn=aoe", _BALANCED_INIT), "aoe", "aoe"),
        Variant("aoe_normal_init", "AoE (authors' gate init)",
                "AoE with every gate factor ~ N(0, init_std), as the authors' code (the default before)",
                ("model.ffn=aoe", "model.aux_loss_coef=0.0", _AUTHORS_INIT), "aoe", "aoe"),
        Variant("aoe_factor_nowd", "AoE (no decay on w_down, w_up)", "AoE without weight decay on the gate factors",
                ("model.ffn=aoe", _NO_FACTOR_DECAY), "aoe", "aoe"),
        Variant("moe_factorized_balanced", "MoE + factorized W_g (balanced init)",
                "MoE + factorized W_g with w_up ~ N(0, 1/d_low) (the default init)", (*moe_fact, _BALANCED_INIT), "moe",
                "moe_factorized"),
        Variant("moe_factorized_normal_init", "MoE + factorized W_g (authors' init)",
                "MoE + factorized W_g with every gate factor ~ N(0, init_std)", (*moe_fact, _AUTHORS_INIT), "moe",
                "moe_factorized"),
        Variant("moe_factorized_nowd", "MoE + factorized W_g (no decay on factors)",
                "MoE + factorized W_g without weight decay on w_down, w_up", (*moe_fact, _NO_FACTOR_DECAY), "moe",
                "moe_factorized"),
    ]


def _dense_active_variants(m: ModelConfig) -> list[Variant]:
    """The control of the factorized gate with no selection: a dense SwiGLU of MoE's active width
    top_k x d_ffn, plain and with its gate factorized at rank d_low."""
    active = m.top_k * m.d_ffn
    active_factorized = match_d_wide(m.d_model, active, m.d_low)
    dense_fact = ("model.ffn=dense", f"model.dense_d_ffn={active_factorized}", f"model.dense_gate_rank={m.d_low}")
    return [
        Variant("dense_active", "Dense (MoE's active width)",
                f"SwiGLU FFN of width {active} (= top_k x d_ffn: MoE's active FFN parameters)",
                ("model.ffn=dense", f"model.dense_d_ffn={active}"), "dense"),
        Variant("dense_factorized", "Dense + factorized W_g",
                f"SwiGLU FFN with its gate factorized at rank {m.d_low}, width {active_factorized} (parameters of "
                f"dense_active)", dense_fact, "dense", "dense_active"),
        Variant("dense_factorized_normal_init", "Dense + factorized W_g (authors' init)",
                "dense_factorized with every gate factor ~ N(0, init_std)", (*dense_fact, _AUTHORS_INIT), "dense",
                "dense_factorized"),
    ]


def _selection_variants(m: ModelConfig) -> list[Variant]:
    """Both layers under the paper's other rules.

    Top-p as the paper trains it (``moe_topp`` / ``aoe_topp``): p = 0.6 with Ent_conf as a loss at
    weight 1e-4, so that a model cannot lower its loss by spreading probability over many experts.
    Top-p matched to top-k's compute (``*_topp_kE``): p = k/E and max_k = k: the k largest of E
    probabilities sum to at least k/E, so no token takes more than k experts (max_k only states
    it), and a token whose probabilities are near uniform (every token at init) takes k; a
    confident token takes fewer. Expert choice with capacity factor 1: each expert takes n*k/E
    tokens of a sequence of n, so the rows computed are exactly top-k's n*k (rounded up per expert
    when E does not divide n*k); evaluation routes by top-k (``ec_inference=top_k``: no token sees
    later tokens through its routing).
    """
    E, k = m.n_experts, m.top_k
    p = f"{k / E:.6g}"
    paper_p = ("model.selection=top_p", "model.top_p=0.6", "model.min_k=1", "model.max_k=null",
               "model.entropy_loss_coef=0.0001")
    top_p = ("model.selection=top_p", f"model.top_p={p}", "model.min_k=1", f"model.max_k={k}")
    ec = ("model.selection=expert_choice", "model.capacity_factor=1.0", "model.ec_inference=top_k")
    paper_text = f"top-p (p = 0.6, 1 to {E} experts per token) with Ent_conf as a loss (1e-4), as the paper"
    topp_text = f"top-p (p = k/E = {p}, 1 to {k} experts per token: at most top-{k}'s compute)"
    ec_text = f"expert choice (capacity factor 1: top-{k}'s rows; top-{k} at evaluation)"
    return [
        Variant("moe_topp", "MoE (top-p)", f"router MoE, {paper_text}, no balancing loss",
                ("model.ffn=moe", "model.aux_loss_coef=0.0", *paper_p), "moe", "moe"),
        Variant("aoe_topp", "AoE (top-p)", f"Autonomy-of-Experts, d_low={m.d_low}, {paper_text}, no balancing loss",
                ("model.ffn=aoe", "model.aux_loss_coef=0.0", *paper_p), "aoe", "moe_topp"),
        Variant("moe_topp_kE", "MoE (top-p, p = k/E)", f"router MoE, {topp_text}, no balancing loss",
                ("model.ffn=moe", "model.aux_loss_coef=0.0", *top_p), "moe", "moe"),
        Variant("aoe_topp_kE", "AoE (top-p, p = k/E)", f"Autonomy-of-Experts, d_low={m.d_low}, {topp_text}, "
                "no balancing loss", ("model.ffn=aoe", "model.aux_loss_coef=0.0", *top_p), "aoe", "moe_topp_kE"),
        Variant("moe_ec", "MoE (expert choice)", f"router MoE, {ec_text}, of {E} experts",
                ("model.ffn=moe", "model.aux_loss_coef=0.0", *ec), "moe", "moe"),
        Variant("aoe_ec", "AoE (expert choice)", f"Autonomy-of-Experts, d_low={m.d_low}, {ec_text}, of {E} experts",
                ("model.ffn=aoe", "model.aux_loss_coef=0.0", *ec), "aoe", "moe_ec"),
    ]


def _erc_variants(m: ModelConfig) -> list[Variant]:
    """The first author's follow-up: a router MoE with the ERC loss (aoe.nn.erc), with L_aux as there."""
    return [
        Variant("moe_erc", "MoE + ERC + L_aux",
                f"router MoE with the ERC loss (weight 1, alpha 1: {m.n_experts}x{m.n_experts} router-expert "
                "couplings per layer and step) and load-balancing loss 0.01",
                ("model.ffn=moe", "model.aux_loss_coef=0.01", "model.erc_loss_coef=1.0", "model.erc_alpha=1.0"),
                "moe", "moe_aux"),
    ]


def _dlow_variant(r: int) -> Variant:
    return Variant(f"aoe_dlow{r}", f"AoE (d_low={r})", f"AoE with rank d_low={r}", ("model.ffn=aoe", f"model.d_low={r}"),
                   "aoe", "aoe")


def _factor_lr_variant(scale: str) -> Variant:
    return Variant(f"aoe_factorlr{scale}", f"AoE (gate factors at {scale} x lr)",
                   f"AoE with the learning rate of w_down and w_up multiplied by {scale}",
                   ("model.ffn=aoe", f"train.factor_lr_scale={scale}"), "aoe", "aoe")


DEFAULT_VARIANTS = ("dense", "moe", "moe_aux", "aoe", "aoe_aux")


def _positive_number(text: str) -> bool:
    try:
        return float(text) > 0 and text.strip() == text and text.lower() not in ("inf", "infinity", "nan")
    except ValueError:
        return False


def resolve_variants(names: list[str] | None, model: ModelConfig) -> list[Variant]:
    """The named variants (default ``DEFAULT_VARIANTS``), in the given order.

    Besides the listed names, ``aoe_dlowR`` for any positive R (a d_low sweep) and
    ``aoe_factorlrM`` for any positive number M (the gate factors' learning-rate multiplier) are accepted.
    """
    known = {v.name: v for v in _variants(model)}
    out = []
    for name in names or DEFAULT_VARIANTS:
        if name in known:
            out.append(known[name])
        elif name.startswith("aoe_dlow") and name[8:].isdigit() and int(name[8:]) > 0:
            out.append(_dlow_variant(int(name[8:])))
        elif name.startswith("aoe_factorlr") and _positive_number(name[12:]):
            out.append(_factor_lr_variant(name[12:]))
        else:
            raise ConfigError(f"unknown variant {name!r}; known: {', '.join(known)} (and aoe_dlowR for any rank R, "
                              "aoe_factorlrM for any multiplier M)")
    if len({v.name for v in out}) != len(out):
        raise ConfigError(f"a variant is listed twice: {names}")
    return out


def describe_variants(model: ModelConfig | None = None) -> str:
    model = model or ModelConfig()
    lines = []
    for v in _variants(model):
        mark = "*" if v.name in DEFAULT_VARIANTS else " "
        lines.append(f"{mark} {v.name:<24} {v.description}   [{' '.join(v.overrides)}]")
    lines.append("(* = default suite; shown for the default model config; aoe_dlowR for any rank R, "
                 "aoe_factorlrM for any lr multiplier M of w_down and w_up)")
    return "\n".join(lines)
