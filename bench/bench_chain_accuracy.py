"""The stable chain sweep: its accuracy against damping, and its price against the sweep
before pivoting, a dense LDL^T and MINRES.

Usage:
    python bench/bench_chain_accuracy.py [--quick] [--json out.json]

float64, CPU, one process. Three tables:

1. Accuracy against relative damping ``eps / ||C||`` (1e-2 .. 1e-10) on the issue's
   net (8 tanh layers of width 8, batch 6, MSE; P = 576), for the Hessian and the GGN:
   the relative residual ``||(C + eps I) x - v|| / ||v||`` (dense float64 ``C``) of
   - "before": the sweep with no pivoting and no refinement (hesse before the stable
     sweep; `hesse._factor.elimination.UNPIVOTED`),
   - "raw": the stable sweep, no refinement,
   - "refined": the stable sweep with `solve`'s refinement (steps in brackets),
   - "LDL^T": a dense Bunch-Kaufman factorisation of the same matrix
     (``torch.linalg.ldl_factor`` / ``ldl_solve``),
   - "MINRES": scipy's MINRES on Hessian-vector products, given the stable sweep's time
     (factorise + solve) as its budget,
   and the stable sweep's largest delayed front, its time and the dense LDL^T's.
   "floor" is float64's limit ``u ||C + eps I|| ||x|| / ||v||``.
2. Cost against the sweep before pivoting (ratio stable / before, factorise + solve,
   the best of 7 interleaved rounds in this process, 3 on the paper configuration) on
   the chain benchmark's tanh chains (w = 16, b = 4,
   L = 8 .. 64, eps = 1e-2, Hessian) and on the reference paper's configuration
   (8 bias-free ReLU layers, hidden 24, 768 inputs, batch 64, P = 22,128,
   eps = 1e-3, Hessian and GGN), with the delayed fronts and refinement steps; and
   against the sweep before pivoting checked and refined as the stable one is (its
   `solve_ex`: one product with the true operator, refinement while it halves the
   residual), the price of knowing its answer.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import scipy.sparse.linalg as sla
import torch
from bench_chain import build  # the chain benchmark's tanh chains
from torch import nn

import hesse
from hesse._chain.linear import _Wide
from hesse._factor.elimination import Elimination

U = torch.finfo(torch.float64).eps


def issue_net(seed: int = 0) -> hesse.Problem:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(8):
        layers += [nn.Linear(8, 8)] + ([nn.Tanh()] if i < 7 else [])
    model = nn.Sequential(*layers).double()
    X, y = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    return hesse.Problem(model, nn.MSELoss(), (X.double(), y.double()))


def paper_net(seed: int = 0) -> hesse.Problem:
    torch.manual_seed(seed)
    widths = [768] + [24] * 7 + [10]
    layers: list[nn.Module] = []
    for i in range(8):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=False))
        if i < 7:
            layers.append(nn.ReLU())
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 768, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (64,), generator=g)
    return hesse.Problem(nn.Sequential(*layers).double(), nn.CrossEntropyLoss(), (X, y))


@contextlib.contextmanager
def unpivoted() -> Iterator[None]:
    """The sweep as it was before it pivoted, for the "before" columns: every stage
    takes the first factorisation that succeeds (Cholesky, else Bunch-Kaufman), with no
    growth or rank test and no eigen tier, and a wide Linear stage eliminates its
    whole complement (W3), delaying none of it (W5). A patch of two internals, here
    and nowhere in the library."""
    blocks, split = Elimination._blocks, _Wide._split

    def no_tests(self, Q_uu, Q_uz, Q_zz, tol, limit):
        return blocks(self, Q_uu, Q_uz, Q_zz, -math.inf, math.inf)

    Elimination._blocks = no_tests
    _Wide._split = staticmethod(lambda d, Pz, ctx: None)
    try:
        yield
    finally:
        Elimination._blocks = blocks
        _Wide._split = staticmethod(split)


def _factor(prob: hesse.Problem, eps: float, curvature: str) -> hesse.Factorization:
    """A fresh chain factorisation (`hesse.engine`, not `factorize`, which keeps the
    last factorisations on the problem: a repeat or an unpivoted run would get those)."""
    return hesse.engine(prob, curvature, method="chain").factor(eps)


def _residual(C: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> float:
    return float((C @ x - v).norm() / v.norm())


def accuracy_table(rels: list[float]) -> list[dict]:
    prob = issue_net()
    P = prob.num_params
    v = torch.randn(P, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows = []
    print(
        f"\nTable 1: accuracy against damping, 8 x tanh(8), batch 6, MSE, P = {P}\n"
        f"{'C':>8}{'eps/|C|':>9}{'before':>10}{'raw':>10}{'refined':>14}{'LDL^T':>10}"
        f"{'MINRES':>10}{'floor':>10}{'front':>7}{'sweep s':>9}{'LDL s':>8}"
    )
    for curvature in ("hessian", "ggn"):
        C = hesse.hessian(prob, progress=False) if curvature == "hessian" else hesse.ggn(prob)
        norm = float(torch.linalg.eigvalsh(C).abs().max())
        op = (hesse.HessianOperator if curvature == "hessian" else hesse.GGNOperator)(prob)
        for rel in rels:
            eps = rel * norm
            Ce = C + eps * torch.eye(P, dtype=torch.float64)
            try:
                with unpivoted():
                    f = _factor(prob, eps, curvature)
                    before = _residual(Ce, f.solve(v, max_refine=0), v)
            except (ArithmeticError, ValueError, RuntimeError):
                before = float("nan")
            t = time.perf_counter()
            f = _factor(prob, eps, curvature)
            res = f.solve_ex(v)
            t_sweep = time.perf_counter() - t
            raw = _residual(Ce, f.solve(v, max_refine=0), v)
            refined = _residual(Ce, res.x, v)
            t = time.perf_counter()
            LD, piv = torch.linalg.ldl_factor(Ce)
            xl = torch.linalg.ldl_solve(LD, piv, v[:, None])[:, 0]
            t_ldl = time.perf_counter() - t
            ldl = _residual(Ce, xl, v)
            # MINRES with the sweep's time as budget: as many products as fit in it
            lin = op.to_scipy()
            shifted = sla.LinearOperator(
                (P, P), matvec=lambda x, lin=lin, eps=eps: lin @ x + eps * x
            )
            t = time.perf_counter()
            for _ in range(5):
                shifted @ v.numpy()
            per_product = (time.perf_counter() - t) / 5
            iters = max(1, int(t_sweep / per_product))
            xm, _info = sla.minres(shifted, v.numpy(), rtol=1e-16, maxiter=iters)
            minres = _residual(Ce, torch.as_tensor(xm), v)
            floor = U * float(torch.linalg.matrix_norm(Ce, 2) * res.x.norm() / v.norm())
            row = {
                "curvature": curvature,
                "rel_damping": rel,
                "before": before,
                "raw": raw,
                "refined": refined,
                "refinement_steps": res.refinement_steps,
                "ldl": ldl,
                "minres": minres,
                "minres_iterations": iters,
                "floor": floor,
                "max_delayed": f.status.max_delayed,
                "sweep_s": t_sweep,
                "ldl_s": t_ldl,
            }
            rows.append(row)
            print(
                f"{curvature:>8}{rel:>9.0e}{before:>10.1e}{raw:>10.1e}"
                f"{refined:>10.1e} ({res.refinement_steps}){ldl:>10.1e}{minres:>10.1e}"
                f"{floor:>10.1e}{f.status.max_delayed:>7}{t_sweep:>9.3f}{t_ldl:>8.3f}"
            )
    return rows


def _interleaved(fns: list, rounds: int) -> list[tuple[float, object]]:
    """Each of ``fns`` timed once a round for ``rounds`` rounds, in turn: the best time
    of each and its last result."""
    best = [(float("inf"), None)] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t
            best[i] = (min(best[i][0], dt), out)
    return best


def cost_table(depths: list[int], paper: bool) -> list[dict]:
    cases = [(f"tanh L={L} w=16 b=4", build(L, 16, 4), 1e-2, ("hessian",)) for L in depths]
    if paper:
        cases.append(("paper ReLU 768-24x7-10 b=64", paper_net(), 1e-3, ("hessian", "ggn")))
    rows = []
    print(
        "\nTable 2: the stable sweep against the sweep before pivoting (factorise + solve)\n"
        f"{'problem':>30}{'C':>8}{'P':>7}{'before s':>10}{'stable s':>10}{'ratio':>7}"
        f"{'factor ratio':>13}{'front':>7}{'refine':>7}{'residual':>10}"
        f"{'before checked s':>17}{'ratio':>7}{'its refine':>11}{'its residual':>13}"
    )
    for name, prob, eps, curvatures in cases:
        v = torch.randn(
            prob.num_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64
        )
        for curvature in curvatures:

            def run(op, pivoted, prob=prob, c=curvature, e=eps, v=v):
                with contextlib.nullcontext() if pivoted else unpivoted():
                    f = _factor(prob, e, c)
                    if op == "solve":
                        return f.solve(v, max_refine=0)
                    return f.solve_ex(v) if op == "checked" else f

            # interleaved rounds, the best of each: the machine's drift between them
            # falls on every column alike
            (tb_f, _), (tb, _), (tbc, res_b), (ts_f, f), (ts, res) = _interleaved(
                [
                    functools.partial(run, op, pivoted)
                    for op, pivoted in [
                        ("factor", False),
                        ("solve", False),
                        ("checked", False),
                        ("factor", True),
                        ("checked", True),
                    ]
                ],
                rounds=7 if prob.num_params < 10**4 else 3,
            )
            row = {
                "problem": name,
                "curvature": curvature,
                "P": prob.num_params,
                "before_s": tb,
                "stable_s": ts,
                "ratio": ts / tb,
                "before_checked_s": tbc,
                "ratio_checked": ts / tbc,
                "before_refinement_steps": res_b.refinement_steps,
                "before_residual": res_b.residual,
                "factor_ratio": ts_f / tb_f,
                "max_delayed": f.status.max_delayed,
                "kinds": list(f.status.kinds),
                "refinement_steps": res.refinement_steps,
                "residual": res.residual,
            }
            rows.append(row)
            print(
                f"{name:>30}{curvature:>8}{prob.num_params:>7}{tb:>10.3f}{ts:>10.3f}"
                f"{ts / tb:>7.2f}{ts_f / tb_f:>13.2f}{f.status.max_delayed:>7}"
                f"{res.refinement_steps:>7}{res.residual:>10.1e}"
                f"{tbc:>17.3f}{ts / tbc:>7.2f}{res_b.refinement_steps:>11}{res_b.residual:>13.1e}"
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rows (a smoke run)")
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64")
    rels = [1e-2, 1e-6, 1e-10] if args.quick else [1e-2, 1e-4, 1e-6, 1e-8, 1e-10]
    acc = accuracy_table(rels)
    cost = cost_table([8] if args.quick else [8, 16, 32, 64], paper=not args.quick)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"torch": torch.__version__, "accuracy": acc, "cost": cost}, indent=2)
        )


if __name__ == "__main__":
    main()
