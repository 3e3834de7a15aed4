"""Write a directory all at once: into a temporary sibling, renamed onto the destination at the end.

A destination that holds a training run (its checkpoints, metrics) or a native checkpoint, or
that is (or contains) one of the sources being read, is never replaced, ``overwrite`` or not. A
write the system refuses (disk full...) raises ``WriteError`` naming the destination and the
cause, with the temporary directory removed and the destination untouched. What is written gets the permissions the umask gives new files
(not the private ones of a temporary directory).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from aoe.utils.files import replace_directory, reporting_write_errors, share_as_umask_allows

# What a run directory (``aoe train --out``) or a native checkpoint directory holds.
_RUN_MARKERS = ("checkpoints", "metrics.jsonl", "checkpoint.json", "trainer_state.pt")


def _run_markers(dst: Path) -> list[str]:
    return [name for name in _RUN_MARKERS if (dst / name).exists()]


def _is_within(path: Path, parent: Path) -> bool:
    path, parent = path.resolve(), parent.resolve()
    return path == parent or parent in path.parents


def check_destination(dst: str | os.PathLike, overwrite: bool, sources: Iterable[str | os.PathLike] = ()) -> Path:
    """``dst`` as a Path. ValueError if it exists and is not an empty directory (unless
    ``overwrite``), and in any case if it holds a training run or native checkpoints, or is or
    contains one of ``sources`` (the paths being read): those are never replaced."""
    dst = Path(dst).expanduser()
    if dst.is_dir() and _run_markers(dst):
        raise ValueError(f"destination {str(dst)!r} holds a training run or native checkpoint "
                         f"({', '.join(_run_markers(dst))}), which is never replaced, even with --overwrite: "
                         f"choose a new directory, e.g. {str(dst.with_name(dst.name + '-hf'))!r} (nothing was changed)")
    for src in sources:
        if _is_within(Path(src).expanduser(), dst):
            raise ValueError(f"destination {str(dst)!r} is or contains the source {str(src)!r}: writing there would "
                             "destroy what is being read; choose another destination (nothing was changed)")
    if dst.exists():
        if not dst.is_dir():
            raise ValueError(f"destination {str(dst)!r} exists and is not a directory")
        if any(dst.iterdir()) and not overwrite:
            raise ValueError(f"destination {str(dst)!r} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    return dst


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, overwrite: bool = False,
                     sources: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside ``dst``; on success it replaces ``dst`` (an existing one
    only with ``overwrite``, and never one ``check_destination`` protects), on error it is removed
    and ``dst`` is untouched. A write the system refuses becomes a WriteError naming ``dst``."""
    dst = check_destination(dst, overwrite, sources)
    advice = "nothing was changed there (the partial copy was removed); free some space, then try again"
    tmp: Path | None = None
    try:
        with reporting_write_errors(dst, advice):
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
            yield tmp
            share_as_umask_allows(tmp)
            replace_directory(tmp, dst, aside=dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


