"""Checkpoints: written atomically, verified before use, never overwriting a good one with a bad one.

A run directory holds ``checkpoints/step_{step:08d}/``, each with:

    model.safetensors   the model's state dict (a tied lm_head stored once, as embed_tokens.weight)
    config.yaml         the resolved run config (model.vocab_size filled in)
    tokenizer.json      the tokenizer the model was trained with (when there is one)
    trainer_state.pt    optimizer, step, data position, RNG states, counters (``torch.load``-safe)
    checkpoint.json     format version, step, and the size and SHA-256 of every file above

A checkpoint is written into a hidden temporary directory beside its final place, every file is
fsync'ed, and only then is the directory renamed to ``step_XXXXXXXX`` (with SIGINT/SIGTERM held
back during the renames): a crash leaves at most a ``.tmp-*`` directory, which is ignored (and
cleaned up by the next save, which also puts back a checkpoint whose replacement was cut short).
A write the system refuses (disk full, quota...) raises ``CheckpointWriteError`` naming the path,
the cause and the newest good checkpoint; the temporary directory is removed.

``checkpoint.json`` is checked on load: a truncated or altered file, or a directory whose name
is not the step its ``checkpoint.json`` records (renamed), is refused with an error naming it,
and ``find_latest_checkpoint`` falls back to the newest checkpoint that verifies.
A checkpoint that does not verify is never deleted or overwritten by a run: the run moves it
aside to ``step_XXXXXXXX.corrupt`` (``.corrupt-2``, ... when taken) and says so, and it no longer
counts as a checkpoint. Retention (``keep``) counts only checkpoints that verify.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from aoe.config import DataConfig, RunConfig, TrainConfig, save_config
from aoe.config.files import load_saved_config
from aoe.errors import shown
from aoe.io.layout import (  # noqa: F401  (the file names, read as ckpt.MODEL_FILE... too)
    CHECKPOINT_DIR, CONFIG_FILE, FORMAT_VERSION, META_FILE, MODEL_FILE, STATE_FILE, TOKENIZER_FILE, is_sharded,
    required_files,
)
from aoe.utils.files import (
    WriteError, file_sha256, fsync_dir, fsync_file, open_for_writing, reporting_write_errors, share_as_umask_allows,
    replace_directory,
)

CORRUPT_SUFFIX = ".corrupt"
_PREFIX = "step_"
_TMP = ".tmp-"  # every temporary entry of checkpoints/ starts with this
_TMP_OLD = ".tmp-old-"  # a checkpoint being replaced by a new save of the same step
_TMP_DELETING = ".tmp-deleting-"  # a checkpoint retention is deleting


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


class CheckpointWriteError(CheckpointError, WriteError):
    """The system refused to write a checkpoint (disk full, quota...); the previous ones are untouched."""


# ---------------------------------------------------------------------------------------------
# Low-level helpers
# ---------------------------------------------------------------------------------------------
def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as a native checkpoint stores it: contiguous, floating tensors in
    fp32 (copies where the model holds another dtype; the model itself is left as it is), with a
    tied ``lm_head.weight`` left out (stored once)."""
    state = model.state_dict()
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    if tied:
        state.pop("lm_head.weight", None)
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous() for k, v in state.items()}


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
    retry_hint: str = "free some space, then try again",
) -> Path:
    """Write ``run_dir/checkpoints/step_{step:08d}`` atomically and return its path.

    Refuses (CheckpointError) to save a model with a NaN or inf parameter: a bad state never
    replaces a good one. A checkpoint of the same step already there is replaced once the new
    one is complete if it verifies, and moved aside (``.corrupt``) if it does not. ``keep``:
    afterwards keep the newest ``keep`` checkpoints that verify (this one included) and delete
    the older ones (0 or None keeps all; see ``prune_checkpoints``). A write the system refuses
    raises CheckpointWriteError ("no space left on device while writing ...: nothing on disk was
    lost, the newest good checkpoint is ...; <retry_hint>") with the temporary files removed.
    """
    return save_weights(run_dir, step, model_state_for_saving(model), cfg, trainer_state, tokenizer=tokenizer,
                        keep=keep, retry_hint=retry_hint)


def save_weights(run_dir: str | os.PathLike, step: int, weights: dict[str, torch.Tensor], cfg: RunConfig,
                 trainer_state: dict[str, Any], tokenizer=None, keep: int | None = None,
                 retry_hint: str = "free some space, then try again") -> Path:
    """``save_checkpoint`` of the state dict ``weights`` as ``model_state_for_saving`` gives it
    (what a background save writes from its copy of the state); the same checks and guarantees."""
    refuse_non_finite(step, weights)
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f"{_TMP}{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        with reporting_write_errors(final, lambda: _nothing_lost(run_dir, retry_hint), CheckpointWriteError):
            root.mkdir(parents=True, exist_ok=True)
            _clean_stale(root)
            tmp.mkdir()
            _write_files(tmp, step, weights, cfg, trainer_state, tokenizer)
            _commit(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remember_verified(final)
    if keep:
        prune_checkpoints(run_dir, keep, current=final)
    return final


def refuse_non_finite(step: int, weights: dict[str, torch.Tensor]) -> None:
    """CheckpointError naming the first weight that holds a NaN or inf: a bad state never replaces a good one."""
    for name, p in weights.items():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise CheckpointError(f"refusing to save step {step}: parameter {name!r} holds NaN or inf")


def _write_files(tmp: Path, step: int, weights: dict[str, torch.Tensor], cfg: RunConfig,
                 trainer_state: dict[str, Any], tokenizer) -> None:
    """Every file of a checkpoint into ``tmp``, fsync'ed, ``checkpoint.json`` last."""
    save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt", "step": str(step)})
    save_config(cfg, tmp / CONFIG_FILE)
    if tokenizer is not None:
        tokenizer.save(tmp)
        if not (tmp / TOKENIZER_FILE).is_file():  # pragma: no cover - Tokenizer.save writes tokenizer.json
            raise CheckpointError("tokenizer.save did not write tokenizer.json")
    with open_for_writing(tmp / STATE_FILE) as f:  # a full disk raises ENOSPC, not a bare "unexpected pos"
        torch.save(trainer_state, f)
    share_as_umask_allows(tmp)  # safetensors writes its files 0600
    files = {}
    for file in sorted(tmp.iterdir()):
        fsync_file(file)
        files[file.name] = {"bytes": file.stat().st_size, "sha256": file_sha256(file)}
    meta = {"format_version": FORMAT_VERSION, "step": step, "files": files}
    with open_for_writing(tmp / META_FILE) as f:
        f.write(json.dumps(meta, indent=2).encode("utf-8"))
    fsync_dir(tmp)


def _commit(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final``, uninterrupted by SIGINT/SIGTERM. A checkpoint
    already at ``final`` is replaced if it verifies, else moved aside; never overwritten unseen."""
    root = final.parent
    if final.exists():
        try:
            verify_checkpoint_cached(final)
        except CheckpointError as e:
            aside = quarantine_checkpoint(final)
            warnings.warn(f"checkpoint {str(final)!r} does not verify ({e}); moved it to {str(aside)!r} "
                          "and saved the new one in its place", stacklevel=3)
    # a good checkpoint of the same step (e.g. a model saved again) is replaced now
    replace_directory(tmp, final, aside=root / f"{_TMP_OLD}{final.name}-{uuid.uuid4().hex[:8]}")


def _clean_stale(root: Path) -> None:
    """Remove what interrupted saves left in ``root`` (``.tmp-*``); a checkpoint whose replacement
    was cut between its two renames is put back in place."""
    for stale in root.glob(f"{_TMP}*"):
        if stale.name.startswith(_TMP_OLD):
            target = root / stale.name[len(_TMP_OLD):].rsplit("-", 1)[0]
            if checkpoint_step(target) is not None and not target.exists():
                os.rename(stale, target)
                continue
        shutil.rmtree(stale, ignore_errors=True)


def _nothing_lost(run_dir: str | os.PathLike, retry_hint: str) -> str:
    """The second half of a failed save's message: what is still on disk, and what to do."""
    where = resume_hint(_newest_good(run_dir), none="no earlier checkpoint exists")
    return f"nothing on disk was lost ({where}); {retry_hint}"


def resume_hint(latest: Path | None, then: str | None = None, none: str = "no checkpoint was saved yet") -> str:
    """The one wording of where a run can continue from, for every message that says it:
    "the newest good checkpoint is '<latest>'[; <then>]", or ``none`` when there is none."""
    if latest is None:
        return none
    return f"the newest good checkpoint is {str(latest)!r}" + (f"; {then}" if then else "")


# ---------------------------------------------------------------------------------------------
# Retention and corrupt checkpoints
# ---------------------------------------------------------------------------------------------
def prune_checkpoints(run_dir: str | os.PathLike, keep: int, current: Path | None = None) -> None:
    """Keep the newest ``keep`` checkpoints of ``run_dir`` that verify (``current``, the one just
    written, always among them) and delete the older ones.

    A checkpoint that does not verify takes no place: it is moved aside (``.corrupt``) with a
    warning naming where it went, so a good checkpoint is never deleted while a bad one is
    kept instead. Checks are ``verify_checkpoint_cached``: a full SHA-256 only the first time a
    process meets a checkpoint, so a pass over ``keep`` checkpoints costs a few ``stat`` calls.
    """
    kept = 1 if current is not None else 0
    for path in reversed(list_checkpoints(run_dir)):
        if current is not None and path == current:
            continue
        if kept >= keep:
            _delete_checkpoint(path)
            continue
        try:
            verify_checkpoint_cached(path)
        except CheckpointError as e:
            try:
                where = f"moved it to {str(quarantine_checkpoint(path))!r}"
            except CheckpointError as failed:  # left in place, still not counted
                where = str(failed)
            warnings.warn(f"a bad checkpoint takes no place among the {keep} kept: {e}; {where}", stacklevel=3)
            continue
        kept += 1


def _delete_checkpoint(path: Path) -> None:
    """Delete a checkpoint directory so that it disappears at once (renamed, then removed)."""
    doomed = path.with_name(f"{_TMP_DELETING}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, doomed)
    except OSError:
        doomed = path
    _VERIFIED.pop(_key(path), None)
    shutil.rmtree(doomed, ignore_errors=True)


def quarantine_checkpoint(path: str | os.PathLike) -> Path:
    """Move a checkpoint that does not verify aside, to ``step_XXXXXXXX.corrupt`` (or
    ``.corrupt-2``, ``.corrupt-3``... when taken), where it no longer counts as a checkpoint but
    is kept for inspection. Returns the new path; CheckpointError if it cannot be renamed."""
    path = Path(path)
    aside = path.with_name(path.name + CORRUPT_SUFFIX)
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}{CORRUPT_SUFFIX}-{n}")
    try:
        os.rename(path, aside)
    except OSError as e:
        raise CheckpointError(f"cannot move the bad checkpoint {str(path)!r} aside to {str(aside)!r}: {e}; "
                              "move or delete it by hand") from e
    _VERIFIED.pop(_key(path), None)
    return aside


# ---------------------------------------------------------------------------------------------
# Find and verify
# ---------------------------------------------------------------------------------------------
def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories of a run, oldest first (temporary and moved-aside ones excluded; unverified)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if p.is_dir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check a checkpoint directory against its ``checkpoint.json`` (sizes and SHA-256 of every
    file); return that metadata.

    Raises CheckpointError naming the first missing, truncated, altered or unreadable file.
    """
    path = Path(path)
    try:
        before = _fingerprint(path)
        meta = _verify(path)
        if _fingerprint(path) == before:
            _VERIFIED[_key(path)] = before
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {e}") from e
    return meta


def _verify(path: Path) -> dict:
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{str(path)!r} is not a complete checkpoint: {META_FILE} is missing")
    try:
        meta = json.loads(meta_file.read_text())
        files = meta["files"]
        version = meta["format_version"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{str(meta_file)!r} is unreadable or malformed: {e}") from e
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r} has checkpoint format {version!r}; this version reads {FORMAT_VERSION}")
    _check_step_name(path, meta.get("step"))
    for required in required_files(meta):
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


def _check_step_name(path: Path, step: Any) -> None:
    """A ``step_XXXXXXXX`` directory must hold the checkpoint of that step (one renamed, or whose
    checkpoint.json was edited, would be taken for another step)."""
    named = checkpoint_step(path)
    if named is None or step == named:
        return
    fix = (f"rename it back to {_PREFIX}{step:08d} or remove it" if isinstance(step, int) and step >= 0
           else "remove it")
    raise CheckpointError(f"{str(path)!r} is named for step {named} but its {META_FILE} records step {shown(step)} "
                          f"(renamed or edited): {fix}")


# Checkpoints this process has fully verified (or written and hashed), with the (name, size,
# mtime, inode) of each of their files at that time.
_VERIFIED: dict[str, tuple] = {}


def _key(path: Path) -> str:
    return os.path.abspath(path)


def _fingerprint(path: Path) -> tuple:
    entries = []
    for file in sorted(path.iterdir()):
        st = file.stat()
        entries.append((file.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(entries)


def _remember_verified(path: Path) -> None:
    """Record a checkpoint this process has just written (its files were hashed as they were written)."""
    _VERIFIED[_key(path)] = _fingerprint(path)


def verify_checkpoint_cached(path: str | os.PathLike) -> None:
    """``verify_checkpoint``, hashing each checkpoint once per process.

    Full SHA-256 verification reads every byte, which is too slow to repeat on every save of a
    large model. So a checkpoint this process wrote (hashed as it was written) or already
    verified counts as good while none of its files changed size, modification time or inode
    since; anything else gets the full check. Resuming, which starts a fresh process, therefore
    always hashes the checkpoint it loads, and retention costs a few ``stat`` calls per pass.
    Raises CheckpointError as ``verify_checkpoint`` does.
    """
    path = Path(path)
    try:
        if _VERIFIED.get(_key(path)) == _fingerprint(path):
            return
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {e}") from e
    verify_checkpoint(path)


def _newest_good(run_dir: str | os.PathLike, on_bad: Callable[[Path, CheckpointError], None] | None = None
                 ) -> Path | None:
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint_cached(path)
        except CheckpointError as e:
            if on_bad is not None:
                on_bad(path, e)
            continue
        return path
    return None


def find_latest_checkpoint(run_dir: str | os.PathLike, move_aside: bool = False) -> Path | None:
    """The newest checkpoint of ``run_dir`` that verifies; None when there is none.

    A corrupt one is skipped with a warning and kept on disk: left in place by default (reading
    changes nothing), or, with ``move_aside`` (a run about to write there), moved to
    ``step_XXXXXXXX.corrupt`` so that no later save overwrites it or counts it as a checkpoint.
    """
    if move_aside:
        root = Path(run_dir) / CHECKPOINT_DIR
        if root.is_dir():
            _clean_stale(root)

    def skip(path: Path, error: CheckpointError) -> None:
        if move_aside:
            aside = quarantine_checkpoint(path)
            warnings.warn(f"skipping a bad checkpoint: {error}; moved it to {str(aside)!r}", stacklevel=4)
        else:
            warnings.warn(f"skipping a bad checkpoint: {error}", stacklevel=4)

    return _newest_good(run_dir, on_bad=skip)


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
    """Load ``model.safetensors`` of a (verified) one-process checkpoint into ``model`` (strict,
    tied-aware). A checkpoint of either format: ``aoe.io.models.load_weights``."""
    file = Path(path) / MODEL_FILE
    if is_sharded(path):
        raise CheckpointError(f"{str(path)!r} is a sharded checkpoint, without {MODEL_FILE}: read it with "
                              "aoe.io.models.load_weights, or consolidate it (aoe checkpoint consolidate)")
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
    """The run config a checkpoint was saved with (keys added since read as the run was trained:
    ``aoe.config.files.SAVED_MODEL_DEFAULTS``)."""
    return load_saved_config(Path(path) / CONFIG_FILE)


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / STATE_FILE
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {str(file)!r}: {e}") from e


def imported_run_config(model_config, tokenizer=None) -> RunConfig:
    """The run config of a model that was not trained here (imported, converted): its model
    config with the data/train defaults fitted to it (vocab_size from the tokenizer when there is
    one, seq_len = min(128, max_seq_len))."""
    mcfg = copy.deepcopy(model_config)
    data = DataConfig(vocab_size=mcfg.vocab_size if tokenizer is None else tokenizer.vocab_size)
    return RunConfig(model=mcfg, data=data, train=TrainConfig(seq_len=min(128, mcfg.max_seq_len)))


def save_model_checkpoint(run_dir: str | os.PathLike, model: torch.nn.Module, tokenizer=None, step: int = 0) -> Path:
    """Write a model that was not trained here (imported, converted) as a native checkpoint of
    ``run_dir``, so ``aoe eval``, ``aoe generate`` and ``aoe.io.models.load_model`` take it. The run config is the
    model's config with data/train defaults fitted to it; the trainer state holds only the step."""
    cfg = imported_run_config(model.config, tokenizer)
    return save_checkpoint(run_dir, step, model, cfg, {"step": step}, tokenizer=tokenizer)
