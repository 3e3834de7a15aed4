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
from aoe.hf.modeling import AoEForCausalLM
from aoe.hf.native import hf_to_native_state, load_aoe_directory, load_hf_as_native  # noqa: F401  (re-exported)
from aoe.model.transformer import Transformer

__all__ = [
    "export_to_hf", "export_checkpoint", "load_native_as_hf", "hf_to_native_state", "load_hf_as_native",
    "save_hf_tokenizer",
]

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
    ``aoe.io.models.load_model``; its tokenizer's eos id goes into the config).
    """
    if isinstance(src, Transformer):
        return AoEForCausalLM.from_native(src, **config_kwargs).to(device)
    from aoe.io.models import load_model

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
    from aoe.io.models import load_model

    check_destination(dst_hf_dir, overwrite, sources=(src_checkpoint_dir,))
    model, _, tokenizer = load_model(src_checkpoint_dir, device="cpu")
    return export_to_hf(model, dst_hf_dir, tokenizer, dtype=dtype, overwrite=overwrite, sources=(src_checkpoint_dir,))
