"""The training logs of a comparison's runs: each completed run's OUT/<run_dir>/metrics.jsonl.

Lines are parsed by ``aoe.train.metrics.read_metrics`` (the project's one reader of the format);
this module adds what the report needs around it: a missing, unreadable, empty or partly broken
file becomes a note instead of an exception.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from aoe.compare.report.results import Results, Run
from aoe.train.metrics import read_metrics as read_metrics_file


def read_metrics(path: Path, shown: str | None = None) -> tuple[list[dict], str | None]:
    """Entries of a metrics.jsonl file and a problem description (None when it read cleanly).

    A missing or unreadable file gives ([], reason); lines that are not a JSON object are skipped
    and counted. ``shown`` is how the path is written in the description (default: the path)."""
    shown = shown or str(path)
    skipped: list[int] = []
    try:
        entries = read_metrics_file(path, skipped)
    except FileNotFoundError:
        return [], f"metrics file missing: {shown}"
    except OSError as e:  # a directory, no permission, ...
        return [], f"metrics file unreadable: {shown} ({e.__class__.__name__})"
    if skipped:
        return entries, f"{len(skipped)} malformed line(s) skipped in {shown}"
    return entries, (None if entries else f"metrics file empty: {shown}")


@dataclass
class RunLogs:
    """The metrics entries of every completed run, keyed by the run's index in results.json."""

    entries: dict[int, list[dict]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, results: Results, out_dir: Path) -> RunLogs:
        logs = cls()
        for run in results.runs:
            if run.done:
                logs._read_one(run, out_dir)
        return logs

    def _read_one(self, run: Run, out_dir: Path) -> None:
        who = f"{run.variant} seed {run.seed if run.seed is not None else '?'}"
        if not run.run_dir:
            self.notes.append(f"{who}: no run_dir recorded, metrics not read.")
            return
        rel = f"{run.run_dir}/metrics.jsonl"
        entries, problem = read_metrics(Path(out_dir) / rel, shown=rel)
        self.entries[run.index] = entries
        if problem:
            tail = "" if entries else "; this run is left out of the curves"
            self.notes.append(f"{who}: {problem}{tail}.")

    def of(self, run: Run) -> list[dict]:
        """The entries of ``run`` ([] when none were read)."""
        return self.entries.get(run.index, [])
