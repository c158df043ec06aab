"""The built-in data: scikit-learn's bundled digits (no download)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["load_digits_data", "shard_bounds"]


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous part ``[lo, hi)`` of ``n`` samples split over ``world``
    ranks (sizes differ by at most one; no sampler, so nothing is padded)."""
    return n * rank // world, n * (rank + 1) // world


def load_digits_data(dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled digits (1797 images of 8x8 pixels), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.as_tensor(d.data / 16.0, dtype=dtype), torch.as_tensor(d.target).long()
