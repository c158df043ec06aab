"""The chain sweep as an exact engine, and its registry entry (`CHAIN`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from hesse._autodiff.layers import flatten_sequential, is_sequential
from hesse._chain.chain import Chain
from hesse._chain.factorization import (
    EIGEN_CHOLESKIES,
    ChainFactorization,
    FrontGrewError,
    as_chain,
)
from hesse._factor.base import Engine, Factorization
from hesse._factor.cost import STAGE_SECONDS, EngineCost, EngineSpec, Timing
from hesse._util.memory import check_memory


class ChainEngine(Engine):
    """The chain sweep as an engine: the chain and its linearisation (one forward and one
    backward pass: every stage's input and output adjoint) are kept, so each damping costs
    one sweep.

    With a ``handover`` (`method="auto"`, where the dense engine applies and fits: its
    predicted seconds and how to build it), a sweep whose delayed front outgrows the
    break-even stops and that damping, and every smaller one after it, is factored by
    the dense engine instead, built once (design note, "The hand-over");
    ``status.handed_over`` says why.
    """

    method = "chain"
    handover: tuple[float, Callable[[], Engine]] | None = None

    def __init__(self, chain: Chain, curvature: str, progress: bool | None = None) -> None:
        self.chain, self.problem, self.curvature, self.progress = (
            chain,
            chain.problem,
            curvature,
            progress,
        )
        self._linearisation: tuple[list[Tensor], list[Tensor]] | None = None
        self._dense: Engine | None = None
        self._handed_at = -1.0  # dampings at most this (in magnitude) go to the dense engine
        self._why = ""

    def _factor(self, damping: float | Tensor, rank_rtol: float | None) -> Factorization:
        size = float(damping.min()) if isinstance(damping, Tensor) else abs(damping)
        if self._dense is not None and size <= self._handed_at:
            return self._dense_factor(damping, rank_rtol)
        if self._linearisation is None:
            self._linearisation = self.chain.forward_backward()
        try:
            return ChainFactorization(
                self.chain,
                damping,
                self.curvature,
                self.progress,
                rank_rtol,
                linearisation=self._linearisation,
                handover=None if self.handover is None else self.handover[0],
            )
        except FrontGrewError as err:
            self._handed_at = max(self._handed_at, size)
            self._why = str(err)
            if self._dense is None:
                self._dense = self.handover[1]()  # type: ignore[index]
            return self._dense_factor(damping, rank_rtol)

    def _dense_factor(self, damping: float | Tensor, rank_rtol: float | None) -> Factorization:
        f = self._dense._factor(damping, rank_rtol)  # type: ignore[union-attr]
        f.status = f.status._replace(handed_over=self._why)
        return f


def chain_cost(problem: Any, curvature: str, timing: Timing) -> tuple[EngineCost, Chain | None]:
    """A forward and a backward pass, the sweep's flops, the refinement's product, and
    each stage's fixed cost (small matrices: the work of calling the kernels); the
    chain it built for the prediction is handed on."""
    try:
        chain = as_chain(problem)
    except (ValueError, TypeError) as err:
        return EngineCost("chain", False, reason=str(err).split(";")[0].split(". ")[0]), None
    flops = chain.flops_estimate()
    grad = timing.gradient
    seconds = 3 * grad + flops / timing.gemm + 0.3 * flops / timing.chol
    seconds += STAGE_SECONDS[curvature] * len(chain)
    cost = EngineCost("chain", True, flops, chain.memory_estimate(), seconds)
    if curvature == "hessian":  # indefinite: a stage's pivot may take the eigen tier
        cost.upper = seconds + sum(
            EIGEN_CHOLESKIES * n**3 / 3 / timing.factor_rate("chol", n) for n in chain.pivot_sizes()
        )
    return cost, chain


def chain_floor(problem: Any, curvature: str, timing: Timing) -> float:
    """`chain_cost`'s three gradients and its fixed cost a stage (its lower bound: the
    gradient's timing, which every engine's prediction takes, and the number of stages,
    none built); 0 where the chain may not apply."""
    if isinstance(problem, Chain):
        stages = len(problem)
    else:
        model = getattr(problem, "model", None)
        if model is None or not is_sequential(model):
            return 0.0
        stages = len(flatten_sequential(model)) + 1  # len(Chain): + the loss
    return 3 * timing.gradient + STAGE_SECONDS[curvature] * stages


def build_chain(
    problem: Any, curvature: str, budget: float, built: Chain | None, progress: bool | None
) -> ChainEngine:
    chain = built if built is not None else as_chain(problem)
    check_memory(
        chain.memory_estimate(),
        f"the chain sweep ({chain.inputs.shape[0]} samples, P = {chain.num_params})",
        "its state is (samples x width)^2 a stage: use fewer samples (a curvature "
        "batch), or hesse.solve(..., method='cg') for solves without the exact "
        "factorisation",
        budget=budget,
    )
    return ChainEngine(chain, curvature, progress)


CHAIN = EngineSpec(
    "chain",
    chain_cost,
    build_chain,
    "the stable Riccati sweep, linear in depth, for nn.Sequential models",
    chain_floor,
)
