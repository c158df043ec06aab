"""Exact damped Newton-type steps as a ``torch.optim.Optimizer``: a direction rule (damped
Newton / Gauss-Newton, the exact trust-region step, or saddle-free Newton on the top
eigenpairs) and an acceptance rule (Levenberg-Marquardt damping with an Armijo line
search, or the trust-radius update), each a small part tested on its own."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from hesse._autodiff.layers import is_sequential
from hesse._autodiff.problem import Problem
from hesse._linalg.eigen import eigenvalue
from hesse._linalg.factorize import check_method, factorize
from hesse._operators.curvature import HessianOperator, curvature_operator
from hesse._spectral.lanczos import eigs
from hesse._util.checks import check_number
from hesse.optim._base import Closure, SecondOrderOptimizer
from hesse.optim._parts import (
    armijo,
    lm_damping,
    reduction_ratio,
    rounding_slack,
    trust_radius_update,
    trust_region_subproblem,
)

__all__ = ["ChainNewton", "Newton", "saddle_free_direction", "smallest_eigenpair"]


def smallest_eigenpair(prob: Problem, curvature: str, method: str = "auto") -> tuple[float, Tensor]:
    """The smallest eigenvalue of ``C`` (bisection on exact counts) and a unit eigenvector
    (four steps of inverse iteration with an exact factorisation just below it)."""
    lam1 = eigenvalue(prob, 1, curvature, tol=1e-10, method=method)
    shift = -lam1 + 1e-7 * max(1.0, abs(lam1))
    f = factorize(prob, shift, curvature, method=method)  # nearly singular by design
    u = torch.randn(
        prob.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    ).to(prob.dtype)
    for _ in range(4):
        u = f.solve(u)
        u = u / u.norm()
    return lam1, u


def saddle_free_direction(
    prob: Problem, g: Tensor, k: int, damping: float
) -> tuple[Tensor, HessianOperator]:
    """``-V (|Lambda| + damping)^-1 V^T g`` with ``(Lambda, V)`` the ``k`` eigenpairs of
    largest magnitude of the Hessian (Lanczos): ``|H|`` on that subspace (Dauphin et al.
    2014, "Identifying and attacking the saddle point problem"). Returns the direction and
    the Hessian operator of its quadratic model."""
    hop = HessianOperator(prob)
    r = eigs(hop, min(k, prob.num_params), "magnitude", tol=1e-8)
    V, L = r.eigenvectors, r.eigenvalues
    return -V @ ((V.T @ g) / (L.abs() + damping)), hop


class Newton(SecondOrderOptimizer):
    """Exact damped Gauss-Newton (default) or Newton steps: ``d = -(C + damping I)^-1 g``
    solved exactly by the cheapest engine of `hesse.factorize` (dense, observation space
    or chain; ``method``), with Levenberg-Marquardt damping adapted by the reduction
    ratio.

    Options:
        method: the engine, ``"auto"`` (default: the fastest that fits, by
            `hesse.plan`), ``"dense"``, ``"gram"`` (the GGN of CE / MSE / BCE) or
            ``"chain"`` (``nn.Sequential``).
        trust_region: an initial radius; each step then solves the trust-region
            subproblem exactly (Moré-Sorensen: the exact inertia tells whether
            ``C + lam I`` is positive definite for the multiplier ``lam``, the hard case
            included) and adapts the
            radius by the reduction ratio (`trust_radius_update`).
        saddle_free: ``k``; the step is `saddle_free_direction`.
        params_or_model, loss_fn, and ``model``, ``params``, ``weight_decay``,
            ``decoupled_weight_decay`` (keywords): see `SecondOrderOptimizer`. L2 weight
            decay must be the same for every parameter here: an exact factorisation takes
            one scalar shift, ``C + (damping + wd) I``.

    Usage::

        opt = hesse.optim.Newton(model, loss_fn, damping=1e-2)
        opt.step(closure, curvature_batch=(X, y))     # the data of the curvature
    """

    def __init__(
        self,
        params_or_model: nn.Module | Iterable[Any],
        loss_fn: Any = None,
        *,
        lr: float = 1.0,
        damping: float = 1e-2,
        curvature: str = "ggn",
        method: str = "auto",
        adapt_damping: bool = True,
        line_search: bool = True,
        trust_region: float | None = None,
        max_radius: float = 1e3,
        saddle_free: int | None = None,
        **common: Any,
    ) -> None:
        check_method(method)
        check_number("lr", lr, above=0.0)
        check_number("damping", damping, at_least=0.0)
        check_number("trust_region", trust_region, above=0.0, optional=True)
        check_number("max_radius", max_radius, above=0.0)
        check_number("saddle_free", saddle_free, at_least=1, integer=True, optional=True)
        options = {
            "method": method,
            "adapt_damping": adapt_damping,
            "line_search": line_search,
            "radius": trust_region,
            "max_radius": max_radius,
            "saddle_free": saddle_free,
        }
        super().__init__(
            params_or_model, loss_fn, options, lr=lr, damping=damping, curvature=curvature, **common
        )
        if self.l2 and not bool((self._wd == self._wd[0]).all()):
            raise ValueError(
                f"{type(self).__name__} with L2 weight decay needs one weight_decay for every "
                "parameter (an exact factorisation takes one scalar shift C + (damping + wd) I); "
                "use decoupled_weight_decay=True, or HessianFree for per-group decay"
            )

    def _shift(self) -> float:
        """The L2 term's part of the factorisation's shift."""
        return float(self._wd[0]) if self.l2 else 0.0

    def _smallest(self, prob: Problem, curvature: str) -> tuple[float, Tensor]:
        """`smallest_eigenpair` of the step's curvature (the L2 term shifts it)."""
        lam1, u = smallest_eigenpair(prob, curvature, self.param_groups[0]["method"])
        return lam1 + self._shift(), u

    def step(  # type: ignore[override]
        self,
        closure: Closure,
        curvature_batch: Any = None,
        *,
        samples: int | None = None,
        batch: Any = None,
    ) -> Tensor:
        """One step; returns the objective before it. ``batch=`` is the former name of
        ``curvature_batch=`` (kept; it warns). Under ``torch.distributed``, ``samples``
        and the shards as in `HessianFree.step`: the exact factorisation gathers the
        ranks' curvature shards and every rank takes the same step."""
        if batch is not None:
            if curvature_batch is not None:
                raise TypeError("pass the curvature data once, as curvature_batch=")
            warnings.warn(
                f"{type(self).__name__}.step(batch=...) is now curvature_batch=, as in HessianFree",
                DeprecationWarning,
                stacklevel=3,  # the user's call (torch.optim wraps step)
            )
            curvature_batch = batch
        group = self.param_groups[0]
        loss0, g, skipped = self._start(closure, samples)
        if skipped:
            return loss0
        f0 = float(loss0)
        prob = self._problem(curvature_batch)
        theta = self._theta()
        d, curv, info = self._direction(prob, g)
        q = float(g @ d) + 0.5 * float(d @ curv(d))
        f_d = self._loss_at(closure, theta + group["lr"] * d)
        rho = reduction_ratio(f_d - f0, q)
        damping = group["damping"]
        if group["radius"] is not None and not group["saddle_free"]:
            alpha, f_d = self._accept_trust_region(rho, float(d.norm()), f0, f_d)
        else:
            alpha, f_d = self._accept_damped(closure, theta, d, rho, g, f0, f_d)
        self._finish(theta, alpha * d)
        self.last = {
            "loss": f0,
            "new_loss": f_d,
            "rho": rho,
            "damping": damping,
            "alpha": alpha,
            "step_norm": float(d.norm()) * alpha,
            **info,
        }
        return loss0

    # ------------------------------------------------------------------ directions
    def _direction(
        self, prob: Problem, g: Tensor
    ) -> tuple[Tensor, Callable[[Tensor], Tensor], dict[str, Any]]:
        """The step's direction, the curvature of its quadratic model (``v -> C v``, the
        L2 term included) and what to log."""
        group = self.param_groups[0]
        curvature, damping, shift = group["curvature"], group["damping"], self._shift()
        method = group["method"]
        op = curvature_operator(prob, curvature)
        info: dict[str, Any] = {}
        if group["saddle_free"]:
            d, op = saddle_free_direction(prob, g, group["saddle_free"], damping + shift)
        elif group["radius"] is not None:
            tr = trust_region_subproblem(
                g,
                group["radius"],
                # near -lambda_1 by design
                lambda s: factorize(prob, s + shift, curvature, method=method),
                lambda: self._smallest(prob, curvature),
            )
            d = tr.step
            info |= {"multiplier": tr.lam, "hard_case": tr.hard_case}
        else:
            d = factorize(prob, damping + shift, curvature, method=method).solve(-g)
        return d, (op + self.curvature_shift).__matmul__, info

    # ------------------------------------------------------------------ acceptance
    def _accept_trust_region(
        self, rho: float, step_norm: float, f0: float, f_d: float
    ) -> tuple[float, float]:
        """`trust_radius_update`; a rejected step has length 0."""
        group = self.param_groups[0]
        group["radius"], accepted = trust_radius_update(
            group["radius"], rho, step_norm, max_radius=group["max_radius"]
        )
        return (group["lr"], f_d) if accepted else (0.0, f0)

    def _accept_damped(
        self,
        closure: Closure,
        theta: Tensor,
        d: Tensor,
        rho: float,
        g: Tensor,
        f0: float,
        f_d: float,
    ) -> tuple[float, float]:
        """Levenberg-Marquardt damping from ``rho``; a step that does not decrease the
        objective goes to an Armijo line search from half of ``lr`` (or is rejected)."""
        group = self.param_groups[0]
        if group["adapt_damping"]:
            group["damping"] = lm_damping(max(group["damping"], 1e-10), rho)
        if f_d <= f0 + rounding_slack(f0):
            return group["lr"], f_d
        if not group["line_search"]:
            return 0.0, f0
        return armijo(
            lambda a: self._loss_at(closure, theta + a * d),
            f0,
            float(g @ d),
            alpha0=0.5 * group["lr"],
        )


class ChainNewton(Newton):
    """`Newton` on the chain engine (``method="chain"``), for ``nn.Sequential`` models:
    each step's exact factorisation in time linear in depth. Arguments as `Newton`.

    Usage::

        opt = hesse.optim.ChainNewton(model, loss_fn, damping=1e-2)
        opt.step(closure, curvature_batch=(X, y))
    """

    def __init__(
        self,
        params_or_model: nn.Module | Iterable[Any],
        loss_fn: Any = None,
        *,
        method: str = "chain",
        **kwargs: Any,
    ) -> None:
        model = params_or_model if isinstance(params_or_model, nn.Module) else kwargs.get("model")
        if model is None or not is_sequential(model):
            raise ValueError(
                "ChainNewton needs an nn.Sequential model (a chain, running nn.Sequential's "
                "own forward); use Newton "
                "(any exact engine) or HessianFree for other models"
            )
        super().__init__(params_or_model, loss_fn, method=method, **kwargs)
