"""The learning-rate sweep section (only when results.json has a "sweep")."""

from __future__ import annotations

import math

from aoe.compare.report.figures import Figures
from aoe.compare.report.markdown import DASH, fmt, fmt_lr, table
from aoe.compare.report.results import Sweep
from aoe.compare.report.study import Study


def _cell(sweep: Sweep, variant: str, lr: float, chosen: float | None) -> str:
    run = sweep.run(variant, lr)
    if run is None:
        return DASH
    if not run.done:
        return f"({run.status})"
    value = fmt(run.val_loss, 4)
    return f"**{value}** ✓" if chosen is not None and math.isclose(lr, chosen, rel_tol=1e-9) else value


def sweep_table(study: Study, sweep: Sweep) -> str:
    """Variant x lr -> sweep val loss, the chosen lr's cell bold and ticked, and the chosen lr."""
    names = [s.name for s in study.summaries if any(r.variant == s.name for r in sweep.runs)]
    names += [n for n in dict.fromkeys(r.variant for r in sweep.runs) if n not in names]
    rows = []
    for name in names:
        s = study.summary(name)
        chosen = sweep.chosen_lr(name)
        rows.append([s.label if s else name, *(_cell(sweep, name, lr, chosen) for lr in sweep.lrs), fmt_lr(chosen)])
        lowest = sweep.lowest(name)
        if chosen is not None and lowest is not None and not math.isclose(chosen, lowest, rel_tol=1e-9):
            study.note(f"learning-rate sweep: {name}'s chosen lr {fmt_lr(chosen)} is not its lowest-loss lr "
                       f"{fmt_lr(lowest)}.")
    header = ["variant", *(f"lr {fmt_lr(lr)}" for lr in sweep.lrs), "chosen lr"]
    return table(header, rows, align="l" + "r" * (len(header) - 1))


def learning_rate_sweep(study: Study, figures: Figures) -> list[str]:
    sweep = study.results.sweep
    if sweep is None:
        return []
    steps = f"{sweep.steps} steps" if sweep.steps is not None else "a few steps (count not recorded)"
    seed = f"seed {sweep.seed}" if sweep.seed is not None else "one seed (not recorded)"
    lines = [
        "## Learning-rate sweep", "",
        f"Before the main runs, every variant trained {steps} at each peak learning rate "
        f"({', '.join(fmt_lr(x) for x in sweep.lrs) or DASH}), {seed}. "
        "Its main runs use the learning rate with the lowest validation loss at the end of its sweep run "
        "(the chosen lr: bold and ✓). The table shows that validation loss in nats; a run that did not finish "
        "shows its status.", "",
    ]
    if sweep.runs:
        lines += [sweep_table(study, sweep), ""]
    else:
        lines += ["The sweep recorded no runs.", ""]
    return lines + figures.markdown("sweep")
