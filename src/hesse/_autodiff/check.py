"""Derivative checks: exact derivatives against central finite differences."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from hesse._autodiff import products
from hesse._autodiff.problem import Problem

__all__ = ["CheckReport", "CheckRow", "check"]


@dataclass(frozen=True)
class CheckRow:
    """One comparison: ``quantity`` ("gradient", "hvp", "hessian") on parameter
    ``block``, with the errors ``|exact - fd|`` (absolute, and relative to the larger
    of the two norms), the tolerance it was judged by, and whether the finite
    differences themselves could be trusted (``fd_spread``: the relative distance
    between the central differences at steps ``h`` and ``2h``, measured for a row that
    missed the tolerance; ``nan`` when not needed)."""

    quantity: str
    block: str
    abs_error: float
    rel_error: float
    tol: float
    fd_spread: float = float("nan")

    @property
    def passed(self) -> bool:
        return self.rel_error <= self.tol

    @property
    def verdict(self) -> str:
        """``"ok"``; ``"FAILED"`` (the finite differences agree with each other but not
        with the exact derivative: a wrong derivative); or ``"unreliable"`` (they do not
        agree with each other: a kink such as ReLU or max-pooling within the step, or
        float32 rounding; nothing can be concluded)."""
        if self.passed:
            return "ok"
        return "unreliable" if not self.fd_spread <= self.tol else "FAILED"


@dataclass
class CheckReport:
    """The result of `check`: a row per quantity and parameter block.

    ``passed``: no row FAILED (a row whose finite differences are unreliable is not a
    failure, but ``conclusive`` is then ``False`` and the table says why)."""

    rows: list[CheckRow] = field(default_factory=list)
    dtype: str = ""
    step: float = 0.0

    @property
    def passed(self) -> bool:
        return all(r.verdict != "FAILED" for r in self.rows)

    @property
    def conclusive(self) -> bool:
        return all(r.verdict != "unreliable" for r in self.rows)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "conclusive": self.conclusive,
            "dtype": self.dtype,
            "step": self.step,
            "rows": [asdict(r) | {"passed": r.passed, "verdict": r.verdict} for r in self.rows],
        }

    def __str__(self) -> str:
        w = max([len(r.block) for r in self.rows] + [5])
        head = f"{'quantity':<9} {'block':<{w}} {'abs err':>10} {'rel err':>10} {'tol':>8}  ok"
        lines = [head]
        mark = {"ok": "yes", "FAILED": "NO", "unreliable": "? (fd unreliable)"}
        for r in self.rows:
            lines.append(
                f"{r.quantity:<9} {r.block:<{w}} {r.abs_error:10.2e} {r.rel_error:10.2e} "
                f"{r.tol:8.0e}  {mark[r.verdict]}"
            )
        where = f"({self.dtype}, central differences, relative step {self.step:.1e})"
        if not self.passed:
            lines.append(f"FAILED {where}")
        elif self.conclusive:
            lines.append(f"all passed {where}")
        else:
            n = sum(r.verdict == "unreliable" for r in self.rows)
            advice = "rerun in float64 (model.double())" if self.dtype != "float64" else ""
            advice += " at parameters away from kinks" if advice else "move away from kinks"
            lines.append(
                f"inconclusive {where}: on {n} row(s) the finite differences at steps h and "
                "2h disagree, so they cannot judge the derivative (a kink such as ReLU or "
                f"max-pooling within the step, or float32 rounding); {advice}"
            )
        return "\n".join(lines)


def _rel(a: Tensor, b: Tensor, floor: float) -> tuple[float, float]:
    err = float((a - b).norm())
    return err, err / max(float(a.norm()), float(b.norm()), floor)


class _Checker:
    """Central differences of the loss and the gradient along directions, at step ``h``
    and, for a row that misses the tolerance, also at ``2h``."""

    def __init__(self, problem: Problem, h: float, floor: float, tol: float) -> None:
        self.problem, self.h, self.floor, self.tol = problem, h, floor, tol
        self.theta = problem.param_vector()

    def _loss_fd(self, d: Tensor, h: float) -> Tensor:
        prob, th = self.problem, self.theta
        return (prob.loss(prob.unflatten(th + h * d)) - prob.loss(prob.unflatten(th - h * d))) / (
            2 * h
        )

    def _grad_fd(self, D: Tensor, h: float) -> Tensor:
        """``(g(x + h d) - g(x - h d)) / 2h`` for each column ``d`` of ``D``."""
        prob, th = self.problem, self.theta
        cols = []
        for d in D.T:
            _, gp = products.loss_and_gradient(prob, prob.unflatten(th + h * d))
            _, gm = products.loss_and_gradient(prob, prob.unflatten(th - h * d))
            cols.append((gp - gm) / (2 * h))
        return torch.stack(cols, 1)

    def directional(self, block: str, d: Tensor, L0: float, g0: Tensor) -> list[CheckRow]:
        """The gradient and HVP rows along a unit direction ``d`` in ``block``."""
        grad_row = self.row(
            "gradient", block, (g0 @ d).reshape(1), lambda h: self._loss_fd(d, h), abs(L0)
        )
        Hd = products.hessian_matmat(self.problem, d.unsqueeze(1))
        hvp_row = self.row(
            "hvp", block, Hd, lambda h: self._grad_fd(d.unsqueeze(1), h), float(g0.norm())
        )
        return [grad_row, hvp_row]

    def row(
        self,
        quantity: str,
        block: str,
        exact: Tensor,
        fd: Callable[[float], Tensor],
        magnitude: float,
    ) -> CheckRow:
        """Judge ``exact`` against ``fd(h)``. The finite differences of a function of
        size ``magnitude`` carry a rounding error of about ``eps magnitude / h``: errors
        within ten times that pass whatever the relative error (a derivative far smaller
        than the function cannot be resolved better)."""
        eps = torch.finfo(exact.dtype).eps
        rounding = 10.0 * eps * max(1.0, magnitude) / self.h
        floor = max(self.floor, rounding / self.tol)
        first = fd(self.h).reshape(exact.shape)
        err, rel = _rel(exact, first, floor)
        if rel <= self.tol:
            return CheckRow(quantity, block, err, rel, self.tol)
        spread = _rel(first, fd(2 * self.h).reshape(exact.shape), floor)[1]
        return CheckRow(quantity, block, err, rel, self.tol, spread)


def check(
    problem: Problem,
    *,
    hessian: bool | None = None,
    seed: int = 0,
    rtol: float | None = None,
) -> CheckReport:
    """Compare the exact gradient, Hessian-vector products and (for small models)
    the dense Hessian against central finite differences, per parameter block.

    For each parameter block ``b`` a random direction ``d`` supported on ``b`` gives:
    ``gradient``: ``g . d`` vs ``(L(x + h d) - L(x - h d)) / 2h``; ``hvp``: ``H d`` vs
    ``(g(x + h d) - g(x - h d)) / 2h``; ``hessian``: the columns of ``H`` belonging to
    ``b`` vs finite differences of the gradient (2 gradients per column).

    Finite differences know their limits: a row that misses the tolerance is differenced
    again at step ``2h``; when the two disagree, the row is "unreliable" (a kink such as
    ReLU or max-pooling within the step, or float32 rounding), not FAILED, and the report
    says so and suggests float64. A wrong derivative gives differences that agree with
    each other and not with it: FAILED.

    Args:
        problem: the `Problem` (use float64 for tight checks).
        hessian: check the dense Hessian column by column; default when ``P <= 600``.
        seed: seed of the random directions.
        rtol: relative tolerance (default ``1e-5`` for float64, ``3e-2`` otherwise;
            central differences lose about a third of the digits).

    Returns:
        a `CheckReport`; ``report.passed`` tells whether no row failed,
        ``report.conclusive`` whether every row could be judged, ``print(report)`` shows
        the table.
    """
    dt = problem.dtype
    eps = torch.finfo(dt).eps
    tol = rtol if rtol is not None else (1e-5 if dt == torch.float64 else 3e-2)
    rel_step = eps ** (1.0 / 3.0)  # balances truncation h^2 against round-off eps/h
    gen = torch.Generator().manual_seed(seed)
    theta = problem.param_vector()
    P = problem.num_params
    L0, g0 = products.loss_and_gradient(problem)
    c = _Checker(
        problem,
        rel_step * max(1.0, float(theta.abs().max())),
        1e3 * eps * (1.0 + float(g0.norm())),
        tol,
    )
    report = CheckReport(dtype=str(dt).replace("torch.", ""), step=rel_step)
    for name, sl in problem.slices.items():
        d = torch.zeros(P, dtype=dt, device=problem.device)
        d[sl] = torch.randn(sl.stop - sl.start, generator=gen, dtype=dt).to(problem.device)
        report.rows += c.directional(name, d / d.norm(), float(L0), g0)
    if P <= 600 if hessian is None else hessian:
        for name, sl in problem.slices.items():
            E = torch.eye(P, dtype=dt)[:, sl].to(theta)
            exact = products.hessian_matmat(problem, E)
            report.rows.append(
                c.row("hessian", name, exact, lambda h, E=E: c._grad_fd(E, h), float(g0.norm()))
            )
    return report
