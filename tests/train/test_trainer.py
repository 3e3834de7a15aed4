"""The trainer end to end on a real (small) corpus: determinism, resume after SIGKILL, DDP, NaN policy."""

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from aoe.config import ConfigError
from aoe.train import CheckpointError, Trainer, TrainingError, list_checkpoints, read_metrics, train, verify_checkpoint
from aoe.train.checkpoint import load_model

from .conftest import PYTHON, cli_env, tiny_overrides


def _losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_metrics(run_dir / "metrics.jsonl") if "loss" in e}


def test_training_logs_everything_and_learns(tmp_path, make_cfg):
    summary = train(make_cfg(**{"train.max_steps": 30, "train.eval_every": 10}), tmp_path / "run", progress=False)
    entries = read_metrics(tmp_path / "run" / "metrics.jsonl")
    steps = [e for e in entries if "loss" in e]
    vals = [e for e in entries if "val_loss" in e]
    assert [e["step"] for e in steps] == list(range(1, 31))
    assert [e["step"] for e in vals] == [10, 20, 30]
    first = steps[0]
    for key in ("loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens", "layers"):
        assert key in first, key
    assert len(first["layers"]) == 2
    layer = first["layers"][0]
    assert sum(layer["tokens_per_expert"]) == 8 * 32 * 2  # every (token, slot) assignment counted
    assert 0 < layer["ent_load"] <= math.log(4) + 1e-9 and 0 < layer["ent_conf"] <= math.log(4) + 1e-9
    assert layer["imbalance"] >= 1
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5
    assert summary["val_loss"] == pytest.approx(vals[-1]["val_loss"])
    assert summary["val_loss"] < summary["unigram_entropy"] + 1.0
    assert summary["params_total"] > summary["params_active"] > 0
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 30


def test_same_seed_same_losses_and_refuses_to_overwrite(tmp_path, make_cfg):
    cfg = make_cfg(**{"train.max_steps": 6, "train.checkpoint_every": 3})
    train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        Trainer(cfg, tmp_path / "a", progress=False)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        Trainer(cfg, tmp_path / "empty", resume=True, progress=False)


def test_resume_continues_exactly_and_skips_a_corrupt_checkpoint(tmp_path, make_cfg):
    full = make_cfg(**{"train.max_steps": 12})
    train(full, tmp_path / "full", progress=False)
    # the same run, with its newest checkpoint (step 12) then corrupted: resuming falls back to step 8
    train(make_cfg(**{"train.max_steps": 12}), tmp_path / "cut", progress=False)
    newest = list_checkpoints(tmp_path / "cut")[-1]  # step 12
    (newest / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="skipping a bad checkpoint"):
        trainer = Trainer(full, tmp_path / "cut", resume=True, progress=False)
    assert trainer.state.step == 8
    trainer.fit()
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")


def _wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {step}: {proc.stderr.read().decode()[-2000:]}")
        if metrics.is_file() and any(e.get("step", 0) >= step for e in read_metrics(metrics)):
            return
        time.sleep(0.005)
    raise AssertionError(f"no step {step} within {timeout} s")


def test_sigkill_then_resume_logs_the_same_losses(tmp_path, cache_dir):
    args = tiny_overrides(cache_dir, **{"train.max_steps": 60, "train.checkpoint_every": 5, "train.eval_every": 30})
    cmd = [PYTHON, "-m", "aoe.cli", "train", "--quiet"]
    subprocess.run([*cmd, "--out", str(tmp_path / "full"), *args], check=True, env=cli_env(), capture_output=True)
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "killed"), *args], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for_step(tmp_path / "killed" / "metrics.jsonl", 7, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(tmp_path / "killed"))
    assert killed_at < 60, "the run finished before it could be killed"
    for ckpt in list_checkpoints(tmp_path / "killed"):
        verify_checkpoint(ckpt)  # only complete checkpoints are visible
    subprocess.run([*cmd, "--out", str(tmp_path / "killed"), "--resume", *args], check=True, env=cli_env(),
                   capture_output=True)
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 61))
    assert resumed == full


def test_two_process_ddp_matches_one_process(tmp_path, cache_dir):
    args = tiny_overrides(cache_dir, **{"train.max_steps": 5, "train.checkpoint_every": 0, "train.eval_every": 5})
    single = subprocess.run([PYTHON, "-m", "aoe.cli", "train", "--quiet", "--out", str(tmp_path / "one"), *args],
                            env=cli_env(), capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "aoe.cli", "train", "--quiet", "--out", str(tmp_path / "two"), *args],
                         env=cli_env(), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-5)
    # both wrote one final checkpoint with (nearly) the same weights
    m1, _, _ = load_model(tmp_path / "one")
    m2, _, _ = load_model(tmp_path / "two")
    for (name, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, make_cfg):
    train(make_cfg(**{"train.max_steps": 4}), tmp_path / "big", progress=False)
    train(make_cfg(**{"train.max_steps": 4, "train.micro_batch_size": 2}), tmp_path / "acc", progress=False)
    big, acc = _losses(tmp_path / "big"), _losses(tmp_path / "acc")
    for step in big:
        assert acc[step] == pytest.approx(big[step], rel=1e-5)


def test_nan_loss_stops_without_saving_a_bad_checkpoint(tmp_path, make_cfg):
    cfg = make_cfg(**{"train.lr": 1e30, "train.warmup_steps": 0, "train.checkpoint_every": 1, "train.max_steps": 20})
    with pytest.raises(TrainingError, match="non-finite loss or gradient at step"):
        train(cfg, tmp_path / "run", progress=False)
    for ckpt in list_checkpoints(tmp_path / "run"):
        model, _, _ = load_model(ckpt)
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_skip_policy_skips_then_gives_up(tmp_path, make_cfg, capsys):
    cfg = make_cfg(**{"train.lr": 1e30, "train.warmup_steps": 0, "train.nan_policy": "skip", "train.max_steps": 40,
                      "train.checkpoint_every": 0})
    with pytest.raises(TrainingError, match="consecutive steps skipped"):
        train(cfg, tmp_path / "run", progress=False)
    assert "step skipped" in capsys.readouterr().err
