"""Evaluation: the lm-evaluation-harness adapter (``AoEHarnessLM``, registered as model "aoe";
``run_harness``) and local multiple-choice files scored like the harness does."""

from aoe.eval.harness import AoEHarnessLM, TaskDataUnavailableError
from aoe.eval.tasks import run_harness
from aoe.eval.multiple_choice import (
    MultipleChoiceFormatError,
    load_multiple_choice,
    score_multiple_choice,
    validate_example,
)

__all__ = [
    "AoEHarnessLM", "run_harness", "TaskDataUnavailableError",
    "load_multiple_choice", "score_multiple_choice", "validate_example", "MultipleChoiceFormatError",
]
