"""Hessian-free optimisation (Martens 2010) as a ``torch.optim.Optimizer``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from hesse._autodiff.problem import Problem
from hesse._operators.base import CurvatureOperator
from hesse._operators.curvature import curvature_operator
from hesse._spectral.stochastic import empirical_fisher_diagonal
from hesse._util.checks import check_number
from hesse.optim._base import Closure, SecondOrderOptimizer
from hesse.optim._parts import (
    CGResult,
    armijo,
    cg_backtrack,
    lm_damping,
    reduction_ratio,
    rounding_slack,
    truncated_cg,
)

__all__ = ["HessianFree"]


class HessianFree(SecondOrderOptimizer):
    """Hessian-free optimisation (Martens 2010), faithful to its parts.

    Each step: the gradient from the closure; truncated conjugate gradients on
    ``(C + damping I) d = -g`` with ``C`` the Gauss-Newton matrix (default) or the Hessian on a
    separate curvature batch, started from ``decay`` times the previous solution, stopped
    by the relative-progress rule; backtracking through the CG iterates; the reduction
    ratio ``rho`` adapts the Levenberg-Marquardt ``damping``; an Armijo line search;
    optionally Martens' diagonal preconditioner ``(diag(EF) + damping)^0.75``.

    Args:
        params_or_model, loss_fn, and ``model``, ``params``, ``weight_decay``,
            ``decoupled_weight_decay`` (keywords): see `SecondOrderOptimizer` (the model,
            or parameters and groups in ``torch.optim`` style with ``model=``).
        lr: the initial step length of the line search (1: the CG step).
        damping: the initial Levenberg-Marquardt damping.
        curvature: ``"ggn"`` or ``"hessian"``.
        cg_max_iter, cg_progress_tol: CG budget and Martens' ``epsilon``.
        warm_start_decay: ``0`` disables the warm start.
        backtrack, line_search, adapt_damping: switch the parts on or off.
        preconditioner: ``None`` or ``"martens"``.

    Usage::

        opt = hesse.optim.HessianFree(model, loss_fn)
        def closure():
            opt.zero_grad(); loss = loss_fn(model(X), y); loss.backward(); return loss
        opt.step(closure, curvature_batch=(Xc, yc))

    The closure is evaluated several times per step (backtracking, line search). Reference:
    J. Martens, *Deep learning via Hessian-free optimization*, ICML 2010.
    """

    def __init__(
        self,
        params_or_model: nn.Module | Iterable[Any],
        loss_fn: Any = None,
        *,
        lr: float = 1.0,
        damping: float = 1.0,
        curvature: str = "ggn",
        cg_max_iter: int = 100,
        cg_progress_tol: float = 5e-4,
        warm_start_decay: float = 0.95,
        backtrack: bool = True,
        line_search: bool = True,
        adapt_damping: bool = True,
        preconditioner: str | None = None,
        **common: Any,
    ) -> None:
        if preconditioner not in (None, "martens"):
            raise ValueError(f"preconditioner must be None or 'martens'; got {preconditioner!r}")
        check_number("damping", damping, above=0.0)
        check_number("lr", lr, above=0.0)
        check_number("cg_max_iter", cg_max_iter, at_least=1, integer=True)
        check_number("cg_progress_tol", cg_progress_tol, above=0.0)
        check_number("warm_start_decay", warm_start_decay, at_least=0.0, at_most=1.0)
        options = {
            "cg_max_iter": cg_max_iter,
            "cg_progress_tol": cg_progress_tol,
            "warm_start_decay": warm_start_decay,
            "backtrack": backtrack,
            "line_search": line_search,
            "adapt_damping": adapt_damping,
            "preconditioner": preconditioner,
        }
        super().__init__(
            params_or_model, loss_fn, options, lr=lr, damping=damping, curvature=curvature, **common
        )

    def _preconditioner(self, prob: Problem, damping: float) -> Tensor:
        """Martens' ``(diag(EF) + damping)^0.75``, the empirical Fisher's diagonal from
        per-sample gradients of the curvature batch."""
        diag = empirical_fisher_diagonal(prob)
        return (diag + self.curvature_shift + damping) ** 0.75

    def step(  # type: ignore[override]
        self, closure: Closure, curvature_batch: Any = None, *, samples: int | None = None
    ) -> Tensor:
        """One HF step; returns the objective before it (as ``torch.optim.LBFGS`` does;
        with L2 weight decay, its term included).

        Under ``torch.distributed`` (`SecondOrderOptimizer`'s ``process_group``): the
        closure evaluates this rank's shard, ``curvature_batch`` is this rank's shard of
        the curvature batch, and ``samples`` is how many samples the closure's loss
        averages over (needed for a ``"mean"`` loss)."""
        group = self.param_groups[0]
        loss0, g, skipped = self._start(closure, samples)
        if skipped:
            return loss0
        f0 = float(loss0)
        prob = self._problem(curvature_batch)
        op = curvature_operator(prob, group["curvature"])
        theta = self._theta()

        curv = op + self.curvature_shift  # C, the L2 term's curvature included

        res = self._cg(prob, curv, g)

        def loss_at(x: Tensor) -> float:
            return self._loss_at(closure, theta + x)

        if group["backtrack"]:
            d, f_d, it = cg_backtrack(res.iterates, loss_at)
        else:
            d, f_d, it = res.x, loss_at(res.x), res.iterations
        damping = group["damping"]
        rho = reduction_ratio(f_d - f0, float(g @ d) + 0.5 * float(d @ (curv @ d)))
        if group["adapt_damping"]:
            group["damping"] = lm_damping(damping, rho)
        alpha, f_new = self._line_search(loss_at, d, f0, f_d, float(g @ d))
        self._finish(theta, alpha * d)
        self.last = {
            "loss": f0,
            "new_loss": f_new,
            "rho": rho,
            "damping": damping,
            "cg_iterations": res.iterations,
            "cg_stop": res.reason,
            "backtracked_to": it,
            "alpha": alpha,
        }
        return loss0

    def _cg(self, prob: Problem, curv: CurvatureOperator, g: Tensor) -> CGResult:
        """Truncated CG on ``(C + damping I) d = -g``, warm-started from the previous step's
        solution; stores this one for the next step."""
        group = self.param_groups[0]
        damping = group["damping"]
        precond = (
            self._preconditioner(prob, damping) if group["preconditioner"] == "martens" else None
        )
        x0 = None
        warm = [self.state[p].get("cg_warm") for p in self.space.tensors]
        if group["warm_start_decay"] > 0 and all(w is not None for w in warm):
            x0 = group["warm_start_decay"] * self.space.flatten(warm)
        res = truncated_cg(
            (curv + damping).__matmul__,
            -g,
            x0,
            max_iter=group["cg_max_iter"],
            progress_tol=group["cg_progress_tol"],
            precond=precond,
        )
        # the (non-backtracked) CG solution warm-starts the next step
        for p, w in zip(self.space.tensors, self.space.unflatten(res.x), strict=True):
            self.state[p]["cg_warm"] = w.clone()
        return res

    def _line_search(
        self, loss_at: Callable[[Tensor], float], d: Tensor, f0: float, f_d: float, slope: float
    ) -> tuple[float, float]:
        """The step length: 1 when the (backtracked) CG step already satisfies Armijo's
        condition, else an Armijo search from ``lr``; ``lr`` itself without the search."""
        group = self.param_groups[0]
        if not group["line_search"]:
            return group["lr"], loss_at(group["lr"] * d)
        if f_d <= f0 + 1e-2 * slope + rounding_slack(f0) and group["lr"] == 1.0:
            return 1.0, f_d
        return armijo(lambda a: loss_at(a * d), f0, slope, alpha0=group["lr"])
