"""Sharded checkpoints (torch.distributed.checkpoint) with real processes (gloo on CPU).

A run under FSDP on 2 ranks writes sharded checkpoints (each rank its shards, no model.safetensors);
its step-2 checkpoint resumes in one process and under expert parallelism on 2 ranks with the
uninterrupted one-process run's losses (rel 1e-5); ``aoe eval`` reads it in one process and its
weights are the one-process run's; ``aoe checkpoint consolidate`` writes the one-process format,
which resumes too; a damaged or half-written sharded checkpoint is refused naming its file, and the
newest good one is used instead.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from helpers.processes import spawn
from .runs import close, copy_until, losses, resume_worker, same_losses, trainer_worker, weights


STEP2, STEP4 = "checkpoints/step_00000002", "checkpoints/step_00000004"


@pytest.fixture(scope="module")
def fsdp_run(single_run, tmp_path_factory):
    overrides, single = single_run
    run = tmp_path_factory.mktemp("sharded") / "fsdp2"
    spawn(trainer_worker, 2, [*overrides, "train.fsdp=true"], str(run), None)
    return overrides, single, run


def _same_weights(got: dict, want: dict, what: str, tol: float = 1e-5) -> None:
    assert got.keys() == want.keys(), what
    for name, b in want.items():
        assert got[name].shape == b.shape, f"{what} {name}"
        close(got[name], b, tol, f"{what} {name}")


@pytest.mark.slow
def test_an_fsdp_checkpoint_resumes_in_one_process_and_under_expert_parallelism(fsdp_run, tmp_path):
    from aoe.config import load_config
    from aoe.io.checkpoint import verify_checkpoint
    from aoe.train.trainer import Trainer

    overrides, single, run = fsdp_run
    want = losses(single)
    same_losses(losses(run), want, "FSDP, 2 ranks")
    meta = verify_checkpoint(run / STEP2)
    assert (meta["layout"], meta["world_size"]) == ("sharded", 2)
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "rank_00000.pt", "rank_00001.pt"} <= set(meta["files"])
    assert not (run / STEP2 / "model.safetensors").exists()

    one = copy_until(run, tmp_path / "fsdp2_then_one", 2)
    torch.set_num_threads(1)
    Trainer(load_config("tiny", overrides), one, resume=True, progress=False).fit()
    same_losses(losses(one), want, "FSDP=2 sharded checkpoint resumed in one process")

    ep = copy_until(run, tmp_path / "fsdp2_then_ep2", 2)
    spawn(resume_worker, 2, [*overrides, "train.expert_parallel=2"], str(ep))
    same_losses(losses(ep), want, "FSDP=2 sharded checkpoint resumed under EP=2")
    assert json.loads((ep / STEP4 / "checkpoint.json").read_text())["layout"] == "sharded"  # EP's own shards
    # EP's expert slices were saved as the full [E, ...] tensors: one process reads them back.
    # 1e-4: the layouts sum gradients in other orders and AdamW magnifies it (see test_expert_parallel)
    _same_weights(weights(ep / STEP4), weights(single / STEP4), "FSDP=2 -> EP=2 weights", tol=1e-4)


@pytest.mark.slow
def test_eval_and_consolidate_read_a_sharded_checkpoint_in_one_process(fsdp_run, tmp_path, capsys):
    from aoe.cli import main
    from aoe.config import load_config
    from aoe.io.checkpoint import CheckpointError, verify_checkpoint
    from aoe.train.consolidate import consolidate
    from aoe.train.trainer import Trainer

    overrides, single, run = fsdp_run
    _same_weights(weights(run / STEP4), weights(single / STEP4), "FSDP=2 sharded weights")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no DCP warning about loading without a group
        assert main(["eval", str(run), "--max-batches", "2"]) == 0
    assert "val loss" in capsys.readouterr().out

    out = tmp_path / "consolidated"
    assert main(["checkpoint", "consolidate", str(run / STEP2), str(out)]) == 0
    full = out / STEP2
    assert verify_checkpoint(full).get("layout") is None and (full / "model.safetensors").is_file()
    assert all(torch.equal(a, b) for a, b in zip(weights(full).values(), weights(run / STEP2).values()))
    torch.set_num_threads(1)
    Trainer(load_config("tiny", overrides), out, resume=True, progress=False).fit()
    same_losses(losses(out), {s: v for s, v in losses(single).items() if s > 2}, "consolidated, resumed")

    with pytest.raises(CheckpointError, match=r"already in the one-process format"):
        consolidate(full, tmp_path / "again")
    assert main(["checkpoint", "consolidate", str(run), str(out)]) == 2  # holds checkpoints: refused
    assert "already holds checkpoints" in capsys.readouterr().err


@pytest.mark.slow
def test_a_damaged_or_half_written_sharded_checkpoint_is_refused_by_name(fsdp_run, tmp_path):
    from aoe.io.checkpoint import (
        CheckpointError, find_latest_checkpoint, list_checkpoints, prune_checkpoints, verify_checkpoint,
    )

    run = tmp_path / "run"
    shutil.copytree(fsdp_run[2], run)
    half = run / "checkpoints" / ".tmp-step_00000006-0123abcd"  # a save cut short: shards, no checkpoint.json
    shutil.copytree(run / STEP4, half)
    (half / "checkpoint.json").unlink()
    shard = run / STEP4 / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=rf"{shard}' is \d+ bytes, expected \d+ \(truncated\?\)"):
        verify_checkpoint(run / STEP4)
    with pytest.warns(UserWarning, match=r"__1_0\.distcp"):
        assert find_latest_checkpoint(run) == run / STEP2
    with pytest.warns(UserWarning, match=r"moved it to .*step_00000004\.corrupt"):
        prune_checkpoints(run, 1)  # retention counts verified checkpoints only: step 2 stays
    assert list_checkpoints(run) == [run / STEP2]
    (run / STEP2 / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"step_00000002/\.metadata' is missing"):
        verify_checkpoint(run / STEP2)


def test_the_checkpoint_format_is_one_of_three(make_cfg):
    from aoe.config import ConfigError

    for fmt in ("auto", "full", "sharded"):
        assert make_cfg(**{"train.checkpoint_format": fmt}).train.checkpoint_format == fmt
    with pytest.raises(ConfigError, match=r"train.checkpoint_format"):
        make_cfg(**{"train.checkpoint_format": "zip"})


def test_one_process_writes_and_resumes_the_sharded_format_too(single_run, tmp_path):
    """train.checkpoint_format=sharded without a process group: DCP alone, the same losses exactly."""
    from aoe.config import load_config
    from aoe.train.trainer import Trainer

    overrides, single = single_run
    run = tmp_path / "one"
    torch.set_num_threads(1)
    Trainer(load_config("tiny", [*overrides, "train.checkpoint_format=sharded"]), run, progress=False).fit()
    assert json.loads((run / STEP2 / "checkpoint.json").read_text())["world_size"] == 1
    assert losses(run) == losses(single)
    resumed = copy_until(run, tmp_path / "resumed", 2)
    Trainer(load_config("tiny", overrides), resumed, resume=True, progress=False).fit()
    assert losses(resumed) == losses(single)
