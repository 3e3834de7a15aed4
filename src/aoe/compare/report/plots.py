"""Drawing the report's figures with matplotlib (Agg canvas: no pyplot, no global backend switch).

Each function draws one kind of figure from plain data and writes a PNG; which figures a report
has, and from what data, is ``aoe.compare.report.figures``' job. matplotlib is imported inside the
functions, so this module imports without it.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from aoe.compare.report.curves import Band
from aoe.compare.report.stats import finite, is_number, mean, minmax
from aoe.utils.files import atomic_write_bytes


class Palette:
    """One color per variant across every plot of a report (tab10, in the order the variants are given)."""

    def __init__(self, names: Sequence[str]):
        from matplotlib import colormaps

        cmap = colormaps["tab10"]
        self._colors = {name: cmap(i % 10) for i, name in enumerate(dict.fromkeys(names))}
        self._cmap = cmap

    def __call__(self, name: str) -> Any:
        if name not in self._colors:
            self._colors[name] = self._cmap(len(self._colors) % 10)
        return self._colors[name]


@dataclass(frozen=True)
class Series:
    """One line: a legend label, a color, the band (mean line, min–max shading), and optionally a
    point to mark with a star (e.g. the chosen learning rate)."""

    label: str
    color: Any
    band: Band
    star: tuple[float, float] | None = None


def new_figure(width: float = 7.0, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def _draw_lines(ax, series: Sequence[Series], markers: bool) -> None:
    for s in series:
        b = s.band
        if not b:
            continue
        ax.plot(b.steps, b.mean, label=s.label, color=s.color, marker="o" if markers else None, markersize=3)
        if b.spread:
            ax.fill_between(b.steps, b.lo, b.hi, color=s.color, alpha=0.2, linewidth=0)
        if s.star is not None:
            ax.plot([s.star[0]], [s.star[1]], marker="*", markersize=13, color=s.color, markeredgecolor="black",
                    linestyle="none")


def _finish(ax, title: str, xlabel: str, ylabel: str, logx: bool = False, zero_line: bool = False) -> None:
    if logx:
        ax.set_xscale("log")
    if zero_line:
        ax.axhline(0.0, color="black", linewidth=1, linestyle="--")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def line_plot(series: Sequence[Series], path: Path, title: str, ylabel: str, *, xlabel: str = "step",
              markers: bool = False, logx: bool = False, zero_line: bool = False) -> Path:
    """Lines (mean over seeds) with a light min–max band where the seeds differ."""
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    _draw_lines(ax, series, markers)
    _finish(ax, title, xlabel, ylabel, logx, zero_line)
    return save(fig, path)


def panel_plot(panels: Sequence[tuple[str, Sequence[Series]]], path: Path, ylabel: str, *,
               xlabel: str = "step") -> Path:
    """Side-by-side panels sharing the y axis, each titled and drawn like :func:`line_plot`."""
    fig = new_figure(max(7.0, 4.2 * len(panels)), 4.2)
    first = None
    for i, (title, series) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1, sharey=first)
        first = first or ax
        _draw_lines(ax, series, markers=False)
        _finish(ax, title, xlabel, ylabel if i == 0 else "")
    return save(fig, path)


def layer_bars(bars: Sequence[tuple[str, Any, dict[int, list[float]]]], refs: Sequence[int], path: Path,
               title: str, ylabel: str) -> Path:
    """Grouped bars per layer, one group member per variant: (label, color, layer -> per-seed
    values); whiskers min–max over seeds; a dashed line at log E for each E in ``refs``."""
    import numpy as np

    layers = sorted({i for _, _, values in bars for i in values})
    fig = new_figure(max(6.0, 1.0 + 0.6 * len(layers) * max(1, len(bars))), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(bars))
    x = np.arange(len(layers), dtype=float)
    for j, (label, color, values) in enumerate(bars):
        vals = [values.get(i, []) for i in layers]
        m = np.array([mean(v) for v in vals])
        lo = np.array([minmax(v)[0] for v in vals])
        hi = np.array([minmax(v)[1] for v in vals])
        yerr = None
        if np.any(np.isfinite(hi - lo) & (hi - lo > 0)):
            yerr = np.vstack([np.nan_to_num(m - lo), np.nan_to_num(hi - m)])
        ax.bar(x - 0.4 + width * (j + 0.5), np.nan_to_num(m), width=width, color=color, label=label, yerr=yerr,
               capsize=2)
    for n in refs:
        ax.axhline(math.log(n), color="black", linestyle="--", linewidth=1,
                   label=f"max log E = log {n} = {math.log(n):.3f}")
    ax.set_xticks(x)
    ax.set_xticklabels([str(i) for i in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    tops = [math.log(n) for n in refs] + [v for _, _, values in bars for vs in values.values() for v in finite(vs)]
    if tops:
        ax.set_ylim(0.0, max(tops) * 1.3 if max(tops) > 0 else 1.0)  # headroom for the legend
    ax.legend(fontsize=8, loc="upper center", ncol=min(4, len(bars) + len(refs)))
    return save(fig, path)


def load_heatmap(rows: Sequence[tuple[str, Sequence[float]]], path: Path, title: str) -> Path:
    """Share of assignments per expert (columns) and layer (rows: (layer name, tokens per expert))."""
    import numpy as np

    n = max(len(c) for _, c in rows)
    share = np.full((len(rows), n), np.nan)
    for r, (_, counts) in enumerate(rows):
        c = np.array([float(v) if is_number(v) else np.nan for v in counts])
        total = np.nansum(c)
        if total > 0:
            share[r, : len(c)] = c / total
    fig = new_figure(max(4.5, 1.5 + 0.55 * n), max(2.5, 1.2 + 0.45 * len(rows)))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="share of assignments")
    if share.size <= 400:
        for (r, c), v in np.ndenumerate(share):
            if np.isfinite(v):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < np.nanmax(share) * 0.6 else "black")
    ax.set_xticks(range(n))
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([name for name, _ in rows])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"{title} (uniform = 1/{n} = {1 / n:.3f})", fontsize=10)
    return save(fig, path)
