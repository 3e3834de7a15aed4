"""What the multi-process trainer tests share: the short run they all compare against (its steps
here, the fixture ``single_run`` in conftest.py), the worker that trains (and resumes) as one rank,
and the comparisons of losses, gradient norms and weights."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from helpers.processes import torchrun_env

STEPS = {"train.max_steps": 4, "train.checkpoint_every": 2, "train.eval_every": 0, "train.keep_checkpoints": 0,
         "train.batch_size": 8, "train.micro_batch_size": 2}
FINAL = "checkpoints/step_00000004"


def trainer_worker(rank: int, world: int, port: int, overrides: list[str], out: str, resume_from: str | None):
    """Rank ``rank``: train ``overrides`` into ``out``; then, given ``resume_from`` (a run directory
    holding a checkpoint of another layout), continue that run in this world."""
    os.environ.update(torchrun_env(rank, world, port))
    torch.set_num_threads(1)
    from aoe.config import load_config
    from aoe.train.distributed import shutdown_distributed
    from aoe.train.trainer import Trainer

    try:
        Trainer(load_config("tiny", overrides), out, progress=False).fit()
        if resume_from:
            Trainer(load_config("tiny", overrides), resume_from, resume=True, progress=False).fit()
    finally:
        shutdown_distributed()


def resume_worker(rank: int, world: int, port: int, overrides: list[str], run: str) -> None:
    """Rank ``rank``: resume the run directory ``run`` in this world."""
    os.environ.update(torchrun_env(rank, world, port))
    torch.set_num_threads(1)
    from aoe.config import load_config
    from aoe.train.distributed import shutdown_distributed
    from aoe.train.trainer import Trainer

    try:
        Trainer(load_config("tiny", overrides), run, resume=True, progress=False).fit()
    finally:
        shutdown_distributed()


def close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    """Max |a - b| within ``tol`` times max |b|."""
    scale = max(float(b.abs().max()), 1e-30)
    err = float((a - b).abs().max())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g}"


def losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    """Step -> (loss, gradient norm before clipping) of a run's metrics."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {e["step"]: (e["loss"], e["grad_norm"]) for e in map(json.loads, lines) if "loss" in e}


def same_losses(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what
    for step, expected in want.items():
        for name, a, b in zip(("loss", "grad_norm"), got[step], expected):
            assert abs(a - b) <= 1e-5 * abs(b), f"{what} step {step} {name}: {a} != {b}"


def copy_until(run: Path, dest: Path, step: int) -> Path:
    """A run directory holding ``run``'s checkpoint of ``step`` and its metrics up to there."""
    shutil.copytree(run, dest)
    for c in (dest / "checkpoints").iterdir():
        if c.name != f"step_{step:08d}":
            shutil.rmtree(c)
    return dest


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full weights of a checkpoint of either format (one-process or sharded), read here."""
    from aoe.io.checkpoint import model_state_for_saving
    from aoe.io.models import load_model

    model, _, _ = load_model(checkpoint)
    return model_state_for_saving(model)


def same_tensors(got_dir: Path, want_dir: Path, what: str, tol: float = 1e-5) -> None:
    """The final checkpoints of two runs hold the same weights (rel ``tol``)."""
    got, want = weights(got_dir / FINAL), weights(want_dir / FINAL)
    assert got.keys() == want.keys(), what
    for name, b in want.items():
        assert got[name].shape == b.shape, f"{what} {name}"
        close(got[name], b, tol, f"{what} {name}")
