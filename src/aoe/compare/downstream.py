"""Downstream accuracy of a comparison's runs: ``aoe compare --mc FILE ... --tasks a,b``.

Each finished run's final model is scored (its newest good checkpoint) on local multiple-choice
files (``aoe.eval.multiple_choice``, the task named by the file's stem: ``piqa.jsonl`` -> "piqa")
and on lm-eval tasks (``aoe.eval.tasks``), and the accuracy (``acc``: the choice with the highest
log-likelihood) of each is stored in the run's results.json entry as ``"downstream": {task: acc}``.
A run already scored on every requested task is not scored again. The paper's Table 2 columns are
lm-eval's arc_easy, piqa, social_iqa, winogrande, hellaswag, mnli, qnli and sst2 (the last three
3-shot in the paper; ``num_fewshot`` applies to every task here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aoe.config import ConfigError


@dataclass(frozen=True)
class DownstreamPlan:
    """What to score each run on: multiple-choice files (already read) and lm-eval task names."""

    mc: dict[str, list[dict]]  # task name (the file's stem) -> its examples
    tasks: tuple[str, ...] = ()
    num_fewshot: int = 0
    limit: int | None = None
    batch_size: int = 8

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.mc, *self.tasks)

    def missing(self, entry: dict[str, Any]) -> bool:
        """Whether a results.json run entry lacks a score this plan asks for."""
        have = entry.get("downstream") or {}
        return any(name not in have for name in self.names)


def plan_downstream(mc_files=(), tasks: str | None = None, num_fewshot: int = 0, limit: int | None = None,
                    batch_size: int = 8) -> DownstreamPlan | None:
    """The plan (None when nothing is asked), every file read and checked before anything trains."""
    from aoe.eval.multiple_choice import MultipleChoiceFormatError, load_multiple_choice_files

    stems: dict[str, str] = {}
    for path in mc_files or ():
        if stems.setdefault(Path(path).stem, str(path)) != str(path):
            raise ConfigError(f"--mc {path}: another file is also named {Path(path).stem!r}; task names come from "
                              "the file stems")
    try:
        read = load_multiple_choice_files(list(stems.values()))
    except MultipleChoiceFormatError as e:  # a study's options: reported as its other options are
        raise ConfigError(str(e)) from None
    mc = {name: read[path] for name, path in stems.items()}
    names = tuple(t.strip() for t in (tasks or "").split(",") if t.strip())
    if set(names) & set(mc):
        raise ConfigError(f"--tasks {tasks!r} and --mc name the same task {sorted(set(names) & set(mc))}")
    if not mc and not names:
        return None
    return DownstreamPlan(mc, names, num_fewshot, limit, batch_size)


def score_run(run_dir: Path, plan: DownstreamPlan, device: str = "cpu") -> dict[str, float]:
    """{task: accuracy in [0, 1]} of the newest good checkpoint of ``run_dir``."""
    from aoe.eval.harness import AoEHarnessLM
    from aoe.eval.multiple_choice import score_multiple_choice
    from aoe.io.models import load_any

    loaded = load_any(run_dir, device=device)
    lm = AoEHarnessLM(loaded.model, loaded.tokenizer, batch_size=plan.batch_size, device=device)
    scores = {name: float(score_multiple_choice(lm, examples, source=name)["acc"]) for name, examples in plan.mc.items()}
    if plan.tasks:
        from aoe.eval.tasks import run_harness

        flat = run_harness(lm, tasks=list(plan.tasks), num_fewshot=plan.num_fewshot, limit=plan.limit)
        scores.update({task: float(metrics["acc"]) for task, metrics in flat.items() if "acc" in metrics})
    return scores
