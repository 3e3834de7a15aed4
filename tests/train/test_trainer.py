"""The trainer end to end on a real (small) corpus: determinism, resume after SIGKILL, SIGTERM, DDP, NaN
policy, retention and a full disk."""

import errno
import json
import math
import os
import signal
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from aoe.config import ConfigError
from aoe.train import CheckpointError, Trainer, TrainingError, list_checkpoints, read_metrics, train, verify_checkpoint
from aoe.io.checkpoint import load_trainer_state
from aoe.io.models import load_model
from aoe.train.trainer import TrainingInterrupted, TrainingWriteError

from helpers.processes import free_port, torchrun_env

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


CLI_TRAIN = [PYTHON, "-m", "aoe.cli", "train", "--quiet"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache_dir):
    """A 60-step run through the CLI, uninterrupted: (its overrides, its run directory)."""
    args = tiny_overrides(cache_dir, **{"train.max_steps": 60, "train.checkpoint_every": 5, "train.eval_every": 30})
    out = tmp_path_factory.mktemp("full") / "run"
    subprocess.run([*CLI_TRAIN, "--out", str(out), *args], check=True, env=cli_env(), capture_output=True)
    return args, out


def test_sigkill_then_resume_logs_the_same_losses(tmp_path, full_run):
    args, full_dir = full_run
    cmd = CLI_TRAIN
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
    full, resumed = _losses(full_dir), _losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 61))
    assert resumed == full


def test_sigterm_saves_the_step_reached_and_resume_logs_the_same_losses(tmp_path, full_run):
    args, full_dir = full_run
    out = tmp_path / "term"
    proc = subprocess.Popen([*CLI_TRAIN, "--out", str(out), *args, "train.checkpoint_every=0"], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for_step(out / "metrics.jsonl", 7, proc)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    reached = max(_losses(out))
    assert reached < 60, "the run finished before it could be stopped"
    saved = out / "checkpoints" / f"step_{reached:08d}"
    assert list_checkpoints(out) == [saved]  # checkpoint_every=0: written because of the signal
    verify_checkpoint(saved)
    assert f"stopped by SIGTERM after step {reached} of 60" in err and str(saved) in err and "--resume" in err
    subprocess.run([*CLI_TRAIN, "--out", str(out), "--resume", *args], check=True, env=cli_env(), capture_output=True)
    assert _losses(out) == _losses(full_dir)


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tmp_path, cache_dir):
    args = tiny_overrides(cache_dir, **{"train.max_steps": 500, "train.checkpoint_every": 0, "train.eval_every": 0})
    out, port = tmp_path / "ddp", free_port()
    procs = []
    for rank in (0, 1):  # the environment torchrun gives its workers
        env = {**cli_env(), **torchrun_env(rank, 2, port)}
        procs.append(subprocess.Popen([*CLI_TRAIN, "--out", str(out), *args], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    try:
        _wait_for_step(out / "metrics.jsonl", 3, procs[0])
        procs[1].send_signal(signal.SIGTERM)  # the signal reaches one rank only
        errs = [p.communicate(timeout=120)[1].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, errs[0][-2000:] + errs[1][-2000:]
    reached = max(_losses(out))
    saved = out / "checkpoints" / f"step_{reached:08d}"
    assert reached < 500 and list_checkpoints(out) == [saved]
    verify_checkpoint(saved)
    state = load_trainer_state(saved)
    assert state["step"] == reached and state["world_size"] == 2
    assert f"stopped by SIGTERM after step {reached}" in errs[0]


def test_a_stop_signal_in_process_saves_and_a_second_one_is_ignored(tmp_path, make_cfg, monkeypatch):
    import aoe.io.checkpoint as ckpt

    trainer = Trainer(make_cfg(**{"train.checkpoint_every": 0, "train.eval_every": 0}), tmp_path / "run",
                      progress=False)
    real_step, real_save = trainer._train_step, ckpt.save_file

    def step_then_signal(collect_routing):
        out = real_step(collect_routing)
        if trainer.state.step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    def save_file_during_a_second_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: the run is already stopping
        return real_save(*args, **kwargs)

    monkeypatch.setattr(trainer, "_train_step", step_then_signal)
    monkeypatch.setattr(ckpt, "save_file", save_file_during_a_second_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert info.value.code == 128 + signal.SIGUSR1 and info.value.step == 3
    assert info.value.checkpoint == tmp_path / "run" / "checkpoints" / "step_00000003"
    verify_checkpoint(info.value.checkpoint)
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are given back


def test_resume_keeps_the_good_checkpoints_when_a_newer_one_is_bad(tmp_path, make_cfg):
    run = tmp_path / "run"
    base = {"train.checkpoint_every": 2, "train.eval_every": 0}
    train(make_cfg(**base, **{"train.max_steps": 6, "train.keep_checkpoints": 0}), run, progress=False)
    junk = run / "checkpoints" / "step_99999999"
    junk.mkdir()
    (junk / "checkpoint.json").write_text("not json")
    with pytest.warns(UserWarning, match="moved it to .*step_99999999.corrupt"):
        train(make_cfg(**base, **{"train.max_steps": 8, "train.keep_checkpoints": 2}), run, resume=True,
              progress=False)
    assert [p.name for p in list_checkpoints(run)] == ["step_00000006", "step_00000008"]
    assert (run / "checkpoints" / "step_99999999.corrupt" / "checkpoint.json").read_text() == "not json"


def test_a_checkpoint_skipped_on_resume_is_kept_not_overwritten(tmp_path, make_cfg):
    run = tmp_path / "run"
    cfg = make_cfg(**{"train.max_steps": 8, "train.eval_every": 0})
    train(cfg, run, progress=False)
    newest = list_checkpoints(run)[-1]
    (newest / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="skipping a bad checkpoint.*moved it to .*step_00000008.corrupt"):
        train(cfg, run, resume=True, progress=False)
    assert (run / "checkpoints" / "step_00000008.corrupt" / "trainer_state.pt").read_bytes() == b"garbage"
    verify_checkpoint(newest)  # the resumed run's own step 8


def test_disk_full_while_saving_is_one_line_from_the_cli(tmp_path, cache_dir, monkeypatch, capsys):
    import aoe.io.checkpoint as ckpt
    from aoe.cli import main

    real = ckpt.save_file

    def save_file(state, filename, metadata=None):  # the disk fills up during the second checkpoint
        if (Path(filename).parent.name).startswith(".tmp-step_00000008"):
            Path(filename).write_bytes(b"\0" * 64)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(state, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    run = tmp_path / "run"
    args = tiny_overrides(cache_dir, **{"train.max_steps": 8, "train.eval_every": 0})
    assert main(["train", "--quiet", "--out", str(run), *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    good = run / "checkpoints" / "step_00000004"
    assert line.startswith("error: no space left on device while writing ") and "step_00000008" in line
    assert f"the newest good checkpoint is {str(good)!r}" in line and "--resume" in line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000004"]  # no temporary left
    verify_checkpoint(good)


def test_disk_full_while_logging_names_the_metrics_file(tmp_path, make_cfg, monkeypatch):
    from aoe.train.metrics import MetricsLogger

    real = MetricsLogger.log

    def log(self, entry):
        if entry["step"] == 6:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, entry)

    monkeypatch.setattr(MetricsLogger, "log", log)
    run = tmp_path / "run"
    with pytest.raises(TrainingWriteError, match="no space left on device while writing .*metrics.jsonl.*"
                                                 "the newest good checkpoint is .*step_00000004.*--resume"):
        train(make_cfg(**{"train.eval_every": 0}), run, progress=False)


def test_skipped_steps_are_reported(tmp_path, cache_dir, capsys):
    from aoe.cli import main

    args = tiny_overrides(cache_dir, **{"train.lr": 1e30, "train.warmup_steps": 0, "train.nan_policy": "skip",
                                        "train.max_steps": 6, "train.checkpoint_every": 0, "train.eval_every": 0})
    assert main(["train", "--quiet", "--out", str(tmp_path / "run"), *args]) == 0
    out = capsys.readouterr()
    assert "5 of the 6 steps were skipped" in out.err
    assert "trained 6 steps (5 skipped as non-finite, train.nan_policy=skip)" in out.out


def test_stop_signals_come_from_the_config(make_cfg, tmp_path):
    import signal

    from aoe.train.trainer import Trainer

    assert Trainer(make_cfg(), tmp_path / "a", progress=False).stop_signals.signums == (signal.SIGTERM, signal.SIGUSR1)
    cfg = make_cfg(**{"train.stop_signals": "[SIGUSR2]"})
    assert Trainer(cfg, tmp_path / "b", progress=False).stop_signals.signums == (signal.SIGUSR2,)
    assert Trainer(make_cfg(**{"train.stop_signals": "[]"}), tmp_path / "c", progress=False).stop_signals.signums == ()


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


def test_a_run_started_with_the_authors_gate_init_resumes_under_the_new_default(tmp_path, make_cfg):
    """gate_init only decides how a new model starts: a run started with "normal" resumes from a
    config that does not say it (today's default "balanced") and keeps saying "normal"."""
    from aoe.io.checkpoint import load_run_config

    old = make_cfg(**{"train.max_steps": 8, "model.ffn": "aoe", "model.gate_init": "normal"})
    train(old, tmp_path / "full", progress=False)
    train(old, tmp_path / "cut", progress=False)
    shutil.rmtree(list_checkpoints(tmp_path / "cut")[-1])  # as if stopped after the step-4 checkpoint
    now = make_cfg(**{"train.max_steps": 8, "model.ffn": "aoe"})
    assert now.model.gate_init == "balanced"
    Trainer(now, tmp_path / "cut", resume=True, progress=False).fit()
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")
    assert load_run_config(list_checkpoints(tmp_path / "cut")[-1]).model.gate_init == "normal"


def test_async_checkpoints_in_one_process_hold_the_synchronous_state_and_resume(tmp_path, make_cfg):
    """train.async_checkpoint in the one-process format: the same losses, every checkpoint's
    tensors (weights, AdamW moments, RNG) equal to the synchronous run's, retention as usual,
    and its step-8 checkpoint resumes with the same losses."""
    from safetensors.torch import load_file

    base = {"train.max_steps": 12, "train.keep_checkpoints": 2, "train.eval_every": 0}
    train(make_cfg(**base), tmp_path / "sync", progress=False)
    train(make_cfg(**base, **{"train.async_checkpoint": True}), tmp_path / "async", progress=False)
    assert _losses(tmp_path / "async") == _losses(tmp_path / "sync")
    names = [p.name for p in list_checkpoints(tmp_path / "async")]
    assert names == ["step_00000008", "step_00000012"] == [p.name for p in list_checkpoints(tmp_path / "sync")]
    for name in names:
        a, b = tmp_path / "async" / "checkpoints" / name, tmp_path / "sync" / "checkpoints" / name
        verify_checkpoint(a)
        wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wb), name
        sa, sb = load_trainer_state(a), load_trainer_state(b)
        assert torch.equal(sa["rng"]["cpu"], sb["rng"]["cpu"]) and sa["sampler"] == sb["sampler"], name
        for moments_a, moments_b in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
            assert all(torch.equal(moments_a[k], moments_b[k]) for k in moments_b), name
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "async", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000012")
    train(make_cfg(**base, **{"train.async_checkpoint": True}), resumed, resume=True, progress=False)
    assert _losses(resumed) == _losses(tmp_path / "sync")


def test_a_stop_on_nan_names_the_checkpoint_a_background_save_was_writing(tmp_path, make_cfg, monkeypatch):
    """The step-4 save is still being written (held) when step 5's loss is NaN: the run waits for
    it, so the message names step 4 and step 4 verifies."""
    release, run = tmp_path / "release", tmp_path / "run"
    monkeypatch.setenv("AOE_DEBUG_NONFINITE", "0:5")
    monkeypatch.setenv("AOE_DEBUG_HOLD_CHECKPOINT", f"4:{release}")
    cfg = make_cfg(**{"train.checkpoint_every": 2, "train.eval_every": 0, "train.async_checkpoint": True,
                      "train.checkpoint_format": "sharded"})
    real = Trainer._non_finite

    def release_then_report(self, *args):  # the held write goes on only once step 5 has failed
        assert not (run / "checkpoints" / "step_00000004").exists()
        release.touch()
        return real(self, *args)

    monkeypatch.setattr(Trainer, "_non_finite", release_then_report)
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step 5.*the newest good checkpoint is "
                                            r"'.*step_00000004'"):
        train(cfg, run, progress=False)
    verify_checkpoint(run / "checkpoints" / "step_00000004")


def test_a_run_ending_on_an_error_still_completes_the_save_in_flight(tmp_path, make_cfg, monkeypatch):
    """A step fails (here: raises) while the step-4 save is being written: the error propagates
    once that write has finished, so step 4 is in place and verifies."""
    release, run = tmp_path / "release", tmp_path / "run"
    monkeypatch.setenv("AOE_DEBUG_HOLD_CHECKPOINT", f"4:{release}")
    cfg = make_cfg(**{"train.checkpoint_every": 2, "train.eval_every": 0, "train.async_checkpoint": True,
                      "train.checkpoint_format": "sharded"})
    trainer = Trainer(cfg, run, progress=False)
    real = trainer._train_step

    def fail_at_step_5(collect_routing):
        if trainer.state.step == 4:
            assert not (run / "checkpoints" / "step_00000004").exists()  # still being written
            release.touch()
            raise RuntimeError("a step failed")
        return real(collect_routing)

    monkeypatch.setattr(trainer, "_train_step", fail_at_step_5)
    with pytest.raises(RuntimeError, match="a step failed"):
        trainer.fit()
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002", "step_00000004"]
    verify_checkpoint(run / "checkpoints" / "step_00000004")
