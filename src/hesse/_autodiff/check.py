"""Derivative checks: exact derivatives against central finite differences."""

from __future__ import annotations

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
    of the two norms) and the tolerance it was judged by."""

    quantity: str
    block: str
    abs_error: float
    rel_error: float
    tol: float

    @property
    def passed(self) -> bool:
        return self.rel_error <= self.tol


@dataclass
class CheckReport:
    """The result of `check`: a row per quantity and parameter block."""

    rows: list[CheckRow] = field(default_factory=list)
    dtype: str = ""
    step: float = 0.0

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "dtype": self.dtype,
            "step": self.step,
            "rows": [asdict(r) | {"passed": r.passed} for r in self.rows],
        }

    def __str__(self) -> str:
        w = max([len(r.block) for r in self.rows] + [5])
        lines = [f"{'quantity':<9} {'block':<{w}} {'abs err':>10} {'rel err':>10} {'tol':>8}  ok"]
        for r in self.rows:
            lines.append(
                f"{r.quantity:<9} {r.block:<{w}} {r.abs_error:10.2e} {r.rel_error:10.2e} "
                f"{r.tol:8.0e}  {'yes' if r.passed else 'NO'}"
            )
        verdict = "all passed" if self.passed else "FAILED"
        lines.append(
            f"{verdict} ({self.dtype}, central differences, relative step {self.step:.1e})"
        )
        return "\n".join(lines)


def _rel(a: Tensor, b: Tensor, floor: float) -> tuple[float, float]:
    err = float((a - b).norm())
    return err, err / max(float(a.norm()), float(b.norm()), floor)


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

    Args:
        problem: the `Problem` (use float64 for tight checks).
        hessian: check the dense Hessian column by column; default when ``P <= 600``.
        seed: seed of the random directions.
        rtol: relative tolerance (default ``1e-5`` for float64, ``3e-2`` otherwise;
            central differences lose about a third of the digits).

    Returns:
        a `CheckReport`; ``report.passed`` tells whether all rows are within ``rtol``,
        ``print(report)`` shows the table.
    """
    dt = problem.dtype
    eps = torch.finfo(dt).eps
    tol = rtol if rtol is not None else (1e-5 if dt == torch.float64 else 3e-2)
    rel_step = eps ** (1.0 / 3.0)  # balances truncation h^2 against round-off eps/h
    gen = torch.Generator().manual_seed(seed)
    theta = problem.param_vector()
    scale = max(1.0, float(theta.abs().max()))
    h = rel_step * scale
    P = problem.num_params
    do_hessian = P <= 600 if hessian is None else hessian

    def at(x: Tensor) -> list[Tensor]:
        return problem.unflatten(x)

    _, g0 = products.loss_and_gradient(problem)
    floor = 1e3 * eps * (1.0 + float(g0.norm()))
    report = CheckReport(dtype=str(dt).replace("torch.", ""), step=rel_step)
    for name, sl in problem.slices.items():
        d = torch.zeros(P, dtype=dt, device=problem.device)
        d[sl] = torch.randn(sl.stop - sl.start, generator=gen, dtype=dt).to(problem.device)
        d /= d.norm()
        lp = problem.loss(at(theta + h * d))
        lm = problem.loss(at(theta - h * d))
        fd = (lp - lm) / (2 * h)
        ex = g0 @ d
        report.rows.append(
            CheckRow("gradient", name, *_rel(ex.reshape(1), fd.reshape(1), floor), tol)
        )
        _, gp = products.loss_and_gradient(problem, at(theta + h * d))
        _, gm = products.loss_and_gradient(problem, at(theta - h * d))
        fd_hv = (gp - gm) / (2 * h)
        Hd = products.hessian_matmat(problem, d.unsqueeze(1))[:, 0]
        report.rows.append(CheckRow("hvp", name, *_rel(Hd, fd_hv, floor), tol))
    if do_hessian:
        for name, sl in problem.slices.items():
            cols = []
            for j in range(sl.start, sl.stop):
                e = torch.zeros(P, dtype=dt, device=problem.device)
                e[j] = h
                _, gp = products.loss_and_gradient(problem, at(theta + e))
                _, gm = products.loss_and_gradient(problem, at(theta - e))
                cols.append((gp - gm) / (2 * h))
            exact = products.hessian_matmat(problem, torch.eye(P, dtype=dt)[:, sl].to(theta))
            report.rows.append(
                CheckRow("hessian", name, *_rel(exact, torch.stack(cols, 1), floor), tol)
            )
    return report
