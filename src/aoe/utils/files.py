"""File helpers: atomic writes (a temporary sibling, fsync, then ``os.replace``; a complete
directory swapped into place), fsync, SHA-256, locks, and clear errors when the system refuses a
write. Every writer of the package that must not leave a half-written file goes through these.

A crash at any point leaves either the old file or the new one, never a half-written file
under the final name. A write the system refuses (disk full, quota, read-only file system,
permissions) is reported as a ``WriteError`` naming the path and the cause
(``reporting_write_errors``), and a sequence of renames can be shielded from SIGINT/SIGTERM
(``signals_deferred``) so that it is never cut in half.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Callable, Iterator


def tmp_sibling(path: str | os.PathLike) -> Path:
    """A per-process temporary name next to ``path`` (same directory, so ``os.replace`` is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a closed file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename into it) to disk, where the platform allows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    path = Path(path)
    tmp = tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def replace_directory(tmp: str | os.PathLike, dst: str | os.PathLike, aside: str | os.PathLike) -> None:
    """Rename the complete directory ``tmp`` to ``dst``, uninterrupted by SIGINT/SIGTERM. An
    existing ``dst`` is renamed to ``aside`` (a name in the same directory) first and removed once
    ``tmp`` is in place, so a crash leaves the old directory or the new one under ``dst`` (and at
    most ``aside`` beside it). The parent's entries are fsync'ed."""
    tmp, dst = Path(tmp), Path(dst)
    with signals_deferred():
        if dst.exists():
            os.replace(dst, aside)
            os.replace(tmp, dst)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, dst)
        fsync_dir(dst.parent)


def current_umask() -> int:
    """This process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_as_umask_allows(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a directory, everything under it) the permissions a plain new file
    or directory gets under the umask: writers that make private temporaries (safetensors' 0600
    files, ``tempfile.mkdtemp``'s 0700 directories) would otherwise keep colleagues out."""
    mask = current_umask()
    path = Path(path)
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        if entry.is_symlink():
            continue
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)


class file_lock:
    """Exclusive advisory lock on ``path`` (``fcntl.flock``; a no-op where fcntl is missing).

    Serializes writers of one directory across processes, e.g. several DDP ranks calling
    ``prepare_tokens`` on the same ``out_dir``: the first tokenizes, the others then find the
    files up to date.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def __enter__(self) -> "file_lock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX
            return self
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------------------------------------
# Writes the system refuses
# ---------------------------------------------------------------------------------------------
class WriteError(OSError):
    """Writing a file or directory failed for a reason of the system (disk full, quota, read-only
    file system, permissions). The message names the path, the cause and what to do; ``errno``
    is the system's error number. Whoever raises it has removed its temporary files and left the
    previous state as it was."""


# Writers implemented in Rust or C++ (safetensors, tokenizers) report the errno only in their message.
_ERRNO_IN_MESSAGE = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)|\[Errno (\d+)\]")


def os_error_code(exc: BaseException) -> int | None:
    """The system error number behind ``exc`` (an OSError, or a writer's error whose message or
    cause carries one, e.g. safetensors' "... (os error 28)"); None when there is none."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
        match = _ERRNO_IN_MESSAGE.search(str(exc))
        if match:
            return int(next(g for g in match.groups() if g))
        exc = exc.__cause__ or exc.__context__
    return None


def describe_os_error(code: int) -> str:
    """A lower-case cause for a message: ``errno.ENOSPC`` -> "no space left on device"."""
    text = os.strerror(code)
    return text[:1].lower() + text[1:]


@contextlib.contextmanager
def reporting_write_errors(path: str | os.PathLike, advice: str | Callable[[], str] = "",
                           error_type: type[WriteError] = WriteError) -> Iterator[None]:
    """Turn an error of the system inside the block into one ``error_type`` (a WriteError) whose
    message reads "<cause> while writing <path>: <advice>".

    advice: what was (not) lost and what to do; a callable is called only on failure (e.g. to
    look up the newest good checkpoint). Errors that carry no system error number, and
    WriteErrors already raised inside, pass through unchanged.
    """
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        code = os_error_code(e)
        if code is None:
            raise
        text = advice() if callable(advice) else advice
        err = error_type(f"{describe_os_error(code)} while writing {str(path)!r}" + (f": {text}" if text else ""))
        err.errno = code
        raise err from e


class _WholeWrites(io.RawIOBase):
    """A raw file (owning ``fd``) whose ``write`` writes all of its bytes or raises the system's OSError.

    A buffered file reports a short count when the disk fills in the middle of a write; writers
    that check the count (torch.save) then fail with a message that hides the cause.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])
        return len(view)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


@contextlib.contextmanager
def open_for_writing(path: str | os.PathLike) -> Iterator[io.BufferedWriter]:
    """A new binary file at ``path`` whose writes either complete or raise the system's OSError
    (ENOSPC, EDQUOT...); flushed and fsync'ed at the end of the block, closed in any case."""
    raw = _WholeWrites(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))  # less the umask
    f = io.BufferedWriter(raw, buffer_size=1 << 20)
    try:
        yield f
        f.flush()
        os.fsync(raw.fileno())
    finally:
        with contextlib.suppress(OSError):  # after a failed write the buffer cannot be flushed either
            f.close()


# ---------------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def signals_deferred(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold back ``signums`` for the duration of the block: one that arrives is delivered (to the
    handler that was in place) when the block ends. Shields a short sequence of renames from a
    Ctrl-C or a second SIGTERM. A no-op outside the main thread, and for a signal whose handler
    was not installed from Python."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for signum in signums:
        handler = signal.getsignal(signum)
        if handler is None:
            continue
        previous[signum] = handler
        signal.signal(signum, lambda received, frame: pending.append(received))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)
