"""What a training run may write in its ``--out`` directory, and what it must leave alone.

The trainer writes ``config.yaml`` (the resolved config), ``metrics.jsonl`` and ``summary.json``.
A file there that the trainer did not write is the user's: it is never overwritten or appended to.

- ``config.yaml`` written by the trainer starts with ``CONFIG_MARKER``. One without it (the user's
  own config kept in the run directory, say) is left as it is and the resolved config goes beside
  it, to ``config.resolved.yaml``. A ``config.yaml`` identical to the newest checkpoint's copy
  (what earlier versions wrote, without the marker) counts as the trainer's.
- A new run (no ``--resume``) refuses a directory that already holds ``metrics.jsonl`` or
  ``summary.json`` but no checkpoint, unless told to restart (the comparison runner, which owns
  its run directories, restarts a run that stopped before its first checkpoint).
"""

from __future__ import annotations

import sys
from pathlib import Path

from aoe.config import ConfigError, RunConfig
from aoe.config.files import config_yaml
from aoe.utils.files import atomic_write_text

CONFIG_MARKER = "# The resolved config of this run, written by aoe train (replaced on --resume; edit a copy)."
CONFIG_FILE = "config.yaml"
RESOLVED_CONFIG_FILE = "config.resolved.yaml"
LOG_FILES = ("metrics.jsonl", "summary.json")


def _written_by_trainer(file: Path, checkpoint: Path | None) -> bool:
    """Whether ``file`` is a run config the trainer wrote (marked, or a copy of the checkpoint's)."""
    text = file.read_text(encoding="utf-8", errors="replace")
    if text.startswith(CONFIG_MARKER + "\n"):
        return True
    saved = checkpoint / CONFIG_FILE if checkpoint is not None else None
    return saved is not None and saved.is_file() and saved.read_text(encoding="utf-8", errors="replace") == text


def run_config_file(out_dir: Path, checkpoint: Path | None = None) -> Path:
    """Where this run's resolved config goes: ``config.yaml`` unless a file of the user's holds
    that name, then ``config.resolved.yaml`` (refused if that one is the user's too)."""
    for name in (CONFIG_FILE, RESOLVED_CONFIG_FILE):
        file = out_dir / name
        if not file.exists() or _written_by_trainer(file, checkpoint):
            return file
    raise ConfigError(f"{str(out_dir)!r} holds a {CONFIG_FILE} and a {RESOLVED_CONFIG_FILE} that aoe train did not "
                      "write: move one of them, or choose another --out (nothing was overwritten)")


def write_run_config(cfg: RunConfig, out_dir: Path, checkpoint: Path | None = None) -> Path:
    """Write the resolved config atomically where ``run_config_file`` says, saying so on stderr
    when it is not ``config.yaml``; returns the file."""
    file = run_config_file(out_dir, checkpoint)
    if file.name != CONFIG_FILE:
        print(f"note: {str(out_dir / CONFIG_FILE)!r} was not written by aoe train (your own config?): left as it is; "
              f"the resolved config of this run is in {str(file)!r}", file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(file, CONFIG_MARKER + "\n" + config_yaml(cfg))
    return file


def check_new_run(out_dir: Path, restart: bool = False) -> None:
    """A new run in ``out_dir`` (which holds no checkpoint): refuse when it holds ``metrics.jsonl``
    or ``summary.json`` (an earlier start, or files of the user's); with ``restart``, remove them."""
    found = [out_dir / name for name in LOG_FILES if (out_dir / name).exists()]
    if not found:
        return
    if restart:
        for file in found:
            file.unlink()
        return
    names = ", ".join(f.name for f in found)
    raise ConfigError(f"{str(out_dir)!r} already holds {names} but no checkpoint (a run stopped before its first "
                      "checkpoint, or files of your own): move or delete them to start this run there, or choose "
                      "another --out (nothing was overwritten)")
