"""The run configuration: one source of truth for the model, the data and the training.

Three dataclasses, one per YAML section, and a ``RunConfig`` that holds them::

    model:  ModelConfig   the transformer and its feed-forward layers (dense, MoE or AoE)
    data:   DataConfig    the corpus and the tokenizer
    train:  TrainConfig   optimizer, schedule, batch, logging, checkpoints, device

Every field has a default and a docstring (the ``#:`` comment above it). Values are type-checked
and validated when a config is built; an invalid value raises ``ConfigError`` (a ``ValueError``)
naming the dotted key, e.g. ``model.n_heads=6 does not divide model.d_model=512``. The configs
are mutable; after changing a field by hand, call ``validate()`` to re-check.

YAML recipes live in ``aoe/configs/*.yaml`` (``list_configs()``); ``load_config`` reads one (a
path or a packaged recipe's name), applies ``key.sub=value`` overrides (values parsed as YAML, so
``3``, ``3e-4``, ``true``, ``null`` and ``[0, 1]`` work) and refuses unknown keys at every level.
``config_to_dict`` / ``config_from_dict`` / ``save_config`` write and read the resolved config
beside a checkpoint; the round trip through JSON or YAML is exact.

    schema.py    the typed-section machinery (coercion against annotations, ConfigError)
    model.py     ModelConfig; its FFN fields map onto the layers' own configs
                 (``ModelConfig.ffn_config`` -> ``aoe.nn.configs``)
    sections.py  DataConfig, TrainConfig and RunConfig (all three sections; ModelConfig re-exported)
    files.py     YAML/JSON recipes, overrides, save and load
"""

from aoe.config.files import (
    apply_overrides,
    config_from_dict,
    config_path,
    config_to_dict,
    list_configs,
    load_config,
    save_config,
)
from aoe.config.schema import ConfigError
from aoe.config.sections import (
    DECODE_ERRORS,
    DTYPES,
    FFN_KINDS,
    GATE_INITS,
    GROUPED_MM_BACKENDS,
    NAN_POLICIES,
    QK_NORMS,
    SCORE_NORMS,
    SECTIONS,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "ConfigError", "ModelConfig", "DataConfig", "TrainConfig", "RunConfig", "load_config",
    "config_to_dict", "config_from_dict", "save_config", "list_configs", "config_path", "apply_overrides",
]
