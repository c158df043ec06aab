"""Tracking the spectrum during training: the top Hessian eigenvalue and the trace every
few steps, and a plot of their history (matplotlib imported only to plot)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hesse._autodiff.distributed import resolve_group
from hesse._autodiff.problem import Problem
from hesse._operators.curvature import HessianOperator
from hesse._spectral.lanczos import eigs
from hesse._spectral.stochastic import trace
from hesse._util.files import save_png

__all__ = ["SpectrumTracker"]


class SpectrumTracker:
    """Record the top Hessian eigenvalue and the trace every ``every`` steps of a
    training loop, and plot their history.

    Example:
        >>> tracker = hesse.SpectrumTracker(model, loss_fn, (X, y), every=10)
        >>> for step in range(100):
        ...     opt.zero_grad(); loss_fn(model(X), y).backward(); opt.step()
        ...     tracker.step()
        >>> tracker.plot("history.png")

    Args:
        model, loss_fn, data, params: as for `Problem` (the data used for the curvature;
            a fixed held-out batch is typical).
        every: record on steps ``0, every, 2 every, ...``.
        trace_products: Hutch++ budget per record.
        seed: seeds the Lanczos start vectors and the trace probes.

    Attributes:
        history: a list of ``{"step", "top_eigenvalue", "trace", "trace_se"}`` dicts.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        *,
        every: int = 10,
        trace_products: int = 30,
        params: Any = None,
        seed: int = 0,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1; got {every}")
        if isinstance(data, Iterator):  # a generator is spent by the first record: keep it
            data = list(data)
        self.model, self.loss_fn, self.data, self.params = model, loss_fn, data, params
        self.every, self.trace_products = every, trace_products
        self._gen = torch.Generator().manual_seed(seed)
        self._step = 0
        self.history: list[dict[str, float]] = []

    def step(self) -> dict[str, float] | None:
        """Call once per training step; returns the new record on recording steps."""
        rec = None
        if self._step % self.every == 0:
            prob = Problem(self.model, self.loss_fn, self.data, params=self.params)
            op = HessianOperator(prob)
            top = eigs(op, 1, tol=1e-6, generator=self._gen)
            tr = trace(op, num_products=self.trace_products, generator=self._gen)
            rec = {
                "step": self._step,
                "top_eigenvalue": float(top.eigenvalues[0]),
                "trace": tr.estimate,
                "trace_se": tr.std_error,
            }
            self.history.append(rec)
        self._step += 1
        return rec

    def plot(self, path: str | os.PathLike) -> Path:
        """A PNG of the history (top eigenvalue and trace with its standard error),
        written atomically; under ``torch.distributed`` with several ranks, by rank 0
        alone (every rank holds the same history and gets the same path back)."""
        if not self.history:
            raise ValueError("nothing recorded yet: call step() during training first")
        group = resolve_group(None)
        if group is not None and torch.distributed.get_rank(group) != 0:
            return Path(path)  # every rank holds the same history; rank 0 writes it
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [h["step"] for h in self.history]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
        a1.plot(steps, [h["top_eigenvalue"] for h in self.history], "o-")
        a1.set_xlabel("training step")
        a1.set_ylabel("top Hessian eigenvalue")
        a1.set_title("Sharpness")
        tr = torch.tensor([h["trace"] for h in self.history])
        se = torch.tensor([h["trace_se"] for h in self.history]).nan_to_num(0.0)
        a2.plot(steps, tr.tolist(), "o-", color="C1")
        a2.fill_between(
            steps,
            (tr - 2 * se).tolist(),
            (tr + 2 * se).tolist(),
            color="C1",
            alpha=0.25,
            label="+- 2 standard errors",
        )
        a2.set_xlabel("training step")
        a2.set_ylabel("Hessian trace (Hutch++)")
        a2.set_title("Trace")
        a2.legend(fontsize=8)
        fig.tight_layout()
        return save_png(fig, path)
