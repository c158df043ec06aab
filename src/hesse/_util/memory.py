"""Memory estimates checked before heavy work: refuse up front, with the estimate and a
way out, instead of dying in the allocator (or the kernel's OOM killer) minutes later."""

from __future__ import annotations

import os

import torch

__all__ = ["MemoryBudgetError", "available_memory", "check_memory", "format_bytes"]

BUDGET_FRACTION = 0.8
"""The default budget: this fraction of the memory available on the device when asked."""


class MemoryBudgetError(MemoryError):
    """The work would need more memory than the budget allows; the message gives the
    estimate, the budget and the ways out."""


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes available now: free GPU memory for a CUDA device, else the host's
    ``MemAvailable`` (Linux), else the physical memory."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic systems
        return 2**63 - 1


def check_memory(
    estimate: float,
    what: str,
    way_out: str,
    device: torch.device | str = "cpu",
    budget: float | None = None,
) -> None:
    """Raise `MemoryBudgetError` when ``estimate`` bytes exceed ``budget`` (default:
    `BUDGET_FRACTION` of the available memory)."""
    if budget is None:
        budget = BUDGET_FRACTION * available_memory(device)
    if estimate > budget:
        raise MemoryBudgetError(
            f"{what} would need about {format_bytes(estimate)}, more than the "
            f"{format_bytes(budget)} available to it; {way_out}"
        )


def renamed_chunk_memory(chunk_memory: int | None, max_memory: int | None, call: str) -> int | None:
    """``chunk_memory``, or the former name ``max_memory`` with a `DeprecationWarning`:
    the working memory of one chunk of columns was ``max_memory`` here, the name that
    `hesse.factorize`, `hesse.plan` and `hesse.Laplace` give a whole memory budget."""
    if max_memory is None:
        return chunk_memory
    if chunk_memory is not None:
        raise TypeError(f"{call}: give chunk_memory= only (max_memory= is its former name)")
    import warnings

    warnings.warn(
        f"{call}(max_memory=) is now chunk_memory= (the working memory of one chunk of "
        "columns; max_memory is a whole budget in factorize, plan and Laplace)",
        DeprecationWarning,
        stacklevel=3,
    )
    return max_memory
