"""Checkpoints written in the background (train.async_checkpoint) with real processes (gloo on CPU).

Under FSDP or expert parallelism on 2 ranks an asynchronous run logs the synchronous run's losses and writes the same
shards (the same bytes) at the same steps, and its checkpoint resumes with the uninterrupted
run's losses (rel 1e-5). SIGTERM stops a sharded run after the same step on every rank with a
checkpoint of it, also while a background save is held in flight (it is finished first). A disk
that fills during a background write stops the run at the next save, or at the end, with the
synchronous save's message, and the good checkpoint stays; a run killed mid-write loses nothing
already saved and resumes from it.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers.processes import free_port, spawn, torchrun_env
from helpers.tiny_runs import PYTHON, cli_env, tiny_overrides

from .runs import copy_until, losses, same_losses, weights


ASYNC = "train.async_checkpoint=true"
CLI_TRAIN = [PYTHON, "-m", "aoe.cli", "train", "--quiet"]


def _join_env(rank: int, world: int, port: int) -> None:
    os.environ.update(torchrun_env(rank, world, port))
    torch.set_num_threads(1)


def _plan_worker(rank: int, world: int, port: int, plan: list[tuple]) -> None:
    """Run ``plan`` in one process group: ("train", overrides, run, resume) trains (an error is
    recorded in ``run/error-rank{rank}.json`` instead of raised), ("copy", src, dst, step) copies
    a run up to a checkpoint (rank 0, then a barrier), ("full_disk", step) makes this rank's
    DCP shard file of that step's checkpoint fail to sync as on a full disk (ENOSPC)."""
    _join_env(rank, world, port)
    import torch.distributed as dist

    from aoe.config import load_config
    from aoe.train.distributed import shutdown_distributed
    from aoe.train.trainer import Trainer

    try:
        for action, *args in plan:
            if action == "train":
                overrides, run, resume = args
                try:
                    Trainer(load_config("tiny", overrides), run, resume=resume, progress=False).fit()
                except Exception as e:
                    Path(run, f"error-rank{rank}.json").write_text(json.dumps([type(e).__name__, str(e)]))
            elif action == "copy":
                if rank == 0:
                    copy_until(Path(args[0]), Path(args[1]), args[2])
                dist.barrier()
            elif action == "full_disk":
                _fill_the_disk_at(*args)
    finally:
        shutdown_distributed()


def _fill_the_disk_at(rank: int, step: int | None) -> None:
    """From now on, ``os.fsync`` of rank ``rank``'s shard file of the temporary checkpoint of
    ``step`` fails with ENOSPC (None: no more failures). DCP syncs each shard file it writes."""
    real = getattr(os.fsync, "real", os.fsync)

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if step is not None and f".tmp-step_{step:08d}" in name and name.endswith(f"__{rank}_0.distcp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    fsync.real = real
    os.fsync = fsync


def _error(run: Path, rank: int) -> tuple[str, str] | None:
    file = run / f"error-rank{rank}.json"
    return tuple(json.loads(file.read_text())) if file.is_file() else None


def _files(checkpoint: Path) -> dict[str, str]:
    from aoe.io.checkpoint import verify_checkpoint

    return {name: info["sha256"] for name, info in verify_checkpoint(checkpoint)["files"].items()}


def _no_temporary(run: Path) -> bool:
    return not list((run / "checkpoints").glob(".tmp-*"))


def test_async_checkpoint_is_validated(make_cfg, monkeypatch):
    from aoe.config import ConfigError
    from aoe.io.background import held_step

    assert make_cfg(**{"train.async_checkpoint": True}).train.async_checkpoint is True
    assert make_cfg().train.async_checkpoint is False  # the default: configs without the key load as before
    with pytest.raises(ConfigError, match=r"train.async_checkpoint=.* must be a boolean"):
        make_cfg(**{"train.async_checkpoint": "sometimes"})
    with pytest.raises(ConfigError, match=r"train.async_checkpoint=True applies with train.checkpoint_every > 0"):
        make_cfg(**{"train.async_checkpoint": True, "train.checkpoint_every": 0})
    monkeypatch.setenv("AOE_DEBUG_HOLD_CHECKPOINT", "four:/tmp/x")
    with pytest.raises(ConfigError, match=r"AOE_DEBUG_HOLD_CHECKPOINT='four:/tmp/x': expected STEP:PATH"):
        held_step()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["train.fsdp=true", "train.expert_parallel=2"])
def test_async_saves_on_two_ranks_are_the_synchronous_ones_and_resume(single_run, tmp_path, layout):
    overrides, single = single_run
    args = [*overrides, layout]
    sync, background, resumed = tmp_path / "sync", tmp_path / "async", tmp_path / "async-resumed"
    spawn(_plan_worker, 2, [("train", args, str(sync), False), ("train", [*args, ASYNC], str(background), False),
                             ("copy", str(background), str(resumed), 2),
                             ("train", [*args, ASYNC], str(resumed), True)])
    assert losses(background) == losses(sync)
    same_losses(losses(background), losses(single), f"{layout} on 2 ranks, asynchronous checkpoints")
    for step in ("checkpoints/step_00000002", "checkpoints/step_00000004"):
        got, want = _files(background / step), _files(sync / step)
        assert got.keys() == want.keys(), step
        same = [name for name in want if name.endswith(".distcp") or name.startswith("rank_")]
        assert len(same) == 4 and all(got[name] == want[name] for name in same), step  # the same bytes
        got_w, want_w = weights(background / step), weights(sync / step)
        assert got_w.keys() == want_w.keys() and all(torch.equal(got_w[k], want_w[k]) for k in want_w), step
    assert _no_temporary(background)
    same_losses(losses(resumed), losses(single), f"an asynchronous checkpoint resumed under {layout}")


@pytest.mark.slow
def test_a_full_disk_in_a_background_write_stops_the_run_as_a_synchronous_save_does(single_run, tmp_path):
    """ENOSPC in rank 1's shard of step 4: a synchronous save stops at step 4; a background one at
    the next save (step 6), or at the end when step 4 is the last; the same message, naming the
    good step 2, which stays; no temporary directory is left."""
    overrides, _ = single_run
    fsdp = [*overrides, "train.fsdp=true", "train.max_steps=6"]
    sync, later, last = tmp_path / "sync", tmp_path / "async-next-save", tmp_path / "async-at-exit"
    spawn(_plan_worker, 2, [("full_disk", 1, 4), ("train", fsdp, str(sync), False),
                             ("train", [*fsdp, ASYNC], str(later), False),
                             ("train", [*fsdp, ASYNC, "train.max_steps=4"], str(last), False),
                             ("full_disk", 1, None)])
    for rank in (0, 1):
        kind, message = _error(sync, rank)
        assert kind == "CheckpointWriteError", message
        assert message.startswith("no space left on device while writing ") and "step_00000004" in message
        assert f"the newest good checkpoint is {str(sync / 'checkpoints' / 'step_00000002')!r}" in message
        assert message.endswith("free some space, then continue with --resume")
        for run in (later, last):
            assert _error(run, rank) == (kind, message.replace(str(sync), str(run))), f"{run.name} rank {rank}"
    assert max(losses(sync)) == 4 and max(losses(later)) == 6 and max(losses(last)) == 4
    for run in (sync, later, last):
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"], run.name
        _files(run / "checkpoints" / "step_00000002")  # verifies


# -- signals and kills, through the command line (the environment torchrun gives its workers) -------------------
def _launch(out: Path, args: list[str], env: dict[str, str] | None = None, resume: bool = False) -> list:
    port, procs = free_port(), []
    for rank in (0, 1):
        rank_env = {**cli_env(), **(env or {}), **torchrun_env(rank, 2, port)}
        cmd = [*CLI_TRAIN, "--out", str(out), *(["--resume"] if resume else []), *args]
        procs.append(subprocess.Popen(cmd, env=rank_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    return procs


def _wait_for_step(metrics: Path, step: int, procs: list, timeout: float = 120) -> None:
    from aoe.train.metrics import read_metrics

    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"training ended before step {step}: {p.stderr.read().decode()[-2000:]}")
        if metrics.is_file() and any(e.get("step", 0) >= step for e in read_metrics(metrics)):
            return
        time.sleep(0.01)
    raise AssertionError(f"no step {step} within {timeout} s")


def _finish(procs: list) -> list[str]:
    try:
        return [p.communicate(timeout=120)[1].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _sigterm_run(cache_dir, tmp_path: Path, extra: dict, env: dict | None = None, release: Path | None = None):
    """Two FSDP ranks until step 5, SIGTERM to rank 1 only (then ``release`` made): (run, step
    reached, both stderrs); both ranks must have exited with 143."""
    args = tiny_overrides(cache_dir, **{"train.max_steps": 500, "train.eval_every": 0, "train.keep_checkpoints": 0,
                                        "train.fsdp": "true", **extra})
    out = tmp_path / "run"
    procs = _launch(out, args, env)
    try:
        _wait_for_step(out / "metrics.jsonl", 5, procs)
        if release is not None:  # step 5 reached while the held save of step 3 is not in place: in the background
            assert not (out / "checkpoints" / "step_00000003").exists()
        procs[1].send_signal(signal.SIGTERM)
        if release is not None:
            time.sleep(1.0)
            assert [p.poll() for p in procs] == [None, None]  # they wait for the held save to finish
            release.touch()
    finally:
        errs = _finish(procs)
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, errs[0][-2000:] + errs[1][-2000:]
    reached = max(losses(out))
    assert 5 <= reached < 500 and f"stopped by SIGTERM after step {reached} of 500" in errs[0]
    return out, reached, errs


@pytest.mark.slow
def test_sigterm_to_one_rank_saves_a_sharded_checkpoint_of_the_step_reached(cache_dir, tmp_path):
    out, reached, errs = _sigterm_run(cache_dir, tmp_path, {"train.checkpoint_every": 1000})
    saved = out / "checkpoints" / f"step_{reached:08d}"
    assert [p.name for p in (out / "checkpoints").iterdir()] == [saved.name] and str(saved) in errs[0]
    meta = json.loads((saved / "checkpoint.json").read_text())
    assert (meta["layout"], meta["world_size"], meta["step"]) == ("sharded", 2, reached)
    _files(saved)  # verifies


@pytest.mark.slow
def test_sigterm_while_a_background_save_is_in_flight_finishes_it_first(cache_dir, tmp_path):
    """The write of step 3 is held (after its shards, before checkpoint.json) until the signal
    came; the ranks wait for it, then save the step reached: both checkpoints complete."""
    release = tmp_path / "release"
    env = {"AOE_DEBUG_HOLD_CHECKPOINT": f"3:{release}"}
    out, reached, errs = _sigterm_run(cache_dir, tmp_path, {"train.checkpoint_every": 3,
                                                            "train.async_checkpoint": "true"}, env, release)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names[0] == "step_00000003" and names[-1] == f"step_{reached:08d}", names
    assert all(n.startswith("step_") for n in names) and str(out / "checkpoints" / names[-1]) in errs[0]
    for name in names:
        _files(out / "checkpoints" / name)  # every one verifies


@pytest.mark.slow
def test_a_run_killed_during_a_background_save_loses_nothing_and_resumes(single_run, cache_dir, tmp_path):
    """SIGKILL to both ranks while the write of step 4 is held: its temporary directory (DCP's
    shards and metadata, no rank files, no checkpoint.json) is ignored, step 2 is the newest checkpoint, and resuming from it logs
    the uninterrupted run's losses (rel 1e-5)."""
    from aoe.io.checkpoint import find_latest_checkpoint, list_checkpoints

    overrides, single = single_run
    args = [*overrides, "train.fsdp=true", ASYNC]
    out = tmp_path / "killed"
    procs = _launch(out, args, {"AOE_DEBUG_HOLD_CHECKPOINT": f"4:{tmp_path / 'never'}"}, resume=False)
    try:
        _wait_for_step(out / "metrics.jsonl", 4, procs)
        deadline = time.time() + 60
        while not list((out / "checkpoints").glob(".tmp-step_00000004-*/.metadata")) and time.time() < deadline:
            time.sleep(0.01)
        for p in procs:
            p.send_signal(signal.SIGKILL)
    finally:
        _finish(procs)
    [half] = (out / "checkpoints").glob(".tmp-step_00000004-*")
    assert {p.name for p in half.iterdir()} == {"__0_0.distcp", "__1_0.distcp", ".metadata"}  # DCP's, no more
    assert list_checkpoints(out) == [out / "checkpoints" / "step_00000002"] == [find_latest_checkpoint(out)]
    _files(out / "checkpoints" / "step_00000002")
    procs = _launch(out, args, resume=True)
    errs = _finish(procs)
    assert [p.returncode for p in procs] == [0, 0] and _no_temporary(out), errs[0][-2000:]
    same_losses(losses(out), losses(single), "resumed after a kill during a background save")
