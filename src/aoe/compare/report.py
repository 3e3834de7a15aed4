"""The comparison report: ``write_report(results, out_dir)`` writes OUT/report.md and OUT/plots/*.png;
``headline_table(results)`` is a short table for the console.

Nothing here trains or evaluates: every number comes from ``results`` (the dict the runner stores in
OUT/results.json; schema in ``aoe.compare.results``) and from the runs' metrics.jsonl files.
Missing values, missing or broken metrics files, failed runs and a missing matplotlib are tolerated
and noted in the report instead of raising.

The parts::

    results.py     typed records of results.json (variants with kind and baseline, runs, sweep)
    summary.py     per-variant aggregates over seeds
    logs.py        the runs' metrics.jsonl (read by aoe.train.metrics.read_metrics)
    curves.py      curves against step and their aggregates over seeds
    study.py       all of the above for one report, and the comparisons it declares
    plots.py       drawing primitives (matplotlib)
    figures.py     which figures a report has, from what data
    markdown.py    number formatting and tables
    sections/      one function per report section; ``render`` orders them
"""

from __future__ import annotations

from pathlib import Path

from aoe.compare.figures import draw_figures
from aoe.compare.logs import read_metrics
from aoe.compare.markdown import fmt, fmt_bytes, fmt_mean_std, fmt_si, table
from aoe.compare.sections import render
from aoe.compare.stats import mean
from aoe.compare.study import Study
from aoe.compare.summary import VariantSummary, summarize
from aoe.utils.files import atomic_write_text

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


def write_report(results: dict, out_dir: Path) -> Path:
    """Write ``out_dir/report.md`` (and ``out_dir/plots/*.png``) from a comparison's results dict;
    returns the path of report.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study = Study.load(results, out_dir)
    figures = draw_figures(study, out_dir)
    return atomic_write_text(out_dir / "report.md", render(study, figures))


def headline_table(results: dict) -> str:
    """Short markdown table (variant, val loss, Ent_load, Ent_conf; means over completed seeds)."""
    rows = [[s.label if s.label == s.name else f"{s.label} ({s.name})", f"{len(s.done)}/{len(s.runs)}",
             fmt_mean_std(s.val_loss, 4), fmt(mean(s.ent_load), 3), fmt(mean(s.ent_conf), 3)]
            for s in summarize(results)]
    return table(["variant", "seeds done", "val loss (nats)", "Ent_load", "Ent_conf"], rows)
