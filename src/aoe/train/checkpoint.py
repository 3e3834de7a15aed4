"""Checkpoints: written atomically, verified before use, never overwriting a good one with a bad one.

A run directory holds ``checkpoints/step_{step:08d}/``, each with:

    model.safetensors   the model's state dict (a tied lm_head stored once, as embed_tokens.weight)
    config.yaml         the resolved run config (model.vocab_size filled in)
    tokenizer.json      the tokenizer the model was trained with (when there is one)
    trainer_state.pt    optimizer, step, data position, RNG states, counters (``torch.load``-safe)
    checkpoint.json     format version, step, and the size and SHA-256 of every file above

A checkpoint is written into a hidden temporary directory beside its final place, every file is
fsync'ed, and only then is the directory renamed to ``step_XXXXXXXX``: a crash leaves at most a
``.tmp-*`` directory, which is ignored (and cleaned up by the next save). ``checkpoint.json`` is
checked on load: a truncated or altered file is refused with an error naming it, and
``find_latest_checkpoint`` falls back to the newest checkpoint that verifies.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from aoe.config import RunConfig, load_config, save_config
from aoe.utils.files import file_sha256, fsync_dir, fsync_file

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "trainer_state.pt"
META_FILE = "checkpoint.json"
_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


# ---------------------------------------------------------------------------------------------
# Low-level helpers
# ---------------------------------------------------------------------------------------------
def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict, contiguous, with a tied ``lm_head.weight`` left out (stored once)."""
    state = model.state_dict()
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    if tied:
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith(_PREFIX):
        return None
    digits = name[len(_PREFIX):]
    return int(digits) if digits.isdigit() else None


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------
def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    cfg: RunConfig,
    trainer_state: dict[str, Any],
    tokenizer=None,
    keep: int | None = None,
) -> Path:
    """Write ``run_dir/checkpoints/step_{step:08d}`` atomically and return its path.

    Refuses (CheckpointError) to save a model with a NaN or inf parameter: a bad state never
    replaces a good one. ``keep``: afterwards delete all but the newest ``keep`` checkpoints
    (0 or None keeps all); older ones are deleted only once the new one is complete.
    """
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise CheckpointError(f"refusing to save step {step}: parameter {name!r} holds NaN or inf")
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(model_state_for_saving(model), str(tmp / MODEL_FILE), metadata={"format": "pt", "step": str(step)})
        save_config(cfg, tmp / CONFIG_FILE)
        if tokenizer is not None:
            tokenizer.save(tmp)
            if not (tmp / TOKENIZER_FILE).is_file():  # pragma: no cover - Tokenizer.save writes tokenizer.json
                raise CheckpointError("tokenizer.save did not write tokenizer.json")
        torch.save(trainer_state, tmp / STATE_FILE)
        files = {}
        for file in sorted(tmp.iterdir()):
            fsync_file(file)
            files[file.name] = {"bytes": file.stat().st_size, "sha256": file_sha256(file)}
        meta = {"format_version": FORMAT_VERSION, "step": step, "files": files}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        fsync_file(tmp / META_FILE)
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. a resumed run): replace it only now
            old = root / f".tmp-old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep:
        for old in list_checkpoints(run_dir)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# Find and verify
# ---------------------------------------------------------------------------------------------
def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories of a run, oldest first (temporary directories excluded; unverified)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if p.is_dir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check a checkpoint directory against its ``checkpoint.json``; return that metadata.

    Raises CheckpointError naming the first missing, truncated or altered file.
    """
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{str(path)!r} is not a complete checkpoint: {META_FILE} is missing")
    try:
        meta = json.loads(meta_file.read_text())
        files = meta["files"]
        version = meta["format_version"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{str(meta_file)!r} is unreadable or malformed: {e}") from e
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r} has checkpoint format {version!r}; this version reads {FORMAT_VERSION}")
    for required in (MODEL_FILE, CONFIG_FILE, STATE_FILE):
        if required not in files:
            raise CheckpointError(f"{str(path)!r}: {META_FILE} does not list {required}")
    for name, info in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {str(file)!r} is missing")
        size = file.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint file {str(file)!r} is {size} bytes, expected {info['bytes']} (truncated?)")
        if file_sha256(file) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {str(file)!r} does not match its SHA-256 (corrupt)")
    return meta


def find_latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint of ``run_dir`` that verifies; corrupt ones are skipped with a warning
    (and left on disk for inspection). None when there is none."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(f"skipping a bad checkpoint: {e}", stacklevel=2)
            continue
        return path
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from either a checkpoint directory or a run directory (newest good one)."""
    path = Path(path)
    if (path / META_FILE).is_file() or checkpoint_step(path) is not None:
        return path
    if (path / CHECKPOINT_DIR).is_dir():
        latest = find_latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"run directory {str(path)!r} holds no complete checkpoint")
        return latest
    raise CheckpointError(f"{str(path)!r} is neither a checkpoint directory nor a run directory with checkpoints/")


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------
def load_model_state(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load ``model.safetensors`` of a (verified) checkpoint into ``model`` (strict, tied-aware)."""
    file = Path(path) / MODEL_FILE
    try:
        state = load_file(str(file))
    except Exception as e:  # safetensors raises several types on bad headers
        raise CheckpointError(f"cannot read {str(file)!r}: {e}") from e
    if getattr(getattr(model, "config", None), "tie_embeddings", False) and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{str(file)!r} does not fit the model: missing {missing}, unexpected {unexpected}")


def load_run_config(path: str | os.PathLike) -> RunConfig:
    return load_config(Path(path) / CONFIG_FILE)


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / STATE_FILE
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {str(file)!r}: {e}") from e


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True):
    """Load a trained model for inference.

    path: a checkpoint directory or a run directory (its newest good checkpoint).
    Returns ``(model, cfg, tokenizer)``: a ``Transformer`` in eval mode on ``device``, the
    ``RunConfig`` it was trained with, and its ``aoe.data.Tokenizer`` (None if not saved).
    """
    from aoe.data import Tokenizer
    from aoe.model import Transformer

    ckpt = resolve_checkpoint(path)
    if verify:
        verify_checkpoint(ckpt)
    cfg = load_run_config(ckpt)
    model = Transformer(cfg.model)
    load_model_state(model, ckpt)
    model.to(device).eval()
    tok_file = ckpt / TOKENIZER_FILE
    tokenizer = Tokenizer.load(tok_file) if tok_file.is_file() else None
    return model, cfg, tokenizer



def save_model_checkpoint(run_dir: str | os.PathLike, model: torch.nn.Module, tokenizer=None, step: int = 0) -> Path:
    """Write a model that was not trained here (imported, converted) as a native checkpoint of
    ``run_dir``, so ``aoe eval``, ``aoe generate`` and ``load_model`` take it. The run config is the
    model's config with data/train defaults fitted to it; the trainer state holds only the step."""
    from aoe.config import DataConfig, TrainConfig

    mcfg = copy.deepcopy(model.config)
    data = DataConfig(vocab_size=mcfg.vocab_size if tokenizer is None else tokenizer.vocab_size)
    cfg = RunConfig(model=mcfg, data=data, train=TrainConfig(seq_len=min(128, mcfg.max_seq_len)))
    return save_checkpoint(run_dir, step, model.float(), cfg, {"step": step}, tokenizer=tokenizer)
