"""The learning-rate sweep of the tiny study, assembled from one ``aoe compare`` per learning rate.

Each learning rate was one comparison of the same variants at the committed study's budget (tiny
recipe, 1000 steps, 2.05M tokens, seed 0); 2e-3 is docs/results/tiny-cpu itself (seeds 0 and 1;
seed 0 is used here, seed 1 is shown beside it). The commands are in README.md beside this file.

    python docs/results/tiny-lr-sweep/assemble.py RUNS_DIR > docs/results/tiny-lr-sweep/sweep.md

RUNS_DIR holds lr<lr>/results.json for the other learning rates (default: this directory, where
the finished ones are committed with their runs' metrics; runs/lr-sweep while they train).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

COMMITTED = Path(__file__).resolve().parents[1] / "tiny-cpu" / "results.json"
VARIANTS = ("moe", "aoe", "moe_factorized")


def load(path: Path, lr: float) -> dict[tuple[str, int], float]:
    results = json.loads(path.read_text())
    return {(r["variant"], r["seed"], lr): r["val_loss"] for r in results["runs"] if r.get("status") == "done"}


def main(runs_dir: str) -> None:
    losses = load(COMMITTED, 2e-3)
    for sub in sorted(Path(runs_dir).glob("lr*/results.json")):
        losses.update(load(sub, float(sub.parent.name[2:])))
    lrs = sorted({lr for (_, _, lr) in losses})
    print("| variant | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr (seed 0) |")
    print("|:--|" + "--:|" * len(lrs) + ":--|")
    best = {}
    for v in VARIANTS:
        row = [losses.get((v, 0, lr), math.nan) for lr in lrs]
        ok = [(x, lr) for x, lr in zip(row, lrs) if math.isfinite(x)]
        best[v] = min(ok)[1] if ok else None
        cells = [f"{x:.4f}" if math.isfinite(x) else "–" for x in row]
        print(f"| {v} | " + " | ".join(cells) + f" | {best[v]:g} |")
    print()
    print("Seed 1 at lr 2e-3 (docs/results/tiny-cpu): " + ", ".join(
        f"{v} {losses[(v, 1, 2e-3)]:.4f}" for v in VARIANTS if (v, 1, 2e-3) in losses))
    for lr in lrs:
        if all((v, 0, lr) in losses for v in ("moe", "aoe", "moe_factorized")):
            print(f"\nlr {lr:g}: AoE − MoE = {losses[('aoe', 0, lr)] - losses[('moe', 0, lr)]:+.4f}, "
                  f"MoE + factorized W_g − MoE = {losses[('moe_factorized', 0, lr)] - losses[('moe', 0, lr)]:+.4f}")
    if best.get("moe") and best.get("aoe"):
        print(f"\nAt each one's best learning rate in this sweep: AoE − MoE = "
              f"{losses[('aoe', 0, best['aoe'])] - losses[('moe', 0, best['moe'])]:+.4f} (seed 0)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parent))
