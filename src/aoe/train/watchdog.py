"""Noticing a rank that died: heartbeats in the rendezvous store, a watchdog thread on every rank.

A rank killed outright (SIGKILL, the out-of-memory killer, a lost node) runs no ``finally`` and
sends no message: the others would wait for it in their next collective (NCCL: until the
collective timeout) or fail there with a transport error that names an address, not a rank
(gloo). So every rank of a multi-process run starts a ``Watchdog`` (``init_distributed`` does):

- a daemon thread writes this rank's heartbeat ``"<beat> <step> <state>"`` into the TCP store
  the run's rendezvous made (MASTER_ADDR:MASTER_PORT: torchrun's agent, or rank 0 when the ranks
  are started without torchrun), every ``period`` = min(1 s, timeout / 10), on its own connection;
- the same thread reads every peer's heartbeat; a peer whose heartbeat has not changed for
  ``timeout`` seconds (``train.dist_timeout_s``, on this rank's own clock) has stopped responding;
- when this rank's main thread sees a collective fail (``explain``), a peer silent for 5 periods
  is judged at once (a live peer's thread keeps beating even while its main thread waits), and a
  peer that already left (its state ``done``/``error``) is named as such.

The verdict is one line on stderr::

    rank 1 stopped responding (last heartbeat at step 12, 3 s ago); the newest good checkpoint
    is '.../step_00000010'; continue with --resume

and the process ends at once (``os._exit``, after flushing) with exit status ``PEER_LOST_EXIT``
(75, EX_TEMPFAIL: "try again"): no ``finally`` runs, so nothing more is written; a checkpoint
being written is not yet renamed into place (the writer is atomic) and is ignored on resume. When
the store's host itself is gone (rank 0 without torchrun), the heartbeats cannot be read: rank 0
is then the silent one, and the line says that it hosted the store.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

PEER_LOST_EXIT = 75  # EX_TEMPFAIL: a peer is gone; continue with --resume
SUSPECT_PERIODS = 5  # after a failed collective: periods of silence that make a peer dead
_KEY = "aoe/heartbeat/{}"


class Watchdog:
    """``Watchdog(rank, world, timeout_s, host, port).start()``; ``step`` is set by the trainer after
    each step; ``resume_hint()`` says where to resume (set by the trainer); ``stop("done")`` on a
    clean end (a peer that leaves is then not mistaken for a dead one)."""

    def __init__(self, rank: int, world: int, timeout_s: float, host: str, port: int, hosts_store: bool = False):
        self.rank, self.world, self.timeout_s = rank, world, float(timeout_s)
        self.host, self.port, self.hosts_store = host, int(port), hosts_store
        self.period = min(1.0, self.timeout_s / 10)
        self.step = 0
        self.resume_hint: Callable[[], str] = lambda: "continue with --resume"
        self._suspect = threading.Event()
        self._stop = threading.Event()
        self._state = "alive"
        self._beat = 0
        self._seen: dict[int, tuple[str | None, float]] = {}  # peer -> (last value, when it changed)
        self._store: dist.TCPStore | None = None
        self._context = ""
        self._thread = threading.Thread(target=self._run, name="aoe-watchdog", daemon=True)

    # -- the thread --------------------------------------------------------------------------------
    def start(self) -> "Watchdog":
        self._store = dist.TCPStore(self.host, self.port, is_master=False, timeout=timedelta(seconds=self._store_s()),
                                    wait_for_workers=False)
        now = time.monotonic()
        self._seen = {r: (None, now) for r in range(self.world) if r != self.rank}
        self._publish()
        self._thread.start()
        return self

    def _store_s(self) -> float:
        """How long one store operation of the thread may take before it gives up."""
        return max(2 * self.period, 1.0)

    def _round_s(self) -> float:
        """The longest one round of the thread can take: the wait, its own beat, two reads a peer."""
        return self.period + (1 + 2 * len(self._seen)) * self._store_s() + 1.0

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._publish()
            verdict = self.verdict(self._read(), time.monotonic())
            if verdict is not None and not self._stop.is_set():
                self._die(verdict)

    def _publish(self) -> None:
        self._beat += 1
        try:
            self._store.set(_KEY.format(self.rank), f"{self._beat} {self.step} {self._state}")
        except Exception:  # the store is slow or gone: try again next period (a peer judges the silence)
            pass

    def _read(self) -> dict[int, str | None]:
        """Every peer's heartbeat (None: none yet, or the store could not be read this time: a
        failed read changes nothing, so only a silence of ``timeout`` seconds names a peer, and a
        store that was slow once is read again next period)."""
        values: dict[int, str | None] = dict.fromkeys(self._seen)
        for r in self._seen:
            try:
                key = _KEY.format(r)
                values[r] = self._store.get(key).decode() if self._store.check([key]) else None
            except Exception:
                break
        return values

    # -- the judgement -----------------------------------------------------------------------------
    def verdict(self, values: dict[int, str | None], now: float) -> str | None:
        """The line naming the first peer that is dead (or, after a failed collective, left), or None."""
        suspect = self._suspect.is_set()
        limit = min(self.timeout_s, SUSPECT_PERIODS * self.period) if suspect else self.timeout_s
        for r in sorted(self._seen):
            last, since = self._seen[r]
            value = values.get(r)
            if value is not None and value != last:
                self._seen[r] = last, since = value, now
            step, state = _step_state(last)
            if suspect and state in ("done", "error"):
                how = "ended with an error (its own output says which)" if state == "error" else "finished"
                return f"rank {r} left the run after step {step}: it {how}"
            if now - since > limit:
                host = (f"; it hosted the rendezvous store at {self.host}:{self.port}, which is gone"
                        if r == 0 and self.hosts_store and value is None else "")
                beat = f"last heartbeat at step {step}" if last is not None else "no heartbeat yet"
                return f"rank {r} stopped responding ({beat}, {now - since:.0f} s ago{host})"
        return None

    def explain(self, error: BaseException) -> None:
        """Called by the main thread when a collective failed: if a peer died or left, the watchdog
        thread ends this process with the line naming it (and this rank's error); else this returns
        after 8 periods (the caller re-raises)."""
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        self._context = f" [here: {type(error).__name__}: {first}]"
        self._suspect.set()
        self._thread.join(timeout=(SUSPECT_PERIODS + 3) * self.period)

    def _die(self, verdict: str) -> None:
        try:
            hint = self.resume_hint()
        except Exception as e:  # pragma: no cover - the message must still come out
            hint = f"(could not look for a checkpoint: {e}); continue with --resume"
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os.write(2, f"{verdict}{self._context}; {hint} (exit code {PEER_LOST_EXIT})\n".encode())
        os._exit(PEER_LOST_EXIT)

    def stop(self, state: str = "done") -> None:
        """Stop watching, and tell the peers this rank left on purpose (``done``) or with an ``error``."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            # to its end: a daemon thread still inside a store call when the interpreter exits
            # aborts the process (SIGABRT, "terminate called without an active exception")
            self._thread.join(timeout=self._round_s())
        self._state = state
        self._publish()


def _step_state(value: str | None) -> tuple[str, str]:
    """(step, state) of a heartbeat value ("none yet" before the first one)."""
    if value is None:
        return "none yet", "alive"
    _, step, state = value.split()
    return step, state
