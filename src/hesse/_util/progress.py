"""Progress bars for long work: tqdm when asked for, or (``enabled=None``) when stderr is
a terminal and the job has more than a few steps; a no-op object otherwise. tqdm is
imported only when a bar is shown."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["progress_bar"]


class _NullBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kwargs: Any) -> None: ...
    def close(self) -> None: ...


def progress_bar(
    total: int,
    desc: str,
    enabled: bool | None,
    *,
    unit: str = "it",
    initial: int = 0,
    leave: bool = False,
    delay: float = 0.0,
) -> Any:
    """A bar with ``update``, ``set_postfix`` and ``close``; ``delay``: seconds before it
    appears (quick jobs show none)."""
    if enabled is None:
        enabled = total > 4 and sys.stderr.isatty()
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, delay=delay)
