"""The curvature matrices of a `Problem` as operators: each subclass of
`CurvatureOperator` only chooses its product (`hesse._autodiff.products`)."""

from __future__ import annotations

from torch import Tensor

from hesse._autodiff import losses, products
from hesse._autodiff.problem import Problem
from hesse._operators.base import CurvatureOperator
from hesse._util.checks import check_curvature

__all__ = [
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "ResidualOperator",
    "curvature_operator",
]


class HessianOperator(CurvatureOperator):
    """The Hessian ``H = d^2 L / d theta^2`` of the objective (indefinite in general).

    Args:
        problem: the `Problem`.
        method: ``"auto"`` (default: ``"mlp"`` where it applies, else ``"reverse"``),
            ``"mlp"`` (Pearlmutter's R-operator by hand over an ``nn.Sequential`` of
            ``nn.Linear`` layers and element-wise activations: design note (P1)-(P2)),
            ``"reverse"`` (reverse-over-reverse autodiff, the graph reused for all
            columns) or ``"forward"`` (forward-over-reverse autodiff).

    Cost of ``H @ V``: about 2 gradient evaluations per column on the MLP route, 2-3
    on autodiff's.
    """

    name = "Hessian"

    def __init__(self, problem: Problem, method: str = "auto") -> None:
        super().__init__(problem)
        products.check_hessian_method(problem, method)
        self.method = method

    def _matmat(self, V: Tensor) -> Tensor:
        return products.hessian_matmat(self.problem, V, self.method)


class GGNOperator(CurvatureOperator):
    """The generalised Gauss-Newton matrix ``G = sum_b J_b^T (d^2 loss_b/d f^2) J_b``
    (Schraudolph 2002), positive semi-definite for convex losses. ``J`` is the Jacobian
    of the model's outputs. Cost of ``G @ v``: about 1.3 gradients on an MLP (by hand over
    its layers: design note (P3)), 1.5-2 otherwise (one forward-mode pass and one
    backward)."""

    name = "GGN"
    psd = True
    column_memory = 1.7

    def _matmat(self, V: Tensor) -> Tensor:
        return products.ggn_matmat(self.problem, V)


class ResidualOperator(CurvatureOperator):
    """The residual of the Hessian chain rule, ``R = sum_k (dL/df_k) d^2 f_k/d theta^2``,
    so that ``H = G + R``. Zero for models linear in their parameters; for piecewise
    linear networks (ReLU) its within-layer blocks vanish (seed 001)."""

    name = "residual"

    def _matmat(self, V: Tensor) -> Tensor:
        return products.residual_matmat(self.problem, V)


class FisherOperator(CurvatureOperator):
    """The Fisher information of the likelihood that the loss is the negative log of.

    With ``L = c sum_n l_n`` (``c = 1/N`` for cross-entropy with ``reduction="mean"``,
    ``1/(N C)`` for MSE and BCE with ``"mean"``, ``1`` for ``"sum"``):

    - ``kind="true"``: ``F = c sum_n J_n^T E_{y ~ p(y|f_n)}[grad_f l grad_f l^T] J_n``,
      computed exactly in closed form (not by sampling). For ``CrossEntropyLoss``,
      ``MSELoss`` and ``BCEWithLogitsLoss`` it equals the GGN (Martens 2014, sec. 9).
    - ``kind="empirical"``: ``F = c sum_n grad l_n grad l_n^T`` with the observed
      labels (the uncentred gradient covariance).

    Supported losses: ``nn.CrossEntropyLoss`` (outputs ``(n, C)``), ``nn.MSELoss``,
    ``nn.BCEWithLogitsLoss``.
    """

    name = "Fisher"
    psd = True
    column_memory = 1.7

    def __init__(self, problem: Problem, kind: str = "true") -> None:
        super().__init__(problem)
        if kind not in ("true", "empirical"):
            raise ValueError(f"kind must be 'true' or 'empirical'; got {kind!r}")
        losses.fisher_loss(problem.loss_fn)  # validate the loss before any work
        self.kind = kind

    def _matmat(self, V: Tensor) -> Tensor:
        return products.fisher_matmat(self.problem, V, self.kind)


def curvature_operator(problem: Problem, curvature: str) -> CurvatureOperator:
    """The `HessianOperator` or `GGNOperator` of ``problem``, by name."""
    check_curvature(curvature)
    return HessianOperator(problem) if curvature == "hessian" else GGNOperator(problem)
