"""``AoEConfig``: the Hugging Face configuration of the project's decoder LM (``model_type="aoe"``).

Every field of ``aoe.config.ModelConfig`` has an HF-conventional counterpart (``HF_TO_NATIVE``);
``AoEConfig.from_model_config(cfg).to_model_config() == cfg`` exactly (None values such as
``num_key_value_heads=None`` or ``norm_topk_prob=None`` are kept as None and mean what they mean
in ``ModelConfig``).

    hidden_size = d_model            intermediate_size = d_ffn (MoE expert width)
    num_hidden_layers = n_layers     num_attention_heads = n_heads
    num_key_value_heads = n_kv_heads max_position_embeddings = max_seq_len
    rms_norm_eps = norm_eps          tie_word_embeddings = tie_embeddings
    initializer_range = init_std     ffn_type = ffn ("dense" | "moe" | "aoe")
    num_experts = n_experts          num_experts_per_tok = top_k
    norm_topk_prob = renormalize (null: MoE true, AoE false, as saved before Algorithm 2's default)
    expert_score_norm = norm ("l2" | "l1" | "linf")
    router_aux_loss_coef = aux_loss_coef   router_z_loss_coef = z_loss_coef
    dense_intermediate_size = dense_d_ffn  qkv_bias = attn_qkv_bias (Qwen2's names)
    num_shared_experts = n_shared_experts  shared_expert_intermediate_size = d_shared
    expert_selection = selection     router_top_p = top_p (never the sampling top_p)
    min_experts_per_tok = min_k      max_experts_per_tok = max_k
    expert_capacity_factor = capacity_factor   expert_choice_inference = ec_inference
    (d_low, d_wide, rope_theta, qk_norm ("none" | "head" |
    "full"), dense_layers, dense_gate_rank, gate_init, bias_update_rate, recompute_scores, scores_backend, recompute_gate,
    backward_chunks, grouped_mm, shared_expert_gate keep their names)
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

from transformers import PretrainedConfig

from aoe.config import ModelConfig
from aoe.config.applicability import settle_saved

__all__ = ["AoEConfig", "HF_TO_NATIVE"]

#: (AoEConfig field, ModelConfig field)
HF_TO_NATIVE: tuple[tuple[str, str], ...] = (
    ("vocab_size", "vocab_size"),
    ("hidden_size", "d_model"),
    ("num_hidden_layers", "n_layers"),
    ("num_attention_heads", "n_heads"),
    ("num_key_value_heads", "n_kv_heads"),
    ("max_position_embeddings", "max_seq_len"),
    ("rope_theta", "rope_theta"),
    ("rms_norm_eps", "norm_eps"),
    ("qk_norm", "qk_norm"),
    ("tie_word_embeddings", "tie_embeddings"),
    ("initializer_range", "init_std"),
    ("ffn_type", "ffn"),
    ("intermediate_size", "d_ffn"),
    ("num_experts", "n_experts"),
    ("num_experts_per_tok", "top_k"),
    ("d_low", "d_low"),
    ("d_wide", "d_wide"),
    ("norm_topk_prob", "renormalize"),
    ("expert_score_norm", "norm"),
    ("router_aux_loss_coef", "aux_loss_coef"),
    ("router_z_loss_coef", "z_loss_coef"),
    ("bias_update_rate", "bias_update_rate"),
    ("recompute_scores", "recompute_scores"),
    ("scores_backend", "scores_backend"),
    ("recompute_gate", "recompute_gate"),
    ("backward_chunks", "backward_chunks"),
    ("moe_gate_rank", "moe_gate_rank"),
    ("moe_router_hidden", "moe_router_hidden"),
    ("dense_intermediate_size", "dense_d_ffn"),
    ("dense_gate_rank", "dense_gate_rank"),
    ("gate_init", "gate_init"),
    ("dense_layers", "dense_layers"),
    ("grouped_mm", "grouped_mm"),
    ("qkv_bias", "attn_qkv_bias"),
    ("num_shared_experts", "n_shared_experts"),
    ("shared_expert_intermediate_size", "d_shared"),
    ("shared_expert_gate", "shared_expert_gate"),
    # the selection rules; "router_top_p" so that it is never read as the sampling top_p
    ("expert_selection", "selection"),
    ("router_top_p", "top_p"),
    ("min_experts_per_tok", "min_k"),
    ("max_experts_per_tok", "max_k"),
    ("expert_capacity_factor", "capacity_factor"),
    ("expert_choice_inference", "ec_inference"),
    ("router_entropy_loss_coef", "entropy_loss_coef"),
    ("erc_loss_coef", "erc_loss_coef"),
    ("erc_alpha", "erc_alpha"),
)



_DEFAULTS = ModelConfig()  # the defaults live there; AoEConfig's are read from it


def _unmapped_native_fields() -> list[str]:
    """ModelConfig fields without an HF name (added after this module): carried under their own name."""
    mapped = {n for _, n in HF_TO_NATIVE}
    return [f.name for f in dataclasses.fields(ModelConfig) if f.name not in mapped]


class AoEConfig(PretrainedConfig):
    """Configuration of ``AoEForCausalLM``; the defaults are ``ModelConfig``'s (read from it). When
    vocab_size is set the values are validated by building the ``ModelConfig``
    (``aoe.config.ConfigError``, a ``ValueError``, on a bad value)."""

    model_type = "aoe"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int | None = _DEFAULTS.vocab_size
    hidden_size: int = _DEFAULTS.d_model
    num_hidden_layers: int = _DEFAULTS.n_layers
    num_attention_heads: int = _DEFAULTS.n_heads
    num_key_value_heads: int | None = _DEFAULTS.n_kv_heads
    max_position_embeddings: int = _DEFAULTS.max_seq_len
    rope_theta: float = _DEFAULTS.rope_theta
    rms_norm_eps: float = _DEFAULTS.norm_eps
    qk_norm: str = _DEFAULTS.qk_norm
    tie_word_embeddings: bool = _DEFAULTS.tie_embeddings
    initializer_range: float = _DEFAULTS.init_std
    ffn_type: str = _DEFAULTS.ffn
    intermediate_size: int = _DEFAULTS.d_ffn
    num_experts: int = _DEFAULTS.n_experts
    num_experts_per_tok: int = _DEFAULTS.top_k
    d_low: int = _DEFAULTS.d_low
    d_wide: int | None = _DEFAULTS.d_wide
    norm_topk_prob: bool | None = _DEFAULTS.renormalize
    expert_score_norm: str = _DEFAULTS.norm
    router_aux_loss_coef: float = _DEFAULTS.aux_loss_coef
    router_z_loss_coef: float = _DEFAULTS.z_loss_coef
    bias_update_rate: float = _DEFAULTS.bias_update_rate
    recompute_scores: bool = _DEFAULTS.recompute_scores
    scores_backend: str = _DEFAULTS.scores_backend
    recompute_gate: bool | None = _DEFAULTS.recompute_gate
    backward_chunks: int | None = _DEFAULTS.backward_chunks
    moe_gate_rank: int | None = _DEFAULTS.moe_gate_rank
    moe_router_hidden: int | None = _DEFAULTS.moe_router_hidden
    dense_intermediate_size: int | None = _DEFAULTS.dense_d_ffn
    dense_gate_rank: int | None = _DEFAULTS.dense_gate_rank
    gate_init: str = _DEFAULTS.gate_init
    dense_layers: list[int] = field(default_factory=lambda: list(_DEFAULTS.dense_layers))
    grouped_mm: str = _DEFAULTS.grouped_mm
    qkv_bias: bool = _DEFAULTS.attn_qkv_bias
    num_shared_experts: int = _DEFAULTS.n_shared_experts
    shared_expert_intermediate_size: int | None = _DEFAULTS.d_shared
    shared_expert_gate: bool = _DEFAULTS.shared_expert_gate
    expert_selection: str = _DEFAULTS.selection
    router_top_p: float | None = _DEFAULTS.top_p
    min_experts_per_tok: int = _DEFAULTS.min_k
    max_experts_per_tok: int | None = _DEFAULTS.max_k
    expert_capacity_factor: float = _DEFAULTS.capacity_factor
    expert_choice_inference: str = _DEFAULTS.ec_inference
    router_entropy_loss_coef: float = _DEFAULTS.entropy_loss_coef
    erc_loss_coef: float = _DEFAULTS.erc_loss_coef
    erc_alpha: float = _DEFAULTS.erc_alpha
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.dense_layers is None:
            self.dense_layers = []
        self.dense_layers = list(self.dense_layers)
        super().__post_init__(**kwargs)
        if self.vocab_size is not None:
            self.to_model_config()  # validates

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_model_config(self) -> ModelConfig:
        """The project's ``ModelConfig`` with these values (validated; an option that does nothing
        with the others reads as its off value, ``aoe.config.applicability.settle_saved``)."""
        values = {}
        for hf, native in HF_TO_NATIVE:
            v = getattr(self, hf)
            values[native] = list(v) if isinstance(v, (list, tuple)) else v
        for name in _unmapped_native_fields():
            if hasattr(self, name):
                v = getattr(self, name)
                values[name] = list(v) if isinstance(v, (list, tuple)) else v
        return ModelConfig(**settle_saved({"model": values})["model"])

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs) -> "AoEConfig":
        """The ``AoEConfig`` of a ``ModelConfig`` (extra HF kwargs, e.g. eos_token_id, pass through)."""
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"from_model_config takes a ModelConfig, got {type(cfg).__name__}")
        cfg.validate()
        values = {}
        for hf, native in HF_TO_NATIVE:
            v = getattr(cfg, native)
            values[hf] = list(v) if isinstance(v, (list, tuple)) else v
        for name in _unmapped_native_fields():
            v = getattr(cfg, name)
            values[name] = list(v) if isinstance(v, (list, tuple)) else v
        values.update(kwargs)
        return cls(**values)
