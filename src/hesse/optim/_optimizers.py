"""Second-order optimisers as ``torch.optim.Optimizer`` subclasses (closure convention).

Both keep their adaptive state (damping, trust radius, CG warm start, counters) in
``param_groups`` and ``state``, so ``state_dict()`` / ``load_state_dict()`` checkpoint
them like any PyTorch optimiser.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hesse._autodiff.problem import Problem
from hesse._chain.factorization import factorize
from hesse._linalg.solve import eigenvalue
from hesse._operators.curvature import HessianOperator, curvature_operator
from hesse._spectral.lanczos import eigs
from hesse._spectral.stochastic import empirical_fisher_diagonal
from hesse._util.checks import check_curvature
from hesse.optim._parts import (
    armijo,
    cg_backtrack,
    lm_damping,
    reduction_ratio,
    rounding_slack,
    truncated_cg,
    trust_region_subproblem,
)

__all__ = ["ChainNewton", "HessianFree"]

Closure = Callable[[], Tensor]


class _SecondOrder(torch.optim.Optimizer):
    """Shared plumbing: the model's selected parameters as one flat vector, the
    closure convention, and the handling of non-finite losses."""

    def __init__(
        self, model: nn.Module, loss_fn: Any, defaults: dict[str, Any], params: Sequence[str] | None
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        named = dict(model.named_parameters())
        names = [n for n, p in named.items() if p.requires_grad] if params is None else list(params)
        for n in names:
            if n not in named:
                raise ValueError(f"unknown parameter {n!r}; the model has {list(named)}")
            if not named[n].requires_grad:
                raise ValueError(f"parameter {n!r} does not require grad; it cannot be optimised")
        if not names:
            raise ValueError("no parameter requires grad: nothing to optimise")
        for key in ("lr", "damping"):
            value = defaults.get(key)
            if value is not None and not (
                isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
            ):
                raise ValueError(f"{key} must be a finite number >= 0; got {value!r}")
        defaults = {**defaults, "step": 0, "skipped": 0}
        super().__init__([named[n] for n in names], defaults)
        self._model, self._loss_fn, self._names = model, loss_fn, names
        self.last: dict[str, Any] = {}  # statistics of the last step, for logging

    @property
    def _params(self) -> list[Tensor]:
        return self.param_groups[0]["params"]

    def _theta(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params])

    def _set(self, flat: Tensor) -> None:
        with torch.no_grad():
            i = 0
            for p in self._params:
                p.copy_(flat[i : i + p.numel()].view_as(p))
                i += p.numel()

    def _flat_grad(self) -> Tensor:
        return torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                for p in self._params
            ]
        )

    def _loss_at(self, closure: Closure, flat: Tensor) -> float:
        self._set(flat)
        with torch.enable_grad():
            return float(closure().detach())

    def _problem(self, batch: Any, name: str) -> Problem:
        if batch is None:
            raise ValueError(
                f"{type(self).__name__}.step needs {name}=(inputs, targets) for the curvature"
            )
        return Problem(self._model, self._loss_fn, batch, params=self._names)

    def _start(self, closure: Closure) -> tuple[Tensor, Tensor, bool]:
        """Evaluate the closure: ``(loss, flat gradient, skipped)``. A non-finite loss or
        gradient skips the step (the damping is raised and a warning says so)."""
        with torch.enable_grad():
            loss = closure()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(
                "the closure must return the loss as a scalar tensor (and call "
                f"backward on it); got {type(loss).__name__}"
            )
        if all(p.grad is None for p in self._params):
            raise RuntimeError(
                "the closure returned a loss but left every parameter's .grad None: call "
                "loss.backward() inside it (after optimizer.zero_grad())"
            )
        loss0, g = loss.detach(), self._flat_grad()
        if not math.isfinite(float(loss0)):
            return self._skip(loss0, "loss"), g, True
        if not bool(torch.isfinite(g).all()):
            return self._skip(loss0, "gradient"), g, True
        return loss0, g, False

    def _skip(self, loss: Tensor, what: str) -> Tensor:
        group = self.param_groups[0]
        group["skipped"] += 1
        group["damping"] = min(group["damping"] * 10.0, 1e10)
        self.last = {"skipped": True}
        warnings.warn(
            f"{type(self).__name__}: non-finite {what} at step {group['step']}; step "
            f"skipped, damping raised to {group['damping']:.3g}",
            stacklevel=4,
        )
        return loss


class HessianFree(_SecondOrder):
    """Hessian-free optimisation (Martens 2010), faithful to its parts.

    Each step: the gradient from the closure; truncated conjugate gradients on
    ``(C + lam I) d = -g`` with ``C`` the Gauss-Newton matrix (default) or the Hessian on a
    separate curvature batch, started from ``decay`` times the previous solution, stopped
    by the relative-progress rule; backtracking through the CG iterates; the reduction
    ratio ``rho`` adapts the Levenberg-Marquardt damping ``lam``; an Armijo line search;
    optionally Martens' diagonal preconditioner ``(diag(EF) + lam)^0.75``.

    Args:
        model, loss_fn: the model and ``loss_fn(outputs, targets)``.
        lr: the initial step length of the line search (1: the CG step).
        damping: initial ``lam``.
        curvature: ``"ggn"`` or ``"hessian"``.
        cg_max_iter, cg_progress_tol: CG budget and Martens' ``epsilon``.
        warm_start_decay: ``0`` disables the warm start.
        backtrack, line_search, adapt_damping: switch the parts on or off.
        preconditioner: ``None`` or ``"martens"``.
        params: parameter names to optimise (default: all that require grad).

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
        model: nn.Module,
        loss_fn: Any,
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
        params: Sequence[str] | None = None,
    ) -> None:
        check_curvature(curvature)
        if preconditioner not in (None, "martens"):
            raise ValueError(f"preconditioner must be None or 'martens'; got {preconditioner!r}")
        for key, value in (("damping", damping), ("lr", lr)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{key} must be a positive finite number; got {value!r}")
        defaults = {
            "lr": lr,
            "damping": damping,
            "curvature": curvature,
            "cg_max_iter": cg_max_iter,
            "cg_progress_tol": cg_progress_tol,
            "warm_start_decay": warm_start_decay,
            "backtrack": backtrack,
            "line_search": line_search,
            "adapt_damping": adapt_damping,
            "preconditioner": preconditioner,
        }
        super().__init__(model, loss_fn, defaults, params)

    def _preconditioner(self, prob: Problem, lam: float) -> Tensor:
        """Martens' ``(diag(EF) + lam)^0.75``, the empirical Fisher's diagonal from
        per-sample gradients of the curvature batch."""
        return (empirical_fisher_diagonal(prob) + lam) ** 0.75

    def step(self, closure: Closure, curvature_batch: Any = None) -> Tensor:  # type: ignore[override]
        """One HF step; returns the loss before it (as ``torch.optim.LBFGS`` does)."""
        group = self.param_groups[0]
        loss0, g, skipped = self._start(closure)
        if skipped:
            return loss0
        f0 = float(loss0)
        prob = self._problem(curvature_batch, "curvature_batch")
        op = curvature_operator(prob, group["curvature"])
        lam = group["damping"]
        theta = self._theta()

        def Av(v: Tensor) -> Tensor:
            return op @ v + lam * v

        precond = self._preconditioner(prob, lam) if group["preconditioner"] == "martens" else None
        x0 = None
        warm = [self.state[p].get("cg_warm") for p in self._params]
        if group["warm_start_decay"] > 0 and all(w is not None for w in warm):
            x0 = group["warm_start_decay"] * torch.cat([w.reshape(-1) for w in warm])
        res = truncated_cg(
            Av,
            -g,
            x0,
            max_iter=group["cg_max_iter"],
            progress_tol=group["cg_progress_tol"],
            precond=precond,
        )
        i = 0
        for p in self._params:  # the (non-backtracked) CG solution warm-starts the next step
            self.state[p]["cg_warm"] = res.x[i : i + p.numel()].view_as(p).clone()
            i += p.numel()

        def loss_at(x: Tensor) -> float:
            return self._loss_at(closure, theta + x)

        if group["backtrack"]:
            d, f_d, it = cg_backtrack(res.iterates, loss_at)
        else:
            d, f_d, it = res.x, loss_at(res.x), res.iterations
        q = float(g @ d) + 0.5 * float(d @ (op @ d))  # the undamped quadratic model
        rho = reduction_ratio(f_d - f0, q)
        if group["adapt_damping"]:
            group["damping"] = lm_damping(lam, rho)
        slope = float(g @ d)
        if group["line_search"]:
            if f_d <= f0 + 1e-2 * slope + rounding_slack(f0) and group["lr"] == 1.0:
                alpha, f_new = 1.0, f_d
            else:
                alpha, f_new = armijo(lambda a: loss_at(a * d), f0, slope, alpha0=group["lr"])
        else:
            alpha, f_new = group["lr"], loss_at(group["lr"] * d)
        self._set(theta + alpha * d)
        group["step"] += 1
        self.last = {
            "loss": f0,
            "new_loss": f_new,
            "rho": rho,
            "damping": lam,
            "cg_iterations": res.iterations,
            "cg_stop": res.reason,
            "backtracked_to": it,
            "alpha": alpha,
        }
        return loss0


class ChainNewton(_SecondOrder):
    """Exact damped Gauss-Newton (default) or Newton steps from the chain solver, for
    ``nn.Sequential`` models: ``d = -(C + lam I)^-1 g`` solved exactly in time linear in
    depth, with Levenberg-Marquardt damping adapted by the reduction ratio.

    Options:
        trust_region: an initial radius; each step then solves the trust-region
            subproblem exactly (Moré-Sorensen: the chain sweep's exact inertia tells
            whether ``C + lam I`` is positive definite, the hard case included) and adapts
            the radius by the reduction ratio.
        saddle_free: ``k``; the step is ``-V (|Lambda| + lam)^-1 V^T g`` with ``(Lambda,
            V)`` the ``k`` eigenpairs of largest magnitude of the Hessian (Lanczos):
            ``|H|`` on that subspace (Dauphin et al. 2014), which repels saddles.

    Usage::

        opt = hesse.optim.ChainNewton(model, loss_fn, damping=1e-2)
        opt.step(closure, batch=(X, y))     # batch: the data of the curvature
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        *,
        lr: float = 1.0,
        damping: float = 1e-2,
        curvature: str = "ggn",
        adapt_damping: bool = True,
        line_search: bool = True,
        trust_region: float | None = None,
        max_radius: float = 1e3,
        saddle_free: int | None = None,
        params: Sequence[str] | None = None,
    ) -> None:
        check_curvature(curvature)
        if damping < 0 or lr <= 0:
            raise ValueError("damping must be >= 0 and lr > 0")
        if trust_region is not None and trust_region <= 0:
            raise ValueError(f"trust_region radius must be positive; got {trust_region}")
        if not isinstance(model, nn.Sequential):
            raise ValueError(
                "ChainNewton needs an nn.Sequential model (a chain); use "
                "HessianFree for other models"
            )
        defaults = {
            "lr": lr,
            "damping": damping,
            "curvature": curvature,
            "adapt_damping": adapt_damping,
            "line_search": line_search,
            "radius": trust_region,
            "max_radius": max_radius,
            "saddle_free": saddle_free,
        }
        super().__init__(model, loss_fn, defaults, params)

    def _smallest(self, prob: Problem, curvature: str) -> tuple[float, Tensor]:
        """The smallest eigenvalue (bisection on exact counts) and its eigenvector
        (inverse iteration with the chain solver)."""
        lam1 = eigenvalue(prob, 1, curvature, tol=1e-10)
        shift = -lam1 + 1e-7 * max(1.0, abs(lam1))
        f = factorize(prob, shift, curvature)  # nearly singular by design
        u = torch.randn(
            prob.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64
        ).to(prob.dtype)
        for _ in range(4):
            u = f.solve(u)
            u = u / u.norm()
        return lam1, u

    def step(self, closure: Closure, batch: Any = None) -> Tensor:  # type: ignore[override]
        """One step; returns the loss before it."""
        group = self.param_groups[0]
        loss0, g, skipped = self._start(closure)
        if skipped:
            return loss0
        f0 = float(loss0)
        prob = self._problem(batch, "batch")
        curvature, lam = group["curvature"], group["damping"]
        op = curvature_operator(prob, curvature)
        theta = self._theta()
        info: dict[str, Any] = {}
        if group["saddle_free"]:
            hop = HessianOperator(prob)
            r = eigs(hop, min(group["saddle_free"], prob.num_params), "magnitude", tol=1e-8)
            V, L = r.eigenvectors, r.eigenvalues
            d = -V @ ((V.T @ g) / (L.abs() + lam))
            op = hop
        elif group["radius"] is not None:
            tr = trust_region_subproblem(
                g,
                group["radius"],
                lambda s: factorize(prob, s, curvature),  # near -lambda_1 by design
                lambda: self._smallest(prob, curvature),
            )
            d = tr.step
            info |= {"multiplier": tr.lam, "hard_case": tr.hard_case}
        else:
            d = factorize(prob, lam, curvature).solve(-g)
        q = float(g @ d) + 0.5 * float(d @ (op @ d))
        f_d = self._loss_at(closure, theta + group["lr"] * d)
        rho = reduction_ratio(f_d - f0, q)
        alpha = group["lr"]
        if group["radius"] is not None and not group["saddle_free"]:
            dn = float(d.norm())
            if not math.isfinite(rho) or rho < 0.25:
                group["radius"] = 0.25 * group["radius"]
            elif rho > 0.75 and dn >= 0.99 * group["radius"]:
                group["radius"] = min(2.0 * group["radius"], group["max_radius"])
            if not (math.isfinite(rho) and rho > 1e-4):
                alpha, f_d = 0.0, f0  # reject the step
        else:
            if group["adapt_damping"]:
                group["damping"] = lm_damping(max(lam, 1e-10), rho)
            if not f_d <= f0 + rounding_slack(f0):
                if group["line_search"]:
                    alpha, f_d = armijo(
                        lambda a: self._loss_at(closure, theta + a * d),
                        f0,
                        float(g @ d),
                        alpha0=0.5 * group["lr"],
                    )
                else:
                    alpha, f_d = 0.0, f0
        self._set(theta + alpha * d)
        group["step"] += 1
        self.last = {
            "loss": f0,
            "new_loss": f_d,
            "rho": rho,
            "damping": lam,
            "alpha": alpha,
            "step_norm": float(d.norm()) * alpha,
            **info,
        }
        return loss0
