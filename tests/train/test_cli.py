"""The `aoe` command end to end, in process: train -> eval -> generate, and its error messages."""

import json

import pytest

from aoe.cli import main

from .conftest import tiny_overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli")
    cache = root / "cache"
    run = root / "run"
    assert main(["train", "--quiet", "--out", str(run), *tiny_overrides(cache, **{"train.max_steps": 8})]) == 0
    return run, cache


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "aoe train" in out and "torchrun" in out


def test_eval_and_generate(trained, tmp_path, capsys):
    run, _ = trained
    mc = tmp_path / "mc.jsonl"
    mc.write_text("\n".join(json.dumps({"context": "def", "choices": [" main(", " the the"], "label": i % 2})
                            for i in range(4)) + "\n")
    out_json = tmp_path / "eval.json"
    assert main(["eval", str(run), "--max-batches", "2", "--mc", str(mc), "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "val loss" in printed and "perplexity" in printed and "Ent_load" in printed and "acc_norm" in printed
    results = json.loads(out_json.read_text())
    assert results["loss"] > 0 and results["multiple_choice"][str(mc)]["n"] == 4
    assert main(["generate", str(run), "--prompt", "import os", "--max-new-tokens", "5", "--greedy"]) == 0
    assert capsys.readouterr().out.startswith("import os")


def test_prompt_longer_than_context_is_refused(trained, capsys):
    run, _ = trained
    assert main(["generate", str(run), "--prompt", "x = 1\n" * 200]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "max_seq_len" in err


def test_bad_override_names_the_key(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "model.n_expert=4"]) == 2
    assert "model.n_expert" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "model.n_heads=3"]) == 2
    assert "n_heads" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "model.top_k=9"]) == 2
    assert "top_k" in capsys.readouterr().err


def test_empty_corpus_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--quiet", "--out", str(tmp_path / "r"), f"data.source={empty}",
                 f"data.cache_dir={tmp_path / 'cache'}"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(empty) in err


def test_resume_of_a_finished_run_and_missing_checkpoint(trained, tmp_path, capsys):
    run, cache = trained
    assert main(["eval", str(tmp_path)]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err


def test_compare_list_options_leave_overrides_alone(capsys):
    assert main(["compare", "--list-variants", "--seeds", "0", "1", "model.d_low=16", "model.n_experts=4"]) == 0
    out = capsys.readouterr().out
    assert "aoe_dlow8" in out and "top-2 of 4 experts" in out
    assert main(["compare", "--seeds", "0", "x"]) == 2
    assert "--out" in capsys.readouterr().err


def test_quick_demo_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AOE_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "val loss" in out and "unigram entropy" in out and "AoE sample" in out
    assert (tmp_path / "demo" / "report.md").is_file()
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert [r["variant"] for r in results["runs"]] == ["moe", "aoe"]
