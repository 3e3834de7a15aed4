"""The data and train sections of a run's configuration and the ``RunConfig`` that holds all
three (see ``aoe.config``); the model section is ``aoe.config.model``, re-exported here. Every
field has a default and a docstring (the ``#:`` comment above it)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from aoe.config.applicability import refuse_idle_options
from aoe.config.model import (  # noqa: F401  (re-exported: the model section's names, as before)
    FFN_KINDS, GATE_INITS, GROUPED_MM_BACKENDS, LEGACY_RENORMALIZE, QK_NORMS, SCORE_NORMS, ModelConfig,
)
from aoe.config.schema import ConfigError, _Section

DTYPES = ("auto", "float32", "bfloat16")
NAN_POLICIES = ("stop", "skip")
CHECKPOINT_FORMATS = ("auto", "full", "sharded")
DECODE_ERRORS = ("replace", "skip")


@dataclass
class DataConfig(_Section):
    """The corpus and the tokenizer."""

    SECTION: typing.ClassVar[str] = "data"

    #: Where the text comes from: "stdlib" (the embedded default corpus, no download) or another
    #: source understood by aoe.data.
    source: str = "stdlib"
    #: Field of a record that holds its text (for record-structured sources such as JSON lines).
    text_field: str = "text"
    #: Size of the BPE vocabulary to train (ignored when ``tokenizer`` names an existing one).
    vocab_size: int = 4096
    #: None = train a tokenizer on the corpus (cached); or the path of a saved tokenizer.
    tokenizer: str | None = None
    #: Share of the documents held out for validation, in [0, 1).
    val_fraction: float = 0.05
    #: Read at most this many bytes of the source (None = all).
    max_bytes: int | None = None
    #: Where tokenizers and token files are cached. None = $AOE_CACHE, else ~/.cache/aoe.
    cache_dir: str | None = None
    #: Bytes that are not valid UTF-8: "replace" them with U+FFFD, or "skip" the document.
    on_decode_error: str = "replace"

    def _check(self) -> None:
        for name in ("source", "text_field"):
            if not getattr(self, name):
                self._fail(name, "must not be empty")
        self._positive("vocab_size", "max_bytes")
        if not 0 <= self.val_fraction < 1:
            self._fail("val_fraction", "must be in [0, 1)")
        self._choice("on_decode_error", DECODE_ERRORS)


@dataclass
class TrainConfig(_Section):
    """Optimization (AdamW, linear warm-up then cosine decay), batching, logging and checkpoints."""

    SECTION: typing.ClassVar[str] = "train"

    #: Seed of the model init and the data order.
    seed: int = 0
    #: Number of optimizer steps.
    max_steps: int = 1000
    #: Sequences per optimizer step, over all processes (the global batch).
    batch_size: int = 16
    #: Sequences per forward/backward on one process. None = batch_size. Gradient accumulation
    #: steps = batch_size / (micro_batch_size * world_size) (must be a whole number).
    micro_batch_size: int | None = None
    #: Tokens per training sequence (<= model.max_seq_len).
    seq_len: int = 128
    #: Peak learning rate (after warm-up).
    lr: float = 1e-3
    #: Final learning rate of the cosine decay, as a fraction of lr, in [0, 1].
    min_lr_ratio: float = 0.1
    #: Steps of linear warm-up from 0 to lr.
    warmup_steps: int = 100
    #: AdamW decoupled weight decay (paper: 0.1).
    weight_decay: float = 0.1
    #: Weight decay of the factorized gates' w_down and w_up (AoE's, and the moe_gate_rank /
    #: dense_gate_rank ablations'). None = weight_decay. Decay on both factors of a product
    #: acts on the product more strongly than decay on one matrix.
    factor_weight_decay: float | None = None
    #: Learning-rate multiplier of the factorized gates' w_down and w_up (1 = the same lr).
    factor_lr_scale: float = 1.0
    #: AdamW beta1 (paper: 0.9).
    beta1: float = 0.9
    #: AdamW beta2 (paper: 0.95).
    beta2: float = 0.95
    #: Clip the global gradient norm to this value (0 = off).
    grad_clip: float = 1.0
    #: Log training metrics every this many steps.
    log_every: int = 10
    #: Evaluate on the validation split every this many steps (0 = only at the end).
    eval_every: int = 200
    #: Batches (of micro_batch_size sequences) per evaluation.
    eval_batches: int = 20
    #: Save a checkpoint every this many steps (0 = only at the end).
    checkpoint_every: int = 500
    #: Keep the newest this many checkpoints (0 = keep all).
    keep_checkpoints: int = 2
    #: "full": the one-process format (rank 0 gathers every weight and moment); "sharded": each
    #: rank writes its own shards (torch.distributed.checkpoint, aoe.io.sharded; resumes in any
    #: layout); "auto": sharded under fsdp or expert_parallel > 1, else full.
    checkpoint_format: str = "auto"
    #: Write the periodic checkpoints in a background thread (either format): a save copies the
    #: state into CPU memory (each rank its shards, or rank 0 the gathered state) and training goes
    #: on while the copy is written, one write at a time (a save waits for the previous one). The
    #: same files and guarantees as a synchronous save; an error stops the run at the next save or
    #: at the end. The last save, and one on a stop signal, are waited for. Costs a second copy of
    #: the saved state in CPU memory while it is written. Needs train.checkpoint_every > 0.
    async_checkpoint: bool = False
    #: Compile the model with torch.compile.
    compile: bool = False
    #: Expert parallelism: shard each sparse layer's experts over this many ranks (1 = off: every
    #: rank holds every expert). Must divide the world size and model.n_experts; the world is then
    #: expert_parallel x (world / expert_parallel) data-parallel replicas (see aoe.parallel).
    expert_parallel: int = 1
    #: Fully sharded data parallelism (FSDP2): every rank holds 1/world of each parameter, gradient
    #: and optimizer moment (see aoe.parallel.fsdp). Needs several processes (torchrun). With
    #: expert_parallel > 1, FSDP shards the non-expert parameters and EP the experts. Not with
    #: compile yet. Checkpoints are sharded unless checkpoint_format=full.
    fsdp: bool = False
    #: Under fsdp: ranks each parameter is sharded over (None = the world). Smaller: hybrid
    #: sharding, world / fsdp_shard_size data-parallel replicas of an FSDP group (a 2-D mesh).
    fsdp_shard_size: int | None = None
    #: Compute dtype: "auto" (bfloat16 autocast on a GPU that supports it, float32 on CPU),
    #: "float32" or "bfloat16".
    dtype: str = "auto"
    #: "auto" (cuda if available, else cpu) or a torch device string such as "cpu" or "cuda:1".
    device: str = "auto"
    #: A non-finite loss: "stop" the run (with a message) or "skip" that step's update.
    nan_policy: str = "stop"
    #: torch intra-op threads on CPU (None = torch's default).
    num_threads: int | None = None
    #: Signals on which training finishes the current step, saves a checkpoint and exits with
    #: 128 + the signal's number (preemption: schedulers send SIGTERM, some SIGUSR1 first).
    #: [] leaves every signal's default handling alone.
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    #: Several processes: a rank whose heartbeat (written every second by a thread of each rank)
    #: has stopped for this many seconds is dead (SIGKILL, out of memory, a lost node); the others
    #: print which rank and the checkpoint to resume from, and exit with status 75. After a failed
    #: collective, a dead peer is named within 5 s whatever this says.
    dist_timeout_s: float = 300.0
    #: Several processes: how long one collective may wait for the other ranks (a live but stuck
    #: rank) before it fails. None = torch's default (30 min for gloo, 10 min for nccl).
    collective_timeout_s: float | None = None

    @property
    def micro_batch(self) -> int:
        """micro_batch_size resolved (batch_size when None; under data parallelism the per-rank batch)."""
        return self.batch_size if self.micro_batch_size is None else self.micro_batch_size

    def grad_accum_steps(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step on each rank: batch_size / (micro_batch_size * world_size),
        refusing a remainder; 1 when micro_batch_size is None (each rank's share in one pass)."""
        micro = self.batch_size // world_size if self.micro_batch_size is None else self.micro_batch_size
        per_step = micro * world_size
        if world_size < 1 or self.batch_size % per_step:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not a multiple of train.micro_batch_size="
                f"{micro} x world_size={world_size}"
            )
        return self.batch_size // per_step

    def _check_signals(self) -> None:
        import signal

        for name in self.stop_signals:
            if name not in signal.Signals.__members__ or name in ("SIGKILL", "SIGSTOP"):
                self._fail("stop_signals", f"holds {name!r}, not a signal a process can catch (e.g. SIGTERM, SIGUSR1)")
        if len(set(self.stop_signals)) != len(self.stop_signals):
            self._fail("stop_signals", "lists a signal twice")

    def _check(self) -> None:
        self._positive("max_steps", "batch_size", "micro_batch_size", "seq_len", "lr", "log_every",
                       "eval_batches", "num_threads", "expert_parallel", "dist_timeout_s", "collective_timeout_s",
                       "fsdp_shard_size")
        self._finite("dist_timeout_s", "collective_timeout_s")
        self._positive("factor_lr_scale")
        self._non_negative("seed", "warmup_steps", "weight_decay", "factor_weight_decay", "grad_clip", "eval_every",
                           "checkpoint_every", "keep_checkpoints")
        self._finite("lr", "min_lr_ratio", "weight_decay", "factor_weight_decay", "factor_lr_scale", "beta1", "beta2",
                     "grad_clip")
        if not 0 <= self.min_lr_ratio <= 1:
            self._fail("min_lr_ratio", "must be in [0, 1]")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                self._fail(name, "must be in [0, 1)")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.micro_batch_size={self.micro_batch_size} does not divide train.batch_size={self.batch_size}"
            )
        self._choice("dtype", DTYPES)
        self._choice("nan_policy", NAN_POLICIES)
        self._choice("checkpoint_format", CHECKPOINT_FORMATS)
        self._check_signals()
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                self._fail("device", 'is not "auto" or a torch device string (e.g. "cpu", "cuda", "cuda:1")')
        refuse_idle_options(self)


@dataclass
class RunConfig:
    """A whole run: the three sections, plus the checks that span them."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
            getattr(self, name).validate()
        m, d, t = self.model, self.data, self.train
        if t.seq_len > m.max_seq_len:
            raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
        if m.vocab_size is not None and d.tokenizer is None and m.vocab_size < d.vocab_size:
            raise ConfigError(
                f"model.vocab_size={m.vocab_size} is smaller than data.vocab_size={d.vocab_size} "
                "(the tokenizer's ids would not fit); raise it or set it to null"
            )
        if m.erc_loss_coef > 0 and t.expert_parallel > 1:
            raise ConfigError(f"model.erc_loss_coef={m.erc_loss_coef} needs every expert's gate matrix on each rank, "
                              f"and train.expert_parallel={t.expert_parallel} spreads them; set one of them off")


SECTIONS: dict[str, type[_Section]] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
