"""A tiny model config on a small real corpus (a slice of the standard library), shared by the tests
that train: the trainer, the comparison runner and the CLI."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def tiny_overrides(cache_dir: Path, **extra) -> list[str]:
    """A 2-layer AoE model on 300 KB of the standard library; one thread; quick to train."""
    base = {
        "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.max_seq_len": 32,
        "model.d_ffn": 64, "model.n_experts": 4, "model.top_k": 2, "model.d_low": 8,
        "data.max_bytes": 300000, "data.vocab_size": 512, "data.cache_dir": str(cache_dir),
        "train.seq_len": 32, "train.batch_size": 8, "train.max_steps": 12, "train.warmup_steps": 2,
        "train.log_every": 1, "train.eval_every": 6, "train.eval_batches": 2, "train.checkpoint_every": 4,
        "train.num_threads": 1, "train.lr": 3e-3,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def cli_env() -> dict[str, str]:
    """Environment for `python -m aoe.cli` subprocesses: this interpreter's package, one thread."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


PYTHON = sys.executable
