"""The variants of the paper's study, each a label, a sentence and config overrides on a base recipe.

Every variant shares the base config's data, seed, token budget and schedule; only ``model.*``
keys change. Parameter matching: MoE and AoE variants have the same total parameters within 1%
(AoE's d_wide comes from ``aoe.nn.match_d_wide``); the dense baseline's FFN is n_experts x d_ffn
wide, so its total parameters match too (every one of them active).
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


def large_router_shape(m: ModelConfig) -> tuple[int, int]:
    """(hidden width H, expert width) of "MoE + large router": the two-layer router D->H->E holds
    about AoE's w_down budget E*D*d_low, and the experts shrink so that total parameters still
    match the plain MoE's."""
    D, E, L, F = m.d_model, m.n_experts, m.d_low, m.d_ffn
    hidden = max(1, round(E * D * L / (D + E)))
    extra = D * hidden + hidden * E - D * E
    return hidden, max(1, F - round(extra / (3 * D * E)))


def _variants(m: ModelConfig) -> list[Variant]:
    E, k, f = m.n_experts, m.top_k, m.d_ffn
    sparse = f"top-{k} of {E} experts"
    hidden, router_ffn = large_router_shape(m)
    factorized_ffn = match_d_wide(m.d_model, f, m.d_low)
    return [
        Variant("dense", "Dense", f"SwiGLU FFN of width {E * f} (= n_experts x d_ffn: total parameters matched, all active)",
                ("model.ffn=dense", f"model.dense_d_ffn={E * f}")),
        Variant("moe", "MoE", f"router MoE, {sparse}, renormalized gate weights, no balancing loss",
                ("model.ffn=moe", "model.aux_loss_coef=0.0")),
        Variant("moe_aux", "MoE + L_aux", f"router MoE, {sparse}, load-balancing loss 0.01",
                ("model.ffn=moe", "model.aux_loss_coef=0.01")),
        Variant("aoe", "AoE", f"Autonomy-of-Experts, {sparse}, d_low={m.d_low}, L2 norm, no balancing loss",
                ("model.ffn=aoe", "model.aux_loss_coef=0.0")),
        Variant("aoe_aux", "AoE + L_aux", f"Autonomy-of-Experts, {sparse}, d_low={m.d_low}, load-balancing loss 0.01",
                ("model.ffn=aoe", "model.aux_loss_coef=0.01")),
        # ablations (on request)
        Variant("moe_factorized", "MoE + factorized W_g",
                f"router MoE with AoE's experts: gate = (x @ w_down) @ w_up at rank {m.d_low}, width {factorized_ffn}",
                ("model.ffn=moe", f"model.moe_gate_rank={m.d_low}", f"model.d_ffn={factorized_ffn}")),
        Variant("moe_large_router", "MoE + large router",
                f"router MoE with a two-layer router {m.d_model}->{hidden}->{E} (about AoE's w_down), experts "
                f"of width {router_ffn}", ("model.ffn=moe", f"model.moe_router_hidden={hidden}", f"model.d_ffn={router_ffn}")),
        Variant("aoe_l1", "AoE (L1)", "AoE ranking experts by the L1 norm", ("model.ffn=aoe", "model.norm=l1")),
        Variant("aoe_linf", "AoE (L-inf)", "AoE ranking experts by the L-infinity norm",
                ("model.ffn=aoe", "model.norm=linf")),
        Variant("aoe_renorm", "AoE (renormalized)", "AoE with the chosen gate weights divided by their sum",
                ("model.ffn=aoe", "model.renormalize=true")),
        Variant("aoe_bias", "AoE + bias balancing", "AoE with aux-loss-free balancing (selection bias, rate 1e-3)",
                ("model.ffn=aoe", "model.bias_update_rate=0.001")),
        Variant("moe_bias", "MoE + bias balancing", "router MoE with aux-loss-free balancing (selection bias, rate 1e-3)",
                ("model.ffn=moe", "model.bias_update_rate=0.001")),
        *(
            Variant(f"aoe_dlow{r}", f"AoE (d_low={r})", f"AoE with rank d_low={r}", ("model.ffn=aoe", f"model.d_low={r}"))
            for r in sorted({max(1, m.d_low // 2), m.d_low * 2})
        ),
    ]


DEFAULT_VARIANTS = ("dense", "moe", "moe_aux", "aoe", "aoe_aux")


def resolve_variants(names: list[str] | None, model: ModelConfig) -> list[Variant]:
    """The named variants (default ``DEFAULT_VARIANTS``), in the given order.

    Besides the listed names, ``aoe_dlowR`` for any positive R is accepted (a d_low sweep).
    """
    known = {v.name: v for v in _variants(model)}
    out = []
    for name in names or DEFAULT_VARIANTS:
        if name in known:
            out.append(known[name])
        elif name.startswith("aoe_dlow") and name[8:].isdigit() and int(name[8:]) > 0:
            r = int(name[8:])
            out.append(Variant(name, f"AoE (d_low={r})", f"AoE with rank d_low={r}", ("model.ffn=aoe", f"model.d_low={r}")))
        else:
            raise ConfigError(f"unknown variant {name!r}; known: {', '.join(known)} (and aoe_dlowR for any rank R)")
    if len({v.name for v in out}) != len(out):
        raise ConfigError(f"a variant is listed twice: {names}")
    return out


def describe_variants(model: ModelConfig | None = None) -> str:
    model = model or ModelConfig()
    lines = []
    for v in _variants(model):
        mark = "*" if v.name in DEFAULT_VARIANTS else " "
        lines.append(f"{mark} {v.name:<17} {v.description}   [{' '.join(v.overrides)}]")
    lines.append("(* = default suite; shown for the default model config; aoe_dlowR for any rank R)")
    return "\n".join(lines)
