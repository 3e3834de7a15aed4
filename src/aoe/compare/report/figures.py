"""Which figures a report has, from what data: writes OUT/plots/*.png and remembers each figure's
caption and path under a key the report's sections ask for.

A figure that cannot be drawn (no data, matplotlib missing, a plotting error) becomes a note of the
study, never an exception. Colors: one per variant across every figure (``plots.Palette``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from aoe.compare.report import curves as cv
from aoe.compare.report.markdown import fmt_lr, image
from aoe.compare.report.plots import Palette, Series, layer_bars, line_plot, load_heatmap, panel_plot
from aoe.compare.report.stats import is_number
from aoe.compare.report.study import Study
from aoe.compare.report.summary import VariantSummary

BAND = "line: mean over seeds; band: min–max over seeds"


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "variant"


@dataclass
class Figures:
    """The drawn figures: key -> (caption, path relative to OUT)."""

    study: Study
    plot_dir: Path | None  # None when matplotlib is missing
    beta: float = 0.5  # EMA weight of the training-loss curves
    drawn: dict[str, tuple[str, str]] = field(default_factory=dict)
    palette: Palette | None = None

    def draw(self, key: str, filename: str, caption: str, fn: Callable[[Path], object]) -> None:
        if self.plot_dir is None:
            return
        try:
            fn(self.plot_dir / filename)
            self.drawn[key] = (caption, f"plots/{filename}")
        except Exception as e:  # a plot must never stop the report
            self.study.note(f"plot {filename} failed: {e.__class__.__name__}: {e}")

    def markdown(self, *keys: str) -> list[str]:
        """The drawn figures among ``keys``, in that order, as captioned images."""
        return [line for k in keys if k in self.drawn for line in image(*self.drawn[k])]

    def series(self, s: VariantSummary, band: cv.Band, label: str | None = None, star=None) -> Series:
        return Series(label or s.label, self.palette(s.name), band, star)


def draw_figures(study: Study, out_dir: Path) -> Figures:
    """Draw every figure the study's data allows into ``out_dir/plots``."""
    n_points = max([0] + [len(cv.logged(study.logs.of(r), "loss").steps) for r in study.results.runs if r.done])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        study.note("matplotlib is not installed (`pip install autonomy-of-experts[report]`): no plots were drawn.")
        return Figures(study, None, cv.smoothing_beta(n_points))
    plot_dir = Path(out_dir) / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    figs = Figures(study, plot_dir, cv.smoothing_beta(n_points), palette=Palette([s.name for s in study.summaries]))
    for draw in (_loss_curves, _gap_curves, _routing_curves, _layer_bars, _heatmaps, _sweep):
        draw(figs)
    return figs


def _lines(figs: Figures, summaries: list[VariantSummary], make: Callable[[list[dict]], cv.Curve],
           smooth: float | None = None) -> list[Series]:
    """One line per variant that has data: ``make(entries)`` per completed run (EMA-smoothed with
    weight ``smooth`` when given), aggregated over seeds."""
    out = []
    for s in summaries:
        curves = list(figs.study.curves(s, make).values())
        band = cv.over_seeds([c.smoothed(smooth) for c in curves] if smooth is not None else curves)
        if band:
            out.append(figs.series(s, band))
    return out


def _loss_curves(figs: Figures) -> None:
    st, beta = figs.study, figs.beta
    train = _lines(figs, st.summaries, lambda e: cv.logged(e, "loss"), smooth=beta)
    if train:
        figs.draw("train_loss", "train_loss.png", f"Training loss (EMA-smoothed, β = {beta}, debiased; {BAND})",
                  lambda p: line_plot(train, p, f"Training loss (EMA β={beta}), mean over seeds, min–max band",
                                      "loss (nats)"))
    else:
        st.note("no training-loss entries were found in any metrics file: no training-loss plot.")
    val = _lines(figs, st.summaries, lambda e: cv.logged(e, "val_loss"))
    if val:
        figs.draw("val_loss", "val_loss.png", f"Validation loss (unsmoothed; {BAND})",
                  lambda p: line_plot(val, p, "Validation loss, mean over seeds, min–max band", "val loss (nats)",
                                      markers=True))
    else:
        st.note("no validation entries were found in any metrics file: no validation-loss plot.")


def _val_curve(entries: list[dict]) -> cv.Curve:
    return cv.logged(entries, "val_loss")


def gap_band(study: Study, variant: VariantSummary, baseline: VariantSummary) -> cv.Band:
    """Validation loss of ``variant`` minus ``baseline`` against step, paired by seed."""
    return cv.paired_difference(study.curves(variant, _val_curve), study.curves(baseline, _val_curve))


def _gap_curves(figs: Figures) -> None:
    series = []
    for c in figs.study.comparisons():
        band = gap_band(figs.study, c.variant, c.baseline)
        if band:
            series.append(figs.series(c.variant, band, f"{c.variant.label} − {c.baseline.label}"))
    if series:
        figs.draw("val_loss_gap", "val_loss_gap.png",
                  f"Validation loss of each variant minus its baseline, same seed paired (below 0: the variant is "
                  f"ahead; {BAND})",
                  lambda p: line_plot(series, p, "Validation loss − baseline's, mean over seeds",
                                      "Δ val loss (nats)", markers=True, zero_line=True))


#: (figure key, log field, title, y label, statistic of a layer) of the routing curves over training
ROUTING_CURVES = (
    ("ent_load_train", "ent_load", "Ent_load", "Ent_load (nats)", lambda l: l.ent_load),
    ("ent_conf_train", "ent_conf", "Ent_conf", "Ent_conf (nats)", lambda l: l.ent_conf),
    ("dead_experts_train", "dead_experts", "Dead experts per layer", "dead experts", lambda l: l.dead),
)


def _layer_curve(stat: Callable) -> Callable[[list[dict]], cv.Curve]:
    return lambda entries: cv.layer_mean(entries, stat)


def _routing_curves(figs: Figures) -> None:
    sparse = figs.study.sparse
    if not sparse:
        return
    for key, log_field, title, ylabel, stat in ROUTING_CURVES:
        series = _lines(figs, sparse, _layer_curve(stat))
        if not series:
            figs.study.note(f"the training logs hold no {log_field} (runs logged before it was recorded): "
                            f"no {title} plot over training.")
            continue
        figs.draw(key, f"{key}.png", f"{title} during training (from the training log, mean over layers; {BAND})",
                  lambda p, series=series, title=title, ylabel=ylabel: line_plot(
                      series, p, f"{title} during training (mean over layers)", ylabel))
    _gate_weight_curves(figs, sparse)


def _gate_weight_curves(figs: Figures, sparse: list[VariantSummary]) -> None:
    panels = [(f"top-{rank + 1} gate weight", _lines(figs, sparse, _layer_curve(lambda l, r=rank: l.gate_weight(r))))
              for rank in (0, 1)]
    if not any(series for _, series in panels):
        figs.study.note("the training logs hold no gate_weight_mean (runs logged before it was recorded): "
                        "no gate-weight plot over training.")
        return
    figs.draw("gate_weight_train", "gate_weight_train.png",
              f"Mean gate weight of the largest (top-1) and second-largest (top-2) chosen expert during training "
              f"(from the training log, mean over layers; {BAND})",
              lambda p: panel_plot(panels, p, "mean gate weight"))


def _layer_bars(figs: Figures) -> None:
    sparse = figs.study.sparse
    if not sparse:
        return
    refs = sorted({s.n_experts for s in sparse if s.n_experts})
    for key, what, more in (("ent_load", "Ent_load", "perfectly balanced"),
                            ("ent_conf", "Ent_conf", "a uniform score distribution")):
        bars = [(s.label, figs.palette(s.name), {i: getattr(d, key) for i, d in s.per_layer.items()}) for s in sparse]
        better = "higher = more balanced" if key == "ent_load" else "lower = more confident"
        figs.draw(f"{key}_layers", f"{key}_layers.png",
                  f"Per-layer {what} at the end of training (mean over seeds, whiskers min–max; dashed: log E, "
                  f"{more})",
                  lambda p, bars=bars, what=what, better=better: layer_bars(
                      bars, refs, p, f"{what} per layer ({better})", f"{what} (nats)"))


def _heatmaps(figs: Figures) -> None:
    seeds = list(figs.study.results.seeds)
    for s in figs.study.sparse:
        order = sorted(s.done, key=lambda r: seeds.index(r.seed) if r.seed in seeds else len(seeds))
        run = next((r for r in order if any(l.tokens_per_expert for l in r.layers)), None)
        if run is None:
            figs.study.note(f"{s.name}: no tokens_per_expert recorded, no load heatmap.")
            continue
        rows = [(str(l.layer if l.layer is not None else i), l.tokens_per_expert)
                for i, l in enumerate(run.layers) if l.tokens_per_expert]
        figs.draw(f"heatmap:{s.name}", f"load_heatmap_{safe_name(s.name)}.png",
                  f"{s.label}: share of (token, slot) assignments per expert and layer, seed {run.seed}, "
                  f"validation batches at the end of training",
                  lambda p, rows=rows, title=f"{s.label}: expert load, seed {run.seed}": load_heatmap(rows, p, title))


def _sweep(figs: Figures) -> None:
    sweep = figs.study.results.sweep
    if sweep is None:
        return
    series = []
    for s in figs.study.summaries:
        runs = [(lr, sweep.run(s.name, lr)) for lr in sweep.lrs]
        points = [(lr, r.val_loss) for lr, r in runs if r is not None and r.done and is_number(r.val_loss)]
        if not points:
            continue
        lrs, losses = tuple(x for x, _ in points), tuple(y for _, y in points)
        chosen = sweep.chosen_lr(s.name)
        star = next(((x, y) for x, y in points if chosen is not None and math.isclose(x, chosen, rel_tol=1e-9)), None)
        series.append(figs.series(s, cv.Band(lrs, losses, losses, losses), star=star))
    if series:
        lrs = ", ".join(fmt_lr(x) for x in sweep.lrs)
        figs.draw("sweep", "lr_sweep.png",
                  f"Learning-rate sweep: validation loss after {sweep.steps if sweep.steps is not None else '?'} steps "
                  f"(seed {sweep.seed if sweep.seed is not None else '?'}) against the peak learning rate ({lrs}); "
                  f"star: the chosen lr",
                  lambda p: line_plot(series, p, "Learning-rate sweep (val loss at the end of the sweep run)",
                                      "val loss (nats)", xlabel="peak learning rate", markers=True, logx=True))
