"""Sharded checkpoints: each rank writes its own shards with ``torch.distributed.checkpoint`` (DCP).

A sharded checkpoint is a directory ``checkpoints/step_{step:08d}/`` like the one-process format
(``aoe.io.checkpoint``), with the weights and AdamW moments in DCP's files instead of
``model.safetensors`` and the optimizer entry of ``trainer_state.pt``::

    __{rank}_0.distcp   rank's shards of every weight and moment (DCP; replicated tensors once)
    .metadata           DCP's global metadata: every tensor's full shape and where its chunks are
    rank_{rank:05d}.pt  rank's data position and RNG states
    trainer_state.pt    step, counters, rank 0's data position and RNG (no optimizer)
    config.yaml, tokenizer.json
    checkpoint.json     "layout": "sharded", the world size, and the size and SHA-256 of every file

Every rank writes into the same hidden temporary directory (a file system all ranks see), hashes
its own files and sends the hashes to rank 0, which writes ``checkpoint.json`` last and renames
the directory into place as the one-process format does: a half-written save never looks
complete, verification, retention and moving aside work unchanged. No tensor is gathered: a rank
holds its own shards, and DCP's writer a bounded buffer.

A save has two halves (``begin_sharded_checkpoint``, then the ``ShardedWrite`` it returns): the
checks and the temporary directory, then the write. The write may run in a background thread
(``train.async_checkpoint``, ``aoe.io.background``) over a CPU copy of the state, its collectives
on a process group of its own so that they never interleave with the training's; it is the same
write, so the files and the guarantees are the same.

Loading reshards: DCP knows each tensor's full shape, so the shards land wherever the loading
layout wants them (FSDP over any number of ranks, expert parallelism, one process). The data
position and RNG of each rank are restored when the world size is the same, else every rank
takes rank 0's (as the one-process format does). One process reads a sharded checkpoint without a
process group (``load_model_state``, through ``aoe.io.models``: ``aoe eval``, ``generate``,
``export``); ``aoe.train.consolidate`` writes it in the one-process format.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.distributed.checkpoint.api import CheckpointException

from aoe.config import RunConfig, save_config
from aoe.io import checkpoint as ckpt
from aoe.io.background import hold_for_tests, snapshot
from aoe.io.layout import DCP_METADATA, SHARDED, rank_file
from aoe.parallel.state import load_training_state, training_state
from aoe.utils.files import file_sha256, fsync_dir, fsync_file, open_for_writing, reporting_write_errors


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _one_process() -> bool:
    return _rank_world()[1] == 1


@contextlib.contextmanager
def _quiet_one_process():
    """Without DCP's warning that a process without a group saves or loads alone (meant so here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .*(disabled|unavailable)")
        yield


def _from_rank0(make):
    """``make()``'s value on rank 0, sent to every rank; an error there is raised on every rank."""
    import torch.distributed as dist

    rank, world = _rank_world()
    value, error = None, None
    if rank == 0:
        try:
            value = make()
        except Exception as e:
            error = e
    if world > 1:
        box = [(value, None if error is None else f"{type(error).__name__}: {error}")]
        dist.broadcast_object_list(box, src=0)
        value, message = box[0]
        if rank != 0 and message is not None:
            raise ckpt.CheckpointError(f"rank 0 could not start the checkpoint ({message})")
    if error is not None:
        raise error
    return value


def _gather_to_rank0(obj, group=None) -> list | None:
    import torch.distributed as dist

    rank, world = _rank_world()
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0, group=group)
    return out


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------
def save_sharded_checkpoint(run_dir: str | os.PathLike, step: int, tensors: dict, cfg: RunConfig,
                            trainer_state: dict[str, Any], rank_state: dict[str, Any], tokenizer=None,
                            keep: int | None = None, retry_hint: str = "free some space, then try again"
                            ) -> Path | None:
    """Collective: write ``run_dir/checkpoints/step_{step:08d}`` in the sharded layout and return
    its path on rank 0 (None elsewhere). ``tensors``: this rank's shards
    (``aoe.parallel.state.training_state``); ``trainer_state``: rank 0's counters (no optimizer);
    ``rank_state``: this rank's data position and RNG. Refuses (CheckpointError) non-finite
    weights on any rank. Raises on rank 0 what went wrong anywhere; the other ranks raise only for
    their own failures (so the caller agrees on the outcome, e.g. with an all-reduce)."""
    return begin_sharded_checkpoint(run_dir, step, tensors, cfg, trainer_state, rank_state, tokenizer=tokenizer,
                                    keep=keep, retry_hint=retry_hint)()


def begin_sharded_checkpoint(run_dir: str | os.PathLike, step: int, tensors: dict, cfg: RunConfig,
                             trainer_state: dict[str, Any], rank_state: dict[str, Any], tokenizer=None,
                             keep: int | None = None, retry_hint: str = "free some space, then try again",
                             copy: bool = False, group=None) -> "ShardedWrite":
    """Collective, the first half of ``save_sharded_checkpoint`` (its arguments, its errors): the
    non-finite check and the temporary directory. Returns the second half, the write, to call on
    every rank. ``copy``: the write gets a CPU copy of the state (``aoe.io.background.snapshot``),
    so that it may run in a thread while training changes the state; ``group``: the process group
    its collectives use (one of its own, beside the training's; None: the default group)."""
    _refuse_non_finite(step, tensors)
    root = Path(run_dir) / ckpt.CHECKPOINT_DIR
    final = root / f"step_{step:08d}"
    advice = lambda: ckpt._nothing_lost(run_dir, retry_hint)  # noqa: E731
    tmp = _from_rank0(lambda: _start(root, final, advice))
    try:
        if copy:
            tensors, trainer_state, rank_state = snapshot((tensors, trainer_state, rank_state))
    except BaseException:
        if _rank_world()[0] == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ShardedWrite(Path(run_dir), step, tmp, final, advice, tensors, cfg, trainer_state, rank_state,
                        tokenizer, keep, group)


@dataclass
class ShardedWrite:
    """The second half of a sharded save (``begin_sharded_checkpoint``); calling it writes."""

    run_dir: Path
    step: int
    tmp: Path
    final: Path
    advice: Callable[[], str]
    tensors: dict
    cfg: RunConfig
    trainer_state: dict[str, Any]
    rank_state: dict[str, Any]
    tokenizer: Any
    keep: int | None
    group: Any

    def __call__(self) -> Path | None:
        """Collective over ``group``: every rank's shards and rank file, hashed; then rank 0 writes
        ``checkpoint.json``, renames the directory into place and applies retention. The path on
        rank 0, None elsewhere; on failure the temporary directory is removed."""
        rank, world = _rank_world()
        try:
            _write_shards(self.tmp, self.tensors, self.final, self.advice, self.group)
            hold_for_tests(self.step)
            reports = _gather_to_rank0(_write_rank_file(self.tmp, rank, self.rank_state), self.group)
            if rank != 0:
                return None
            with reporting_write_errors(self.final, self.advice, ckpt.CheckpointWriteError):
                _raise_failed(reports, self.final)
                _write_common(self.tmp, self.step, world, self.cfg, self.trainer_state, self.tokenizer, reports)
                ckpt._commit(self.tmp, self.final)
        except BaseException:
            if rank == 0:
                shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        ckpt._remember_verified(self.final)
        if self.keep:
            ckpt.prune_checkpoints(self.run_dir, self.keep, current=self.final)
        return self.final


def _refuse_non_finite(step: int, tensors: dict) -> None:
    """CheckpointError on every rank when any rank's weights hold a NaN or inf (named where seen)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    bad = None
    for name, t in tensors["model"].items():
        local = t.to_local() if isinstance(t, DTensor) else t
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            bad = name
            break
    flag = torch.tensor([int(bad is not None)])
    if _rank_world()[1] > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        where = f"parameter {bad!r} holds NaN or inf" if bad else "another rank's parameters hold NaN or inf"
        raise ckpt.CheckpointError(f"refusing to save step {step}: {where}")


def _start(root: Path, final: Path, advice) -> Path:
    """Rank 0: clean what interrupted saves left, and make the temporary directory."""
    tmp = root / f"{ckpt._TMP}{final.name}-{uuid.uuid4().hex[:8]}"
    with reporting_write_errors(final, advice, ckpt.CheckpointWriteError):
        root.mkdir(parents=True, exist_ok=True)
        ckpt._clean_stale(root)
        tmp.mkdir()
    return tmp


def _write_shards(tmp: Path, tensors: dict, final: Path, advice, group=None) -> None:
    """Collective (over ``group``): DCP writes every rank's shards and rank 0 the global metadata."""
    import torch.distributed.checkpoint as dcp

    with reporting_write_errors(final, advice, ckpt.CheckpointWriteError):
        try:
            with _quiet_one_process():
                dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True),
                         process_group=group, no_dist=_one_process())
        except CheckpointException as e:
            raise _dcp_failure(e) from e


def _dcp_failure(error: CheckpointException) -> Exception:
    """DCP's error, a BaseException that gathers every rank's failure over many lines, as one
    ordinary exception: the first OSError among them as it is (a full disk then reads as one,
    ``reporting_write_errors``), else a CheckpointError naming the first rank's cause in a line."""
    failures = sorted(error.failures.items(), key=lambda item: item[0])
    for _rank, (exc, _trace) in failures:
        if isinstance(exc, OSError):
            return exc
    rank, (exc, _trace) = failures[0]
    return ckpt.CheckpointError(f"rank {rank}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")


def _write_rank_file(tmp: Path, rank: int, rank_state: dict) -> dict:
    """This rank's state file, fsync'ed; {file name: size and SHA-256} of the files this rank
    wrote, or {"error": message}."""
    try:
        with open_for_writing(tmp / rank_file(rank)) as f:
            torch.save(rank_state, f)
        own = [tmp / rank_file(rank), *sorted(tmp.glob(f"__{rank}_*.distcp"))]
        report = {}
        for file in own:
            fsync_file(file)
            report[file.name] = {"bytes": file.stat().st_size, "sha256": file_sha256(file)}
        return report
    except OSError as e:
        return {"error": f"rank {rank}: {e}"}


def _raise_failed(reports: list[dict], final: Path) -> None:
    failed = [r["error"] for r in reports if "error" in r]
    if failed:
        raise ckpt.CheckpointError(f"could not write the checkpoint {str(final)!r}: {'; '.join(failed)}")


def _write_common(tmp: Path, step: int, world: int, cfg: RunConfig, trainer_state: dict, tokenizer,
                  reports: list[dict]) -> None:
    """Rank 0: config, tokenizer, trainer state, then ``checkpoint.json`` listing every file."""
    save_config(cfg, tmp / ckpt.CONFIG_FILE)
    if tokenizer is not None:
        tokenizer.save(tmp)
    with open_for_writing(tmp / ckpt.STATE_FILE) as f:
        torch.save(trainer_state, f)
    files = {}
    for name in (ckpt.CONFIG_FILE, ckpt.TOKENIZER_FILE, ckpt.STATE_FILE, DCP_METADATA):
        file = tmp / name
        if file.is_file():
            fsync_file(file)
            files[name] = {"bytes": file.stat().st_size, "sha256": file_sha256(file)}
    for report in reports:
        files.update(report)
    meta = {"format_version": ckpt.FORMAT_VERSION, "layout": SHARDED, "step": step, "world_size": world,
            "files": dict(sorted(files.items()))}
    with open_for_writing(tmp / ckpt.META_FILE) as f:
        f.write(json.dumps(meta, indent=2).encode("utf-8"))
    fsync_dir(tmp)


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------
def load_tensors(path: str | os.PathLike, tensors: dict) -> None:
    """Collective (or one process without a group): fill ``tensors`` in place from the (verified)
    sharded checkpoint ``path``, resharded to their layout. CheckpointError naming ``path`` when
    it does not hold them."""
    import torch.distributed.checkpoint as dcp

    try:
        with _quiet_one_process():
            dcp.load(tensors, storage_reader=dcp.FileSystemReader(str(path)), no_dist=_one_process())
    except CheckpointException as e:
        raise ckpt.CheckpointError(f"cannot read the sharded checkpoint {str(path)!r}: {_dcp_failure(e)}") from e
    except Exception as e:
        first = " ".join(str(e).split())[:400]
        raise ckpt.CheckpointError(f"cannot read the sharded checkpoint {str(path)!r}: {first}") from e


def load_rank_state(path: str | os.PathLike, rank: int, world: int) -> dict | None:
    """This rank's data position and RNG when ``path`` was written by ``world`` ranks, else None."""
    if json.loads((Path(path) / ckpt.META_FILE).read_text()).get("world_size") != world:
        return None
    file = Path(path) / rank_file(rank)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ckpt.CheckpointError(f"cannot read {str(file)!r}: {e}") from e


def load_training(path: str | os.PathLike, model, optimizer, expert_parallel=None) -> None:
    """Collective: the model's and optimizer's shards of the sharded checkpoint ``path``, in this
    run's layout (``aoe.parallel.state``)."""
    tensors = training_state(model, optimizer, expert_parallel)
    load_tensors(path, tensors)
    load_training_state(model, optimizer, tensors, expert_parallel)


def load_model_state(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """One process: the full weights of the sharded checkpoint ``path`` into ``model``."""
    load_training(path, model, None)
