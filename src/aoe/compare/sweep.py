"""The learning-rate sweep of ``aoe compare --lr-sweep``: every variant trained briefly at each
learning rate (one seed, the first of ``--seeds``); the lowest final validation loss chooses that
variant's learning rate for its main runs.

    OUT/sweep/<variant>-lr<lr>/   one short ordinary training run each (resumable like the main runs)

Every sweep run has the base config's data, batch, warm-up and schedule shape, with
``train.max_steps = steps`` (the cosine decays over the sweep's own length) and ``train.lr = lr``.
A sweep shorter than the main runs favours larger learning rates (they make faster early
progress); ``steps`` equal to the main runs' max_steps measures each variant at its real budget.
A run that ends non-finite or fails counts as an infinite loss; ties go to the smaller lr.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from aoe.config import ConfigError, RunConfig, load_config
from aoe.compare.variants import Variant

SWEEP_DIR = "sweep"


@dataclass(frozen=True)
class SweepPlan:
    """The learning rates tried, the steps of each sweep run, and its seed."""

    lrs: tuple[float, ...]
    steps: int
    seed: int

    def __post_init__(self) -> None:
        if not self.lrs:
            raise ConfigError("--lr-sweep: give at least one learning rate")
        for lr in self.lrs:
            if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
                raise ConfigError(f"--lr-sweep: {lr!r} is not a positive learning rate")
        if len(set(self.lrs)) != len(self.lrs):
            raise ConfigError(f"--lr-sweep lists a learning rate twice: {list(self.lrs)}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"--sweep-steps={self.steps!r} must be a positive integer")

    def as_dict(self) -> dict[str, Any]:
        return {"lrs": list(self.lrs), "steps": self.steps, "seed": self.seed}

    def same_as(self, stored: dict[str, Any] | None) -> bool:
        """Whether a results.json "sweep" entry was made with this plan."""
        return stored is not None and {k: stored.get(k) for k in ("lrs", "steps", "seed")} == self.as_dict()


def sweep_run_name(variant: str, lr: float) -> str:
    return f"{variant}-lr{lr:g}"


def sweep_config(config, overrides, variant: Variant, plan: SweepPlan, lr: float) -> RunConfig:
    return load_config(config, [*overrides, *variant.overrides, f"train.seed={plan.seed}",
                                f"train.max_steps={plan.steps}", f"train.lr={lr!r}"])


def choose_lr(runs: list[dict[str, Any]], variant: str) -> float:
    """The learning rate of ``variant``'s sweep run with the lowest val_loss (non-finite = inf;
    ties: the smaller lr)."""
    mine = [r for r in runs if r["variant"] == variant]
    if not mine:
        raise ValueError(f"no sweep run of variant {variant!r}")

    def key(r):
        loss = r.get("val_loss")
        ok = r.get("status") == "done" and isinstance(loss, (int, float)) and math.isfinite(loss)
        return (loss if ok else math.inf, r["lr"])

    return min(mine, key=key)["lr"]


def run_sweep(
    plan: SweepPlan,
    variants: list[Variant],
    config,
    overrides,
    out: Path,
    train: Callable[[RunConfig, Path], dict[str, Any]],
    previous: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or reuse) every variant x lr sweep run; return the results.json "sweep" entry:
    ``{"lrs", "steps", "seed", "runs": [{"variant", "lr", "status", "val_loss", "run_dir"}], "chosen"}``.

    ``train(cfg, run_dir)`` trains one run (resuming it if it has checkpoints) and returns its
    summary (a dict with "step" and "val_loss"). A finished run (summary.json at ``steps``) is read
    back instead of trained again; a run that diverged (``TrainingError``: a non-finite loss) is
    recorded with status "diverged" and, when ``previous`` (the stored "sweep" entry) says so, not
    tried again.
    """
    from aoe.train.trainer import TrainingError

    stored = {(r["variant"], r["lr"]): r for r in (previous or {}).get("runs", [])}
    runs = []
    total, i = len(variants) * len(plan.lrs), 0
    for v in variants:
        for lr in plan.lrs:
            i += 1
            name = sweep_run_name(v.name, lr)
            run_dir = out / SWEEP_DIR / name
            entry = {"variant": v.name, "lr": lr, "status": "done", "val_loss": None, "run_dir": f"{SWEEP_DIR}/{name}"}
            summary = finished_summary(run_dir, plan.steps)
            prior = stored.get((v.name, lr))
            if summary is None and prior is not None and prior.get("status") == "diverged":
                entry.update(status="diverged", error=prior.get("error"))
            elif summary is None:
                if progress:
                    print(f"[sweep {i}/{total}] {name}: {plan.steps} steps at lr {lr:g}", file=sys.stderr)
                try:
                    summary = train(sweep_config(config, overrides, v, plan, lr), run_dir)
                except TrainingError as e:
                    entry.update(status="diverged", error=str(e))
            elif progress:
                print(f"[sweep {i}/{total}] {name}: already done (val_loss {summary['val_loss']:.4f})", file=sys.stderr)
            if summary is not None:
                entry["val_loss"] = summary.get("val_loss")
            runs.append(entry)
    return {**plan.as_dict(), "runs": runs, "chosen": {v.name: choose_lr(runs, v.name) for v in variants}}


def finished_summary(run_dir: Path, steps: int) -> dict[str, Any] | None:
    """The run's summary.json if the run finished ``steps`` steps, else None (the sweep's runs and
    the comparison's main runs are reused by this one rule)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("step") == steps else None
