"""A Hugging Face ``aoe`` directory read back as a native ``Transformer`` (``load_hf_as_native``):
what ``aoe export --to-native`` and ``aoe.io.models.load_any`` use. It needs only the config
classes, the weights' headers (``aoe.io.bounds``) and the native model, never the checkpoint
format, so ``aoe.io`` can read a Hugging Face directory through it while ``aoe.hf.export``
writes one through ``aoe.io``."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from aoe.hf.configuration import AoEConfig
from aoe.model.transformer import Transformer

__all__ = ["hf_to_native_state", "load_hf_as_native", "load_aoe_directory"]

_PREFIX = "model."


def hf_to_native_state(hf) -> dict[str, torch.Tensor]:
    """The native ``Transformer`` state dict of an ``AoEForCausalLM`` (or of its state dict, or of
    a raw safetensors dict): ``model.`` stripped; a missing ``lm_head.weight`` (tied, not saved) is
    the embedding."""
    state = hf.state_dict() if isinstance(hf, torch.nn.Module) else dict(hf)
    out = {}
    for key, value in state.items():
        if not key.startswith(_PREFIX):
            raise ValueError(f"{key!r} is not an AoEForCausalLM weight (expected the prefix {_PREFIX!r})")
        out[key[len(_PREFIX):]] = value
    if "lm_head.weight" not in out and "embed_tokens.weight" in out:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


def load_hf_as_native(hf_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Transformer:
    """An HF ``aoe`` directory -> a native ``Transformer`` (eval mode) with the same weights and dtype.

    config.json is checked against the weights' headers before anything is allocated
    (``aoe.io.bounds``): ConversionError naming the file when they do not belong together."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    config = AoEConfig.from_pretrained(str(hf_dir))
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{str(hf_dir)!r} has no .safetensors weights")
    model_cfg = config.to_model_config()
    _check_weights_fit(model_cfg, files, hf_dir / "config.json")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    native = hf_to_native_state(state)
    model = Transformer(model_cfg)
    dtype = native["embed_tokens.weight"].dtype
    model.to(dtype)
    missing, unexpected = model.load_state_dict(native, strict=False)
    if missing or unexpected:
        raise ValueError(f"{str(hf_dir)!r} does not fit its config: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval()


def _check_weights_fit(model_cfg, files: list[Path], config_file: Path) -> None:
    """The sizes, then the shapes, of ``config_file`` against the weights' headers (``aoe.io.bounds``)."""
    from aoe.io.bounds import check_shapes, check_sizes, native_shapes, read_shapes
    from aoe.hf.sources import ConversionError

    found = read_shapes(files, ConversionError)
    check_sizes(model_cfg, found, config_file, ConversionError)
    if model_cfg.tie_embeddings:
        found.pop("model.lm_head.weight", None)
    check_shapes(native_shapes(model_cfg), found, config_file, ConversionError)


def _check_aoe_source(src: Path) -> None:
    """The source of ``--to-native`` must be an HF ``aoe`` directory: a readable config.json of
    model_type "aoe" (one of another type is converted first, with ``aoe convert``)."""
    from aoe.hf.convert import ConversionError, read_config_json

    if not (src / "config.json").is_file():
        raise ConversionError(f"{str(src)!r} is not a Hugging Face directory (no config.json); --to-native reads "
                              "one written by aoe export or aoe convert")
    model_type = read_config_json(src).get("model_type")
    if model_type != "aoe":
        raise ConversionError(f"{str(src / 'config.json')!r} has model_type={model_type!r}, not 'aoe': --to-native "
                              "reads a directory written by aoe export or aoe convert; convert this one first "
                              "(aoe convert SRC DST)")


def load_aoe_directory(src: Path) -> Transformer:
    """The native model of an HF aoe directory (``load_hf_as_native``), after checking it is one;
    a config.json it cannot be built from is named (``aoe export --to-native`` and ``aoe.io.models``)."""
    from aoe.config import ConfigError
    from aoe.hf.convert import ConversionError

    _check_aoe_source(src)
    try:
        return load_hf_as_native(src)
    except ConfigError as e:
        raise ConversionError(f"{str(src / 'config.json')!r} describes a model the native one cannot be: {e}") from None
