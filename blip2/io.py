"""Atomic file writes: a reader never sees a half-written file, a crash leaves none behind."""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `target`; renames it over `target` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent, target.name)  # what an earlier save of this file, killed mid-write, left
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600); give it the mode a plain open() would have.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Deletes the temporary files `atomic_path` left in `folder` (for target `name`, or any) when a
    process was killed mid-write; returns them. Call it only where no other process is saving there."""
    removed = []
    for tmp in Path(folder).glob(f".{'*' if name is None else glob.escape(name)}.*.tmp"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass  # gone already, or not ours to delete
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write(target: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Calls `write(tmp_path)`, then moves the result into place."""
    with atomic_path(target) as tmp:
        write(tmp)
