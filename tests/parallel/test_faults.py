"""Faults of a multi-process run, with real processes (gloo on 127.0.0.1): a rank killed with SIGKILL
is named by the others, which exit with status 75 within the timeout, and ``--resume`` continues
from the newest good checkpoint with the uninterrupted run's losses; a non-finite loss on one rank
stops (or skips the step on) every rank after the same step, naming that rank. A frozen rank
(SIGSTOP: no collective fails, as with NCCL) is named by its heartbeat alone, after the timeout.

The ranks are started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT: rank 0 hosts
the rendezvous store) and, in the slow test, by torchrun itself (its agent hosts the store and
sends SIGTERM to the survivors).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from aoe.train import list_checkpoints, read_metrics, verify_checkpoint
from aoe.train.watchdog import PEER_LOST_EXIT, Watchdog
from helpers.processes import free_port, torchrun_env
from helpers.tiny_runs import PYTHON, cli_env, tiny_overrides


CLI_TRAIN = [PYTHON, "-m", "aoe.cli", "train", "--quiet"]
TIMEOUT_S = 5  # train.dist_timeout_s of these runs
SLACK_S = 15  # process teardown on a busy two-core machine
STEPS = 40


def _losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_metrics(run_dir / "metrics.jsonl") if "loss" in e}


def _args(cache_dir: Path, **extra) -> list[str]:
    return tiny_overrides(cache_dir, **{"train.max_steps": STEPS, "train.checkpoint_every": 5, "train.eval_every": 0,
                                        "train.keep_checkpoints": 0, "train.dist_timeout_s": TIMEOUT_S, **extra})


def _start_ranks(out: Path, args: list[str], world: int = 2, env: dict | None = None) -> list[subprocess.Popen]:
    port, procs = free_port(), []
    for rank in range(world):  # the environment torchrun gives its workers
        rank_env = {**cli_env(), **(env or {}), **torchrun_env(rank, world, port)}
        procs.append(subprocess.Popen([*CLI_TRAIN, "--out", str(out), *args], env=rank_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {step}: {proc.stderr.read()[-2000:]}")
        if metrics.is_file() and any(e.get("step", 0) >= step for e in read_metrics(metrics)):
            return
        time.sleep(0.005)
    raise AssertionError(f"no step {step} within {timeout} s")


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Every process's stderr once it ended (killing what is left after ``timeout``)."""
    try:
        return [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    """The losses of the uninterrupted two-rank run."""
    out = tmp_path_factory.mktemp("faults") / "whole"
    procs = _start_ranks(out, _args(cache_dir))
    errs = _finish(procs, 300)
    assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    return _losses(out)


def _same_losses(got: dict[int, float], want: dict[int, float], what: str) -> None:
    assert sorted(got) == sorted(want), what
    for step, b in want.items():
        assert abs(got[step] - b) <= 1e-5 * abs(b), f"{what} step {step}: {got[step]} != {b}"


def _killed_and_resumed(tmp_path: Path, cache_dir: Path, victim: int) -> tuple[str, float, Path]:
    """Two ranks; SIGKILL ``victim`` after step 7; the survivor's stderr, seconds from the kill to
    its exit, the run directory (checked: exit 75, only complete checkpoints)."""
    out = tmp_path / "run"
    procs = _start_ranks(out, _args(cache_dir))
    try:
        _wait_for_step(out / "metrics.jsonl", 7, procs[0])
        killed = time.monotonic()
        procs[victim].send_signal(signal.SIGKILL)
        survivor = procs[1 - victim]
        err = _finish([survivor], TIMEOUT_S + SLACK_S)[0]
        took = time.monotonic() - killed
    finally:
        _finish(procs, 5)
    assert survivor.returncode == PEER_LOST_EXIT, err[-3000:]
    assert max(_losses(out)) < STEPS, "the run finished before a rank could be killed"
    for c in list_checkpoints(out):
        verify_checkpoint(c)  # nothing half-written counts as a checkpoint
    return err, took, out


@pytest.mark.slow  # several processes start (seconds each on two busy cores)
def test_a_killed_rank_is_named_and_resume_continues_with_the_same_losses(tmp_path, cache_dir, uninterrupted):
    err, took, out = _killed_and_resumed(tmp_path, cache_dir, victim=1)
    assert took < TIMEOUT_S + SLACK_S
    newest = list_checkpoints(out)[-1]
    line = next(l for l in err.splitlines() if "stopped responding" in l)
    assert line.startswith("rank 1 stopped responding (last heartbeat at step ")
    assert f"the newest good checkpoint is {str(newest)!r}; continue with --resume (exit code 75)" in line
    resumed = _start_ranks(out, ["--resume", *_args(cache_dir)])
    errs = _finish(resumed, 300)
    assert [p.returncode for p in resumed] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    _same_losses(_losses(out), uninterrupted, "2 ranks, rank 1 killed, resumed by 2 ranks")


@pytest.mark.slow
def test_a_killed_store_host_is_named_as_such(tmp_path, cache_dir):
    err, took, _ = _killed_and_resumed(tmp_path, cache_dir, victim=0)
    assert took < TIMEOUT_S + SLACK_S
    # after the other tests of this file (a loaded machine) rank 1 has at times read none of rank
    # 0's heartbeats before rank 0 died ("no heartbeat yet"): the verdict must name rank 0 either way
    assert ("rank 0 stopped responding (last heartbeat at step " in err
            or "rank 0 stopped responding (no heartbeat yet, " in err)
    assert "it hosted the rendezvous store at 127.0.0.1:" in err and "--resume" in err


@pytest.mark.slow
def test_a_frozen_rank_is_named_after_the_timeout(tmp_path, cache_dir):
    """SIGSTOP: the rank is silent but its sockets stay open, so no collective fails (what a dead
    peer looks like to NCCL): the heartbeat alone names it, after train.dist_timeout_s."""
    out = tmp_path / "run"
    procs = _start_ranks(out, _args(cache_dir))
    try:
        _wait_for_step(out / "metrics.jsonl", 7, procs[0])
        stopped = time.monotonic()
        procs[1].send_signal(signal.SIGSTOP)
        err = _finish([procs[0]], TIMEOUT_S + SLACK_S)[0]
        took = time.monotonic() - stopped
    finally:
        procs[1].send_signal(signal.SIGKILL)
        _finish(procs, 5)
    assert procs[0].returncode == PEER_LOST_EXIT, err[-3000:]
    assert TIMEOUT_S - 1.5 < took < TIMEOUT_S + SLACK_S  # the heartbeat may be up to 1 s older than the stop
    assert "rank 1 stopped responding (last heartbeat at step " in err and "--resume" in err


def _worker_pid(launcher: subprocess.Popen, rank: int, timeout: float = 60) -> int:
    """The pid of torchrun's worker of ``rank`` (Linux: read from /proc)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for task in Path(f"/proc/{launcher.pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                if f"RANK={rank}".encode() in environ:
                    return int(child)
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank} under torchrun")


@pytest.mark.slow
def test_a_killed_rank_under_torchrun_is_named_with_the_default_timeout(tmp_path, cache_dir):
    """torchrun's agent sends SIGTERM to the survivor at once; it still names the dead rank (the
    failed collective makes the watchdog judge within seconds, not the 300 s default) and exits 75."""
    out = tmp_path / "run"
    args = [a for a in _args(cache_dir) if not a.startswith("train.dist_timeout_s")]
    launcher = subprocess.Popen([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                 "-m", "aoe.cli", "train", "--quiet", "--out", str(out), *args],
                                env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim = _worker_pid(launcher, 1)
        _wait_for_step(out / "metrics.jsonl", 7, launcher)
        killed = time.monotonic()
        subprocess.run(["kill", "-KILL", str(victim)], check=True)
        err = _finish([launcher], 60)[0]
        took = time.monotonic() - killed
    finally:
        _finish([launcher], 5)
    assert launcher.returncode != 0
    assert "rank 1 stopped responding (last heartbeat at step " in err, err[-3000:]
    assert f"exitcode  : {PEER_LOST_EXIT}" in err and took < 30  # before the agent's SIGKILL
    assert max(_losses(out)) < STEPS


@pytest.mark.slow  # several processes start (seconds each on two busy cores)
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_non_finite_loss_on_one_rank_stops_or_skips_on_every_rank(tmp_path, cache_dir, policy):
    out = tmp_path / policy
    args = _args(cache_dir, **{"train.max_steps": 6, "train.nan_policy": policy})
    procs = _start_ranks(out, args, env={"AOE_DEBUG_NONFINITE": "1:3"})  # rank 1's loss is NaN at step 3
    errs = _finish(procs, 120)
    seen = "non-finite loss or gradient at step 3 (loss=nan, grad_norm=nan; the loss was non-finite on rank 1)"
    for rank, (proc, err) in enumerate(zip(procs, errs)):
        assert seen in err, f"rank {rank}: {err[-2000:]}"
        assert proc.returncode == (2 if policy == "stop" else 0), f"rank {rank}: {err[-2000:]}"
    if policy == "stop":  # both stopped after step 2: no later step logged or saved
        assert max(_losses(out)) == 2
        assert [c.name for c in list_checkpoints(out)] == []
        return
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and sorted(_losses(out)) == list(range(1, 7))


# -- the watchdog's judgement, without processes ----------------------------------------------------
def _watchdog(world: int = 3) -> Watchdog:
    dog = Watchdog(rank=0, world=world, timeout_s=10, host="127.0.0.1", port=1, hosts_store=True)
    dog._seen = {r: (None, 0.0) for r in range(1, world)}  # what start() sets, at time 0
    return dog


def test_a_peer_is_dead_only_after_the_timeout_without_a_new_heartbeat():
    dog = _watchdog()
    assert dog.verdict({1: "1 0 alive", 2: "1 0 alive"}, now=1.0) is None
    assert dog.verdict({1: "2 4 alive", 2: "1 0 alive"}, now=9.0) is None
    assert dog.verdict({1: "3 5 alive", 2: "1 0 alive"}, now=10.9) is None  # rank 2's beat came at 1.0
    assert dog.verdict({1: "4 5 alive", 2: "1 0 alive"}, now=11.2) == \
        "rank 2 stopped responding (last heartbeat at step 0, 10 s ago)"
    assert dog.verdict({1: "5 6 alive", 2: "2 1 alive"}, now=11.5) is None  # it beat again


def test_after_a_failed_collective_a_silent_or_departed_peer_is_named_at_once():
    dog = _watchdog()
    dog.verdict({1: "1 3 alive", 2: "1 3 alive"}, now=1.0)
    dog._suspect.set()
    assert dog.verdict({1: "2 3 alive", 2: "1 3 alive"}, now=4.0) is None  # 3 s < 5 periods of 1 s
    assert dog.verdict({1: "3 3 alive", 2: "1 3 alive"}, now=6.5) == \
        "rank 2 stopped responding (last heartbeat at step 3, 6 s ago)"
    dog = _watchdog()
    assert dog.verdict({1: "1 3 done", 2: "1 3 alive"}, now=1.0) is None  # left when it finished: not an error
    dog._suspect.set()
    assert dog.verdict({1: "1 3 done", 2: "2 3 alive"}, now=1.5) == "rank 1 left the run after step 3: it finished"


def test_a_store_host_that_is_gone_is_said():
    dog = _watchdog(world=2)
    assert dog.verdict({1: None}, now=11.0) == "rank 1 stopped responding (no heartbeat yet, 11 s ago)"
    dog = Watchdog(rank=1, world=2, timeout_s=10, host="10.0.0.1", port=29500, hosts_store=True)
    dog._seen = {0: ("7 12 alive", 0.0)}
    assert dog.verdict({0: None}, now=11.0) == ("rank 0 stopped responding (last heartbeat at step 12, 11 s ago; it "
                                                "hosted the rendezvous store at 10.0.0.1:29500, which is gone)")


def test_the_debug_variable_is_checked(monkeypatch):
    from aoe.config import ConfigError
    from aoe.train.build import debug_nonfinite_steps as _debug_nonfinite_steps

    monkeypatch.setenv("AOE_DEBUG_NONFINITE", "1:3, 0:5")
    assert _debug_nonfinite_steps() == {(1, 3), (0, 5)}
    monkeypatch.setenv("AOE_DEBUG_NONFINITE", "rank1")
    with pytest.raises(ConfigError, match="AOE_DEBUG_NONFINITE='rank1': expected RANK:STEP"):
        _debug_nonfinite_steps()
    monkeypatch.delenv("AOE_DEBUG_NONFINITE")
    assert _debug_nonfinite_steps() == set()


_SLOW_STORE_EXIT = """
import sys, time
from datetime import timedelta
import torch.distributed as dist
from aoe.train.watchdog import Watchdog

host = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
dog = Watchdog(rank=0, world=3, timeout_s=1, host="127.0.0.1", port=host.port).start()

def slow_read():  # each peer's two reads taking nearly the store's timeout, inside the C++ call
    for _ in range(2 * len(dog._seen)):
        try:
            dog._store.wait(["aoe/never"], timedelta(seconds=0.9))  # its timeout: 1 s
        except Exception:
            pass
    return dict.fromkeys(dog._seen)

dog._read = slow_read
time.sleep(2 * dog.period)  # the thread is in its first slow round
dog.stop("done")
print("alive" if dog._thread.is_alive() else "stopped", flush=True)
"""


def test_stop_waits_for_a_round_of_slow_store_calls_so_the_exit_cannot_abort():
    """A daemon thread still inside a store call when the interpreter exits aborts the process
    (SIGABRT): ``stop`` waits for the whole round, however slow its store calls are."""
    proc = subprocess.run([PYTHON, "-c", _SLOW_STORE_EXIT], env=cli_env(), capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout.strip()) == (0, "stopped"), proc.stderr[-2000:]
