"""`aoe eval` / `aoe generate` on a Hugging Face directory (from `aoe export` or `aoe convert`) give
what they give on the native checkpoint; `aoe.io.models.load_any` tells the three kinds apart."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from aoe.cli import main
from aoe.io.checkpoint import CheckpointError, imported_run_config, save_model_checkpoint
from aoe.io.models import load_any, load_model, model_dir_kind

from helpers.tiny_models import make_lines

MC = [{"context": "the cat sat on", "choices": ["a mat", "paris", "the blue green model"], "label": 0},
      {"context": "experts route each token to", "choices": ["themselves", "rome"], "label": 1},
      {"context": "red blue", "choices": ["green", "yes", "no"], "label": 0}]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, model, tokenizer):
    """A native run of the tiny random model, its `aoe export`, a small corpus and an --mc file."""
    root = tmp_path_factory.mktemp("load-any")
    run, hf = root / "run", root / "hf"
    save_model_checkpoint(run, model, tokenizer)
    assert main(["export", str(run), str(hf)]) == 0
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(make_lines(seed, 6)) for seed in range(40)))
    mc = root / "mc.jsonl"
    mc.write_text("".join(json.dumps(ex) + "\n" for ex in MC))
    return {"run": run, "hf": hf, "corpus": corpus, "mc": mc, "root": root}


def test_the_three_kinds(dirs, tmp_path):
    ckpt = next((dirs["run"] / "checkpoints").iterdir())
    assert [model_dir_kind(p) for p in (ckpt, dirs["run"], dirs["hf"])] == ["checkpoint", "run", "hf"]
    for bad, message in ((tmp_path, "is neither a checkpoint directory"), (tmp_path / "nope", "does not exist")):
        with pytest.raises(CheckpointError, match=message) as e:
            load_any(bad)
        assert str(bad) in str(e.value) and "run directory" in str(e.value) and "aoe export or aoe convert" in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type='llama', not 'aoe': convert it first"):
        load_any(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read .*config.json"):
        load_any(tmp_path)


def test_an_hf_directory_loads_the_native_model(dirs, model, tokenizer):
    loaded = load_any(dirs["hf"])
    assert loaded.kind == "hf" and loaded.path == dirs["hf"] and not loaded.model.training
    ids = torch.randint(0, tokenizer.vocab_size, (2, 24))
    assert torch.equal(loaded.model(ids).logits, model(ids).logits)
    assert loaded.tokenizer.eos_id == tokenizer.eos_id and loaded.tokenizer.vocab_size == tokenizer.vocab_size
    for text in make_lines(7, 20):
        assert loaded.tokenizer.encode(text) == tokenizer.encode(text)
    assert loaded.config == imported_run_config(model.config, tokenizer)  # what `aoe export --to-native` writes
    native_cfg = load_any(dirs["run"]).config
    assert loaded.config == native_cfg
    m, cfg, tok = load_model(dirs["hf"])  # load_model (and so the harness's model "aoe") takes it too
    assert torch.equal(m(ids).logits, model(ids).logits) and cfg == loaded.config and tok.eos_id == tokenizer.eos_id


def test_loading_needs_no_trainer_and_transformers_only_for_an_hf_directory(dirs):
    code = ("import sys; from aoe.io.models import load_any; "
            f"loaded = load_any({str(dirs['run'])!r}); assert loaded.kind == 'checkpoint'; "
            "print('transformers' in sys.modules, 'aoe.train' in sys.modules); "
            f"loaded = load_any({str(dirs['hf'])!r}); assert loaded.kind == 'hf'; "
            "print('transformers' in sys.modules, 'aoe.train' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["False False", "True False"]


def _eval(path, dirs, capsys, name):
    out = dirs["root"] / f"{name}.json"
    assert main(["eval", str(path), "--data", str(dirs["corpus"]), "--seq-len", "32", "--mc", str(dirs["mc"]),
                 "--json", str(out)]) == 0
    return capsys.readouterr().out, json.loads(out.read_text())


def test_eval_gives_the_same_numbers_on_the_hf_directory(dirs, capsys, monkeypatch):
    monkeypatch.setenv("AOE_CACHE", str(dirs["root"] / "cache"))
    native_text, native = _eval(dirs["run"], dirs, capsys, "native")
    hf_text, hf = _eval(dirs["hf"], dirs, capsys, "hf")
    assert "val loss" in hf_text and "acc_norm" in hf_text
    assert hf_text == native_text
    assert hf["results"] == native["results"] and hf["loss"] == native["loss"] > 0
    assert hf["config"]["model_args"]["kind"] == "hf" and native["config"]["model_args"]["kind"] == "checkpoint"
    assert hf["results"]["corpus_val"]["sample_len"] > 0 and hf["results"]["mc_mc"]["sample_len"] == len(MC)


def test_generate_gives_the_same_text_on_the_hf_directory(dirs, capsys):
    texts = []
    for path in (dirs["run"], dirs["hf"]):
        assert main(["generate", str(path), "--prompt", "the cat", "--max-new-tokens", "12", "--greedy",
                     "--no-stop"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("the cat") and len(texts[0]) > len("the cat\n")


def test_an_hf_directory_without_a_tokenizer_is_named(dirs, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(dirs["hf"], bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    assert main(["generate", str(bare), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{bare} has no tokenizer.json" in err and err.count("\n") == 1
    assert main(["eval", str(bare), "--data", str(dirs["corpus"])]) == 2
    assert "has no tokenizer.json (no tokenizer files at all): the corpus loss needs" in capsys.readouterr().err
    (bare / "tokenizer.model").write_bytes(b"\x00")
    assert main(["eval", str(bare), "--skip-loss", "--mc", str(dirs["mc"])]) == 2
    assert "only tokenizer.model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# A directory of `aoe convert`: the source's tokenizer (here a word-level one ending with "</s>")
# ---------------------------------------------------------------------------------------------
WORDS = sorted(set(" ".join(make_lines(0, 300)).replace(".", " .").split()))


def _word_tokenizer(directory):
    """A Llama-like tokenizer of its own: <unk> <s> </s> and the test's words, eos "</s>"."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    return len(vocab)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from aoe.hf.convert import convert_to_aoe

    root = tmp_path_factory.mktemp("convert")
    src = root / "llama"
    torch.manual_seed(0)
    n_vocab = len(WORDS) + 3
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=n_vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         initializer_range=0.5, eos_token_id=2, bos_token_id=1)).eval()
    llama.save_pretrained(src)
    _word_tokenizer(src)
    convert_to_aoe(src, root / "aoe", verbose=False)  # one expert, top-1, full rank: the Llama's logits
    return llama, src, root / "aoe"


def test_a_converted_directory_keeps_its_source_tokenizer(converted, capsys):
    llama, src, dst = converted
    loaded = load_any(dst)
    assert loaded.tokenizer.eos_token == "</s>" and loaded.tokenizer.eos_id == 2
    prompt = "the cat sat on"
    ids = loaded.tokenizer.encode(prompt)
    assert ids == [WORDS.index(w) + 3 for w in prompt.split()]
    with torch.no_grad():
        ref = llama(torch.tensor([ids])).logits
        assert torch.allclose(loaded.model(torch.tensor([ids])).logits, ref, atol=1e-4)
        greedy = llama.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(ids):].tolist()
    assert main(["generate", str(dst), "--prompt", prompt, "--max-new-tokens", "6", "--greedy", "--no-stop"]) == 0
    out = capsys.readouterr().out
    assert out == prompt + loaded.tokenizer.decode(greedy) + "\n"  # the Llama's greedy tokens


def test_eval_of_a_converted_directory(converted, dirs, capsys, monkeypatch):
    """--mc works with the source's tokenizer; the corpus loss, which needs <|endoftext|>, says why not."""
    _, src, dst = converted
    assert main(["eval", str(dst), "--skip-loss", "--mc", str(dirs["mc"])]) == 0
    assert "acc_norm" in capsys.readouterr().out
    monkeypatch.setenv("AOE_CACHE", str(dirs["root"] / "cache"))
    assert main(["eval", str(dst), "--data", str(dirs["corpus"])]) == 2
    err = capsys.readouterr().err
    assert "'</s>'" in err and "--skip-loss" in err and err.count("\n") == 1
    assert main(["eval", str(src), "--skip-loss", "--mc", str(dirs["mc"])]) == 2  # the unconverted source
    assert f"aoe convert {src} DST" in capsys.readouterr().err
