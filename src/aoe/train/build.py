"""The build step of a run, each stage one call, run once, in this order:

    join_processes(cfg.train)    -> Process   the process group and its watchdog, this rank's device,
                                              dtype and threads
    prepare_data(cfg)            -> TokenData the tokenized corpus (memory-mapped)
    resolve_config(cfg, data)    -> RunConfig the run's one live config: model.vocab_size from the
                                              tokenizer, the data checked against train.seq_len
    build_model(cfg, process)    -> (model, ParallelPlan, parameter counts)   sharded by its plan
    build_optimizer(model, cfg.train)                       (aoe.train.optim)
    RunCheckpoints(...).resume()                            (aoe.train.run_state)

``cfg`` is validated once, when the trainer receives it; every stage after that only reads it,
and ``resolve_config``'s copy is the one the model holds (``model.config is cfg.model``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from dataclasses import dataclass

import torch

from aoe.config import ConfigError, RunConfig, TrainConfig
from aoe.data import DataError, TokenData, prepare_tokens
from aoe.model import Transformer
from aoe.train.distributed import DistInfo, current_watchdog, init_distributed, launch_ranks
from aoe.train.plans import ParallelPlan, make_plan
from aoe.utils.device import resolve_device

DEBUG_NONFINITE_ENV = "AOE_DEBUG_NONFINITE"  # debug only: "RANK:STEP,..." -> that rank's loss is NaN at that step


@dataclass(frozen=True)
class Process:
    """This process's place in the run: its ranks, device, compute dtype and watchdog (None: one
    process, or none asked for)."""

    dist: DistInfo
    device: torch.device
    dtype: torch.dtype
    watchdog: object | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's autocast to ``dtype`` (none in float32)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """train.dtype -> a torch.dtype ("auto": bfloat16 on CUDA, else float32)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def join_processes(t: TrainConfig) -> Process:
    """Join the process group (under torchrun) with its watchdog; this rank's device (cuda:LOCAL_RANK
    under torchrun), dtype and CPU threads."""
    device = resolve_device(t.device, launch_ranks().local_rank, setting="train.device", error=ConfigError)
    dist = init_distributed(device, timeout_s=t.dist_timeout_s, collective_timeout_s=t.collective_timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if t.num_threads is not None and device.type == "cpu":
        torch.set_num_threads(t.num_threads)
    return Process(dist, device, resolve_dtype(t.dtype, device), current_watchdog())


def prepare_data(cfg: RunConfig) -> TokenData:
    """Tokenize (or reuse) the corpus the config names."""
    d = cfg.data
    return prepare_tokens(
        d.source, vocab_size=d.vocab_size, tokenizer_path=d.tokenizer, val_fraction=d.val_fraction,
        max_bytes=d.max_bytes, text_field=d.text_field, on_decode_error=d.on_decode_error, cache_dir=d.cache_dir,
    )


def resolve_config(cfg: RunConfig, data: TokenData) -> RunConfig:
    """A copy of the (validated) ``cfg`` with ``model.vocab_size`` from the tokenizer when unset;
    refuses a model smaller than the tokenizer and a training split shorter than one window."""
    cfg = copy.deepcopy(cfg)
    vocab = int(data.vocab_size)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = vocab
        if cfg.data.tokenizer is None and vocab < cfg.data.vocab_size:
            # A small corpus runs out of byte pairs to merge before data.vocab_size. Record the
            # size the tokenizer really has, so the resolved config (saved with the run) is
            # consistent: trained again with it, the same corpus gives the same tokenizer.
            logging.getLogger(__name__).warning(
                "the tokenizer trained on data.source=%r has %d tokens, fewer than data.vocab_size=%d "
                "(the corpus has no more byte pairs seen twice); the model uses %d and the saved config "
                "records data.vocab_size=%d", cfg.data.source, vocab, cfg.data.vocab_size, vocab, vocab)
            cfg.data.vocab_size = vocab
    elif cfg.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {vocab} tokens")
    if len(data.train) < cfg.train.seq_len + 2:
        raise DataError(
            f"the training split has {len(data.train)} tokens, too few for one window of "
            f"train.seq_len={cfg.train.seq_len}: use a larger corpus or a smaller seq_len"
        )
    return cfg


def build_model(cfg: RunConfig, process: Process) -> tuple[Transformer, ParallelPlan, tuple[int, int]]:
    """The model from ``train.seed``, sharded by its parallel plan on the device, and its
    (total, active) parameter counts before sharding. ``cfg.model`` is made the model's own
    config, so the run has one live copy of it."""
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    cfg.model = model.config
    params = (model.num_params(), model.num_params(active=True))
    return model, make_plan(model, cfg.train, process.dist, process.device), params


def flops_per_token(model: Transformer, t: TrainConfig, world_size: int = 1) -> float:
    """Training FLOPs per token: the model's at ``train.seq_len``, plus its token-independent
    FLOPs (the ERC loss: once per forward, so once per micro-batch on every rank) spread over the
    step's tokens."""
    flops = model.flops_per_token(t.seq_len)
    step_flops = model.step_flops()
    if step_flops:
        forwards = world_size * t.grad_accum_steps(world_size)
        flops += step_flops * forwards / (t.batch_size * t.seq_len)
    return flops


def debug_nonfinite_steps() -> set[tuple[int, int]]:
    """The (rank, step) pairs of ``AOE_DEBUG_NONFINITE`` (empty when unset)."""
    text = os.environ.get(DEBUG_NONFINITE_ENV, "").strip()
    pairs = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            rank, step = (int(v) for v in item.split(":"))
        except ValueError:
            raise ConfigError(f"{DEBUG_NONFINITE_ENV}={text!r}: expected RANK:STEP pairs separated by commas "
                              "(e.g. 1:3), or unset it") from None
        pairs.add((rank, step))
    return pairs
