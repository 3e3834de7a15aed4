"""Everything one report is made from: the typed results, the per-variant summaries, the runs'
training logs, the comparisons the study declares, and the notes gathered on the way."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable

from aoe.compare.report.curves import Curve
from aoe.compare.report.logs import RunLogs
from aoe.compare.report.results import Results, Run
from aoe.compare.report.summary import VariantSummary, by_name, summarize


@dataclass(frozen=True)
class Comparison:
    """A variant and the baseline it is compared against."""

    variant: VariantSummary
    baseline: VariantSummary


def seed_key(run: Run) -> Hashable:
    """The key that pairs a run with the same seed of another variant (runs without a seed pair with none)."""
    return run.seed if run.seed is not None else ("run", run.index)


@dataclass
class Study:
    results: Results
    summaries: list[VariantSummary]
    logs: RunLogs
    notes: list[str]

    @classmethod
    def load(cls, results, out_dir: Path) -> Study:
        """``results``: the stored dict (or :class:`Results`); the logs are read from ``out_dir``."""
        res = Results.from_dict(results)
        logs = RunLogs.read(res, out_dir)
        return cls(res, summarize(res), logs, list(logs.notes))

    def summary(self, name: str | None) -> VariantSummary | None:
        return by_name(self.summaries, name)

    @property
    def sparse(self) -> list[VariantSummary]:
        """The variants with routing statistics to show."""
        return [s for s in self.summaries if s.sparse and s.per_layer]

    def comparisons(self) -> list[Comparison]:
        """One per variant that names a baseline the study has, in the variants' order; a baseline
        missing from the study is noted once."""
        out = []
        for s in self.summaries:
            if s.baseline is None:
                continue
            base = self.summary(s.baseline)
            if base is None:
                self.note(f"{s.name}: its baseline {s.baseline!r} is not a variant of this study; not compared.")
            else:
                out.append(Comparison(s, base))
        return out

    def curves(self, s: VariantSummary, make: Callable[[list[dict]], Curve]) -> dict[Hashable, Curve]:
        """``make(entries)`` for each completed run of ``s`` that has log entries, keyed by seed."""
        out = {}
        for r in s.done:
            curve = make(self.logs.of(r))
            if curve:
                out[seed_key(r)] = curve
        return out

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
