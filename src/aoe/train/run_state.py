"""A run's checkpoints from the trainer's side: what is saved beyond the weights, and resuming.

``RunCheckpoints(out_dir, cfg, plan, optimizer, sampler, dist, device, tokenizer)``:

- ``save(state, background=False)``: collective; the checkpoint of ``state.step`` in the
  single-process format (``aoe.io.checkpoint``, written by rank 0 from the plan's ``full_state``)
  or in this run's shards (``aoe.io.sharded``, every rank writing its own), as
  ``train.checkpoint_format`` and the plan say; the ranks agree on failure, so every rank raises
  if it was not written. In the ``background`` (``train.async_checkpoint``) the state is copied
  and written by a thread (``aoe.io.background``); one write at a time: ``finish()`` (collective)
  waits for it and raises its error on every rank, as the synchronous save would have, and every
  save, ``finish`` first. ``close()`` waits for it on one rank, when the run ends on an error.
- ``resume()``: collective; the newest good checkpoint of ``out_dir`` (rank 0 looks, moving a
  corrupt one aside) loaded into the model, optimizer, sampler and RNG in this run's layout,
  after ``check_same_run`` refused settings the checkpoint's run did not have. Returns its
  ``TrainState`` and path.

The checkpoint holds, beside the weights and optimizer moments, ``TrainState``, the sampler's
position, the RNG states and the world size; a sharded one also each rank's own sampler and RNG.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
from torch.distributed import new_group

from aoe.config import ConfigError, RunConfig, config_to_dict
from aoe.config.files import INIT_ONLY_MODEL_KEYS
from aoe.data import BatchSampler
from aoe.io import checkpoint as ckpt
from aoe.io import sharded
from aoe.io.background import BackgroundWrite, held_step, snapshot
from aoe.io.layout import is_sharded
from aoe.train.distributed import DistInfo, any_rank, broadcast_object
from aoe.train.plans import ParallelPlan

#: The second half of a save: writes on every rank, returns the path on rank 0 (None elsewhere).
Write = Callable[[], "Path | None"]

#: Settings a resumed run must keep: they decide the tokenizer, the data order and what the
#: run's config.yaml says it was trained with.
RESUME_FIXED_KEYS = (("data", "vocab_size"), ("train", "batch_size"), ("train", "seq_len"), ("train", "seed"))
RETRY_HINT = "free some space, then continue with --resume"


@dataclass
class TrainState:
    """What, beyond weights and optimizer, a checkpoint must restore to continue exactly."""

    step: int = 0  # optimizer steps completed
    tokens: int = 0  # training tokens consumed (all ranks)
    train_time_s: float = 0.0  # time spent in training steps (evaluation and saving excluded)
    skipped_steps: int = 0


def keep_saved_init(cfg: RunConfig, saved: RunConfig) -> None:
    """Init-only settings (``INIT_ONLY_MODEL_KEYS``) do not change a resumed model, whose weights
    come from the checkpoint: the run keeps the ones it was started with, whatever today's
    defaults or the config given now say (a run started before a default changed resumes)."""
    for key in INIT_ONLY_MODEL_KEYS:
        setattr(cfg.model, key, getattr(saved.model, key))


def check_same_run(cfg: RunConfig, saved: RunConfig, path: Path) -> None:
    """Refuse to resume with settings that the checkpoint's run did not have: the ones that
    decide the data order and the record of the run (``RESUME_FIXED_KEYS``), then the model."""
    now, then = config_to_dict(cfg), config_to_dict(saved)
    changed = [f"{section}.{key}={now[section][key]!r} (the run has {then[section][key]!r})"
               for section, key in RESUME_FIXED_KEYS if now[section][key] != then[section][key]]
    if changed:
        raise ConfigError(f"--resume: {', '.join(changed)} {_differ(changed)} from {str(path)!r}: resume with "
                          "the run's values, or start a new run with another --out")
    model = [f"model.{key}={value!r} (the run has {then['model'].get(key)!r})"
             for key, value in now["model"].items() if then["model"].get(key) != value]
    if model:
        raise ConfigError(f"--resume: {', '.join(model)} {_differ(model)} from the model in {str(path)!r}; "
                          "resume with the same model.* settings")


def _differ(items: list) -> str:
    return "differs" if len(items) == 1 else "differ"


class RunCheckpoints:
    """Saving and resuming the checkpoints of one run (see the module docstring)."""

    def __init__(self, out_dir: Path, cfg: RunConfig, plan: ParallelPlan, optimizer: torch.optim.Optimizer,
                 sampler: BatchSampler, dist: DistInfo, device: torch.device, tokenizer=None):
        self.out_dir, self.cfg, self.plan, self.optimizer = out_dir, cfg, plan, optimizer
        self.sampler, self.dist, self.device, self.tokenizer = sampler, dist, device, tokenizer
        self._pending: BackgroundWrite | None = None  # the save in flight (train.async_checkpoint)
        self._newest: Path | None = None  # the newest checkpoint this run saved (rank 0)
        self._group = None  # the process group of the background writes, made at the first
        held_step()  # AOE_DEBUG_HOLD_CHECKPOINT (tests only): a malformed value is refused now, not mid-save

    # -- saving --------------------------------------------------------------------------------------
    def save(self, state: TrainState, background: bool = False) -> Path | None:
        """Collective: write the checkpoint of ``state.step`` and return its path (None on other
        ranks than 0). A save in flight is finished first (``finish``). Every rank returns only
        once it is written, and every rank raises if it could not be. ``background``: return
        (None) once the state is copied, the write going on in a thread; ``finish`` waits for it
        and raises its error on every rank."""
        self.finish()
        begin = self._begin_sharded if self.sharded() else self._begin_full
        write, error = begin(state, background)
        self._agree(error, state.step)
        if background:
            self._pending = BackgroundWrite(state.step, write)
            return None
        return self._written(state.step, *_run(write))

    def finish(self) -> Path | None:
        """Collective: wait for the save in flight, if any, and raise its error on every rank, as a
        synchronous save would have; the path of the newest checkpoint this run saved (rank 0)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._written(pending.step, *pending.wait())
        return self._newest

    def settle(self) -> None:
        """This rank alone: wait until the save in flight has ended (its outcome kept for ``finish``)."""
        if self._pending is not None:
            self._pending.wait()

    def close(self) -> None:
        """This rank alone, for a run ending on an error (its peers may be gone, so no agreement):
        wait for the save in flight; its error is printed, not raised over the run's."""
        pending, self._pending = self._pending, None
        error = None if pending is None else pending.wait()[1]
        if error is not None:
            print(f"warning: the checkpoint of step {pending.step} was not saved: {error}", file=sys.stderr)

    def _written(self, step: int, path: Path | None, error: BaseException | None) -> Path | None:
        """The end of a write on every rank: its path (rank 0), or every rank raises."""
        self._agree(error, step)
        if path is not None:
            self._newest = path
        return path

    def _agree(self, error: BaseException | None, step: int) -> None:
        """Collective: raise ``error`` here, and on every other rank too if any rank has one."""
        failed = any_rank(error is not None, self.dist, self.device)
        if error is not None:
            raise error
        if failed:
            raise ckpt.CheckpointError(f"rank 0 could not save the checkpoint of step {step} "
                                       "(its message says why); stopping")

    def sharded(self) -> bool:
        """``train.checkpoint_format``: "auto" as the parallel plan says (sharded under FSDP or
        expert parallelism)."""
        fmt = self.cfg.train.checkpoint_format
        return fmt == "sharded" or (fmt == "auto" and self.plan.sharded_checkpoints)

    def _begin_full(self, state: TrainState, background: bool) -> tuple[Write, Exception | None]:
        """Collective gather (``ParallelPlan.full_state``), then rank 0's write of the single-process
        format: (the write, the error that stopped it). A synchronous write runs here, while the
        gathered state exists (the write returned only hands back its path); one in the
        background gets a copy of that state."""
        write, error = _nothing, None
        with self.plan.full_state(self.optimizer) as (model, optimizer_state):
            if self.dist.is_main:
                try:
                    write = self._full_write(state, model, optimizer_state, background)
                    if not background:
                        path = write()
                        write = lambda: path  # noqa: E731
                except Exception as e:
                    error = e
        return write, error

    def _full_write(self, state: TrainState, model, optimizer_state: dict | None, background: bool) -> Write:
        """Rank 0: the write of the one-process format (of a CPU copy of the state in the background)."""
        weights = ckpt.model_state_for_saving(model)
        trainer_state = self._trainer_state(state, optimizer_state)
        if background:
            ckpt.refuse_non_finite(state.step, weights)  # now, not at the next save
            weights, trainer_state = snapshot((weights, trainer_state))
        return functools.partial(ckpt.save_weights, self.out_dir, state.step, weights, self.cfg, trainer_state,
                                 tokenizer=self.tokenizer, keep=self.cfg.train.keep_checkpoints,
                                 retry_hint=RETRY_HINT)

    def _begin_sharded(self, state: TrainState, background: bool) -> tuple[Write, Exception | None]:
        """No gather: every rank will write its shards and its own data position and RNG (in the
        background over a copy of them, on a process group of the writes' own)."""
        common = self._trainer_state(state, optimizer_state={})
        del common["optimizer"]  # in the shards
        try:
            return sharded.begin_sharded_checkpoint(
                self.out_dir, state.step, self.plan.sharded_state(self.optimizer), self.cfg, common,
                {"sampler": common["sampler"], "rng": common["rng"]}, tokenizer=self.tokenizer,
                keep=self.cfg.train.keep_checkpoints, retry_hint=RETRY_HINT, copy=background,
                group=self._write_group() if background else None), None
        except Exception as e:
            return _nothing, e

    def _write_group(self):
        """Collective the first time: the gloo process group of the background writes (None for one
        process), so that their collectives never interleave with the training's on the default group."""
        if self.dist.enabled and self._group is None:
            timeout = self.cfg.train.collective_timeout_s
            self._group = new_group(backend="gloo",
                                         **({} if timeout is None else {"timeout": timedelta(seconds=timeout)}))
        return self._group

    def _trainer_state(self, s: TrainState, optimizer_state: dict[str, Any] | None = None) -> dict[str, Any]:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "step": s.step, "tokens": s.tokens, "train_time_s": s.train_time_s, "skipped_steps": s.skipped_steps,
            "optimizer": self.optimizer.state_dict() if optimizer_state is None else optimizer_state,
            "sampler": self.sampler.state_dict(),
            "rng": rng,
            "world_size": self.dist.world_size,
        }

    # -- resuming ------------------------------------------------------------------------------------
    def resume(self) -> tuple[TrainState, Path]:
        """Load the newest good checkpoint (see the module docstring); its state and path."""
        path = None
        if self.dist.is_main:  # one rank looks (and moves a corrupt checkpoint aside); all load the same one
            path = ckpt.find_latest_checkpoint(self.out_dir, move_aside=True)
        path = broadcast_object(path, self.dist)
        if path is None:
            raise ckpt.CheckpointError(f"--resume: {str(self.out_dir)!r} holds no complete checkpoint to resume from")
        saved = ckpt.load_run_config(path)
        keep_saved_init(self.cfg, saved)
        check_same_run(self.cfg, saved, path)
        state = ckpt.load_trainer_state(path)
        if state.get("step") != ckpt.checkpoint_step(path):
            raise ckpt.CheckpointError(f"{str(path)!r} holds the trainer state of step {state.get('step')}, not of "
                                       "the step its name says: it was renamed or edited; rename it back or remove it")
        if is_sharded(path):  # aoe.io.sharded: resharded to this layout
            self.plan.load_sharded(path, self.optimizer)
            state.update(sharded_rank_state(path, self.dist))
        else:  # every rank reads the full tensors, keeps its own
            self.plan.load_full(path, self.optimizer, state["optimizer"])
        self._optimizer_to_device()
        self._restore_position(state)
        return TrainState(step=state["step"], tokens=state["tokens"], train_time_s=state["train_time_s"],
                          skipped_steps=state["skipped_steps"]), path

    def _optimizer_to_device(self) -> None:
        """Optimizer state follows the model's device."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                for k, v in self.optimizer.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor) and k != "step":
                        self.optimizer.state[p][k] = v.to(p.device)

    def _restore_position(self, state: dict[str, Any]) -> None:
        """The sampler's position and the RNG states."""
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)


def _nothing() -> None:
    """The write of a rank that writes nothing (the one-process format on ranks other than 0)."""
    return None


def _run(write: Write) -> tuple[Path | None, Exception | None]:
    """``write()`` -> (its path, None), or (None, the error it raised) for the ranks to agree on."""
    try:
        return write(), None
    except Exception as e:
        return None, e


def sharded_rank_state(path: Path, dist: DistInfo) -> dict[str, Any]:
    """This rank's own data position and RNG when the world size is the one that saved (else {}:
    rank 0's, in the common trainer state, serve)."""
    return sharded.load_rank_state(path, dist.rank, dist.world_size) or {}
