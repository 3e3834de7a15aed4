"""Markdown report and plots for an AoE-vs-MoE comparison (the dict the runner stores in results.json).

``write_report(results, out_dir)`` writes ``out_dir/report.md`` and PNGs under ``out_dir/plots/``;
``headline_table(results)`` is a short table for the console. Nothing here trains or evaluates: every
number comes from ``results`` and from the runs' ``metrics.jsonl`` files. Missing values (NaN/None),
missing or broken metrics files, failed runs and a missing matplotlib are tolerated and noted in the
report instead of raising.

``results`` (OUT/results.json; any float may be NaN/None where unavailable, e.g. dense variants have no
expert statistics)::

    {"command": str, "created": str (ISO 8601),
     "machine": {"platform", "python", "torch", "device", "threads"},
     "config": {"model": {...}, "data": {...}, "train": {...}},          # the resolved base config
     "corpus": {"source", "train_tokens", "val_tokens", "vocab_size",
                "unigram_entropy", "unigram_cross_entropy", "bytes_per_token"},
     "variants": [{"name", "label", "description", "overrides": [str, ...]}, ...],
     "seeds": [int, ...],
     "runs": [{"variant", "seed", "status" ("done" or anything else = incomplete), "error" (optional),
               "run_dir" (relative to OUT), "val_loss", "perplexity", "bits_per_byte",
               "params_total", "params_active", "flops_per_token", "tokens_per_s",
               "peak_memory_bytes", "train_time_s", "steps", "tokens",
               "layers": [{"layer", "kind", "ent_load", "ent_conf", "imbalance",
                           "tokens_per_expert": [int, ...]}, ...]}, ...],
     "definitions": {"peak_memory": str, "flops_per_token": str}      # optional wording overrides
    }

``OUT/<run_dir>/metrics.jsonl``: training entries (with "loss", optionally "layers" with ent_load etc.)
and validation entries (with "val_loss"), one JSON object per line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from aoe.compare.stats import (
    NAN,
    VERDICT_RULE,
    compare_entropies,
    compare_means,
    ema,
    finite,
    is_number,
    mean,
    minmax,
    std,
)

__all__ = [
    "write_report",
    "headline_table",
    "summarize",
    "read_metrics",
    "fmt",
    "fmt_si",
    "fmt_bytes",
    "fmt_mean_std",
    "VariantSummary",
]

LN2 = math.log(2.0)
DASH = "–"

# ---------------------------------------------------------------------------------------------------------
# Formatting


def fmt(x: object, digits: int = 3) -> str:
    """Fixed-point number, or an en dash for None/NaN/inf/non-numbers."""
    return f"{float(x):.{digits}f}" if is_number(x) else DASH


def fmt_si(x: object, digits: int = 2, unit: str = "") -> str:
    """1234567 -> '1.23 M' (K, M, G, T, P); en dash when missing."""
    if not is_number(x):
        return DASH
    v = float(x)
    for div, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= div:
            return f"{v / div:.{digits}f} {prefix}{unit}".rstrip()
    return f"{v:.0f} {unit}".rstrip() if float(v).is_integer() else f"{v:.{digits}f} {unit}".rstrip()


def fmt_bytes(x: object) -> str:
    """Bytes in binary units (KiB, MiB, GiB); en dash when missing (e.g. not measured on CPU)."""
    if not is_number(x):
        return DASH
    v = float(x)
    for div, unit in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if v >= div:
            return f"{v / div:.2f} {unit}"
    return f"{v:.0f} B"


def fmt_mean_std(values: Sequence[object], digits: int = 4) -> str:
    """'mean ± std' over the finite values; just the value with one; en dash with none."""
    xs = finite(values)
    if not xs:
        return DASH
    if len(xs) == 1:
        return fmt(xs[0], digits)
    return f"{fmt(mean(xs), digits)} ± {fmt(std(xs), digits)}"


def _md_escape(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> str:
    rows = [[_md_escape(c) for c in r] for r in rows]
    if align is None:
        align = "l" + "r" * (len(header) - 1)
    seps = [":--" if a == "l" else "--:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(seps) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Reading and summarizing


def read_metrics(path: Path, shown: str | None = None) -> tuple[list[dict], str | None]:
    """Entries of a metrics.jsonl file and a problem description (None when it read cleanly).

    A missing or unreadable file gives ([], reason); malformed lines are skipped and counted.
    ``shown`` is how the path is written in the description (default: the path itself)."""
    path = Path(path)
    shown = shown or str(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return [], f"metrics file missing: {shown}"
    except OSError as e:  # a directory, no permission, ...
        return [], f"metrics file unreadable: {shown} ({e.__class__.__name__})"
    entries, bad = [], 0
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(obj, dict):
            entries.append(obj)
        else:
            bad += 1
    problem = f"{bad} malformed line(s) skipped in {shown}" if bad else None
    if not entries and problem is None:
        problem = f"metrics file empty: {shown}"
    return entries, problem


def _num(d: Any, key: str) -> float:
    v = d.get(key) if isinstance(d, dict) else None
    return float(v) if is_number(v) else NAN


def _layers(run: dict) -> list[dict]:
    layers = run.get("layers") if isinstance(run, dict) else None
    return [l for l in layers if isinstance(l, dict)] if isinstance(layers, list) else []


def _parse_override(overrides: Any, key: str) -> str | None:
    for o in overrides or []:
        if isinstance(o, str) and "=" in o:
            k, v = o.split("=", 1)
            if k.strip() == key:
                return v.strip()
    return None


@dataclass
class VariantSummary:
    """Per-variant aggregates over the completed seeds (lists hold one value per done run)."""

    name: str
    label: str
    description: str = ""
    overrides: list[str] = field(default_factory=list)
    kind: str = "unknown"  # "aoe", "moe", "dense", ...
    runs: list[dict] = field(default_factory=list)  # all runs of this variant
    done: list[dict] = field(default_factory=list)  # runs with status "done"
    val_loss: list[float] = field(default_factory=list)
    perplexity: list[float] = field(default_factory=list)
    bits_per_byte: list[float] = field(default_factory=list)
    ent_load: list[float] = field(default_factory=list)  # per run: mean over layers
    ent_conf: list[float] = field(default_factory=list)
    imbalance: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    peak_memory: list[float] = field(default_factory=list)
    params_total: float = NAN
    params_active: float = NAN
    flops_per_token: float = NAN
    # layer index -> {"ent_load": [...], "ent_conf": [...], "imbalance": [...], "n_experts": [...]}
    per_layer: dict[int, dict[str, list[float]]] = field(default_factory=dict)

    @property
    def sparse(self) -> bool:
        return bool(finite(self.ent_load) or finite(self.ent_conf)) or self.kind in ("moe", "aoe")

    @property
    def n_experts(self) -> int | None:
        ns = [n for d in self.per_layer.values() for n in finite(d.get("n_experts", []))]
        return int(max(ns)) if ns else None


def _first_number(values: Iterable[object]) -> float:
    for v in values:
        if is_number(v):
            return float(v)
    return NAN


def summarize(results: dict) -> list[VariantSummary]:
    """One :class:`VariantSummary` per variant, in the order of ``results["variants"]`` (then any
    variant that only appears in ``results["runs"]``)."""
    runs = [r for r in (results.get("runs") or []) if isinstance(r, dict)]
    variants = [v for v in (results.get("variants") or []) if isinstance(v, dict) and v.get("name")]
    names = [str(v["name"]) for v in variants]
    for r in runs:
        n = str(r.get("variant", "?"))
        if n not in names:
            names.append(n)
            variants.append({"name": n})
    corpus = results.get("corpus") or {}
    bpt = _num(corpus, "bytes_per_token")
    base_ffn = ((results.get("config") or {}).get("model") or {}).get("ffn")

    out = []
    for v in variants:
        name = str(v["name"])
        s = VariantSummary(
            name=name,
            label=str(v.get("label") or name),
            description=str(v.get("description") or ""),
            overrides=[str(o) for o in (v.get("overrides") or [])],
        )
        s.runs = sorted((r for r in runs if str(r.get("variant", "?")) == name), key=lambda r: str(r.get("seed")))
        s.runs.sort(key=lambda r: r.get("seed") if is_number(r.get("seed")) else math.inf)
        s.done = [r for r in s.runs if r.get("status") == "done"]
        for r in s.done:
            vl = _num(r, "val_loss")
            s.val_loss.append(vl)
            ppl = _num(r, "perplexity")
            s.perplexity.append(ppl if is_number(ppl) else (math.exp(vl) if is_number(vl) and vl < 700 else NAN))
            bpb = _num(r, "bits_per_byte")
            if not is_number(bpb) and is_number(vl) and is_number(bpt) and bpt > 0:
                bpb = vl / LN2 / bpt
            s.bits_per_byte.append(bpb)
            layers = _layers(r)
            s.ent_load.append(mean(_num(l, "ent_load") for l in layers))
            s.ent_conf.append(mean(_num(l, "ent_conf") for l in layers))
            s.imbalance.append(mean(_num(l, "imbalance") for l in layers))
            s.tokens_per_s.append(_num(r, "tokens_per_s"))
            s.peak_memory.append(_num(r, "peak_memory_bytes"))
            for i, l in enumerate(layers):
                idx = int(l["layer"]) if is_number(l.get("layer")) else i
                d = s.per_layer.setdefault(idx, {"ent_load": [], "ent_conf": [], "imbalance": [], "n_experts": []})
                d["ent_load"].append(_num(l, "ent_load"))
                d["ent_conf"].append(_num(l, "ent_conf"))
                d["imbalance"].append(_num(l, "imbalance"))
                tpe = l.get("tokens_per_expert")
                d["n_experts"].append(float(len(tpe)) if isinstance(tpe, list) and tpe else NAN)
        pool = s.done or s.runs
        s.params_total = _first_number(r.get("params_total") for r in pool)
        s.params_active = _first_number(r.get("params_active") for r in pool)
        s.flops_per_token = _first_number(r.get("flops_per_token") for r in pool)
        s.per_layer = dict(sorted(s.per_layer.items()))
        # kind: the layers' own kind, else the override, else the name, else the base config
        kinds = [str(l.get("kind")) for r in s.runs for l in _layers(r) if l.get("kind") not in (None, "dense")]
        if kinds:
            s.kind = max(set(kinds), key=kinds.count)
        else:
            ffn = _parse_override(s.overrides, "model.ffn")
            if ffn:
                s.kind = ffn
            elif name.startswith(("aoe", "moe", "dense")):
                s.kind = name.split("-")[0].split("_")[0]
            elif base_ffn:
                s.kind = str(base_ffn)
        out.append(s)
    return out


def _pick(summaries: list[VariantSummary], name: str, kind: str) -> VariantSummary | None:
    """The variant called ``name`` if it has a val loss; else the ``kind`` variant with the lowest one."""
    for s in summaries:
        if s.name == name and finite(s.val_loss):
            return s
    cands = [s for s in summaries if s.kind == kind and finite(s.val_loss)]
    if not cands:
        for s in summaries:
            if s.name == name:
                return s
        return None
    return min(cands, key=lambda s: mean(s.val_loss))


# ---------------------------------------------------------------------------------------------------------
# Console table


def headline_table(results: dict) -> str:
    """Short markdown table (variant, val loss, Ent_load, Ent_conf; means over completed seeds)."""
    rows = []
    for s in summarize(results):
        rows.append(
            [
                s.label if s.label == s.name else f"{s.label} ({s.name})",
                f"{len(s.done)}/{len(s.runs)}",
                fmt_mean_std(s.val_loss, 4),
                fmt(mean(s.ent_load), 3),
                fmt(mean(s.ent_conf), 3),
            ]
        )
    return _md_table(["variant", "seeds done", "val loss (nats)", "Ent_load", "Ent_conf"], rows)


# ---------------------------------------------------------------------------------------------------------
# Curves and plots


def _curve(entries: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the entries that carry ``key`` (training: "loss"; validation: "val_loss");
    a repeated step keeps its last value (a resumed run)."""
    by_step: dict[float, float] = {}
    for e in entries:
        if key in e and is_number(e.get("step")):
            by_step[float(e["step"])] = float(e[key]) if is_number(e[key]) else NAN
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _layer_mean_curve(entries: list[dict], key: str) -> tuple[list[float], list[float]]:
    by_step: dict[float, float] = {}
    for e in entries:
        if "loss" in e and is_number(e.get("step")) and isinstance(e.get("layers"), list):
            m = mean(_num(l, key) for l in e["layers"] if isinstance(l, dict))
            if is_number(m):
                by_step[float(e["step"])] = m
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _aggregate(curves: list[tuple[list[float], list[float]]]):
    """Mean, min and max over seeds on the steps all seeds logged; falls back to the longest curve
    when the seeds share no step."""
    curves = [c for c in curves if c[0]]
    if not curves:
        return [], [], [], []
    maps = [dict(zip(s, v)) for s, v in curves]
    common = sorted(set.intersection(*(set(m) for m in maps)))
    if not common:
        maps = [max(maps, key=len)]
        common = sorted(maps[0])
    means, los, his = [], [], []
    for st in common:
        vals = [m[st] for m in maps]
        means.append(mean(vals))
        lo, hi = minmax(vals)
        los.append(lo)
        his.append(hi)
    return common, means, los, his


def _smoothing_beta(n_points: int) -> float:
    """EMA weight for the training-loss plot, lighter when few points were logged."""
    if n_points >= 200:
        return 0.95
    if n_points >= 50:
        return 0.9
    if n_points >= 15:
        return 0.8
    return 0.5


def _new_figure(width: float = 7.0, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)  # Agg canvas, no pyplot and no global backend switch
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


_PALETTE: dict[str, Any] = {}


def _color(label: str):
    """One color per variant label across every plot of a report (tab10, in first-seen order)."""
    from matplotlib import colormaps

    if label not in _PALETTE:
        _PALETTE[label] = colormaps["tab10"](len(_PALETTE) % 10)
    return _PALETTE[label]


def _plot_curves(series: list[tuple[str, tuple]], title: str, ylabel: str, path: Path, markers: bool = False):
    """series: (label, (steps, mean, lo, hi)) each; a light min-max band where seeds differ."""
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for label, (steps, m, lo, hi) in series:
        color = _color(label)
        if not steps:
            continue
        ax.plot(steps, m, label=label, color=color, marker="o" if markers else None, markersize=3)
        if any(h != l for l, h in zip(lo, hi) if is_number(l) and is_number(h)):
            ax.fill_between(steps, lo, hi, color=color, alpha=0.2, linewidth=0)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_layer_bars(sparse: list[VariantSummary], key: str, title: str, ylabel: str, path: Path):
    import numpy as np

    layers = sorted({i for s in sparse for i in s.per_layer})
    fig = _new_figure(max(6.0, 1.0 + 0.6 * len(layers) * max(1, len(sparse))), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(sparse))
    x = np.arange(len(layers), dtype=float)
    for j, s in enumerate(sparse):
        color = _color(s.label)
        vals = [s.per_layer.get(i, {}).get(key, []) for i in layers]
        m = np.array([mean(v) for v in vals])
        lo = np.array([minmax(v)[0] for v in vals])
        hi = np.array([minmax(v)[1] for v in vals])
        pos = x - 0.4 + width * (j + 0.5)
        yerr = None
        if np.any(np.isfinite(hi - lo) & (hi - lo > 0)):
            yerr = np.vstack([np.nan_to_num(m - lo), np.nan_to_num(hi - m)])
        ax.bar(pos, np.nan_to_num(m), width=width, color=color, label=s.label, yerr=yerr, capsize=2)
    ns = sorted({s.n_experts for s in sparse if s.n_experts})
    for n in ns:
        ax.axhline(math.log(n), color="black", linestyle="--", linewidth=1, label=f"max log E = log {n} = {math.log(n):.3f}")
    ax.set_xticks(x)
    ax.set_xticklabels([str(i) for i in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    tops = [math.log(n) for n in ns] + [v for s in sparse for d in s.per_layer.values() for v in finite(d.get(key, []))]
    if tops:
        ax.set_ylim(0.0, max(tops) * 1.3 if max(tops) > 0 else 1.0)  # headroom for the legend
    ax.legend(fontsize=8, loc="upper center", ncol=min(4, len(sparse) + len(ns)))
    return _save(fig, path)


def _plot_heatmap(s: VariantSummary, run: dict, path: Path):
    import numpy as np

    layers = [l for l in _layers(run) if isinstance(l.get("tokens_per_expert"), list) and l["tokens_per_expert"]]
    n = max(len(l["tokens_per_expert"]) for l in layers)
    share = np.full((len(layers), n), np.nan)
    for r, l in enumerate(layers):
        c = np.array([float(v) if is_number(v) else np.nan for v in l["tokens_per_expert"]])
        tot = np.nansum(c)
        if tot > 0:
            share[r, : len(c)] = c / tot
    fig = _new_figure(max(4.5, 1.5 + 0.55 * n), max(2.5, 1.2 + 0.45 * len(layers)))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="share of assignments")
    if share.size <= 400:
        for (r, c), v in np.ndenumerate(share):
            if np.isfinite(v):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < np.nanmax(share) * 0.6 else "black")
    ax.set_xticks(range(n))
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(l.get("layer", i)) for i, l in enumerate(layers)])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"{s.label}: expert load, seed {run.get('seed')} (uniform = 1/{n} = {1 / n:.3f})", fontsize=10)
    return _save(fig, path)


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "variant"


def _make_plots(results: dict, summaries: list[VariantSummary], out_dir: Path, metrics: dict, notes: list[str]):
    """Write the PNGs; returns [(caption, relative path)]. Failures become notes, never exceptions."""
    plots: list[tuple[str, str]] = []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        notes.append("matplotlib is not installed (`pip install autonomy-of-experts[report]`): no plots were drawn.")
        return plots
    _PALETTE.clear()  # the variants' order in this report fixes their colors
    for summary in summaries:
        _color(summary.label)
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)

    def attempt(caption: str, filename: str, fn, *args):
        try:
            fn(*args, plot_dir / filename)
            plots.append((caption, f"plots/{filename}"))
        except Exception as e:  # a plot must never stop the report
            notes.append(f"plot {filename} failed: {e.__class__.__name__}: {e}")

    # (1) training loss
    train_series, n_pts = [], 0
    for s in summaries:
        curves = [_curve(metrics.get(id(r), []), "loss") for r in s.done]
        n_pts = max([n_pts] + [len(c[0]) for c in curves])
        train_series.append((s, curves))
    beta = _smoothing_beta(n_pts)
    series = []
    for s, curves in train_series:
        smoothed = [(st, ema(v, beta)) for st, v in curves]
        agg = _aggregate(smoothed)
        if agg[0]:
            series.append((s.label, agg))
    if series:
        attempt(
            f"Training loss (EMA-smoothed, β = {beta}, debiased; line: mean over seeds; band: min–max over seeds)",
            "train_loss.png",
            lambda p: _plot_curves(series, f"Training loss (EMA β={beta}), mean over seeds, min–max band", "loss (nats)", p),
        )
    else:
        notes.append("no training-loss entries were found in any metrics file: no training-loss plot.")
    # (2) validation loss
    series = []
    for s in summaries:
        agg = _aggregate([_curve(metrics.get(id(r), []), "val_loss") for r in s.done])
        if agg[0]:
            series.append((s.label, agg))
    if series:
        attempt(
            "Validation loss (unsmoothed; line: mean over seeds; band: min–max over seeds)",
            "val_loss.png",
            lambda p: _plot_curves(series, "Validation loss, mean over seeds, min–max band", "val loss (nats)", p, markers=True),
        )
    else:
        notes.append("no validation entries were found in any metrics file: no validation-loss plot.")

    sparse = [s for s in summaries if s.sparse and s.per_layer]
    if sparse:
        # (3), (4) per-layer entropies
        attempt(
            "Per-layer Ent_load at the end of training (mean over seeds, whiskers min–max; dashed: log E, perfectly balanced)",
            "ent_load_layers.png",
            lambda p: _plot_layer_bars(sparse, "ent_load", "Ent_load per layer (higher = more balanced)", "Ent_load (nats)", p),
        )
        attempt(
            "Per-layer Ent_conf at the end of training (mean over seeds, whiskers min–max; dashed: log E, a uniform score distribution)",
            "ent_conf_layers.png",
            lambda p: _plot_layer_bars(sparse, "ent_conf", "Ent_conf per layer (lower = more confident)", "Ent_conf (nats)", p),
        )
        # (5) heatmaps from the first seed with expert counts
        seeds = results.get("seeds") or []
        for s in sparse:
            order = sorted(s.done, key=lambda r: seeds.index(r.get("seed")) if r.get("seed") in seeds else len(seeds))
            run = next((r for r in order if any(isinstance(l.get("tokens_per_expert"), list) and l["tokens_per_expert"] for l in _layers(r))), None)
            if run is None:
                notes.append(f"{s.name}: no tokens_per_expert recorded, no load heatmap.")
                continue
            attempt(
                f"{s.label}: share of (token, slot) assignments per expert and layer, seed {run.get('seed')}, validation batches at the end of training",
                f"load_heatmap_{_safe_name(s.name)}.png",
                lambda p, s=s, run=run: _plot_heatmap(s, run, p),
            )
        # extra: Ent_load during training, from the training log
        series = []
        for s in sparse:
            agg = _aggregate([_layer_mean_curve(metrics.get(id(r), []), "ent_load") for r in s.done])
            if agg[0]:
                series.append((s.label, agg))
        if series:
            attempt(
                "Ent_load during training (from the training log, mean over layers; line: mean over seeds; band: min–max)",
                "ent_load_train.png",
                lambda p: _plot_curves(series, "Ent_load during training (mean over layers)", "Ent_load (nats)", p),
            )
    return plots


# ---------------------------------------------------------------------------------------------------------
# The report


def _max_entropy_note(summaries: list[VariantSummary]) -> str:
    by_e: dict[int, list[str]] = {}
    for s in summaries:
        if s.n_experts:
            by_e.setdefault(s.n_experts, []).append(s.label)
    if not by_e:
        return ""
    parts = [f"log {e} = {math.log(e):.3f} ({', '.join(labels)})" for e, labels in sorted(by_e.items())]
    return "The maximum of Ent_load and Ent_conf is log E: " + "; ".join(parts) + ". "


def _config_summary(results: dict, summaries: list[VariantSummary]) -> list[str]:
    cfg = results.get("config") or {}
    model, train, data = cfg.get("model") or {}, cfg.get("train") or {}, cfg.get("data") or {}
    lines = []

    def kv(d: dict, keys: Sequence[str]) -> str:
        return ", ".join(f"{k} = {d[k]}" for k in keys if k in d and d[k] is not None)

    m = kv(model, ["vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "ffn", "d_ffn",
                   "n_experts", "top_k", "d_low", "d_wide", "renormalize", "norm", "aux_loss_coef", "dense_d_ffn"])
    if m:
        lines.append(f"- Model (base, before each variant's overrides): {m}")
    t = kv(train, ["max_steps", "batch_size", "micro_batch_size", "seq_len", "lr", "min_lr_ratio", "warmup_steps",
                   "weight_decay", "grad_clip", "eval_every", "eval_batches", "dtype", "device"])
    if t:
        lines.append(f"- Training: {t}")
    d = kv(data, ["source", "vocab_size", "tokenizer", "val_fraction", "max_bytes"])
    if d:
        lines.append(f"- Data: {d}")
    steps, bs, sl = train.get("max_steps"), train.get("batch_size"), train.get("seq_len")
    planned = steps * bs * sl if all(is_number(x) for x in (steps, bs, sl)) else None
    actual = finite(r.get("tokens") for s in summaries for r in s.done)
    tok = []
    if planned is not None:
        tok.append(f"{planned:,} planned per run (max_steps × batch_size × seq_len)")
    if actual:
        lo, hi = min(actual), max(actual)
        tok.append(f"{int(lo):,} trained per completed run" if lo == hi else f"{int(lo):,}–{int(hi):,} trained per completed run")
    if tok:
        lines.append(f"- Tokens: {'; '.join(tok)}")
    seeds = results.get("seeds")
    if seeds:
        lines.append(f"- Seeds: {', '.join(str(x) for x in seeds)}")
    return lines


def _definitions(results: dict, beta_note: str) -> list[str]:
    machine = results.get("machine") or {}
    device = str(machine.get("device", ""))
    peak = (
        "the peak bytes of one micro-batch forward + backward (loss + aux loss) of the trained model, measured "
        "after training: parameters plus the most activations, temporaries and gradients alive at once; "
        "optimizer state is not included. On CUDA it is the allocator's peak (torch.cuda.max_memory_allocated "
        "after a reset); on CPU the peak of live tensor bytes counted by aoe.utils.memory.TensorMemoryTracker "
        "(no allocator overhead); – where it was not recorded"
    )
    custom = (results.get("definitions") or {}) if isinstance(results.get("definitions"), dict) else {}
    peak = custom.get("peak_memory", peak)
    flops = custom.get(
        "flops_per_token",
        "matrix-multiply FLOPs of one training step per token, counted analytically as 3 × the forward "
        "matmul FLOPs (2 FLOPs per multiply-add; backward ≈ 2 × forward). Only the k chosen experts' "
        "matmuls count, plus the router, or for AoE the W_down of all n experts, plus attention and the "
        "output projection",
    )
    items = [
        ("Val loss", "mean next-token cross entropy in nats over the held-out validation windows, measured at "
                     "the end of training; the headline shows mean ± sample standard deviation over the completed "
                     "seeds (just the value with one seed)"),
        ("Perplexity", "exp(val loss), per run; the headline shows the mean over seeds of the runs' values"),
        ("Bits per byte", "val_loss / ln 2 / bytes_per_token, with bytes_per_token the mean UTF-8 bytes per "
                          "token of the validation text; mean over seeds"),
        ("Ent_load", "per layer, -Σ_i q_i log q_i with q_i the share of (token, slot) assignments given to "
                     "expert i, measured on validation batches at the end of training; maximum log E "
                     "(perfectly balanced, E experts); higher is more balanced. The headline shows the mean over "
                     "layers, then over seeds. This definition is this project's (the paper's formula is not public)"),
        ("Ent_conf", "per layer, the mean over tokens of -Σ_i p_i log p_i, where p is the softmax over all E "
                     "selection scores (router logits for MoE, activation norms for AoE); 0 is a one-hot choice, "
                     "log E a uniform one; lower is a more confident choice. Headline: mean over layers, then seeds. "
                     "This project's definition as well"),
        ("Max/mean load (imbalance)", "per layer, max_i (tokens to expert i) / mean_i (tokens per expert); "
                                      "1 is perfectly balanced; headline: mean over layers, then seeds"),
        ("Params total", "all parameters of the model, embeddings included (tied embeddings counted once)"),
        ("Params active", "parameters used for one token: the expert weights of the k chosen experts only; the "
                          "router, and AoE's W_down of all experts (every expert computes x W_down), count in full, "
                          "as do attention, norms and embeddings"),
        ("FLOPs/token", flops),
        ("Tokens/s", "training tokens processed per second of wall-clock training time (excluding evaluation "
                     "where the runner separates it); mean over seeds"),
        ("Peak memory", peak + (f" (device of this study: {device})" if device else "")),
        ("Unigram baseline", "unigram_entropy: the entropy of the validation tokens under their own unigram "
                             "distribution; unigram_cross_entropy: the validation cross entropy of the training "
                             "set's unigram distribution, i.e. the val loss of a model that ignores all context. "
                             "A language model should be well below it"),
        ("Mean, std, standard error", "mean over completed seeds; std is the sample standard deviation "
                                      "(n − 1 in the denominator); standard error = std / √n"),
        ("Smoothing", beta_note),
        ("Verdict rule", VERDICT_RULE),
    ]
    return [f"- **{k}**: {v}." for k, v in items]


def write_report(results: dict, out_dir: Path) -> Path:
    """Write ``out_dir/report.md`` (and ``out_dir/plots/*.png``) from a comparison's results dict;
    returns the path of report.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = results if isinstance(results, dict) else {}
    notes: list[str] = []
    summaries = summarize(results)

    # metrics files, keyed by id(run)
    metrics: dict[int, list[dict]] = {}
    for s in summaries:
        for r in s.done:
            rd = r.get("run_dir")
            if not rd:
                notes.append(f"{s.name} seed {r.get('seed')}: no run_dir recorded, metrics not read.")
                continue
            rel = f"{rd}/metrics.jsonl"
            entries, problem = read_metrics(out_dir / rel, shown=rel)
            metrics[id(r)] = entries
            if problem:
                tail = "" if entries else "; this run is left out of the curves"
                notes.append(f"{s.name} seed {r.get('seed')}: {problem}{tail}.")

    plots = _make_plots(results, summaries, out_dir, metrics, notes)
    n_pts = max([0] + [len(_curve(m, "loss")[0]) for m in metrics.values()])
    beta = _smoothing_beta(n_pts)
    beta_note = (
        f"training-loss curves are smoothed with a debiased exponential moving average, "
        f"s_t = β s_(t−1) + (1 − β) x_t divided by (1 − β^t), β = {beta} (chosen from the number of logged "
        f"points: 0.5 below 15, 0.8 below 50, 0.9 below 200, else 0.95); validation curves are not smoothed; "
        f"bands are the min–max over seeds"
    )

    corpus = results.get("corpus") or {}
    machine = results.get("machine") or {}
    L: list[str] = []
    L.append("# Autonomy-of-Experts vs router MoE: comparison report")
    L.append("")
    created = results.get("created")
    if created:
        L.append(f"Created {created}.")
        L.append("")

    L.append("## Command")
    L.append("")
    L.append("```bash")
    L.append(str(results.get("command") or "(command not recorded)"))
    L.append("```")
    L.append("")

    L.append("## Machine")
    L.append("")
    for k in ("platform", "python", "torch", "device", "threads"):
        L.append(f"- {k}: {machine.get(k, DASH) if machine.get(k) is not None else DASH}")
    L.append("")

    L.append("## Corpus")
    L.append("")
    ue, uce, bpt = _num(corpus, "unigram_entropy"), _num(corpus, "unigram_cross_entropy"), _num(corpus, "bytes_per_token")
    L.append(f"- source: {corpus.get('source', DASH)}")
    L.append(f"- tokens: {corpus.get('train_tokens', DASH):,} train, {corpus.get('val_tokens', DASH):,} validation"
             if is_number(corpus.get("train_tokens")) and is_number(corpus.get("val_tokens"))
             else f"- tokens: {corpus.get('train_tokens', DASH)} train, {corpus.get('val_tokens', DASH)} validation")
    L.append(f"- vocabulary: {corpus.get('vocab_size', DASH)} tokens; {fmt(bpt, 3)} bytes per token (validation)")
    L.append(f"- unigram entropy of the validation tokens: {fmt(ue, 4)} nats/token")
    ppl_u = fmt(math.exp(uce), 1) if is_number(uce) and uce < 700 else DASH
    bpb_u = fmt(uce / LN2 / bpt, 4) if is_number(uce) and is_number(bpt) and bpt > 0 else DASH
    L.append(f"- unigram baseline (training unigram scored on validation): {fmt(uce, 4)} nats/token, "
             f"perplexity {ppl_u}, {bpb_u} bits/byte")
    L.append("")

    L.append("## Configuration")
    L.append("")
    L.extend(_config_summary(results, summaries))
    L.append("")
    if summaries:
        L.append(_md_table(
            ["variant", "label", "description", "overrides"],
            [[s.name, s.label, s.description or DASH, " ".join(s.overrides) or "(none)"] for s in summaries],
            align="llll",
        ))
        L.append("")
    if results.get("config"):
        L.append("<details><summary>Resolved base configuration</summary>")
        L.append("")
        L.append("```json")
        L.append(json.dumps(results["config"], indent=2, sort_keys=True, default=str))
        L.append("```")
        L.append("")
        L.append("</details>")
        L.append("")

    # headline
    L.append("## Results")
    L.append("")
    header = ["variant", "seeds", "params total", "params active", "FLOPs/token", "val loss (nats)", "perplexity",
              "bits/byte", "Ent_load", "Ent_conf", "max/mean load", "tokens/s", "peak memory"]
    rows = []
    for s in summaries:
        rows.append([
            s.label, f"{len(s.done)}/{len(s.runs)}", fmt_si(s.params_total), fmt_si(s.params_active),
            fmt_si(s.flops_per_token), fmt_mean_std(s.val_loss, 4), fmt(mean(s.perplexity), 2),
            fmt(mean(s.bits_per_byte), 4), fmt(mean(s.ent_load), 3), fmt(mean(s.ent_conf), 3),
            fmt(mean(s.imbalance), 2), fmt_si(mean(s.tokens_per_s), 2), fmt_bytes(mean(s.peak_memory)),
        ])
    rows.append(["unigram baseline", DASH, DASH, DASH, DASH, fmt(uce, 4), ppl_u, bpb_u] + [DASH] * 5)
    L.append(_md_table(header, rows))
    L.append("")
    L.append("Means over the completed seeds (val loss: mean ± std); Ent_load, Ent_conf and max/mean load "
             "are means over layers, measured on validation batches at the end of training. "
             + _max_entropy_note(summaries) + "See Definitions.")
    L.append("")

    # per-run table
    L.append("### Runs")
    L.append("")
    run_rows = []
    for s in summaries:
        for r in s.runs:
            run_rows.append([
                s.label, r.get("seed", DASH), r.get("status", DASH), r.get("steps", DASH) if r.get("steps") is not None else DASH,
                fmt_si(r.get("tokens")), fmt(r.get("val_loss"), 4), fmt(r.get("perplexity"), 2),
                fmt(r.get("bits_per_byte"), 4), fmt_si(r.get("tokens_per_s"), 2), fmt(r.get("train_time_s"), 1),
                fmt_bytes(r.get("peak_memory_bytes")), r.get("run_dir") or DASH,
            ])
    if run_rows:
        L.append(_md_table(["variant", "seed", "status", "steps", "tokens", "val loss", "perplexity", "bits/byte",
                            "tokens/s", "train time (s)", "peak memory", "run dir"], run_rows,
                           align="lrlrrrrrrrrl"))
    else:
        L.append("No runs were recorded.")
    L.append("")
    incomplete = [(s, r) for s in summaries for r in s.runs if r.get("status") != "done"]
    if incomplete:
        L.append("**Incomplete runs** (left out of every mean, plot and verdict):")
        L.append("")
        for s, r in incomplete:
            err = r.get("error")
            L.append(f"- {s.label} (`{s.name}`), seed {r.get('seed', DASH)}: status `{r.get('status', 'unknown')}`"
                     + (f" ({_md_escape(err)})" if err else ""))
        L.append("")

    # per-layer tables
    sparse = [s for s in summaries if s.sparse and s.per_layer]
    if sparse:
        L.append("### Per layer")
        L.append("")
        L.append("Mean over completed seeds, measured on validation batches at the end of training.")
        L.append("")
        for s in sparse:
            E = s.n_experts
            L.append(f"**{s.label}** (`{s.name}`" + (f", E = {E}, max log E = {math.log(E):.3f}" if E else "") + ")")
            L.append("")
            L.append(_md_table(
                ["layer", "Ent_load", "Ent_conf", "max/mean load"],
                [[i, fmt_mean_std(d["ent_load"], 3), fmt_mean_std(d["ent_conf"], 3), fmt_mean_std(d["imbalance"], 2)]
                 for i, d in s.per_layer.items()],
            ))
            L.append("")

    # plots
    if plots:
        L.append("## Plots")
        L.append("")
        for caption, rel in plots:
            L.append(f"**{caption}**")
            L.append("")
            L.append(f"![{caption}]({rel})")
            L.append("")

    # verdict
    L.append("## Verdict")
    L.append("")
    aoe = _pick(summaries, "aoe", "aoe")
    moe = _pick(summaries, "moe", "moe")
    if aoe is None or moe is None:
        missing = " and ".join(x for x, v in (("an AoE variant", aoe), ("a MoE variant", moe)) if v is None)
        L.append(f"No verdict: the study has no {missing} to compare.")
        L.append("")
    else:
        la = aoe.label if aoe.label != moe.label else f"{aoe.label} ({aoe.name})"
        lb = moe.label if moe.label != aoe.label else f"{moe.label} ({moe.name})"
        v = compare_means(aoe.val_loss, moe.val_loss, la, lb)
        chosen = "" if aoe.name == "aoe" else (
            f" ({aoe.label} is the AoE variant with the lowest mean validation loss; there is no variant named `aoe`.)")
        L.append(v.sentence + chosen)
        L.append("")
        E = aoe.n_experts if aoe.n_experts == moe.n_experts else None
        L.append(compare_entropies(mean(aoe.ent_load), mean(moe.ent_load), mean(aoe.ent_conf), mean(moe.ent_conf),
                                   la, lb, math.log(E) if E else NAN))
        L.append("")
        L.append(f"Rule: {VERDICT_RULE}.")
        L.append("")
        others = [s for s in summaries if s is not moe and finite(s.val_loss)]
        if len(others) > 1 and finite(moe.val_loss):
            rows = []
            for s in others:
                w = compare_means(s.val_loss, moe.val_loss, s.label, moe.label)
                judged = {True: "exceeds the seed spread", False: "within the seed spread", None: "not judged"}[w.exceeds]
                rows.append([s.label, fmt_mean_std(s.val_loss, 4), f"{w.diff:+.4f}" if is_number(w.diff) else DASH, judged])
            L.append(f"Every variant against {moe.label}, same rule:")
            L.append("")
            L.append(_md_table(["variant", "val loss", f"− {moe.label} (nats)", "difference"], rows, align="lrrl"))
            L.append("")

    L.append("## Definitions")
    L.append("")
    L.extend(_definitions(results, beta_note))
    L.append("")

    if notes:
        L.append("## Notes")
        L.append("")
        L.extend(f"- {n}" for n in notes)
        L.append("")

    path = out_dir / "report.md"
    path.write_text("\n".join(L), encoding="utf-8")
    return path
