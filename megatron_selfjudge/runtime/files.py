"""Crash-safe file replacement (readers see the old content or the new, never half), and bounded reads."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from megatron_selfjudge.runtime.faults import kill_point

PART_SUFFIX = ".part"


def write_atomic(path: Union[str, Path], text: str, fault_point: Optional[str] = None) -> None:
    """Replace `path` by `text`: write `path.part`, fsync, rename over `path`, fsync the folder.

    A crash at any moment leaves `path` whole (old or new content) and at most a stale `.part`,
    which the next write replaces. `fault_point` names the crash-test hook (runtime.faults) that
    fires between the fsync and the rename. One writer per file (the run directory is locked).
    """
    path = Path(path)
    part = path.with_name(path.name + PART_SUFFIX)
    try:
        with open(part, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        part.unlink(missing_ok=True)  # a half-written temporary is of no use to anyone
        raise
    if fault_point is not None:
        kill_point(fault_point)
    os.replace(part, path)
    # The rename is durable only once the folder's entry is on disk.
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_bounded(path: Union[str, Path], limit: int, name: str, error: type, hint: str = "") -> bytes:
    """The bytes of a small file; `error(one line)` when it cannot be read or holds more than `limit` bytes.

    Reads at most limit + 1 bytes, so a huge (or endless) file named by mistake costs nothing.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise error(f"{name} cannot be read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise error(f"{name} is larger than {limit} bytes" + (f" ({hint})" if hint else ""))
    return data
