"""Running lm-evaluation-harness tasks on the AoE model: ``run_harness`` (what ``aoe eval --tasks``
calls), with the adapter of ``aoe.eval.harness``. ``run_harness(..., raw=True)`` returns lm-eval's
own results, which ``aoe.io.results`` merges into what ``aoe eval --json`` writes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from aoe.eval.harness import AoEHarnessLM, TaskDataUnavailableError

__all__ = ["run_harness", "flatten_results"]


def _as_lm(model_or_checkpoint, tokenizer, batch_size: int, device: str) -> AoEHarnessLM:
    if isinstance(model_or_checkpoint, AoEHarnessLM):
        return model_or_checkpoint
    if isinstance(model_or_checkpoint, (str, os.PathLike)):
        return AoEHarnessLM(checkpoint=Path(model_or_checkpoint), tokenizer=tokenizer, batch_size=batch_size, device=device)
    if isinstance(model_or_checkpoint, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("run_harness: a model needs its tokenizer (tokenizer=None given)")
        return AoEHarnessLM(model_or_checkpoint, tokenizer, batch_size=batch_size, device=device)
    raise TypeError(
        "run_harness: model_or_checkpoint must be an AoEHarnessLM, a Transformer or a checkpoint path, "
        f"got {type(model_or_checkpoint).__name__}"
    )


def _task_label(spec) -> str:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, dict):
        return str(spec.get("task", spec))
    return str(getattr(spec, "task_name", None) or getattr(spec, "name", None) or spec)


def _load_tasks(task_manager, tasks) -> list:
    """Build each task (downloading its data), naming the task in the error when that fails."""
    try:
        from datasets.exceptions import DatasetsError
    except ImportError:  # pragma: no cover
        DatasetsError = OSError  # noqa: N806
    built = []
    for spec in tasks:
        name = _task_label(spec)
        try:
            loaded = task_manager.load([spec])
        except KeyError as e:
            raise ValueError(f"unknown lm-eval task {name!r}: {e.args[0] if e.args else e}") from e
        except (OSError, ConnectionError, TimeoutError, DatasetsError) as e:
            raise TaskDataUnavailableError(
                f"the data of lm-eval task {name!r} could not be downloaded ({type(e).__name__}: {e}). "
                "Harness tasks fetch their datasets from the Hugging Face Hub: run with network access, "
                "or with the dataset already in the local Hugging Face cache (HF_DATASETS_OFFLINE=1)."
            ) from e
        built.extend(list(loaded["groups"].values())[:1] or list(loaded["tasks"].values()))
    return built


def flatten_results(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from simple_evaluate's "results": "acc,none" -> "acc" (a metric
    of another filter keeps its ",filter" suffix), "sample_len" -> "n" (examples evaluated);
    aliases and non-numbers (a stderr of "N/A") are dropped."""
    flat: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            if key == "alias" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if key == "sample_len":
                row["n"] = float(value)
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt in ("", "none") else key] = float(value)
        flat[task] = row
    return flat


def run_harness(
    model_or_checkpoint,
    tokenizer=None,
    tasks: Sequence[str | dict] = (),
    num_fewshot: int | None = 0,
    limit: int | float | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    *,
    bootstrap_iters: int = 100_000,
    task_manager=None,
    seed: int = 1234,
    raw: bool = False,
) -> dict:
    """Evaluate on lm-eval tasks through ``lm_eval.simple_evaluate``.

    Args:
        model_or_checkpoint: an ``AoEHarnessLM`` (used as is), a ``Transformer`` (with
            ``tokenizer``), or the path of a native checkpoint.
        tokenizer: the model's ``Tokenizer`` (for a checkpoint: overrides the saved one).
        tasks: harness task / group names (e.g. "hellaswag", "arc_easy"), or task config dicts
            (e.g. a local ``dataset_path: json`` task).
        num_fewshot: few-shot examples per prompt (None: each task's default).
        limit: examples per task (an int, or a fraction < 1); None = all.
        batch_size, device: for a model or checkpoint (ignored for an ``AoEHarnessLM``).
        bootstrap_iters: bootstrap draws for the stderr of metrics without a closed form.
        task_manager: an ``lm_eval.tasks.TaskManager`` to reuse (building one indexes every
            built-in task, ~10 s).
        seed: random, numpy, torch and few-shot seed.
        raw: return what ``simple_evaluate`` returns (lm-eval's results layout, without samples)
            instead of the flat dict.

    Returns:
        {task or group name: {metric: value}} (``flatten_results``), e.g. {"arc_easy": {"n": 2376.0, "acc": 0.61,
        "acc_stderr": 0.01, "acc_norm": 0.58, "acc_norm_stderr": 0.01}}.

    Raises:
        TaskDataUnavailableError: a task's dataset could not be downloaded (offline), naming it.
        ValueError: an unknown task name, or no tasks.
    """
    from lm_eval.tasks import TaskManager  # first: without lm-eval, nothing else runs

    tasks = _task_list(tasks)
    lm = _as_lm(model_or_checkpoint, tokenizer, batch_size, device)
    task_manager = TaskManager() if task_manager is None else task_manager
    built = _load_tasks(task_manager, tasks)
    results = _simple_evaluate(lm, built, task_manager, num_fewshot=num_fewshot, limit=limit,
                               bootstrap_iters=bootstrap_iters, seed=seed)
    return results if raw else flatten_results(results)


def _task_list(tasks) -> list:
    """``tasks`` as a non-empty list (one name or config dict becomes a list of one)."""
    if isinstance(tasks, (str, dict)):
        tasks = [tasks]
    tasks = list(tasks)
    if not tasks:
        raise ValueError("run_harness: give at least one task")
    return tasks


def _simple_evaluate(lm: AoEHarnessLM, tasks: list, task_manager, *, num_fewshot, limit, bootstrap_iters: int,
                     seed: int) -> dict:
    """lm-eval's results of the built ``tasks`` (``simple_evaluate``, every seed set to ``seed``),
    without the samples; {} where it returns none (on ranks other than 0)."""
    import lm_eval

    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
        bootstrap_iters=bootstrap_iters, log_samples=False, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed,
    )
    if results is None:  # pragma: no cover  (non-zero ranks only)
        return {}
    results.pop("samples", None)
    return results
