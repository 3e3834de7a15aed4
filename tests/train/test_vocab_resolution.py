"""A corpus too small for data.vocab_size: the tokenizer has fewer tokens, and the run still works."""

import pytest
import torch

from aoe.config import load_config
from aoe.train import Trainer, prepare_data
from aoe.io.models import load_model

from helpers.corpora import write_corpus

TINY_MODEL = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.max_seq_len": 32,
              "model.d_ffn": 64, "model.n_experts": 4, "model.top_k": 2, "model.d_low": 8}


@pytest.fixture
def small_corpus_cfg(tmp_path):
    """The tiny recipe on 20 short files: far fewer distinct pairs than data.vocab_size=4096 merges."""
    write_corpus(tmp_path / "corpus")
    overrides = {**TINY_MODEL, "data.source": str(tmp_path / "corpus"), "data.cache_dir": str(tmp_path / "cache"),
                 "train.seq_len": 16, "train.batch_size": 4, "train.max_steps": 2, "train.warmup_steps": 1,
                 "train.eval_every": 2, "train.eval_batches": 1, "train.checkpoint_every": 2, "train.num_threads": 1}
    return load_config("tiny", [f"{k}={v}" for k, v in overrides.items()])


def test_tokenizer_smaller_than_requested_gives_a_working_run(small_corpus_cfg, tmp_path, one_thread):
    cfg = small_corpus_cfg
    assert cfg.model.vocab_size is None and cfg.data.vocab_size == 4096
    data = prepare_data(cfg)
    assert data.vocab_size < 4096  # the corpus ran out of pairs to merge
    trainer = Trainer(cfg, tmp_path / "run", progress=False, data=data)
    assert trainer.cfg.model.vocab_size == data.vocab_size == trainer.cfg.data.vocab_size
    assert cfg.model.vocab_size is None and cfg.data.vocab_size == 4096  # the caller's config is untouched
    assert load_config(tmp_path / "run" / "config.yaml").model.vocab_size == data.vocab_size  # saved config loads
    summary = trainer.fit()
    assert summary["step"] == 2
    model, saved, tokenizer = load_model(tmp_path / "run")
    assert saved.model.vocab_size == tokenizer.vocab_size == data.vocab_size
    logits = model(torch.zeros(1, 8, dtype=torch.long)).logits
    assert logits.shape == (1, 8, data.vocab_size) and torch.isfinite(logits).all()


def test_the_recorded_vocab_size_trains_the_same_tokenizer(small_corpus_cfg, tmp_path):
    """Training again from the saved config (data.vocab_size = the tokenizer's real size) gives
    the identical tokenizer, so the recorded config reproduces the run's data."""
    cfg = small_corpus_cfg
    first = prepare_data(cfg)
    cfg.data.vocab_size = first.vocab_size
    assert prepare_data(cfg).tokenizer.hash == first.tokenizer.hash
