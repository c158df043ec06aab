"""Writing files so that no half-written one is ever left behind: write to a temporary
file beside the target, then rename it into place (used by the CLI, the report and
``hesse train``; the library never writes files)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "save_png"]


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; when the block succeeds, flush it to
    disk and rename it to ``target`` (mode as the umask gives a new file); in any case,
    no temporary file remains, and those a killed earlier write left are removed.

    Example:
        >>> with atomic_path("out.json") as tmp:
        ...     tmp.write_text("{}")
    """
    target = Path(target)
    folder = target.resolve().parent
    for stale in folder.glob(f".{target.name}.*.tmp"):  # left by a killed earlier write
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the file gets the usual mode
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_png(fig: Any, target: str | os.PathLike) -> Path:
    """Write a matplotlib figure to ``target`` as a PNG (atomically) and close it."""
    import matplotlib.pyplot as plt

    target = Path(target)
    try:
        with atomic_path(target) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return target
