"""``AoEConfig``: the Hugging Face configuration of the project's decoder LM (``model_type="aoe"``).

Every field of ``aoe.config.ModelConfig`` is a field here, with its type and default, under its
HF-conventional name where one exists (``HF_NAMES``: hidden_size = d_model, num_experts_per_tok =
top_k, norm_topk_prob = renormalize, router_top_p = top_p, never the sampling top_p...) and under
its own name otherwise (d_low, d_wide, gate_init...): a field added to ``ModelConfig`` is carried
with no edit here. ``AoEConfig.from_model_config(cfg).to_model_config() == cfg`` exactly (None
values such as ``num_key_value_heads=None`` or ``norm_topk_prob=None`` are kept as None and mean
what they mean in ``ModelConfig``; ``norm_topk_prob=None``: MoE true, AoE false, as saved before
Algorithm 2's default).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import field

from transformers import PretrainedConfig

from aoe.config import ModelConfig
from aoe.config.applicability import settle_saved

__all__ = ["AoEConfig", "HF_TO_NATIVE", "HF_NAMES"]

#: The HF name of every ``ModelConfig`` field named otherwise here (the rest keep their names).
HF_NAMES: dict[str, str] = {
    "d_model": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads", "max_seq_len": "max_position_embeddings", "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings", "init_std": "initializer_range", "ffn": "ffn_type",
    "d_ffn": "intermediate_size", "n_experts": "num_experts", "top_k": "num_experts_per_tok",
    "renormalize": "norm_topk_prob", "norm": "expert_score_norm", "aux_loss_coef": "router_aux_loss_coef",
    "z_loss_coef": "router_z_loss_coef", "dense_d_ffn": "dense_intermediate_size", "attn_qkv_bias": "qkv_bias",
    "n_shared_experts": "num_shared_experts", "d_shared": "shared_expert_intermediate_size",
    # the selection rules; "router_top_p" so that it is never read as the sampling top_p
    "selection": "expert_selection", "top_p": "router_top_p", "min_k": "min_experts_per_tok",
    "max_k": "max_experts_per_tok", "capacity_factor": "expert_capacity_factor",
    "ec_inference": "expert_choice_inference", "entropy_loss_coef": "router_entropy_loss_coef",
}

_NATIVE_FIELDS = dataclasses.fields(ModelConfig)
#: (AoEConfig field, ModelConfig field) for every ModelConfig field, in its order
HF_TO_NATIVE: tuple[tuple[str, str], ...] = tuple((HF_NAMES.get(f.name, f.name), f.name) for f in _NATIVE_FIELDS)


def _hf_fields() -> tuple[dict[str, object], dict[str, object]]:
    """(annotations, defaults) of AoEConfig's ModelConfig-backed fields: ModelConfig's types and
    defaults under the HF names (declared there once)."""
    hints = typing.get_type_hints(ModelConfig)
    annotations, defaults = {}, {}
    for (hf, _), f in zip(HF_TO_NATIVE, _NATIVE_FIELDS):
        annotations[hf] = hints[f.name]
        if f.default_factory is not dataclasses.MISSING:
            defaults[hf] = field(default_factory=f.default_factory)
        else:
            defaults[hf] = f.default
    return annotations, defaults


class AoEConfig(PretrainedConfig):
    """Configuration of ``AoEForCausalLM``; the defaults are ``ModelConfig``'s (read from it). When
    vocab_size is set the values are validated by building the ``ModelConfig``
    (``aoe.config.ConfigError``, a ``ValueError``, on a bad value)."""

    model_type = "aoe"
    keys_to_ignore_at_inference = ["past_key_values"]

    # every ModelConfig field under its HF name, with ModelConfig's type and default (HF_TO_NATIVE)
    __annotations__.update(_hf_fields()[0])
    locals().update(_hf_fields()[1])
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
        values.update(kwargs)
        return cls(**values)
