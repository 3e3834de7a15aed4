"""The `aoe` command end to end, in process: train -> eval -> generate, and its error messages."""

import json

import pytest

from aoe.cli import main

from helpers.tiny_runs import tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster and steadier


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cli-cache")


@pytest.fixture(autouse=True)
def _token_cache(cli_cache, monkeypatch):
    """`aoe eval` caches tokens where $AOE_CACHE (or --cache-dir) says, never where a checkpoint's config does."""
    monkeypatch.setenv("AOE_CACHE", str(cli_cache))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cli_cache):
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli")
    cache = cli_cache
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


# ---------------------------------------------------------------------------------------------
# Every refusal is one `error: ...` line (exit status 2); a bug keeps its traceback
# ---------------------------------------------------------------------------------------------
def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("content", [b"model: 5\n", b"model: [d_model, 128]\n", b"model:\n  d_model: 64\n# caf\xe9\n"])
def test_a_config_file_that_is_no_config_is_named(tmp_path, capsys, content):
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "r")]) == 2
    err = _one_error_line(capsys)
    assert str(path) in err and ("section 'model'" in err or "not UTF-8" in err)


def test_a_learning_rate_beyond_float32_is_refused_before_training(tmp_path, capsys):
    assert main(["train", "--quiet", "--out", str(tmp_path / "r"), "train.lr=1e300"]) == 2
    assert "train.lr=1e+300 is out of range" in _one_error_line(capsys)
    assert not (tmp_path / "r").exists()


def test_a_missing_multiple_choice_file_is_named(trained, tmp_path, capsys):
    run, _ = trained
    missing = tmp_path / "missing.jsonl"
    assert main(["eval", str(run), "--skip-loss", "--mc", str(missing)]) == 2
    assert f"--mc {missing}: no such file" in _one_error_line(capsys)


def test_max_new_tokens_past_the_context_is_capped_with_a_warning(trained, capsys):
    run, _ = trained
    assert main(["generate", str(run), "--prompt", "import os", "--max-new-tokens", "500", "--greedy", "--no-stop"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("import os")
    assert "warning: --max-new-tokens 500 capped to" in captured.err and "max_seq_len=32" in captured.err
    assert captured.err.count("\n") == 1
    assert main(["generate", str(run), "--max-new-tokens", "3", "--greedy"]) == 0
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "capped, with a warning" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("args, message", [
    (["generate", "RUN", "--max-new-tokens", "-3"], "--max-new-tokens -3 must be >= 0"),
    (["generate", "RUN", "--temperature", "-1"], "--temperature -1.0 must be >= 0"),
    (["generate", "RUN", "--top-k", "0"], "--top-k 0 must be at least 1"),
    (["generate", "RUN", "--top-p", "2"], "--top-p 2.0 must be in (0, 1]"),
    (["generate", "RUN", "--device", "nonsense"], "--device 'nonsense' is not a torch device"),
    (["eval", "RUN", "--seq-len", "100", "--max-batches", "1"], "--seq-len 100 exceeds the model's context"),
    (["eval", "RUN", "--seq-len", "0"], "--seq-len 0 must be at least 1"),
    (["eval", "RUN", "--batch-size", "0"], "--batch-size 0 must be at least 1"),
    (["eval", "RUN", "--skip-loss", "--tasks", ","], "--tasks ',' names no task"),
    (["compare", "--list-variants", "model.d_modle=3"], "unknown config key 'model.d_modle'"),
])
def test_bad_option_values_are_one_line_messages(trained, capsys, args, message):
    run, _ = trained
    assert main([str(run) if a == "RUN" else a for a in args]) == 2
    assert message in _one_error_line(capsys)


def test_a_library_bug_keeps_its_traceback(trained, tmp_path, monkeypatch):
    import aoe.config
    import aoe.model

    def bug(*args, **kwargs):
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr(aoe.config, "load_config", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["train", "--out", str(tmp_path / "r")])
    monkeypatch.setattr(aoe.model, "generate", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["generate", str(trained[0]), "--max-new-tokens", "2"])


def test_an_unknown_harness_task_is_a_message_other_harness_errors_are_not(trained, monkeypatch, capsys):
    import aoe.eval.tasks

    def unknown(*args, **kwargs):
        raise ValueError("unknown lm-eval task 'nope': no such task")

    monkeypatch.setattr(aoe.eval.tasks, "run_harness", unknown)
    assert main(["eval", str(trained[0]), "--skip-loss", "--tasks", "nope"]) == 2
    assert "--tasks: unknown lm-eval task 'nope'" in _one_error_line(capsys)

    def bug(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(aoe.eval.tasks, "run_harness", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["eval", str(trained[0]), "--skip-loss", "--tasks", "piqa"])


# ---------------------------------------------------------------------------------------------
# aoe eval --json: lm-eval's results layout; choices that begin with whitespace
# ---------------------------------------------------------------------------------------------
def _mc_file(path, spaced: bool):
    space = " " if spaced else ""
    path.write_text("\n".join(json.dumps({"context": "def", "choices": [space + "main(", space + "the the"],
                                          "label": i % 2}) for i in range(4)) + "\n")
    return path


def test_eval_json_is_lm_evals_results_layout(trained, tmp_path, capsys):
    from lm_eval.utils import make_table

    run, _ = trained
    mc, out_json = _mc_file(tmp_path / "plain.jsonl", spaced=False), tmp_path / "eval.json"
    assert main(["eval", str(run), "--max-batches", "2", "--mc", str(mc), "--json", str(out_json)]) == 0
    assert capsys.readouterr().err == ""  # no whitespace warning for a normal file
    layout = json.loads(out_json.read_text())
    for key in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config"):
        assert key in layout, key
    mc_task, corpus = layout["results"]["mc_plain"], layout["results"]["corpus_val"]
    assert mc_task["alias"] == str(mc) and mc_task["sample_len"] == 4
    for metric in ("acc", "acc_norm", "acc_bytes"):
        assert mc_task[f"{metric},none"] == layout["multiple_choice"][str(mc)][metric]  # the earlier key, kept
        assert mc_task[f"{metric}_stderr,none"] == layout["multiple_choice"][str(mc)][f"{metric}_stderr"]
    assert corpus["loss,none"] == layout["loss"] > 0 and corpus["perplexity,none"] == layout["perplexity"]
    assert corpus["bits_per_byte,none"] == layout["bits_per_byte"] and corpus["sample_len"] == layout["tokens"]
    assert layout["n-samples"]["mc_plain"] == {"original": 4, "effective": 4}
    assert layout["higher_is_better"]["corpus_val"]["loss"] is False and layout["configs"]["mc_plain"]["target_delimiter"] == " "
    config = layout["config"]
    assert config["model"] == layout["checkpoint"] and config["batch_size"] == 8 and config["device"] == "cpu"
    assert config["model_dtype"] == "torch.float32" and config["limit"] is None
    table = make_table(layout)  # lm-eval's own reader of its results
    assert str(mc) in table and "acc_norm" in table and "bits_per_byte" in table


def test_choices_with_a_leading_space_warn_once_and_mc_delimiter(trained, tmp_path, capsys):
    run, _ = trained
    spaced, plain = _mc_file(tmp_path / "spaced.jsonl", True), _mc_file(tmp_path / "plain.jsonl", False)
    results = {}
    for name, args in (("spaced", [str(spaced)]), ("plain", [str(plain)]),
                       ("own", [str(spaced), "--mc-delimiter", ""])):
        out_json = tmp_path / f"{name}.json"
        assert main(["eval", str(run), "--skip-loss", "--mc", *args, "--json", str(out_json)]) == 0
        err = capsys.readouterr().err
        if name == "spaced":
            assert err.count("\n") == 1 and err.startswith(f"warning: {spaced}: 8 of 8 choices begin with whitespace")
        else:
            assert err == ""
        results[name] = next(iter(json.loads(out_json.read_text())["results"].values()))
    for key in ("acc,none", "acc_norm,none", "acc_bytes,none"):  # '' scores " main(" as ' ' scores "main("
        assert results["own"][key] == results["plain"][key]


def test_eval_caches_tokens_where_this_machine_says_not_where_the_checkpoint_records(tmp_path, monkeypatch, capsys):
    recorded, env, flag = tmp_path / "recorded", tmp_path / "env", tmp_path / "flag"
    run = tmp_path / "run"
    quick = {"train.max_steps": 2, "train.eval_every": 0, "train.checkpoint_every": 0}
    assert main(["train", "--quiet", "--out", str(run), *tiny_overrides(recorded, **quick)]) == 0
    import shutil

    shutil.rmtree(recorded)
    monkeypatch.setenv("AOE_CACHE", str(env))
    assert main(["eval", str(run), "--max-batches", "1"]) == 0
    assert not recorded.exists() and (env / "tokens").is_dir()
    assert main(["eval", str(run), "--max-batches", "1", "--cache-dir", str(flag)]) == 0
    assert not recorded.exists() and (flag / "tokens").is_dir()


def test_several_prompts_are_generated_together_each_as_alone(trained, tmp_path, capsys):
    run, _ = trained
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps("def f(x):\n    return") + "\n\n" + json.dumps({"prompt": "class A"}) + "\n")
    common = ["--max-new-tokens", "6", "--temperature", "1.0", "--no-stop"]
    assert main(["generate", str(run), "--prompt", "import os", "--prompt", "x =", "--prompts-file",
                 str(prompts_file), "--seed", "3", *common]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["import os", "x =", "def f(x):\n    return", "class A"]
    for i, row in enumerate(rows):  # row i samples with seed + i, as it would alone
        assert main(["generate", str(run), "--prompt", row["prompt"], "--seed", str(3 + i), *common]) == 0
        assert capsys.readouterr().out == row["text"] + "\n"
    text_file = tmp_path / "prompts.txt"
    text_file.write_text("import sys\n\nfrom os import\n")
    assert main(["generate", str(run), "--prompts-file", str(text_file), "--greedy", "--max-new-tokens", "3"]) == 0
    assert [json.loads(line)["prompt"] for line in capsys.readouterr().out.splitlines()] == ["import sys", "from os import"]


@pytest.mark.parametrize("flags, message", [
    (["--greedy", "--temperature", "1.5", "--top-k", "5"], "--greedy takes the most likely token, so --temperature, "
                                                          "--top-k would do nothing"),
    (["--greedy", "--top-p", "0.9"], "--greedy takes the most likely token, so --top-p would do nothing"),
    (["--temperature", "0", "--top-k", "5"], "--temperature 0 takes the most likely token, so --top-k would do nothing"),
    (["--greedy", "--seed", "3"], "--greedy takes the most likely token, so --seed would do nothing"),
])
def test_conflicting_sampling_flags_are_refused(trained, capsys, flags, message):
    run, _ = trained
    assert main(["generate", str(run), "--prompt", "x", *flags]) == 2
    assert message in _one_error_line(capsys)


def test_a_bad_prompts_file_is_named(trained, tmp_path, capsys):
    run, _ = trained
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"ok"\n{"text": 1}\n')
    assert main(["generate", str(run), "--prompts-file", str(bad)]) == 2
    assert f"{bad}:2: expected a JSON string" in _one_error_line(capsys)


@pytest.mark.parametrize("flags, message", [
    (["--skip-loss", "--data", "x.txt", "--max-batches", "2"], "--skip-loss skips the corpus loss, so --data, "
                                                               "--max-batches would do nothing"),
    (["--skip-loss", "--seq-len", "8"], "--skip-loss skips the corpus loss, so --seq-len would do nothing"),
    (["--limit", "5"], "--limit applies to lm-eval tasks only: add --tasks"),
    (["--num-fewshot", "2", "--limit", "5"], "--num-fewshot, --limit apply to lm-eval tasks only"),
])
def test_eval_options_that_would_do_nothing_are_refused(trained, capsys, flags, message):
    assert main(["eval", str(trained[0]), *flags]) == 2
    assert message in _one_error_line(capsys)
