"""The exact engines' registry entry and what their predictions are made of.

An engine registers one `EngineSpec`: its name, ``cost`` (the prediction `hesse.plan`
shows and ``method="auto"`` compares: flops, peak memory and seconds on this machine, or
why it does not apply) and ``build`` (the engine itself, refused up front when its
memory estimate is over the budget). The predictions share one `Timing` of the problem:
the matrix-product and Cholesky speed of the device (measured once a process), one
gradient and one product column, each taken the first time an engine's cost asks.
The recipe for a new engine is in the design note ("Adding an engine").
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hesse._autodiff import products
from hesse._autodiff.problem import Problem, tensor_leaves
from hesse._operators.curvature import curvature_operator

STAGE_SECONDS = 2.5e-3
"""The chain sweep's fixed cost a stage (measured on a 2-core CPU: many small kernels)."""


@dataclass
class EngineCost:
    """One engine's predicted cost: ``flops``, peak ``memory`` (bytes) and ``seconds``;
    ``reason`` says why it does not apply (``applies`` is then ``False``)."""

    method: str
    applies: bool
    flops: float = math.nan
    memory: float = math.nan
    seconds: float = math.nan
    reason: str = ""


@functools.cache
def device_rates(device: str, dtype: torch.dtype) -> tuple[float, float]:
    """Flops per second of a matrix product and of a Cholesky factorisation on this
    device and dtype, measured once a process (best of three, ``n = 384``)."""
    n = 384
    g = torch.Generator().manual_seed(0)
    A = torch.randn(n, n, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    S = A @ A.T + n * torch.eye(n, dtype=dtype, device=device)

    def best(fn: Any) -> float:
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        return max(min(ts), 1e-9)

    gemm = 2 * n**3 / best(lambda: A @ A)
    chol = (n**3 / 3) / best(lambda: torch.linalg.cholesky(S))
    return gemm, chol


class Timing:
    """The measurements of one problem that the engines' costs share, each taken on
    first use (a plan that asks no engine for it pays nothing for it).

    Attributes:
        gemm, chol: flops per second of a matrix product and of a Cholesky
            factorisation (`device_rates`).
        gradient: seconds of one gradient (the second of two: the first pays the
            kernels' start-up).
        column: seconds per column of the curvature's product (8 columns at once, after
            a warm-up): the unit of the dense engine's ``P`` products.
    """

    def __init__(self, problem: Problem, curvature: str) -> None:
        self.problem, self.curvature = problem, curvature

    @functools.cached_property
    def _rates(self) -> tuple[float, float]:
        return device_rates(str(self.problem.device), self.problem.dtype)

    @property
    def gemm(self) -> float:
        return self._rates[0]

    @property
    def chol(self) -> float:
        return self._rates[1]

    @functools.cached_property
    def gradient(self) -> float:
        return _measured(self.problem, "gradient", self._time_gradient)

    @functools.cached_property
    def column(self) -> float:
        return _measured(self.problem, f"column {self.curvature}", self._time_column)

    def _time_gradient(self) -> float:
        products.gradient(self.problem)
        t0 = time.perf_counter()
        products.gradient(self.problem)
        return time.perf_counter() - t0

    def _time_column(self) -> float:
        problem = self.problem
        op = curvature_operator(problem, self.curvature)
        V = torch.zeros(problem.num_params, 8, dtype=problem.dtype, device=problem.device)
        V[0] = 1.0
        op.matmat(V[:, :1])
        t0 = time.perf_counter()
        op.matmat(V)
        return (time.perf_counter() - t0) / 8


_MEASURED: dict[tuple[Any, ...], float] = {}
"""Timings by what they depend on, the problem's shapes (`_signature`), not its values: a
fresh `Problem` of the same model and batch shapes (an optimiser's step, a second
`factorize`) is planned without timing its gradient and products again. Not across ranks:
a timing's products are collectives, and a rank that remembered would skip its part."""


def _signature(problem: Problem, what: str) -> tuple[Any, ...]:
    """What a timing depends on: the model (its printed structure), the selected
    parameters' shapes, the batches' sizes and input shapes, the loss, dtype and device."""
    first = next(iter(problem.batches()), None)
    inputs = () if first is None else tuple(tuple(t.shape) for t in tensor_leaves(first[0]))
    loss = problem.loss_fn
    return (
        what,
        repr(problem.model),
        tuple(zip(problem.names, map(tuple, problem.shapes), strict=True)),
        tuple(problem.batch_sizes),
        inputs,
        type(loss).__name__,
        getattr(loss, "reduction", None),
        str(problem.device),
        problem.dtype,
    )


def _measured(problem: Problem, what: str, measure: Callable[[], float]) -> float:
    if problem.group is not None:  # every rank must time (its products are collectives)
        return measure()
    key = _signature(problem, what)
    if key not in _MEASURED:
        if len(_MEASURED) >= 256:  # a bounded memory of shapes
            _MEASURED.pop(next(iter(_MEASURED)))
        _MEASURED[key] = measure()
    return _MEASURED[key]


@dataclass(frozen=True)
class EngineSpec:
    """One exact engine's registry entry (`hesse._linalg.factorize.ENGINES`).

    Attributes:
        name: the ``method=`` that selects it.
        cost: ``cost(problem, curvature, timing) -> (EngineCost, built)``: the
            prediction for a `Problem` (or a `Chain`, for engines that take one) in
            float64-promoted form, and anything it built on the way that `build` can
            reuse (``None`` if nothing), so that ``method="auto"`` pays for it once.
        build: ``build(problem, curvature, budget, built, progress) -> Engine``: the
            engine, refused with `MemoryBudgetError` when its estimate is over
            ``budget``; ``built`` is what ``cost`` returned (or ``None`` when the engine
            is named directly).
        summary: one line for the plan's docs.
    """

    name: str
    cost: Callable[[Any, str, Timing], tuple[EngineCost, Any]]
    build: Callable[[Any, str, float, Any, bool | None], Any]
    summary: str


def problem_of(obj: Any) -> Problem:
    """The `Problem` of a `Problem` or of a `Chain` (which holds one)."""
    return obj if isinstance(obj, Problem) else obj.problem
