"""A model for inference from any directory the project writes: ``load_any(path)``.

Three kinds of directory are accepted (``model_dir_kind`` tells them apart without loading)::

    checkpoint  a native checkpoint: checkpoint.json, model.safetensors, config.yaml, tokenizer.json
    run         a run directory (``aoe train --out``): its newest checkpoint that verifies
    hf          a Hugging Face directory written by ``aoe export`` or ``aoe convert``: config.json
                with model_type "aoe", *.safetensors, the tokenizer files

``load_model(path)`` is ``load_any`` as ``(model, cfg, tokenizer)``. A native checkpoint is read
by ``load_native_checkpoint``, in either format (``load_weights``: the one-process format through
``aoe.io.checkpoint``, the sharded one through ``aoe.io.sharded``, one process without a process
group); this module is the one place that reads both. A Hugging Face directory is read
as ``aoe export --to-native`` reads it (``aoe.hf.native.load_hf_as_native``: same weights, same
dtype) and gets the run config ``aoe export --to-native`` would write for it
(``imported_run_config``), so evaluating the directory or its native copy gives the same numbers.
Its tokenizer is its ``tokenizer.json`` (the ``tokenizers`` library, as for a native checkpoint),
with the end-of-text token its ``tokenizer_config.json`` names (else the one of config.json's
eos_token_id, else ``<|endoftext|>``): the directory of ``aoe convert`` of a Llama keeps the
Llama's tokenizer and its ``</s>``. transformers is imported only for a Hugging Face directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from aoe.config import RunConfig
from aoe.io import checkpoint as ckpt
from aoe.io import sharded
from aoe.io.bounds import SIZE_FIELDS, check_shapes, check_sizes, native_shapes, read_shapes
from aoe.io.checkpoint import (
    CHECKPOINT_DIR, CONFIG_FILE, META_FILE, MODEL_FILE, TOKENIZER_FILE, CheckpointError, checkpoint_step,
    imported_run_config, resolve_checkpoint, verify_checkpoint,
)
from aoe.io.layout import is_sharded

__all__ = ["LoadedModel", "load_any", "load_model", "load_native_checkpoint", "load_weights", "model_dir_kind",
           "ACCEPTED"]

HF_CONFIG_FILE = "config.json"
ACCEPTED = ("a checkpoint directory, a run directory with checkpoints/, or a Hugging Face directory written "
            "by aoe export or aoe convert (config.json with model_type 'aoe')")
# Tokenizer files of other formats, which a Hugging Face directory may hold instead of tokenizer.json.
_OTHER_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")


@dataclass
class LoadedModel:
    """What ``load_any`` read: the model (eval mode), its run config, its tokenizer (None when the
    directory has none: ``tokenizer_missing`` then says what is missing), the kind of directory
    ("checkpoint" for a checkpoint or run directory, "hf") and the directory the files came from
    (for a run directory: its checkpoint)."""

    model: torch.nn.Module
    config: RunConfig
    tokenizer: object | None
    kind: str
    path: Path
    tokenizer_missing: str | None = None

    @property
    def tokenizer_file(self) -> Path:
        return self.path / TOKENIZER_FILE


def _read_hf_config(path: Path) -> dict:
    file = path / HF_CONFIG_FILE
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {str(file)!r} ({e}): a Hugging Face directory needs a readable "
                              "config.json") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(file)!r} is not a JSON object: a Hugging Face directory needs a config.json "
                              "of model_type 'aoe'")
    return config


def model_dir_kind(path: str | os.PathLike) -> str:
    """"checkpoint", "run" or "hf" (see the module docstring); CheckpointError naming ``path``
    and the accepted kinds for anything else (a config.json of another model_type: convert first)."""
    path = Path(path)
    if (path / META_FILE).is_file() or checkpoint_step(path) is not None:
        return "checkpoint"
    if (path / CHECKPOINT_DIR).is_dir():
        return "run"
    if (path / HF_CONFIG_FILE).is_file():
        model_type = _read_hf_config(path).get("model_type")
        if model_type != "aoe":
            raise CheckpointError(f"{str(path / HF_CONFIG_FILE)!r} has model_type={model_type!r}, not 'aoe': "
                                  f"convert it first (aoe convert {path} DST), then use DST")
        return "hf"
    missing = "does not exist" if not path.exists() else "is neither a checkpoint directory, nor a run directory " \
        "with checkpoints/, nor a Hugging Face directory (config.json of model_type 'aoe')"
    raise CheckpointError(f"{str(path)!r} {missing}: give {ACCEPTED}")


def load_any(path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True) -> LoadedModel:
    """The model of a checkpoint, run or Hugging Face directory, in eval mode on ``device``.

    verify: check a native checkpoint's SHA-256 sums first (a Hugging Face directory has none).
    Raises CheckpointError (a directory of none of the three kinds, named with the kinds accepted;
    weights that cannot be read or do not fit their config), ConversionError (a config.json
    the native model cannot be built from), DataError (a tokenizer.json that cannot be read).
    """
    kind = model_dir_kind(path)
    if kind != "hf":
        found = resolve_checkpoint(path)
        model, cfg, tokenizer = load_native_checkpoint(found, device=device, verify=verify)
        missing = None if tokenizer is not None else f"{found} has no {TOKENIZER_FILE}"
        return LoadedModel(model, cfg, tokenizer, "checkpoint", found, missing)
    path = Path(path)
    model = _load_hf_model(path).to(device).eval()
    tokenizer, missing = _load_hf_tokenizer(path, _read_hf_config(path))
    return LoadedModel(model, imported_run_config(model.config, tokenizer), tokenizer, "hf", path, missing)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True):
    """Load a trained model for inference.

    path: a checkpoint directory, a run directory (its newest good checkpoint), or a Hugging Face
    directory written by ``aoe export`` / ``aoe convert`` (see ``load_any``, which also says which
    kind it was and where the tokenizer came from).
    Returns ``(model, cfg, tokenizer)``: a ``Transformer`` in eval mode on ``device``, the
    ``RunConfig`` it was trained with (for a Hugging Face directory: ``imported_run_config``), and
    its ``aoe.data.Tokenizer`` (None if not saved).
    """
    loaded = load_any(path, device=device, verify=verify)
    return loaded.model, loaded.config, loaded.tokenizer


def load_native_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True):
    """``(model, cfg, tokenizer)`` of one native checkpoint directory of either format (see ``load_model``)."""
    from aoe.data import Tokenizer
    from aoe.model import Transformer

    path = Path(path)
    if verify:
        verify_checkpoint(path)
    cfg = ckpt.load_run_config(path)
    _check_weights_fit(cfg, path)
    model = Transformer(cfg.model)
    load_weights(model, path)
    model.to(device).eval()
    tok_file = path / TOKENIZER_FILE
    tokenizer = Tokenizer.load(tok_file) if tok_file.is_file() else None
    return model, cfg, tokenizer


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """The full weights of the (verified) native checkpoint ``path`` into ``model``, whichever
    format wrote it: a sharded one is assembled from its shards by this one process."""
    if is_sharded(path):
        sharded.load_model_state(model, path)
    else:
        ckpt.load_model_state(model, path)


def _check_weights_fit(cfg: RunConfig, path: Path) -> None:
    """The checkpoint's model config against its weights' header (``aoe.io.bounds``), before the
    model is built: a config.yaml that claims more than the weights hold is refused."""
    if is_sharded(path):  # no safetensors header: DCP's metadata is checked against the model on load
        return
    found = read_shapes([path / MODEL_FILE], CheckpointError)
    where = path / CONFIG_FILE
    names = {field: f"model.{field}" for field in ("n_layers", *SIZE_FIELDS)}
    check_sizes(cfg.model, found, where, CheckpointError, names=names)
    expected = {key.removeprefix("model."): shape for key, shape in native_shapes(cfg.model).items()}
    check_shapes(expected, found, where, CheckpointError)


def _load_hf_model(path: Path) -> torch.nn.Module:
    """The native model of an HF aoe directory, as ``aoe export --to-native`` reads it."""
    from safetensors import SafetensorError

    from aoe.errors import InputError
    from aoe.hf.native import load_aoe_directory

    try:
        return load_aoe_directory(path)
    except InputError:
        raise
    except (ValueError, SafetensorError) as e:  # no weights, weights that do not fit config.json, a bad header
        raise CheckpointError(f"cannot load the Hugging Face directory {str(path)!r}: {e}") from e


def _load_hf_tokenizer(path: Path, config: dict):
    """(Tokenizer, None) from ``path/tokenizer.json``, or (None, what is missing)."""
    from aoe.data import Tokenizer

    file = path / TOKENIZER_FILE
    if not file.is_file():
        others = [name for name in _OTHER_TOKENIZER_FILES if (path / name).is_file()]
        if not others:
            return None, f"{path} has no {TOKENIZER_FILE} (no tokenizer files at all)"
        return None, (f"{path} has no {TOKENIZER_FILE}, only {', '.join(others)}: aoe reads the tokenizers library's "
                      f"{TOKENIZER_FILE}; write one with transformers: AutoTokenizer.from_pretrained(DIR)"
                      ".save_pretrained(DIR)")
    return Tokenizer.load(file, eos_token=_hf_eos_token(path, config, file)), None


def _hf_eos_token(path: Path, config: dict, tokenizer_file: Path) -> str:
    """The end-of-text token of an HF directory: tokenizer_config.json's eos_token, else the token
    of config.json's eos_token_id (the first of a list), else ``<|endoftext|>``."""
    from aoe.data.tokenizer import EOS_TOKEN

    tok_config = path / "tokenizer_config.json"
    if tok_config.is_file():
        try:
            eos = json.loads(tok_config.read_text(encoding="utf-8")).get("eos_token")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            eos = None
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str) and eos:
            return eos
    eos_id = config.get("eos_token_id")
    eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
    if isinstance(eos_id, int) and not isinstance(eos_id, bool):
        import tokenizers

        try:
            token = tokenizers.Tokenizer.from_file(str(tokenizer_file)).id_to_token(eos_id)
        except Exception:  # tokenizers raises a plain Exception on a bad file; Tokenizer.load names it next
            token = None
        if token:
            return token
    return EOS_TOKEN
