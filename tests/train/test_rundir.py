"""A run directory's files that the trainer did not write are never overwritten or appended to,
and a resumed run keeps the settings it was started with."""

from __future__ import annotations

import json
import shutil

import pytest

from aoe.config import ConfigError, load_config
from aoe.io.checkpoint import CheckpointError
from aoe.train import Trainer, train
from aoe.train.rundir import CONFIG_MARKER
from helpers.tiny_runs import tiny_overrides

QUICK = {"train.max_steps": 2, "train.eval_every": 0, "train.checkpoint_every": 0}

HAND_WRITTEN = """\
# my experiment: a smaller model, see notes.md
model:
  d_model: 32   # small on purpose
"""


def test_a_users_config_in_the_run_directory_is_kept_and_the_resolved_one_goes_beside(tmp_path, cache_dir, capsys):
    run = tmp_path / "myexp"
    run.mkdir()
    (run / "config.yaml").write_text(HAND_WRITTEN)
    cfg = load_config(run / "config.yaml", tiny_overrides(cache_dir, **QUICK))
    train(cfg, run, progress=False)
    assert (run / "config.yaml").read_text() == HAND_WRITTEN
    resolved = run / "config.resolved.yaml"
    assert resolved.read_text().startswith(CONFIG_MARKER + "\n")
    assert load_config(resolved).train.max_steps == 2
    assert "config.resolved.yaml" in capsys.readouterr().err
    train(cfg, run, resume=True, progress=False)  # the resumed run rewrites its own file, not the user's
    assert (run / "config.yaml").read_text() == HAND_WRITTEN


def test_a_run_directory_with_the_users_summary_and_metrics_but_no_checkpoint_is_refused(tmp_path, make_cfg):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text('{"mine": 1}\n')
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    with pytest.raises(ConfigError, match=r"metrics\.jsonl, summary\.json but no checkpoint.*nothing was overwritten"):
        Trainer(make_cfg(**QUICK), run, progress=False)
    assert (run / "summary.json").read_text() == '{"mine": 1}\n'
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 9.0}\n'
    assert not (run / "config.yaml").exists()


def test_a_run_killed_before_its_first_checkpoint_is_not_appended_to(tmp_path, make_cfg):
    run = tmp_path / "run"
    train(make_cfg(**QUICK), run, progress=False)  # checkpoint_every=0 saves only at the end: remove it
    shutil.rmtree(run / "checkpoints")
    logged = (run / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="move or delete them"):
        train(make_cfg(**QUICK), run, progress=False)
    assert (run / "metrics.jsonl").read_text() == logged
    trainer = Trainer(make_cfg(**QUICK), run, progress=False, restart=True)
    trainer.fit()
    steps = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 2


@pytest.mark.parametrize("key, value", [("train.batch_size", 4), ("train.seq_len", 16), ("train.seed", 1)])
def test_resume_with_a_changed_batch_size_seq_len_or_seed_is_refused(tmp_path, make_cfg, key, value):
    run = tmp_path / "run"
    train(make_cfg(**QUICK), run, progress=False)
    with pytest.raises(ConfigError, match=rf"--resume: {key}={value} \(the run has \d+\)"):
        Trainer(make_cfg(**QUICK, **{key: value}), run, resume=True, progress=False)


def test_resume_with_only_data_vocab_size_changed_names_it(tmp_path, make_cfg):
    run = tmp_path / "run"
    train(make_cfg(**QUICK), run, progress=False)
    with pytest.raises(ConfigError, match=r"--resume: data\.vocab_size=384 \(the run has 512\)"):
        Trainer(make_cfg(**QUICK, **{"data.vocab_size": 384}), run, resume=True, progress=False)


def test_resume_refuses_a_checkpoint_renamed_with_its_recorded_step_edited_to_match(tmp_path, make_cfg):
    run = tmp_path / "run"
    train(make_cfg(**QUICK), run, progress=False)
    saved = run / "checkpoints" / "step_00000002"
    meta = json.loads((saved / "checkpoint.json").read_text())
    meta["step"] = 99
    (saved / "checkpoint.json").write_text(json.dumps(meta))
    saved.rename(saved.with_name("step_00000099"))
    with pytest.raises(CheckpointError, match="trainer state of step 2, not of the step its name says"):
        Trainer(make_cfg(**{**QUICK, "train.max_steps": 100}), run, resume=True, progress=False)
