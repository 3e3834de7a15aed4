"""Hugging Face integration: ``AoEConfig`` / ``AoEForCausalLM`` (registered with the Auto classes
as model_type "aoe" on import), export of native models and checkpoints (``aoe.hf.export``) and
conversion of HF MoE / dense checkpoints into AoE models (``aoe.hf.convert``)."""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from aoe.hf.configuration import AoEConfig
from aoe.hf.modeling import AoEForCausalLM, AoEPreTrainedModel

__all__ = ["AoEConfig", "AoEForCausalLM", "AoEPreTrainedModel", "register"]


def register() -> None:
    """Register "aoe" with AutoConfig and AutoModelForCausalLM (idempotent)."""
    try:
        AutoConfig.register("aoe", AoEConfig)
    except ValueError:  # already registered (by us, or a reload of this module)
        pass
    try:
        AutoModelForCausalLM.register(AoEConfig, AoEForCausalLM)
    except ValueError:
        pass


register()
