"""A model directory's config checked against its weights before anything is allocated (a
Hugging Face directory's config.json, a native checkpoint's config.yaml).

A config.json is small and its sizes are only claims: a 1 KB file saying ``hidden_size=8192`` and
48 layers beside 172 KB of weights would have the model built (gigabytes) before the weights'
shapes are compared, and a size of 1e12 overflows torch's size arithmetic. So, reading only the
safetensors headers:

1. ``check_sizes``: no layer count above the layers the weights hold, and no size above the
   number of values all the weights hold together (every real size is the extent of some
   weight). This bounds the model the config describes by the weights' own size.
2. ``check_shapes``: then the model is built on the meta device (no memory) and every tensor's
   shape compared with the file's.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Mapping

from aoe.config import ModelConfig

__all__ = ["SIZE_FIELDS", "check_shapes", "check_sizes", "native_shapes", "read_shapes"]

#: Native size fields, with the config.json name of an ``aoe`` directory where it differs.
SIZE_FIELDS = {
    "vocab_size": "vocab_size", "d_model": "hidden_size", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads", "d_ffn": "intermediate_size", "n_experts": "num_experts",
    "top_k": "num_experts_per_tok", "d_low": "d_low", "d_wide": "d_wide", "dense_d_ffn": "dense_intermediate_size",
    "n_shared_experts": "num_shared_experts", "d_shared": "shared_expert_intermediate_size",
    "moe_gate_rank": "moe_gate_rank", "moe_router_hidden": "moe_router_hidden", "dense_gate_rank": "dense_gate_rank",
}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")

Error = Callable[[str], Exception]


def read_shapes(files: list[Path], error: Error) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of the safetensors ``files``, from their headers only."""
    from safetensors import safe_open

    shapes = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except Exception as e:  # safetensors reports a bad header with its own exception types
            raise error(f"cannot read {str(file)!r} as safetensors ({e}): the file is damaged or not a "
                        "safetensors file; download or save it again") from None
    return shapes


def check_sizes(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]], config_file: Path, error: Error,
                names: Mapping[str, str] | None = None) -> None:
    """Refuse a config whose layer count or sizes the weights cannot hold (see the module
    docstring). ``names``: how config.json calls each native field (default: an ``aoe`` directory's)."""
    names = {**SIZE_FIELDS, "n_layers": "num_hidden_layers", **(names or {})}
    layers = {int(m.group(1)) for key in shapes for m in [_LAYER.search(key)] if m}
    if cfg.n_layers > len(layers):
        raise error(f"{str(config_file)!r}: {names['n_layers']}={cfg.n_layers}, but the weights hold {len(layers)} "
                    f"layer(s): this {config_file.name} does not belong to these weights")
    values = sum(math.prod(shape) for shape in shapes.values())
    for field in SIZE_FIELDS:
        size = getattr(cfg, field, None)
        if isinstance(size, int) and size > max(values, 1):
            raise error(f"{str(config_file)!r}: {names.get(field, field)}={size} is larger than the {values:,} values "
                        f"all the weights hold together: this {config_file.name} does not belong to these weights")


def native_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of the native model (built on the meta device: no memory), by
    its Hugging Face key (``model.`` + the native one; a tied ``lm_head.weight`` left out)."""
    import torch

    from aoe.model.transformer import Transformer

    with torch.device("meta"):
        native = Transformer(cfg)
    expected = {f"model.{k}": tuple(v.shape) for k, v in native.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("model.lm_head.weight", None)
    return expected


def check_shapes(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], config_file: Path,
                 error: Error) -> None:
    """Every tensor the config implies (``expected``, from a meta build) is in the weights with
    that shape, and the weights hold nothing else."""
    for key, shape in expected.items():
        if key in found and tuple(found[key]) != tuple(shape):
            raise error(f"{key} has shape {list(found[key])} in the weights, but {str(config_file)!r} implies "
                        f"{list(shape)}: this {config_file.name} does not belong to these weights")
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise error(f"the weights do not fit {str(config_file)!r}: missing {_few(missing)}, unexpected {_few(unexpected)}")


def _few(keys: list[str], limit: int = 5) -> str:
    """The first ``limit`` keys of a list, and how many more."""
    shown = ", ".join(keys[:limit]) or "none"
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
