"""Stopping on a signal (preemption): ``StopSignals`` records the signal while training runs, the
trainer finishes its step, saves, and raises ``TrainingInterrupted`` (exit status 128 + signal)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any


class TrainingInterrupted(SystemExit):
    """A stop signal ended training early, after a checkpoint of the step reached was saved.

    A SystemExit: uncaught, it ends the process with ``code`` = 128 + the signal's number (143 for
    SIGTERM), the status the signal itself would have given, so schedulers and scripts read it
    as "terminated", yet after the checkpoint and through every ``finally``. ``str()`` is the
    message; ``signum``, ``step`` and ``checkpoint`` (None on ranks other than 0) say where it stopped.
    """

    def __init__(self, message: str, signum: int, step: int, checkpoint: Path | None):
        super().__init__(128 + signum)
        self.message, self.signum, self.step, self.checkpoint = message, signum, step, checkpoint

    def __str__(self) -> str:
        return self.message


class StopSignals:
    """While entered (in the main thread), records the first of ``signums`` received instead of
    dying of it; the trainer acts on ``received`` at its next step boundary. Later signals (a
    second SIGTERM while the checkpoint is written) are ignored. The previous handlers are
    restored on exit."""

    def __init__(self, signums: tuple[int, ...]):
        self.signums = tuple(signums)
        self.received = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        self.received = 0
        if threading.current_thread() is threading.main_thread():
            for signum in self.signums:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def _record(self, signum: int, frame) -> None:
        if not self.received:
            self.received = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
