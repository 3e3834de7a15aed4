"""The comparison report: ``write_report(results, out_dir)`` writes OUT/report.md and OUT/plots/*.png;
``headline_table(results)`` is a short table for the console.

Nothing here trains or evaluates: every number comes from ``results`` (the dict the runner stores in
OUT/results.json; schema in ``aoe.compare.report.results``) and from the runs' metrics.jsonl files.
Missing values, missing or broken metrics files, failed runs and a missing matplotlib are tolerated
and noted in the report instead of raising.

The parts (the running side, ``aoe.compare.runner`` and the rest of ``aoe.compare``, imports
only ``write_report`` and ``headline_table``; this package imports nothing of it but the variant
and suite definitions)::

    report.py      write_report, headline_table
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

from aoe.compare.report.report import (
    VariantSummary, fmt, fmt_bytes, fmt_mean_std, fmt_si, headline_table, read_metrics, summarize, write_report,
)

__all__ = ["write_report", "headline_table", "summarize", "read_metrics", "fmt", "fmt_si", "fmt_bytes", "fmt_mean_std",
           "VariantSummary"]
