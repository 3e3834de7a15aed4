"""run_harness and simple_evaluate(model="aoe") end to end on a local JSON task (no download)."""

from __future__ import annotations

import json

import datasets
import lm_eval
import pytest
from lm_eval.tasks import TaskManager

import aoe.eval.harness as harness
from aoe.eval import (AoEHarnessLM, TaskDataUnavailableError, load_multiple_choice, run_harness,
                      score_multiple_choice)

CHOICES = [["a mat", "paris", "the blue green model"], ["yes", "no because"], ["red", "rome", "berlin", "cat"]]


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_defaults=False)  # the built-in index takes ~10 s to build


@pytest.fixture
def local_task(tmp_path):
    rows = [{"context": f"the cat sat on {w}", "choices": CHOICES[i % 3], "label": i % len(CHOICES[i % 3])}
            for i, w in enumerate("a mat while experts route each token to themselves by norm model answer".split())]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = {
        "task": "local_mc", "dataset_path": "json", "test_split": "test",
        "dataset_kwargs": {"data_files": {"test": str(path)}, "cache_dir": str(tmp_path / "hf_cache")},
        "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "choices",
        "doc_to_target": "label",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
    }
    return task, path


def test_run_harness_matches_local_scoring(model, tokenizer, task_manager, local_task):
    task, path = local_task
    lm = AoEHarnessLM(model, tokenizer, batch_size=4)
    # relabel so that acc and acc_norm differ: where the two predictions disagree, gold = pred_norm
    examples = load_multiple_choice(path)
    first = score_multiple_choice(lm, examples)
    for ex, p in zip(examples, first["predictions"]):
        if p["pred"] != p["pred_norm"]:
            ex["label"] = p["pred_norm"]
    path.write_text("\n".join(json.dumps(ex) for ex in examples) + "\n")
    local = score_multiple_choice(lm, load_multiple_choice(path))
    assert local["acc_norm"] > local["acc"]
    res = run_harness(lm, None, [task], task_manager=task_manager, bootstrap_iters=100)
    got = res["local_mc"]
    assert got["n"] == local["n"] == 13
    for metric in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert got[metric] == pytest.approx(local[metric]), metric
    # a Transformer + tokenizer works as well, with limit
    res2 = run_harness(model, tokenizer, [task], limit=5, task_manager=task_manager, bootstrap_iters=100)
    assert res2["local_mc"]["n"] == 5


def test_simple_evaluate_by_name(model, tokenizer, task_manager, local_task, monkeypatch, tmp_path):
    task, _ = local_task
    monkeypatch.setattr(harness, "_load_checkpoint", lambda path, device: (model, tokenizer))
    out = lm_eval.simple_evaluate(model="aoe", model_args=f"checkpoint={tmp_path}", tasks=[task], batch_size=4,
                                  task_manager=task_manager, bootstrap_iters=0, log_samples=False)
    assert 0.0 <= out["results"]["local_mc"]["acc,none"] <= 1.0


def test_offline_task_data_named(model, tokenizer, task_manager, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/some_dataset' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    task = {"task": "hub_mc", "dataset_path": "someone/some_dataset", "test_split": "test",
            "output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_choice": "choices",
            "doc_to_target": "label", "metric_list": [{"metric": "acc"}]}
    with pytest.raises(TaskDataUnavailableError, match=r"task 'hub_mc' could not be downloaded"):
        run_harness(AoEHarnessLM(model, tokenizer), None, [task], task_manager=task_manager)
    with pytest.raises(ValueError, match="unknown lm-eval task 'no_such_task_xyz'"):
        run_harness(AoEHarnessLM(model, tokenizer), None, ["no_such_task_xyz"], task_manager=task_manager)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        run_harness(model, None, ["no_such_task_xyz"], task_manager=task_manager)


def test_the_json_layout_of_local_files_is_what_lm_eval_writes(model, tokenizer, task_manager, local_task):
    """The same file as a harness task (lm-eval's own results) and as an --mc file
    (``aoe.io.results``): the same entry keys and values, side by side in one layout."""
    from aoe.eval.tasks import flatten_results
    from aoe.io.results import multiple_choice_task, results_layout

    task, path = local_task
    lm = AoEHarnessLM(model, tokenizer, batch_size=4)
    raw = run_harness(lm, None, [task], task_manager=task_manager, bootstrap_iters=100, raw=True)
    assert "samples" not in raw and set(flatten_results(raw)) == {"local_mc"}
    ours = multiple_choice_task("mc_file", str(path), score_multiple_choice(lm, load_multiple_choice(path)), " ")
    layout = json.loads(json.dumps(results_layout([ours], {"model": "m"}, raw)))
    theirs, mine = layout["results"]["local_mc"], layout["results"]["mc_file"]
    assert set(theirs) - {"sample_count"} <= set(mine)
    for key, value in theirs.items():
        if key not in ("name", "alias", "sample_count"):
            assert mine[key] == pytest.approx(value), key
    assert layout["n-samples"]["mc_file"] == layout["n-samples"]["local_mc"]
    assert layout["versions"]["local_mc"] == raw["versions"]["local_mc"] and layout["config"] == {"model": "m"}
    assert layout["higher_is_better"]["mc_file"]["acc"] is layout["higher_is_better"]["local_mc"]["acc"] is True
