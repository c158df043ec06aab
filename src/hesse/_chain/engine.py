"""The chain sweep as an exact engine, and its registry entry (`CHAIN`)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from hesse._chain.chain import Chain
from hesse._chain.factorization import ChainFactorization, as_chain
from hesse._factor.base import Engine
from hesse._factor.cost import STAGE_SECONDS, EngineCost, EngineSpec, Timing
from hesse._util.memory import check_memory


class ChainEngine(Engine):
    """The chain sweep as an engine: the chain and its linearisation (one forward and one
    backward pass: every stage's input and output adjoint) are kept, so each damping costs
    one sweep."""

    method = "chain"

    def __init__(self, chain: Chain, curvature: str, progress: bool | None = None) -> None:
        self.chain, self.problem, self.curvature, self.progress = (
            chain,
            chain.problem,
            curvature,
            progress,
        )
        self._linearisation: tuple[list[Tensor], list[Tensor]] | None = None

    def _factor(self, damping: float | Tensor, rank_rtol: float | None) -> ChainFactorization:
        if self._linearisation is None:
            self._linearisation = self.chain.forward_backward()
        return ChainFactorization(
            self.chain,
            damping,
            self.curvature,
            self.progress,
            rank_rtol,
            linearisation=self._linearisation,
        )


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
    seconds += STAGE_SECONDS * len(chain)
    return EngineCost("chain", True, flops, chain.memory_estimate(), seconds), chain


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
)
