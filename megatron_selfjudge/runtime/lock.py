"""One run per run directory: an exclusive lock, and one-line errors for unusable run directories.

Global rank 0 takes `RunLock` on ``run_dir/.lock`` before it writes anything there (config.yaml,
metrics, checkpoints) and holds it until the run ends; `hold_run_dir` makes every other rank stop
too when rank 0 could not take it. The lock is ``fcntl.flock``: the kernel drops it when the
holder's process dies, even by SIGKILL, so a crashed run never leaves a stale lock behind. The
file keeps the holder's host, pid, start time and command, which a refused run prints::

    run directory runs/a is in use by pid 4242 on host node07 since 2026-12-01T09:14:51Z (selfjudge train ...)

The file itself stays (truncated on release): deleting it would let two processes lock two
different inodes under one name. On NFS, Linux implements flock with POSIX byte-range locks, so
the lock also holds between nodes that share the folder.

`RunDirError` is the one-line error of the CLI (exit 2) for: a lock held by another run, a run
directory that is a file, a folder that is not writable, and a full disk (`run_dir_errors` maps
OSError from writes into the run directory to it).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Union

LOCK_FILE = ".lock"
# Errors that say a path is unusable; mapped only when the path lies in the run directory
# (a full disk is mapped wherever it was raised: writes often report no file name).
_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST, errno.EISDIR}


class RunDirError(Exception):
    """The run directory cannot be used (in use, not a folder, not writable, disk full); one line."""


def _inside(path: Optional[Union[str, bytes, os.PathLike]], root: Path) -> bool:
    if path is None:
        return False
    try:
        resolved = Path(os.fsdecode(path)).resolve()
        return resolved == root.resolve() or root.resolve() in resolved.parents
    except (OSError, ValueError):
        return False


def _not_a_folder(run_dir: Path) -> Optional[RunDirError]:
    """The error for a run directory that is, or lies below, something other than a folder."""
    for path in [*reversed(run_dir.parents), run_dir]:
        if path.exists() and not path.is_dir():
            if path == run_dir:
                return RunDirError(f"run directory {run_dir} exists and is not a folder")
            return RunDirError(f"run directory {run_dir}: {path} is not a folder")
    return None


def describe_os_error(exc: OSError, run_dir: Union[str, Path]) -> Optional[RunDirError]:
    """The RunDirError an OSError stands for (disk full, not writable, not a folder), else None."""
    run_dir = Path(run_dir)
    not_folder = _not_a_folder(run_dir) if exc.errno in (errno.EEXIST, errno.ENOTDIR) else None
    if not_folder is not None:
        return not_folder
    where = f" ({exc.filename})" if exc.filename else ""
    reason = exc.strerror or str(exc)
    inside = _inside(exc.filename, run_dir)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # often raised without a file name
        return RunDirError(f"run directory {run_dir}: no space left while writing{where}: {reason}")
    if (exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and inside) or \
            (exc.errno == errno.EROFS and not exc.filename):
        return RunDirError(f"run directory {run_dir} is not writable{where}: {reason}")
    if exc.errno in _PATH_ERRNOS and inside:
        return RunDirError(f"run directory {run_dir} is not a usable folder{where}: {reason}")
    return None


@contextlib.contextmanager
def run_dir_errors(run_dir: Union[str, Path]) -> Iterator[None]:
    """Turn an OSError of a write into the run directory (or a full disk) into a one-line RunDirError."""
    try:
        yield
    except OSError as exc:
        mapped = describe_os_error(exc, run_dir)
        if mapped is None:
            raise
        raise mapped from exc


def _holder_text() -> str:
    command = shlex.join([os.path.basename(sys.executable)] + sys.argv)
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "command": command[:300]}) + "\n"


def _describe_holder(fd: int) -> str:
    """'pid P on host H since T (command)' from the lock file, or a fallback if it was not written yet."""
    try:
        info = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
        text = f"pid {info['pid']} on host {info['host']} since {info['since']} ({info['command']})"
        return " ".join(text.split())  # the file is another process's words: keep the message one line
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not recorded itself yet)"


class RunLock:
    """Exclusive, non-blocking lock of a run directory for this process (see the module docstring)."""

    def __init__(self, run_dir: Union[str, Path]):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        with run_dir_errors(self.run_dir):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise RunDirError(f"run directory {self.run_dir} is in use by {holder}") from None
        try:
            with run_dir_errors(self.run_dir):
                os.ftruncate(fd, 0)
                os.pwrite(fd, _holder_text().encode("utf-8"), 0)
                os.fsync(fd)
        except BaseException:
            os.close(fd)  # closing drops the lock
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # the lock goes with the descriptor in any case
            os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None


@contextlib.contextmanager
def hold_run_dir(run_dir: Union[str, Path], is_main: bool) -> Iterator[None]:
    """Rank 0 (`is_main`) holds RunLock for the body; every rank raises if rank 0 could not take it.

    A collective: every rank enters it at the same point. Errors of writes into the run directory
    inside the body become RunDirError as well (`run_dir_errors`).
    """
    from megatron_selfjudge.runtime.ranks import raise_if_any_rank_failed

    with contextlib.ExitStack() as stack:
        error = None
        if is_main:
            try:
                stack.enter_context(RunLock(run_dir))
            except RunDirError as exc:
                error = exc
        raise_if_any_rank_failed(error, f"locking run directory {run_dir}")
        stack.enter_context(run_dir_errors(run_dir))
        yield
