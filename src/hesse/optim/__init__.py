"""Second-order optimisers: ``hesse.optim.HessianFree``, ``hesse.optim.Newton`` and
``hesse.optim.ChainNewton``
(``torch.optim.Optimizer`` subclasses), and the parts they are built from, each usable and
tested on its own (optax's spirit: small transforms composed)."""

from hesse.optim._base import SecondOrderOptimizer
from hesse.optim._hessian_free import HessianFree
from hesse.optim._newton import ChainNewton, Newton, saddle_free_direction, smallest_eigenpair
from hesse.optim._parts import (
    CGResult,
    TrustRegionResult,
    armijo,
    cg_backtrack,
    lm_damping,
    reduction_ratio,
    truncated_cg,
    trust_radius_update,
    trust_region_subproblem,
)

__all__ = [
    "CGResult",
    "ChainNewton",
    "HessianFree",
    "Newton",
    "SecondOrderOptimizer",
    "TrustRegionResult",
    "armijo",
    "cg_backtrack",
    "lm_damping",
    "reduction_ratio",
    "saddle_free_direction",
    "smallest_eigenpair",
    "truncated_cg",
    "trust_radius_update",
    "trust_region_subproblem",
]
