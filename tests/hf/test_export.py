import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from aoe.config import ModelConfig
from aoe.hf import AoEForCausalLM
from aoe.hf.export import (export_checkpoint, export_to_hf, hf_to_native_state, load_hf_as_native,
                           load_native_as_hf)
from aoe.model.transformer import Transformer


def native_model(**kw):
    base = dict(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, d_ffn=48,
                n_experts=4, top_k=2, d_low=8)
    base.update(kw)
    return Transformer(ModelConfig(**base)).eval()


@pytest.mark.parametrize("ffn,tie,qk_norm", [("aoe", True, "none"), ("moe", False, "none"), ("dense", True, "none"),
                                            ("aoe", False, "head"), ("dense", True, "full")])
def test_export_then_load_identical_logits(tmp_path, ffn, tie, qk_norm):
    model = native_model(ffn=ffn, tie_embeddings=tie, dense_layers=[0] if ffn != "dense" else [], qk_norm=qk_norm)
    if qk_norm != "none":
        with torch.no_grad():
            for block in model.layers:
                block.attn.q_norm.weight.uniform_(0.5, 1.5)
                block.attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randint(0, 300, (2, 10))
    dst = export_to_hf(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert isinstance(hf, AoEForCausalLM)
    assert torch.equal(hf(x).logits, model(x).logits)
    back = load_hf_as_native(dst)
    assert torch.equal(back(x).logits, model(x).logits)
    assert back.config == model.config
    state = hf_to_native_state(hf)
    ref = model.state_dict()
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)


def test_export_bf16_and_dtype_kept(tmp_path):
    model = native_model().to(torch.bfloat16)
    dst = export_to_hf(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(dst, dtype="auto")
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    x = torch.randint(0, 300, (1, 8))
    assert torch.equal(hf(x).logits, model(x).logits)


def test_export_with_tokenizer(tmp_path, tiny_tokenizer):
    from transformers import AutoTokenizer

    model = native_model(vocab_size=tiny_tokenizer.vocab_size)
    dst = export_to_hf(model, tmp_path / "hf", tiny_tokenizer)
    tok = AutoTokenizer.from_pretrained(dst)
    text = "hello world, the quick fox"
    assert tok(text)["input_ids"] == tiny_tokenizer.encode(text)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == tiny_tokenizer.eos_id
    hf = AutoModelForCausalLM.from_pretrained(dst)
    assert hf.config.eos_token_id == tiny_tokenizer.eos_id


def test_destination_rules(tmp_path):
    model = native_model()
    dst = tmp_path / "hf"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        export_to_hf(model, dst)
    assert (dst / "keep.txt").exists()
    export_to_hf(model, dst, overwrite=True)
    assert (dst / "config.json").exists() and not (dst / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary directory left
    empty = tmp_path / "empty"
    empty.mkdir()
    export_to_hf(model, empty)  # an empty directory is fine


def test_export_checkpoint_and_load_native_as_hf(tmp_path, tiny_tokenizer):
    from aoe.io.checkpoint import save_model_checkpoint

    model = native_model(vocab_size=tiny_tokenizer.vocab_size)
    save_model_checkpoint(tmp_path / "run", model, tiny_tokenizer)
    export_checkpoint(tmp_path / "run", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    x = torch.randint(0, model.config.vocab_size, (1, 6))
    assert torch.equal(hf(x).logits, model(x).logits)
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    live = load_native_as_hf(tmp_path / "run")
    assert live.config.eos_token_id == tiny_tokenizer.eos_id
    assert torch.equal(live(x).logits, model(x).logits)
    assert torch.equal(load_native_as_hf(model)(x).logits, model(x).logits)


def test_cli_export_round_trip_through_native_checkpoints(tmp_path, tiny_tokenizer):
    from aoe.cli import main
    from aoe.io.checkpoint import save_model_checkpoint
    from aoe.io.models import load_model

    model = native_model(vocab_size=tiny_tokenizer.vocab_size)
    save_model_checkpoint(tmp_path / "run", model, tiny_tokenizer)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert main(["export", "--to-native", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back, _, tok = load_model(tmp_path / "back")
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    assert torch.equal(back(x).logits, model(x).logits)
    text = "the quick brown fox, hello there"
    assert tok is not None and tok.encode(text) == tiny_tokenizer.encode(text) and tok.eos_id == tiny_tokenizer.eos_id
    assert main(["export", "--to-native", str(tmp_path / "hf"), str(tmp_path / "back")]) == 1  # never overwrites
    # nor writes into a training run, even with --overwrite
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert main(["export", "--to-native", str(tmp_path / "hf"), str(tmp_path / "run"), "--overwrite"]) == 1
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_a_training_run_or_the_source_is_never_replaced(tmp_path, tiny_tokenizer, capsys):
    from aoe.cli import main
    from aoe.io.checkpoint import list_checkpoints, save_model_checkpoint, verify_checkpoint

    model = native_model(vocab_size=tiny_tokenizer.vocab_size)
    run = tmp_path / "run"
    save_model_checkpoint(run, model, tiny_tokenizer)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(ValueError, match="holds a training run or native checkpoint.*even with --overwrite"):
        export_checkpoint(run, run, overwrite=True)
    [ckpt] = list_checkpoints(run)
    with pytest.raises(ValueError, match="is or contains the source"):
        export_checkpoint(ckpt, ckpt.parent, overwrite=True)
    with pytest.raises(ValueError, match="holds a training run or native checkpoint"):
        export_to_hf(model, ckpt, overwrite=True)  # a checkpoint directory itself
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="metrics.jsonl"):
        export_to_hf(model, other, overwrite=True)
    assert main(["export", str(run), str(run), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "never replaced" in err and "Traceback" not in err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    verify_checkpoint(ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "run"]  # no temporary directory left


def test_disk_full_while_exporting_names_the_cause_and_changes_nothing(tmp_path, monkeypatch):
    import errno
    import os

    import transformers.modeling_utils as modeling_utils

    model = native_model()
    dst = export_to_hf(model, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in dst.iterdir()}

    def no_space(state, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(modeling_utils, "safe_save_file", no_space)
    with pytest.raises(OSError, match=r"^no space left on device while writing .*hf.*nothing was changed") as info:
        export_to_hf(native_model(), dst, overwrite=True)
    from aoe.utils.files import WriteError

    assert isinstance(info.value, WriteError) and info.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary directory left


def test_an_export_gets_the_permissions_the_umask_gives(tmp_path, tiny_config):
    from aoe.hf.export import export_to_hf
    from aoe.model import Transformer

    model = Transformer(tiny_config().to_model_config())
    before = os.umask(0o022)
    try:
        dst = export_to_hf(model, tmp_path / "shared")
    finally:
        os.umask(before)
    assert dst.stat().st_mode & 0o777 == 0o755
    assert [f.name for f in dst.iterdir() if f.stat().st_mode & 0o777 != 0o644] == []
