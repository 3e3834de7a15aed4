"""Checkpoint writes in the background: one at a time, in a thread, over a CPU copy of the state.

A save in the background has two halves. The first runs where the save is asked for: the checks
(no NaN or inf), the gather or the shards, the temporary directory, and ``snapshot``, a copy of
every tensor of the state in CPU memory (DCP's ``DefaultStager``: a DTensor keeps its mesh and
placement around a local copy; tensors that share storage still share it), so that training may
change the originals. The second half, the write itself (files, hashes, ``checkpoint.json``, the
rename into place, retention), is the same code a synchronous save runs; ``BackgroundWrite``
runs it in a daemon thread and hands back its value or its error. The caller
(``aoe.train.run_state``) waits for one write before it starts the next, and the ranks agree on
its outcome then. A process killed mid-write leaves a ``.tmp-*`` directory, which no reader
counts and the next save removes.

Test hook: the environment variable ``AOE_DEBUG_HOLD_CHECKPOINT="STEP:PATH"`` makes the write of
the sharded checkpoint of step STEP wait, once its shards are written and before its rank files
and ``checkpoint.json``, until the file PATH exists; tests hold a save in flight with it (never
set it in a real run).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from aoe.config import ConfigError

HOLD_ENV = "AOE_DEBUG_HOLD_CHECKPOINT"


def snapshot(state: Any) -> Any:
    """A copy of ``state`` (nested dicts, lists, tuples) with every tensor copied to CPU memory."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False, use_async_staging=False,
                                          use_non_blocking_copy=False))
    try:
        return stager.stage(state)
    finally:
        stager.close()


class BackgroundWrite:
    """``write()`` running in a daemon thread from construction on; ``wait()`` -> (its value, the
    exception it raised, or None). A daemon, so that a process that ends on an error is not kept
    alive by a write: a cut write leaves only its temporary directory."""

    def __init__(self, step: int, write: Callable[[], Path | None]):
        self.step = step
        self._value: Path | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(write,), name=f"aoe-checkpoint-{step}", daemon=True)
        self._thread.start()

    def _run(self, write: Callable[[], Path | None]) -> None:
        try:
            self._value = write()
        except BaseException as e:  # handed to the thread that waits, whatever it is
            self._error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> tuple[Path | None, BaseException | None]:
        """Block until the write has ended (again and again: the same answer)."""
        self._thread.join()
        return self._value, self._error


def held_step() -> tuple[int, Path] | None:
    """(STEP, PATH) of ``AOE_DEBUG_HOLD_CHECKPOINT`` (None when unset); ConfigError when malformed."""
    text = os.environ.get(HOLD_ENV, "").strip()
    if not text:
        return None
    step, sep, path = text.partition(":")
    if not (sep and path and step.strip().isdigit()):
        raise ConfigError(f"{HOLD_ENV}={text!r}: expected STEP:PATH (e.g. 4:/tmp/release), or unset it")
    return int(step), Path(path)


def hold_for_tests(step: int) -> None:
    """Wait here while ``AOE_DEBUG_HOLD_CHECKPOINT`` holds the write of ``step`` and its file is missing."""
    held = held_step()
    if held is None or held[0] != step:
        return
    while not held[1].exists():
        time.sleep(0.01)
