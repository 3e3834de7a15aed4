"""Native ``Transformer`` <-> Hugging Face directory (``AoEForCausalLM``), lossless both ways.

    export_to_hf(model, dst, tokenizer=None)   native model -> HF dir (config.json,
                                               model.safetensors, tokenizer files)
    export_checkpoint(src_ckpt, dst)           native checkpoint / run dir -> HF dir
    load_native_as_hf(model_or_checkpoint)     an in-memory AoEForCausalLM of a native model
    hf_to_native_state(hf_model_or_state)      HF state dict -> native state dict
    load_hf_as_native(hf_dir)                  HF dir -> native Transformer

The HF state-dict keys are the native ones prefixed by ``model.``; the weights are copied bit for
bit (same dtype unless ``dtype`` is given), so logits are identical.

The tokenizer (an ``aoe.data.Tokenizer``) is written as ``tokenizer.json`` plus the
``tokenizer_config.json`` / ``special_tokens_map.json`` of a ``PreTrainedTokenizerFast`` whose
eos (and pad) token is ``<|endoftext|>``; ``AutoTokenizer.from_pretrained(dst)`` loads it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from aoe.hf._io import atomic_directory, check_destination
from aoe.hf.configuration import AoEConfig
from aoe.hf.modeling import AoEForCausalLM
from aoe.model.transformer import Transformer

__all__ = [
    "export_to_hf", "export_checkpoint", "load_native_as_hf", "hf_to_native_state", "load_hf_as_native",
    "save_hf_tokenizer",
]

_PREFIX = "model."


def save_hf_tokenizer(tokenizer, directory: str | os.PathLike) -> None:
    """Write an ``aoe.data.Tokenizer`` (or a ``tokenizers.Tokenizer``) as an HF fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    backend = getattr(tokenizer, "backend", tokenizer)
    eos = getattr(tokenizer, "eos_token", "<|endoftext|>")
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=eos)
    fast.save_pretrained(str(directory))


def load_native_as_hf(src, device: str | torch.device = "cpu", **config_kwargs) -> AoEForCausalLM:
    """An ``AoEForCausalLM`` holding a copy of a native model's weights.

    src: a ``Transformer``, or the path of a native checkpoint / run directory (read with
    ``aoe.io.checkpoint.load_model``; its tokenizer's eos id goes into the config).
    """
    if isinstance(src, Transformer):
        return AoEForCausalLM.from_native(src, **config_kwargs).to(device)
    from aoe.io.checkpoint import load_model

    model, _, tokenizer = load_model(src, device="cpu")
    if tokenizer is not None:
        config_kwargs.setdefault("eos_token_id", tokenizer.eos_id)
        config_kwargs.setdefault("pad_token_id", tokenizer.eos_id)
    return AoEForCausalLM.from_native(model, **config_kwargs).to(device)


def export_to_hf(
    model: Transformer,
    dst_dir: str | os.PathLike,
    tokenizer=None,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    sources: tuple[str | os.PathLike, ...] = (),
) -> Path:
    """Save a native ``Transformer`` as an HF directory loadable with
    ``AutoModelForCausalLM.from_pretrained(dst_dir)`` after ``import aoe.hf``.

    tokenizer: an ``aoe.data.Tokenizer`` to save beside the weights (its eos id becomes the
    config's eos/pad token id). dtype: cast the weights (default: keep the model's dtype).
    The directory is written to a temporary sibling and renamed at the end; an existing
    non-empty ``dst_dir`` is refused unless ``overwrite``, and one that holds a training run or
    native checkpoints, or is or contains one of ``sources`` (paths the model was read from), is
    always refused (ValueError). A write the system refuses (disk full...) raises
    ``aoe.utils.files.WriteError`` naming ``dst_dir`` and the cause; ``dst_dir`` is then untouched.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"export_to_hf takes a native aoe Transformer, got {type(model).__name__}")
    kwargs = {}
    if tokenizer is not None:
        kwargs = {"eos_token_id": int(tokenizer.eos_id), "pad_token_id": int(tokenizer.eos_id)}
    hf = AoEForCausalLM.from_native(model, **kwargs)
    if dtype is not None:
        hf = hf.to(dtype)
    with atomic_directory(dst_dir, overwrite=overwrite, sources=sources) as tmp:
        hf.save_pretrained(str(tmp))
        if tokenizer is not None:
            save_hf_tokenizer(tokenizer, tmp)
    return Path(dst_dir)


def export_checkpoint(src_checkpoint_dir: str | os.PathLike, dst_hf_dir: str | os.PathLike, *,
                      dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """A native checkpoint (or run directory: its newest good checkpoint) -> HF directory, with
    its tokenizer when the checkpoint has one. ``dst_hf_dir`` is checked (see ``export_to_hf``;
    it may not be or contain the source) before anything is loaded."""
    from aoe.io.checkpoint import load_model

    check_destination(dst_hf_dir, overwrite, sources=(src_checkpoint_dir,))
    model, _, tokenizer = load_model(src_checkpoint_dir, device="cpu")
    return export_to_hf(model, dst_hf_dir, tokenizer, dtype=dtype, overwrite=overwrite, sources=(src_checkpoint_dir,))


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
