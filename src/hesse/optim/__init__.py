"""Second-order optimisers: ``hesse.optim.HessianFree`` and ``hesse.optim.ChainNewton``,
and the parts they are built from (each usable and tested on its own)."""

from hesse.optim._optimizers import ChainNewton, HessianFree
from hesse.optim._parts import (
    CGResult,
    TrustRegionResult,
    armijo,
    cg_backtrack,
    lm_damping,
    reduction_ratio,
    truncated_cg,
    trust_region_subproblem,
)

__all__ = [
    "CGResult",
    "ChainNewton",
    "HessianFree",
    "TrustRegionResult",
    "armijo",
    "cg_backtrack",
    "lm_damping",
    "reduction_ratio",
    "truncated_cg",
    "trust_region_subproblem",
]
