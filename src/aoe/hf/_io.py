"""Write a directory all at once: into a temporary sibling, renamed onto the destination at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def check_destination(dst: str | os.PathLike, overwrite: bool) -> Path:
    """``dst`` as a Path; ValueError if it exists and is not an empty directory (unless overwrite)."""
    dst = Path(dst).expanduser()
    if dst.exists():
        if not dst.is_dir():
            raise ValueError(f"destination {str(dst)!r} exists and is not a directory")
        if any(dst.iterdir()) and not overwrite:
            raise ValueError(f"destination {str(dst)!r} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    return dst


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``dst``; on success it replaces ``dst`` (an existing one
    only with ``overwrite``), on error it is removed and ``dst`` is untouched."""
    dst = check_destination(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            old.rmdir()
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
