"""The results of ``aoe eval`` in lm-eval's results layout (``results_layout``: what ``aoe eval
--json`` writes), so that tooling that reads lm-eval's result files reads them. Imports neither
lm_eval nor transformers (the corpus loss needs neither).

The layout (lm_eval 0.4.13: ``EvalAcc._to_eval_results`` and ``simple_evaluate``)::

    {"results":  {task: {"name": task, "alias": ..., "sample_len": n, "acc,none": 0.61,
                         "acc_stderr,none": 0.01, ...}},       # "metric,filter" keys
     "group_subtasks": {...}, "configs": {task: {...}}, "versions": {task: ...},
     "n-shot": {task: 0}, "higher_is_better": {task: {metric: bool}},
     "n-samples": {task: {"original": N, "effective": n}},
     "config": {"model": ..., "batch_size": ..., "device": ..., "limit": ..., ...}, "date": ..., ...}

The project's own evaluations are tasks of their own there: ``corpus_{split}`` (the corpus loss:
"loss,none" in nats per token, "perplexity,none", "bits_per_byte,none", "unigram_entropy,none";
sample_len = tokens scored) and ``mc_{file stem}`` for each local multiple-choice file ("acc",
"acc_norm", "acc_bytes" and their stderr). A stderr lm-eval cannot give is "N/A", as lm-eval
writes it. Harness tasks keep lm-eval's own entries. Besides lm-eval's top-level keys the file may
hold the caller's own (``extra``: ``aoe eval`` keeps there the flat keys its --json had before).
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = ["LocalTask", "corpus_task", "multiple_choice_task", "local_task_name", "results_layout", "json_default"]


@dataclass
class LocalTask:
    """One of the project's own evaluations as an lm-eval task: ``metrics`` {metric: value} (the
    filter ",none" is added; a stderr that is NaN is written "N/A"), ``sample_len`` the examples
    (or tokens) scored, ``original`` how many there were, ``config`` its entry of "configs"."""

    name: str
    alias: str
    metrics: dict[str, Any]
    higher_is_better: dict[str, bool | None]
    sample_len: int
    original: int
    config: dict = field(default_factory=dict)
    version: float = 1.0

    def entry(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "alias": self.alias, "sample_len": self.sample_len}
        for metric, value in self.metrics.items():
            stderr = metric.endswith("_stderr")
            if stderr and (value is None or (isinstance(value, float) and math.isnan(value))):
                value = "N/A"
            out[f"{metric},none"] = value
        return out


def corpus_task(split: str, source: str, val: dict, unigram_entropy: float, split_tokens: int,
                config: dict) -> LocalTask:
    """The corpus loss of ``aoe.train.evaluate.evaluate`` (``val``) as the task ``corpus_{split}``."""
    metrics = {"loss": val["val_loss"], "loss_stderr": "N/A", "perplexity": val["val_ppl"],
               "perplexity_stderr": "N/A", "bits_per_byte": val.get("val_bpb"), "bits_per_byte_stderr": "N/A",
               "unigram_entropy": unigram_entropy}
    better = {"loss": False, "perplexity": False, "bits_per_byte": False, "unigram_entropy": None}
    task = f"corpus_{split}"
    cfg = {"task": task, "output_type": "corpus_loss", "dataset_path": str(source), "split": split, **config}
    return LocalTask(task, f"{source} ({split})", metrics, better, int(val["val_tokens"]), int(split_tokens), cfg)


def multiple_choice_task(name: str, path: str, scores: dict, target_delimiter: str) -> LocalTask:
    """The scores of ``score_multiple_choice`` on the file ``path`` as the task ``name``."""
    metrics = {}
    for metric in ("acc", "acc_norm", "acc_bytes"):
        metrics[metric] = scores[metric]
        metrics[f"{metric}_stderr"] = scores[f"{metric}_stderr"]
    cfg = {"task": name, "output_type": "multiple_choice", "dataset_path": "json", "data_files": str(path),
           "target_delimiter": target_delimiter, "num_fewshot": 0,
           "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in
                           ("acc", "acc_norm", "acc_bytes")]}
    better = {"acc": True, "acc_norm": True, "acc_bytes": True}
    return LocalTask(name, str(path), metrics, better, int(scores["n"]), int(scores["n"]), cfg)


def local_task_name(prefix: str, path: str | os.PathLike, taken: set[str]) -> str:
    """``{prefix}_{file stem}`` (letters, digits, ``_ . -``), with ``_2``, ``_3``... if taken."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path).stem) or "file"
    name, n = f"{prefix}_{stem}", 1
    while name in taken:
        n += 1
        name = f"{prefix}_{stem}_{n}"
    return name


_HARNESS_SECTIONS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
                     "n-samples")


def results_layout(local: Sequence[LocalTask], config: dict, harness: dict | None = None,
                   extra: dict | None = None) -> dict:
    """lm-eval's results layout (module docstring) of the project's own tasks ``local`` and the
    raw ``simple_evaluate`` results of harness tasks (``harness``, merged section by section);
    ``config`` is the top-level "config" (its "model" is also "model_name"); ``extra`` adds
    top-level keys of the caller's own (ValueError if one is a key of the layout)."""
    out: dict[str, Any] = {"results": {}, "group_subtasks": {}, "configs": {}, "versions": {}, "n-shot": {},
                           "higher_is_better": {}, "n-samples": {}}
    for task in local:
        out["results"][task.name] = task.entry()
        out["configs"][task.name] = task.config
        out["versions"][task.name] = task.version
        out["n-shot"][task.name] = 0
        out["higher_is_better"][task.name] = task.higher_is_better
        out["n-samples"][task.name] = {"original": task.original, "effective": task.sample_len}
    for section in _HARNESS_SECTIONS:
        if harness and harness.get(section):
            out.setdefault(section, {}).update(harness[section])
    out["config"] = dict(config)
    out["model_source"], out["model_name"] = "aoe", str(config.get("model"))
    out["date"] = time.time()
    for package in ("lm_eval", "transformers", "torch"):
        try:
            out[f"{package}_version"] = importlib.metadata.version(package.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[f"{package}_version"] = None
    for key, value in (extra or {}).items():
        if key in out:
            raise ValueError(f"results_layout: extra key {key!r} is a key of lm-eval's layout")
        out[key] = value
    return out


def json_default(value: Any) -> Any:
    """For ``json.dumps`` of a layout: numpy and torch scalars as numbers, sets as lists, the rest as
    text (harness task configs hold functions), as lm-eval writes them."""
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)
