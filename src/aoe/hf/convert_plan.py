"""What a converted checkpoint becomes, decided before any weight is read (``aoe.hf.convert``):
the ``Plan`` (experts, top-k, expert width, gate rank, renormalization, layers kept dense, the
native FFN) from the source's config and the caller's choices, and the native ``ModelConfig`` it
gives. Every choice the source cannot take is a ``ConversionError`` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aoe.config import ConfigError, ModelConfig
from aoe.hf.sources import ConversionError, SourceArch, rope_theta

__all__ = ["Plan", "native_model_config", "plan_conversion"]


@dataclass(frozen=True)
class Plan:
    """E experts, top_k, expert width F (d_wide), gate rank R, renormalization, layers kept dense;
    for a dense source also its FFN width and the upcycling; the native FFN ("aoe" or "moe")."""

    E: int
    k: int
    F: int
    R: int
    renormalize: bool
    dense_layers: tuple[int, ...] = ()
    F_dense: int | None = None
    upcycle: str = "copy"
    ffn: str = "aoe"


def _sparse_plan(arch: SourceArch, cfg, src: Path, num_experts, top_k, renormalize) -> Plan:
    E = getattr(cfg, arch.experts_field)
    if num_experts is not None and num_experts != E:
        raise ConversionError(f"num_experts={num_experts}: a {arch.model_type} source keeps its {E} experts "
                              "(leave num_experts unset)")
    if E < 1:
        raise ConversionError(f"{arch.model_type} source {str(src)!r}: num_experts={E}, no sparse layer to convert")
    dense = tuple(arch.dense_layers(cfg))
    if len(dense) == cfg.num_hidden_layers:
        raise ConversionError(f"{arch.model_type} source {str(src)!r}: every layer is dense (mlp_only_layers="
                              f"{list(getattr(cfg, 'mlp_only_layers', []) or [])}, decoder_sparse_step="
                              f"{getattr(cfg, 'decoder_sparse_step', None)})")
    k = cfg.num_experts_per_tok if top_k is None else top_k
    renorm = arch.renormalize(cfg) if renormalize is None else renormalize
    F = getattr(cfg, arch.width_field)
    return Plan(E, k, F, min(cfg.hidden_size, F), renorm, dense)


def _dense_plan(cfg, num_experts, top_k, upcycle: str, renormalize) -> Plan:
    E = 1 if num_experts is None else num_experts
    k = 1 if top_k is None else top_k
    F_dense = cfg.intermediate_size
    if E < 1:
        raise ConversionError(f"num_experts={E} must be >= 1")
    if upcycle == "slice" and F_dense % E:
        raise ConversionError(f"upcycle='slice': intermediate_size={F_dense} is not divisible by num_experts={E}")
    F = F_dense // E if upcycle == "slice" else F_dense
    renorm = (upcycle == "copy") if renormalize is None else renormalize
    return Plan(E, k, F, min(cfg.hidden_size, F), renorm, F_dense=F_dense, upcycle=upcycle)


def _check_target(arch: SourceArch, ffn: str, d_low) -> None:
    if ffn not in ("aoe", "moe"):
        raise ConversionError(f"ffn={ffn!r} must be 'aoe' (router dropped, gates factorized) or 'moe' (router kept)")
    if ffn == "moe" and not arch.sparse:
        raise ConversionError(f"ffn='moe' keeps the source's router, and a {arch.model_type} source (dense) has none: "
                              "convert it with ffn='aoe'")
    if ffn == "moe" and d_low is not None:
        raise ConversionError(f"d_low={d_low}: ffn='moe' keeps every gate projection whole; d_low applies to ffn='aoe' only")


def plan_conversion(arch: SourceArch, cfg, src: Path, num_experts, top_k, d_low, upcycle: str, renormalize, ffn: str) -> Plan:
    _check_target(arch, ffn, d_low)
    if arch.sparse:
        plan = _sparse_plan(arch, cfg, src, num_experts, top_k, renormalize)
    else:
        plan = _dense_plan(cfg, num_experts, top_k, upcycle, renormalize)
    if not 1 <= plan.k <= plan.E:
        raise ConversionError(f"top_k={plan.k} must be in [1, num_experts={plan.E}]")
    R = plan.R if d_low is None else d_low
    D = cfg.hidden_size
    if not isinstance(R, int) or not 1 <= R <= min(D, plan.F):
        raise ConversionError(f"d_low={R} must be in [1, min(hidden_size={D}, expert width={plan.F})={min(D, plan.F)}]")
    return Plan(plan.E, plan.k, plan.F, R, plan.renormalize, plan.dense_layers, plan.F_dense, plan.upcycle, ffn)


def native_model_config(cfg, src: Path, arch: SourceArch, plan: Plan) -> ModelConfig:
    """The native model: the source's attention and widths, AoE (or MoE) FFNs as planned."""
    max_seq_len = cfg.max_position_embeddings
    window = getattr(cfg, "sliding_window", None)
    if window and window < max_seq_len:  # within that length the window never bites (0: Qwen2-MoE's "off")
        max_seq_len = window
    width = {"d_low": plan.R, "d_wide": plan.F} if plan.ffn == "aoe" else {}
    shared = {}
    if arch.shared_width_field is not None:
        shared = dict(n_shared_experts=1, d_shared=getattr(cfg, arch.shared_width_field), shared_expert_gate=arch.shared_gate)
    return _native_config(
        src, vocab_size=cfg.vocab_size, d_model=cfg.hidden_size, n_layers=cfg.num_hidden_layers,
        n_heads=cfg.num_attention_heads, n_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        max_seq_len=max_seq_len, rope_theta=rope_theta(cfg), norm_eps=float(cfg.rms_norm_eps),
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        init_std=float(getattr(cfg, "initializer_range", 0.02)), ffn=plan.ffn, d_ffn=plan.F, n_experts=plan.E,
        top_k=plan.k, renormalize=plan.renormalize, qk_norm=arch.qk_norm, attn_qkv_bias=arch.qkv_bias(cfg),
        dense_layers=list(plan.dense_layers), dense_d_ffn=cfg.intermediate_size if plan.dense_layers else None,
        **width, **shared,
    )



def _native_config(src: Path, **fields) -> ModelConfig:
    """The native model the source's config.json describes; a value it cannot take is named."""
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise ConversionError(f"{str(src / 'config.json')!r} describes a model the native one cannot be: {e}") from None
