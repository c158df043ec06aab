"""hesse: exact second-order calculus of deep networks in PyTorch.

The public API is this file: a `Problem` (model, loss, data, parameters), exact
quantities as functions of it, and curvature operators that behave like
``scipy.sparse.linalg.LinearOperator`` objects.
"""

from hesse import optim
from hesse._apps.influence import InfluenceScores, influence, self_influence, top_influences
from hesse._apps.laplace import Laplace, NotPositiveDefiniteError
from hesse._apps.per_sample import per_sample_gradient_chunks, per_sample_gradients
from hesse._autodiff.check import CheckReport, CheckRow, check
from hesse._autodiff.problem import Parameters, Problem
from hesse._chain.chain import Chain
from hesse._chain.factorization import ChainFactorization
from hesse._factor.base import Engine, Factorization, InverseOperator
from hesse._factor.results import (
    FactorizationStatus,
    InaccurateSolveError,
    Inertia,
    SingularPivotError,
    SolveResult,
)
from hesse._linalg.eigen import count_eigenvalues, eigenvalue, eigenvalue_histogram
from hesse._linalg.factorize import EngineCost, Plan, engine, factorize, plan
from hesse._linalg.solve import NewtonStep, inertia, logdet, newton_step, solve
from hesse._operators.base import CurvatureOperator
from hesse._operators.curvature import (
    FisherOperator,
    GGNOperator,
    HessianOperator,
    ResidualOperator,
)
from hesse._operators.functions import (
    Decomposition,
    decompose,
    fisher_vp,
    ggn,
    ggn_vp,
    gradient,
    hessian,
    hessian_blocks,
    hvp,
    jacobian,
    loss_and_gradient,
)
from hesse._report.schema import REPORT_SCHEMA
from hesse._spectral.lanczos import EigResult, eigs, eigvalsh
from hesse._spectral.stochastic import (
    SpectralDensity,
    TraceEstimate,
    diagonal,
    spectral_density,
    trace,
)
from hesse._spectral.tracker import SpectrumTracker
from hesse._util.memory import MemoryBudgetError

__version__ = "0.1.0"

__all__ = [
    "REPORT_SCHEMA",
    "Chain",
    "ChainFactorization",
    "CheckReport",
    "CheckRow",
    "CurvatureOperator",
    "Decomposition",
    "EigResult",
    "Engine",
    "EngineCost",
    "Factorization",
    "FactorizationStatus",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "InaccurateSolveError",
    "Inertia",
    "InfluenceScores",
    "InverseOperator",
    "Laplace",
    "MemoryBudgetError",
    "NewtonStep",
    "NotPositiveDefiniteError",
    "Parameters",
    "Plan",
    "Problem",
    "ResidualOperator",
    "SingularPivotError",
    "SolveResult",
    "SpectralDensity",
    "SpectrumTracker",
    "TraceEstimate",
    "check",
    "count_eigenvalues",
    "decompose",
    "diagonal",
    "eigenvalue",
    "eigenvalue_histogram",
    "eigs",
    "eigvalsh",
    "engine",
    "factorize",
    "fisher_vp",
    "ggn",
    "ggn_vp",
    "gradient",
    "hessian",
    "hessian_blocks",
    "hvp",
    "inertia",
    "influence",
    "jacobian",
    "logdet",
    "loss_and_gradient",
    "newton_step",
    "optim",
    "per_sample_gradient_chunks",
    "per_sample_gradients",
    "plan",
    "self_influence",
    "solve",
    "spectral_density",
    "top_influences",
    "trace",
]
