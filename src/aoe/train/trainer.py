"""The training loop: one process on a CPU, or many under torchrun (DDP, FSDP2/HSDP, expert parallelism).

    cfg -> data (memory-mapped tokens) -> model -> AdamW + warm-up/cosine -> steps
        -> metrics.jsonl / TensorBoard, periodic validation, atomic checkpoints -> summary.json

Three parts: the build step (``aoe.train.build``: each stage one call, run once by ``Trainer``),
this loop, and the parallel plan of the run's mode (``aoe.train.plans``), which owns what differs
between the modes, so that nothing here asks which one runs. Checkpoints are saved and resumed by
``aoe.train.run_state``.

A step: the global batch (``train.batch_size`` windows of ``train.seq_len`` tokens, shared out
over ranks) is split into micro-batches; their losses (next-token cross entropy + the sparse
layers' auxiliary losses) are averaged by gradient accumulation; gradients are reduced and clipped
to ``train.grad_clip`` by the plan; AdamW steps; the aux-loss-free selection biases (if on) are
updated.

Expert parallelism (``train.expert_parallel=N > 1``, ``aoe.parallel``): each sparse layer's experts
are sharded over N ranks, tokens travel to their experts by all-to-all; no DDP (the gradients are
averaged by ``ExpertParallel.reduce_gradients``).
FSDP2 (``train.fsdp=true``, ``aoe.parallel.fsdp``): parameters, gradients and AdamW moments are
sharded over the ranks (no DDP), on a 2-D mesh with ``train.fsdp_shard_size`` (HSDP), or for the
non-expert parameters alongside expert parallelism. Under either, checkpoints are sharded
(``aoe.io.sharded``: each rank writes its own shards; they reshard on resume) unless
``train.checkpoint_format=full`` (gathered to the single-process format).

Determinism: on CPU, a run with the same config, seed and thread count computes the same losses,
and a run resumed from a checkpoint continues exactly where the uninterrupted run would be (the
checkpoint holds the weights, optimizer moments, step, data position and RNG states).

Asynchronous checkpoints (``train.async_checkpoint``): a periodic save copies the state and the
steps go on while a thread writes it (``aoe.train.run_state``); the next save, a stop signal and
the end of the run wait for it first, and its failure stops the run there as a synchronous one's
would have.

Stopping early: SIGTERM (the preemption signal of cluster schedulers) or SIGUSR1 lets the current
step finish, then every rank stops after the same step (the ranks agree at each step boundary, as
the signal may reach only one of them), a checkpoint is saved (after the one in flight), and ``TrainingInterrupted`` ends the
process with exit code 128 + the signal's number (143 for SIGTERM). A write the system refuses
(disk full...) stops the run with a ``CheckpointWriteError`` or ``TrainingWriteError`` naming the
path, the cause and the checkpoint to resume from.

Faults of several processes: a rank that dies (SIGKILL...) is named by the others' watchdog
(``aoe.train.watchdog``), which exit with status 75 within ``train.dist_timeout_s`` (within seconds
when a collective fails first), pointing at the newest good checkpoint for ``--resume``. A
non-finite loss on any rank is known to every rank by the step's loss all-reduce, so all of them
skip that step or stop after it (``train.nan_policy``), and the message names the ranks that saw it.
Debug option: the environment variable ``AOE_DEBUG_NONFINITE="RANK:STEP[,RANK:STEP...]"`` makes
that rank's loss NaN at that step (for testing the above; never set it in a real run).
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from aoe.config import ConfigError, RunConfig
from aoe.data import BatchSampler, TokenData, unigram_entropy
from aoe.io import checkpoint as ckpt
from aoe.train.build import (
    build_model, debug_nonfinite_steps, flops_per_token, join_processes, prepare_data, resolve_config, resolve_dtype,
)
from aoe.train.distributed import DistInfo, all_reduce_sum, any_rank, shutdown_distributed
from aoe.train.evaluate import evaluate
from aoe.train.metrics import MetricsLogger, RoutingStats, measure_matmul_flops
from aoe.train.optim import build_optimizer, lr_at, set_lr
from aoe.train.rundir import check_new_run, write_run_config
from aoe.train.run_state import RunCheckpoints, TrainState
from aoe.train.signals import StopSignals, TrainingInterrupted
from aoe.utils.files import WriteError, atomic_write_text, reporting_write_errors

__all__ = ["Trainer", "TrainingError", "TrainingWriteError", "TrainState", "peak_memory_bytes", "prepare_data",
           "resolve_dtype", "train"]

MAX_CONSECUTIVE_SKIPS = 10


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss under nan_policy=stop, too many skipped steps...)."""


class TrainingWriteError(WriteError):
    """The system refused to write the run's config, metrics or summary (disk full, quota...).

    An OSError, not a TrainingError: the run did not go wrong (a TrainingError means it diverged),
    its disk did, and it continues from its newest checkpoint once there is space.
    """


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process so far: CUDA max allocated on a GPU, else the peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class Trainer:
    """Trains ``Transformer(cfg.model)`` on ``cfg.data`` as ``cfg.train`` says, writing to ``out_dir``.

    ``Trainer(cfg, out_dir, resume=False).fit() -> dict`` (the run's summary, also written to
    ``out_dir/summary.json``). With ``resume=True`` the newest good checkpoint in ``out_dir`` is
    loaded (an error if there is none); without it, an ``out_dir`` that already holds checkpoints
    is refused rather than overwritten, and so is one with the ``metrics.jsonl`` or ``summary.json``
    of a start that saved no checkpoint (or files of the user's), unless ``restart`` (then they are
    replaced). A ``config.yaml`` the trainer did not write is left alone (``aoe.train.rundir``).

    ``stop_signals``: the signals on which ``fit`` finishes the current step, saves a checkpoint
    and raises ``TrainingInterrupted`` (default: ``train.stop_signals``, SIGTERM and SIGUSR1 unless
    configured; ``()`` leaves the signals' handling alone).
    """

    def __init__(self, cfg: RunConfig, out_dir: str | os.PathLike, *, resume: bool = False, progress: bool = True,
                 data: TokenData | None = None, stop_signals: tuple[int, ...] | None = None,
                 restart: bool = False):
        cfg.validate()  # the one validation: every stage below reads the config as it is
        if stop_signals is None:
            stop_signals = tuple(signal.Signals[name] for name in cfg.train.stop_signals)
        self.stop_signals = StopSignals(stop_signals)
        self.out_dir = Path(out_dir)
        self._join_processes(cfg)
        self.progress = progress and self.dist.is_main
        self.data = data if data is not None else prepare_data(cfg)
        self.cfg = resolve_config(cfg, self.data)
        self.model, self.plan, self.params_total = build_model(self.cfg, self.process)
        self.optimizer = build_optimizer(self.model, self.cfg.train)
        self._start_loop_state()
        if resume:
            self._resume()
        else:
            self._start_new(restart)
        if self.dist.is_main:
            self._write_config()
        self.step_model: torch.nn.Module = self._wrap_for_steps()
        self.flops_per_token = flops_per_token(self.model, self.cfg.train, self.dist.world_size)
        self.peak_flops = measure_matmul_flops(self.device, self.dtype) * self.dist.world_size

    # -- set-up helpers ----------------------------------------------------------------------------
    def _join_processes(self, cfg: RunConfig) -> None:
        """The process group (under torchrun) and its watchdog, this rank's device, dtype and threads."""
        self.process = join_processes(cfg.train)
        self.dist, self.device, self.dtype = self.process.dist, self.process.device, self.process.dtype
        self.watchdog = self.process.watchdog
        if self.watchdog is not None:
            self.watchdog.resume_hint = self._resume_hint
        self._debug_nonfinite = debug_nonfinite_steps()

    def _start_loop_state(self) -> None:
        """Step 0: the batch sampler, the counters, the metrics log, the routing statistics and
        the run's checkpoints."""
        t = self.cfg.train
        self.accum_steps = t.grad_accum_steps(self.dist.world_size)
        self.sampler = BatchSampler(self.data.train, t.batch_size, t.seq_len, seed=t.seed,
                                    rank=self.dist.rank, world_size=self.dist.world_size)
        self.state = TrainState()
        self.logger = MetricsLogger(self.out_dir, enabled=self.dist.is_main)
        self.routing = RoutingStats(self.model)
        self.checkpoints = RunCheckpoints(self.out_dir, self.cfg, self.plan, self.optimizer, self.sampler,
                                          self.dist, self.device, self.data.tokenizer)
        self.resumed_from: Path | None = None
        self._consecutive_skips = 0

    def _start_new(self, restart: bool) -> None:
        """A new run: refused in an ``out_dir`` that holds checkpoints, or the logs of an earlier
        start (unless ``restart``: rank 0 alone removes them)."""
        if ckpt.list_checkpoints(self.out_dir):
            raise ConfigError(
                f"{str(self.out_dir)!r} already holds checkpoints: pass --resume to continue that run, "
                "or choose another --out (nothing was overwritten)"
            )
        if self.dist.is_main or not restart:
            check_new_run(self.out_dir, restart=restart)

    def _resume(self) -> None:
        """The newest good checkpoint loaded (``RunCheckpoints.resume``), the metrics log cut after its step."""
        self.state, self.resumed_from = self.checkpoints.resume()
        with self._writing(self.logger.path):
            self.logger.truncate_after(self.state.step)

    def _wrap_for_steps(self) -> torch.nn.Module:
        """The module the steps call: the model as the parallel plan wraps it (DDP), compiled if asked."""
        step_model = self.plan.wrap(self.model)
        if self.cfg.train.compile:
            step_model = self.plan.compile(step_model, self.device)
        return step_model

    def _write_config(self) -> None:
        """The resolved config, replaced atomically (a full disk leaves the previous one), in
        ``out_dir/config.yaml`` unless that is a file of the user's (``aoe.train.rundir``)."""
        with self._writing(self.out_dir / "config.yaml"):
            write_run_config(self.cfg, self.out_dir, self.resumed_from)

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0) and return its path (None on other ranks),
        after the save in flight if there is one. Every rank returns only once it is written, and
        every rank raises if it could not be."""
        return self.checkpoints.save(self.state)

    def _any_rank(self, flag: bool | int) -> int:
        """The largest of every rank's ``flag`` (0 when none is set): the same answer on all ranks."""
        return any_rank(flag, self.dist, self.device)

    def _writing(self, path: Path):
        """Report a write the system refuses (disk full...) as a TrainingWriteError naming ``path``,
        the checkpoint that is safe, and what to do."""
        return reporting_write_errors(path, self._where_to_resume, TrainingWriteError)

    def _where_to_resume(self) -> str:
        self.checkpoints.settle()  # this rank alone: a write in flight ends first
        latest = ckpt.find_latest_checkpoint(self.out_dir) if self.dist.is_main else None
        return ckpt.resume_hint(latest, then="free some space, then continue with --resume",
                                none="no checkpoint holds this run yet; free some space, then run again")

    def _resume_hint(self) -> str:
        """For the watchdog's last line: the checkpoint ``--resume`` would continue from."""
        return ckpt.resume_hint(ckpt.find_latest_checkpoint(self.out_dir), then="continue with --resume",
                                none=f"{str(self.out_dir)!r} holds no good checkpoint (as this rank sees it); run again")

    # -- one optimizer step ------------------------------------------------------------------------
    def _train_step(self, collect_routing: bool) -> dict[str, float]:
        t = self.cfg.train
        lr = lr_at(self.state.step, t)
        set_lr(self.optimizer, lr)
        x, y = next(self.sampler)
        world = self.dist.world_size
        sums = self._accumulate_gradients(x, y, collect_routing)
        grad_norm = self._clip_gradients()
        if not math.isfinite(grad_norm):
            sums[2] += 1
        all_reduce_sum(sums, self.dist)  # the step's one reduction: every rank learns every rank's flag
        loss, aux = float(sums[0]) / world, float(sums[1]) / world
        if sums[2] > 0:
            self.optimizer.zero_grad(set_to_none=True)
            self._non_finite(loss, grad_norm, [r for r in range(world) if sums[3 + r] > 0])
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.plan.update_selection_biases()
            self._consecutive_skips = 0
        self.state.step += 1
        self.state.tokens += t.batch_size * t.seq_len
        return {"loss": loss, "aux_loss": aux, "lr": lr, "grad_norm": grad_norm}

    def _accumulate_gradients(self, x: torch.Tensor, y: torch.Tensor, collect_routing: bool) -> torch.Tensor:
        """Forward and backward this rank's batch in ``accum_steps`` micro-batches; returns the sums
        to reduce: (loss, aux loss, non-finite flag, each rank's flag), this rank's parts filled in."""
        step = self.state.step + 1
        poison = (self.dist.rank, step) in self._debug_nonfinite  # AOE_DEBUG_NONFINITE (tests only)
        sums = torch.zeros(3 + self.dist.world_size, dtype=torch.float64)
        micro = x.shape[0] // self.accum_steps
        for i in range(self.accum_steps):
            xb = x[i * micro:(i + 1) * micro].to(self.device, non_blocking=True)
            yb = y[i * micro:(i + 1) * micro].to(self.device, non_blocking=True)
            with self.plan.micro_batch(self.step_model, last=i == self.accum_steps - 1):
                with self.process.autocast():
                    out = self.step_model(xb, yb)
                loss = (out.loss + out.aux_loss) / self.accum_steps
                if poison:
                    loss = loss * float("nan")
                loss.backward()
            if collect_routing:
                self.routing.collect()
            lv, av = float("nan") if poison else float(out.loss.detach()), float(out.aux_loss.detach())
            if not (math.isfinite(lv) and math.isfinite(av)):
                sums[2] += 1
                sums[3 + self.dist.rank] += 1
            sums[0] += lv / self.accum_steps
            sums[1] += av / self.accum_steps
        return sums

    def _clip_gradients(self) -> float:
        """Reduce the gradients where the wrapping did not, clip them to ``train.grad_clip`` (none
        when 0) and return their norm before clipping (the whole model's, over every shard)."""
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        return self.plan.clip_gradients(clip)

    def _non_finite(self, loss: float, grad_norm: float, ranks: list[int]) -> None:
        """Every rank calls this after the same step (the flags came with the loss all-reduce)."""
        step = self.state.step + 1
        seen = ""
        if self.dist.enabled:
            seen = (f"; the loss was non-finite on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
                    if ranks else "; the losses were finite on every rank, the gradient was not")
        what = f"non-finite loss or gradient at step {step} (loss={loss}, grad_norm={grad_norm}{seen})"
        if self.cfg.train.nan_policy == "stop":
            raise TrainingError(f"{what}: stopping (train.nan_policy=stop; {self._settled_hint()}; nothing was "
                                "saved). Try a lower train.lr, or train.nan_policy=skip to skip such steps.")
        self.state.skipped_steps += 1
        self._consecutive_skips += 1
        print(f"warning: {what}: step skipped (train.nan_policy=skip)", file=sys.stderr)
        if self._consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            raise TrainingError(f"{what}: {self._consecutive_skips} consecutive steps skipped; giving up "
                                f"({self._settled_hint()})")

    def _settled_hint(self) -> str:
        """Collective (every rank stops after the same step): where to resume once the save in flight
        is written; its failure is printed, not raised over the error being reported."""
        try:
            self.checkpoints.finish()
        except ckpt.CheckpointError as e:
            print(f"warning: {e}", file=sys.stderr)
        return ckpt.resume_hint(ckpt.find_latest_checkpoint(self.out_dir) if self.dist.is_main else None)

    # -- the loop ----------------------------------------------------------------------------------
    def validate(self) -> dict[str, Any]:
        """Validation loss and routing on ``train.eval_batches`` batches, spread over the ranks as
        the parallel plan says; every rank returns the same numbers."""
        t = self.cfg.train

        def run(ranks: DistInfo, lockstep: bool) -> dict[str, Any]:
            return evaluate(self.model, self.data.val, batch_size=t.micro_batch, seq_len=t.seq_len,
                            max_batches=t.eval_batches, bytes_per_token=self.data.bytes_per_token("val"),
                            autocast=self.process.autocast(), dist_info=ranks, lockstep=lockstep)

        return self.plan.evaluate(run)

    def fit(self) -> dict[str, Any]:
        """Train up to ``train.max_steps`` and return the summary.

        Raises TrainingInterrupted (exit code 128 + signal) when a stop signal arrives: the step
        under way finishes, is logged, validated and checkpointed as usual, then the run stops.
        """
        with self.stop_signals:
            try:
                return self._fit()
            except RuntimeError as e:  # a collective failed? if a peer died, the watchdog names it and exits
                if self.watchdog is not None and not isinstance(e, (TrainingError, ckpt.CheckpointError)):
                    self.watchdog.explain(e)
                raise
            finally:  # on an error: the save in flight (train.async_checkpoint) still completes
                self.checkpoints.close()

    def _fit(self) -> dict[str, Any]:
        bar = self._progress_bar()
        self.model.train()
        try:
            last_val, stopped = self._run_steps(bar)
        finally:
            if bar is not None:
                bar.close()
            self.logger.close()
        if stopped is not None:
            if self.dist.is_main:
                print(stopped, file=sys.stderr)
            raise stopped
        return self._finish(last_val)

    def _progress_bar(self):
        """A tqdm bar over the steps on the main rank (None without ``progress``)."""
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.train.max_steps, initial=self.state.step, desc=f"train {self.cfg.model.ffn}",
                    unit="step", dynamic_ncols=True, file=sys.stderr)

    def _run_steps(self, bar) -> tuple[dict[str, Any] | None, TrainingInterrupted | None]:
        """Step up to ``train.max_steps``, logging, validating and saving as configured; returns the
        last validation (None if none ran) and, if a stop signal ended the run early, its exception."""
        t = self.cfg.train
        last_val: dict[str, Any] | None = None
        window_tokens, window_time = 0, 0.0  # since the last logged step, for tokens_per_s
        while self.state.step < t.max_steps:
            step = self.state.step + 1  # the number this step will have once done
            log_now = step % t.log_every == 0 or step == t.max_steps
            metrics, elapsed = self._timed_step(collect_routing=log_now)
            window_time += elapsed
            window_tokens += t.batch_size * t.seq_len
            if log_now:
                self._log_step(step, metrics, window_tokens / window_time if window_time > 0 else float("nan"), bar)
                window_tokens, window_time = 0, 0.0
            if t.eval_every and (step % t.eval_every == 0 or step == t.max_steps):
                last_val = self._log_validation(step, bar)
            save_now = (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.max_steps
            if save_now:  # train.async_checkpoint: written in the background, waited for below or at the next
                self.checkpoints.save(self.state, background=t.async_checkpoint)
            if bar is not None:
                bar.update(1)
            if self.watchdog is not None:
                self.watchdog.step = step
            signum = self._any_rank(self.stop_signals.received)  # every rank stops after the same step
            if signum and step < t.max_steps:
                return last_val, self._stop(signum, self.checkpoints.finish() if save_now else self.save())
        self.checkpoints.finish()  # the last checkpoint written before the summary names it
        return last_val, None

    def _timed_step(self, collect_routing: bool) -> tuple[dict[str, float], float]:
        """One training step and its wall time in seconds (added to ``state.train_time_s``)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        metrics = self._train_step(collect_routing=collect_routing)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        self.state.train_time_s += elapsed
        return metrics, elapsed

    def _log_step(self, step: int, metrics: dict[str, float], tokens_per_s: float, bar) -> None:
        """The step's metrics, throughput and routing statistics to metrics.jsonl (and the bar)."""
        entry = {"step": step, **metrics, "tokens": self.state.tokens, "tokens_per_s": tokens_per_s,
                 "mfu": self.flops_per_token * tokens_per_s / self.peak_flops,
                 "layers": self.routing.summary(self.dist)}
        self.routing.reset()
        with self._writing(self.logger.path):
            self.logger.log(entry)
        if bar is not None:
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")

    def _log_validation(self, step: int, bar) -> dict[str, Any]:
        """Validate now, log the result (without the per-layer routing) and return it."""
        val = self.validate()
        with self._writing(self.logger.path):
            self.logger.log({"step": step, **{k: v for k, v in val.items() if k != "layers"}})
        if bar is not None:
            bar.write(f"step {step}: val_loss {val['val_loss']:.4f}")
        return val

    def _finish(self, last_val: dict[str, Any] | None) -> dict[str, Any]:
        """The run's summary (validating first if no validation ran), written to summary.json."""
        if last_val is None:  # no periodic validation (eval_every=0), or nothing trained in this call
            last_val = self.validate()
        summary = self._summary(last_val)
        if self.dist.is_main:
            self._report_skipped()
            summary_file = self.out_dir / "summary.json"
            with self._writing(summary_file):
                atomic_write_text(summary_file, json.dumps(summary, indent=2, default=float))
        return summary

    def _stop(self, signum: int, saved: Path | None) -> TrainingInterrupted:
        """The exception that ends the run after a stop signal, once ``saved`` (this step's checkpoint) is written."""
        name = signal.Signals(signum).name
        message = (f"stopped by {name} after step {self.state.step} of {self.cfg.train.max_steps}: "
                   f"saved checkpoint {str(saved)!r}; continue with --resume (exit code {128 + signum})")
        return TrainingInterrupted(message, signum, self.state.step, saved)

    def _report_skipped(self) -> None:
        skipped, step = self.state.skipped_steps, self.state.step
        if skipped:
            print(f"warning: {skipped} of the {step} steps were skipped (non-finite loss or gradient, "
                  f"train.nan_policy=skip): the weights were updated {step - skipped} times", file=sys.stderr)

    def _summary(self, val: dict[str, Any]) -> dict[str, Any]:
        s = self.state
        return {
            "step": s.step,
            "tokens": s.tokens,
            "train_time_s": s.train_time_s,
            "tokens_per_s": s.tokens / s.train_time_s if s.train_time_s > 0 else None,
            "skipped_steps": s.skipped_steps,
            "val_loss": val["val_loss"],
            "perplexity": val["val_ppl"],
            "bits_per_byte": val.get("val_bpb"),
            "layers": val["layers"],
            "params_total": self.params_total[0],
            "params_active": self.params_total[1],
            "flops_per_token": self.flops_per_token,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "unigram_entropy": unigram_entropy(self.data.val),
            "world_size": self.dist.world_size,
            "device": str(self.device),
            "checkpoint": str(ckpt.find_latest_checkpoint(self.out_dir)) if self.dist.is_main else None,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
        }


def train(cfg: RunConfig, out_dir: str | os.PathLike, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train as ``cfg`` says and return the summary (see ``Trainer``). Under torchrun, joins the
    process group first and leaves it at the end."""
    failed = True  # tells the other ranks' watchdogs whether this one left with an error
    try:
        summary = Trainer(cfg, out_dir, resume=resume, progress=progress).fit()
        failed = False
        return summary
    except TrainingInterrupted:  # a stop signal: every rank saved and stops after the same step
        failed = False
        raise
    finally:
        shutdown_distributed(failed=failed)
