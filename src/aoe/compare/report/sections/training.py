"""Where the loss comes from, over training: loss curves, the gap to the baseline against step,
and the routing (confidence, gate weights, dead experts) from the training logs."""

from __future__ import annotations

from aoe.compare.report.figures import Figures, gap_band
from aoe.compare.report.markdown import DASH, fmt, fmt_mean_std, fmt_signed, table
from aoe.compare.report.stats import is_number
from aoe.compare.report.study import Study


TREND_TOLERANCE = 5e-5  # half the last digit the table prints


def trend(first: float, last: float) -> str:
    """How a gap moved between the first and the last evaluation (moves below the table's
    precision count as unchanged)."""
    if not (is_number(first) and is_number(last)):
        return DASH
    if abs(abs(last) - abs(first)) < TREND_TOLERANCE and first * last >= 0:
        return "unchanged"
    if first * last < 0:
        return "changes sign"
    return "narrows" if abs(last) < abs(first) else "widens"


def _step(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else fmt(x, 1)


def gap_table(study: Study) -> list[str]:
    """Per comparison: the validation-loss gap at the first and at the last evaluation both logged."""
    rows = []
    for c in study.comparisons():
        band = gap_band(study, c.variant, c.baseline)
        if not band:
            continue
        first, last = band.mean[0], band.mean[-1]
        rows.append([c.variant.label, c.baseline.label, _step(band.steps[0]), fmt_signed(first, 4),
                     _step(band.steps[-1]), fmt_signed(last, 4), trend(first, last)])
    if not rows:
        return []
    header = ["variant", "baseline", "first eval step", "gap at first", "last eval step", "gap at last", "the gap"]
    return ["Validation-loss gap to the baseline (variant − baseline, mean over the seeds both completed, same "
            "seed paired) at the first and the last evaluation:", "",
            table(header, rows, align="llrrrrl"), ""]


ROUTING_HEADER = ["variant", "Ent_conf", "gate top-1", "gate top-2", "Σ gate weights", "dead experts per layer"]


def routing_table(study: Study) -> list[str]:
    """Per sparse variant at the end of training: confidence, gate weights and dead experts."""
    rows = [[s.label, fmt_mean_std(s.ent_conf, 3), fmt_mean_std(s.gate_weight[0], 3), fmt_mean_std(s.gate_weight[1], 3),
             fmt_mean_std(s.gate_weight_sum, 3), fmt_mean_std(s.dead_experts, 2)] for s in study.sparse]
    if not rows:
        return []
    return ["Routing at the end of training (validation batches; mean over layers, then mean ± std over seeds; "
            "Σ gate weights: the chosen experts' weights summed, the share of their output that reaches the "
            "residual stream):", "",
            table(ROUTING_HEADER, rows), ""]


def over_training(study: Study, figures: Figures) -> list[str]:
    loss = figures.markdown("train_loss", "val_loss", "val_loss_gap")
    routing = figures.markdown("ent_load_train", "ent_conf_train", "gate_weight_train", "dead_experts_train")
    gaps, ends = gap_table(study), routing_table(study)
    if not (loss or routing or gaps or ends):
        return []
    return ["## Over training: where the loss comes from", "",
            "Loss curves, the gap of each variant to its baseline against step (does it close with training?), "
            "and the routing logged during training (Ent_conf, gate weights, dead experts), one color per variant "
            "as in every plot of this report.", "",
            *loss, *gaps, *routing, *ends]
