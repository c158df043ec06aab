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
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hesse._autodiff import products
from hesse._autodiff.problem import Problem, tensor_leaves
from hesse._operators.curvature import curvature_operator

STAGE_SECONDS = {"hessian": 2.5e-3, "ggn": 1e-3}
"""The chain sweep's fixed cost a stage, by curvature (many small kernels; measured on a
2-core CPU as the chain's time less its flops' and its 3 gradients': the Hessian 1.7-1.8
ms a stage on 4 and 128 stages, its tiers' tests and second-order terms; the GGN 0.5-0.7
ms, where 2.5 ms had over-predicted a 4-stage chain 3x)."""

LAYER_SECONDS = 5e-4
"""The observation-space engine's fixed cost a Linear layer (its Jacobian's blocks, its
kernel's and its products' kernels; measured on a 2-core CPU: 0.3-0.5 ms a layer on 8
to 64 layers at ``M <= 640``)."""


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
    upper: float = math.nan
    """Where the time depends on values the plan cannot see (the chain on the Hessian:
    a near-singular pivot takes the eigen tier, about 20 Choleskies), the seconds if it
    did at every stage, with no direction delayed (a delayed front, at small damping,
    costs more: the sweep's hand-over bounds it); ``nan`` where ``seconds`` is the whole
    prediction."""


SMALL, LARGE = 384, 1152
"""The two sizes the factorisation rates are measured at (`device_rates`): LAPACK's rate
grows with the size (on the 2-core CPU: Cholesky 18 GF/s at 384, 44 at 1,152 and 45 at
2,410; Bunch-Kaufman 17, 30 and 43)."""


@functools.cache
def device_rates(device: str, dtype: torch.dtype) -> tuple[float, float]:
    """Flops per second of a matrix product and of a Cholesky factorisation on this
    device and dtype at ``n = 384``, measured once a process (best of three)."""
    rates = _factor_rates(device, dtype)
    return rates["gemm"], rates[("chol", SMALL)]


@functools.cache
def _factor_rates(device: str, dtype: torch.dtype) -> dict[Any, float]:
    """``gemm`` and ``(kind, n)`` for ``kind`` in ``"chol"``, ``"ldl"`` and ``n`` in
    `SMALL`, `LARGE`: flops per second (``2 n^3`` a product, ``n^3 / 3`` a
    factorisation), best of three (of two at `LARGE`: about 60 ms once a process); and
    ``stream``, bytes per second of an element-wise pass at `LARGE`."""
    out: dict[Any, float] = {}
    g = torch.Generator().manual_seed(0)
    cuda = device.startswith("cuda")
    for n in (SMALL, LARGE):
        A = torch.randn(n, n, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        S = A @ A.T + n * torch.eye(n, dtype=dtype, device=device)
        k = 3 if n == SMALL else 2
        if n == SMALL:
            out["gemm"] = 2 * n**3 / _quickest(functools.partial(torch.mm, A, A), k, cuda=cuda)
        for kind, factor in (("chol", torch.linalg.cholesky), ("ldl", torch.linalg.ldl_factor_ex)):
            out[(kind, n)] = (n**3 / 3) / _quickest(functools.partial(factor, S), k, cuda=cuda)
        if n == LARGE:  # bytes a second of an element-wise pass (read two, write one)
            C = torch.empty_like(S)
            add = functools.partial(torch.add, A, S, out=C)
            out["stream"] = 3 * S.numel() * S.element_size() / _quickest(add, k, cuda=cuda)
    return out


def factor_rate(device: str, dtype: torch.dtype, kind: str, n: int) -> float:
    """Flops per second of an ``n x n`` Cholesky (``kind="chol"``) or Bunch-Kaufman
    (``"ldl"``) factorisation: the rate at `SMALL` below it, at `LARGE` above it, and
    log-linear in ``n`` between."""
    rates = _factor_rates(device, dtype)
    lo, hi = rates[(kind, SMALL)], rates[(kind, LARGE)]
    if n <= SMALL:
        return lo
    if n >= LARGE:
        return hi
    t = math.log(n / SMALL) / math.log(LARGE / SMALL)
    return lo * (hi / lo) ** t


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

    @property
    def stream(self) -> float:
        """Bytes a second of an element-wise pass over arrays larger than the caches."""
        return _factor_rates(str(self.problem.device), self.problem.dtype)["stream"]

    def factor_rate(self, kind: str, n: int) -> float:
        """`factor_rate` on the problem's device and dtype: ``kind`` ``"chol"`` or
        ``"ldl"``, an ``n x n`` matrix."""
        return factor_rate(str(self.problem.device), self.problem.dtype, kind, n)

    @functools.cached_property
    def gradient(self) -> float:
        return _measured(self.problem, "gradient", self._time_gradient)

    @functools.cached_property
    def column(self) -> float:
        return _measured(self.problem, f"column {self.curvature}", self._time_column)

    def _time_gradient(self) -> float:
        products.gradient(self.problem)  # the kernels' start-up
        return _quickest(lambda: products.gradient(self.problem), enough=0.05)

    def _time_column(self) -> float:
        problem = self.problem
        op = curvature_operator(problem, self.curvature)
        V = torch.zeros(problem.num_params, 8, dtype=problem.dtype, device=problem.device)
        V[0] = 1.0
        op.matmat(V[:, :1])
        return _quickest(lambda: op.matmat(V), enough=0.05) / 8


def _quickest(
    run: Callable[[], Any], repeats: int = 3, enough: float = math.inf, cuda: bool = False
) -> float:
    """Seconds of ``run()``, the best of ``repeats`` runs (a cold process's first runs
    are slow, and a plan read from them picked the slower engine on small problems),
    stopping after two once one takes ``enough`` seconds (a dear run is not repeated
    more; two, because one run that another process held up, 100x slow under a
    parallel test run, made a memoised plan pick the slower engine for the whole
    process); ``cuda`` synchronises before each reading."""
    best = math.inf
    for i in range(repeats):
        t0 = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
        if best >= enough and i >= 1:
            break
    return max(best, 1e-9)


_MEASURED: dict[tuple[Any, ...], float] = {}
"""Timings by what they depend on, the problem's shapes (`_signature`), not its values: a
fresh `Problem` of the same model and batch shapes (an optimiser's step, a second
`factorize`) is planned without timing its gradient and products again. Not across ranks:
a timing's products are collectives, and a rank that remembered would skip its part."""


_STRUCTURES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], str]] = (
    weakref.WeakKeyDictionary()
)
"""A model's printed structure, kept while the same module objects make it up (`repr` of
a model takes 0.1-0.3 ms: a tenth of the plan on a model that factors in 3 ms)."""


def _structure(model: nn.Module) -> str:
    """``repr(model)``, recomputed when a module of it was replaced or added."""
    ids = tuple(map(id, model.modules()))
    hit = _STRUCTURES.get(model)
    if hit is None or hit[0] != ids:
        hit = (ids, repr(model))
        _STRUCTURES[model] = hit
    return hit[1]


def _signature(problem: Problem, what: str) -> tuple[Any, ...]:
    """What a timing depends on: the model (its printed structure), the selected
    parameters' shapes, the batches' sizes and input shapes, the loss, dtype and device."""
    first = next(iter(problem.batches()), None)
    inputs = () if first is None else tuple(tuple(t.shape) for t in tensor_leaves(first[0]))
    loss = problem.loss_fn
    return (
        what,
        _structure(problem.model),
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
        floor: ``floor(problem, curvature, timing) -> seconds``: a lower bound of
            ``cost``'s predicted seconds from the problem's sizes alone (no forward pass,
            no timing of the problem), or ``None`` (no bound: 0). ``method="auto"``
            skips the full prediction of an engine whose floor is over an engine it has
            already predicted to fit (the choice is the same, the plan cheaper).
    """

    name: str
    cost: Callable[[Any, str, Timing], tuple[EngineCost, Any]]
    build: Callable[[Any, str, float, Any, bool | None], Any]
    summary: str
    floor: Callable[[Any, str, Timing], float] | None = None


def problem_of(obj: Any) -> Problem:
    """The `Problem` of a `Problem` or of a `Chain` (which holds one)."""
    return obj if isinstance(obj, Problem) else obj.problem
