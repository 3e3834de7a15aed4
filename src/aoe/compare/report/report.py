"""``write_report`` (OUT/report.md and its plots from a results dict) and ``headline_table`` (the
console's short table); the package's opening docstring says what the parts are."""

from __future__ import annotations

from pathlib import Path

from aoe.compare.report.figures import draw_figures
from aoe.compare.report.logs import read_metrics
from aoe.compare.report.markdown import fmt, fmt_bytes, fmt_mean_std, fmt_si, table
from aoe.compare.report.sections import render
from aoe.compare.report.stats import mean
from aoe.compare.report.study import Study
from aoe.compare.report.summary import VariantSummary, summarize
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
