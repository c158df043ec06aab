"""``hesse analyze``'s computations, done once and shared: the problem, its loss and
gradient, the dense decomposition and eigenvalues, and the exact engine of the first
samples (float64) feed the summary, the JSON, the exact section and the report alike."""

from __future__ import annotations

import functools
import time
import warnings
from typing import Any

import torch
from torch import Tensor

import hesse
from hesse._autodiff.bishop import bishop_route
from hesse._autodiff.problem import float64_problem
from hesse._cli.inputs import Setup
from hesse._util.memory import MemoryBudgetError

__all__ = ["NEGATIVE_TOL", "Analysis", "dense_summary", "lanczos_summary"]

NEGATIVE_TOL = 1e-9  # the chain section counts eigenvalues below -NEGATIVE_TOL as negative


def dense_summary(analysis: Analysis) -> dict[str, Any]:
    """Trace, extreme eigenvalues, exact counts, the chain-rule split and per-layer block
    norms from the dense decomposition."""
    prob, dec, evals = analysis.problem, analysis.decomposition, analysis.hessian_eigenvalues
    P = prob.num_params
    tol = float(evals.abs().max()) * P * torch.finfo(prob.dtype).eps
    layers, counts, norms = dec.layer_blocks(prob)
    rows = [
        {"layer": layer, "params": count, **{f"{k}_norm": float(m[i, i]) for k, m in norms.items()}}
        for i, (layer, count) in enumerate(zip(layers, counts, strict=True))
    ]
    return {
        "method": "dense",
        "trace": float(dec.hessian.trace()),
        "eig_max": float(evals[-1]),
        "eig_min": float(evals[0]),
        "num_negative": int((evals < -tol).sum()),
        "num_zero": int((evals.abs() <= tol).sum()),
        "zero_tol": tol,
        "ggn_trace": float(dec.ggn.trace()),
        "residual_trace": float(dec.residual.trace()),
        "layers": rows,
    }


def lanczos_summary(analysis: Analysis) -> dict[str, Any]:
    """The extreme eigenvalues by Lanczos (`hesse.eigs`, seeded: every rank of a
    distributed run takes the same steps), for models beyond ``--max-dense``."""
    op = hesse.HessianOperator(analysis.problem)
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the residual is in the result
        top = hesse.eigs(op, 1, "largest", tol=1e-6, generator=gen)
        bottom = hesse.eigs(op, 1, "smallest", tol=1e-6, generator=gen)
    return {
        "method": "lanczos",
        "eig_max": float(top.eigenvalues[0]),
        "eig_min": float(bottom.eigenvalues[0]),
    }


class Analysis:
    """One setup's analysis; each quantity computed on first use and kept.

    Args:
        setup: the model, loss and data.
        max_dense: the largest ``P`` for the dense Hessian.
        exact_samples: samples of the exact section (0: none).
        damping: ``eps`` of the exact section's ``H + eps I``.
        method: the exact section's engine (``"auto"``: the plan's choice).
        progress: progress bars (``None``: when stderr is a terminal).
    """

    def __init__(
        self,
        setup: Setup,
        *,
        max_dense: int,
        exact_samples: int,
        damping: float,
        progress: bool | None,
        method: str = "auto",
    ) -> None:
        self.setup, self.max_dense, self.damping = setup, max_dense, damping
        self.exact_samples, self.progress, self.method = exact_samples, progress, method

    @functools.cached_property
    def problem(self) -> hesse.Problem:
        s = self.setup
        return hesse.Problem(s.model, s.loss_fn, (s.X, s.y))

    @functools.cached_property
    def loss_and_gradient(self) -> tuple[Tensor, Tensor]:
        return hesse.loss_and_gradient(self.problem)

    @property
    def dense(self) -> bool:
        return self.problem.num_params <= self.max_dense

    @functools.cached_property
    def decomposition(self) -> hesse.Decomposition:
        return hesse.decompose(self.problem, progress=self.progress)

    @functools.cached_property
    def hessian_eigenvalues(self) -> Tensor:
        return torch.linalg.eigvalsh(self.decomposition.hessian)

    # ------------------------------------------------------------------ the exact section
    @functools.cached_property
    def exact_problem(self) -> hesse.Problem:
        """The first ``exact_samples`` samples, always in float64 (on a copy: counts near
        zero and log-determinants need the digits)."""
        s = self.setup
        # the first samples of the whole data: under torchrun, each rank's part of them
        n = max(0, min(self.exact_samples - s.offset, len(s.X)))
        return float64_problem(s.model, s.loss_fn, s.X[:n], s.y[:n])

    @functools.cached_property
    def plan(self) -> hesse.Plan:
        """The cost of each exact engine for the section's Hessian (`hesse.plan`)."""
        return hesse.plan(self.exact_problem, "hessian")

    @functools.cached_property
    def engine(self) -> Any:
        """The section's Hessian engine (``--method``; auto: the plan's choice), built
        once for its counts, log-determinant, Newton step and the report's histogram."""
        method = self.method if self.method != "auto" else self.plan.choice
        return hesse.engine(self.exact_problem, "hessian", method=method, progress=self.progress)

    def check_exact_memory(self) -> None:
        """Refuse, before any other work, an exact section that no engine can take within
        the memory budget (or the engine asked for cannot)."""
        if self.exact_samples <= 0:
            return
        n = self.exact_problem.num_samples
        try:
            if self.method == "auto" and self.plan.choice is None:
                raise MemoryBudgetError(f"no exact engine fits the memory budget:\n{self.plan}")
            self.engine  # noqa: B018 - built (and its memory checked) before the analysis
        except MemoryBudgetError as err:
            raise SystemExit(
                f"hesse analyze: the exact section ({n} samples): {err}; pass a smaller "
                "--chain-samples, or 0 to skip it"
            ) from None
        except ValueError as err:  # the engine asked for does not take this model
            raise SystemExit(f"hesse analyze: --method {self.method}: {err}") from None

    def exact_summary(self) -> dict[str, Any]:
        """Exact quantities from one factorisation engine: the number of negative Hessian
        eigenvalues, ``log det(H + eps I)`` and the damped Newton and Gauss-Newton steps'
        predicted loss change, cross-checked against the dense eigendecomposition of the
        same problem when it is small enough."""
        prob, eng, eps, tau = self.exact_problem, self.engine, self.damping, NEGATIVE_TOL
        t0 = time.perf_counter()
        # "negative" = below -tau: a Hessian may have many eigenvalues within rounding of 0
        out: dict[str, Any] = {
            "method": eng.method,
            "samples": prob.num_samples,
            "damping": eps,
            "negative_below": -tau,
        }
        out["num_negative"] = eng.factor(tau).inertia().negative
        f = eng.factor(eps)
        sign, logabs = f.logdet()
        out |= {"logdet_sign": sign, "logdet": logabs, "inertia": list(f.inertia())}
        st = f.status
        out["pivoting"] = {"max_delayed": st.max_delayed, "growth": st.growth, "kinds": st.kinds}
        g = hesse.gradient(prob)
        ggn = hesse.factorize(prob, eps, "ggn", method=self.method, progress=self.progress)
        for curvature, fac in (("hessian", f), ("ggn", ggn)):
            try:
                step = fac.solve(-g)
            except hesse.SingularPivotError:  # --damping 0 on a singular C: say so
                out[f"{curvature}_step_predicted_change"] = None
                out[f"{curvature}_step_norm"] = None
                out[f"{curvature}_step_singular"] = (
                    f"singular, {fac.inertia().zero} zero eigenvalues"
                )
                continue
            out[f"{curvature}_step_predicted_change"] = 0.5 * float(g @ step) - 0.5 * eps * float(
                step @ step
            )
            out[f"{curvature}_step_norm"] = float(step.norm())
        out["ggn_method"] = ggn.status.method
        out["laplace"] = self.laplace_summary()
        out["seconds"] = time.perf_counter() - t0
        if prob.num_params <= self.max_dense:
            # Bishop's propagation where it applies (one pass, not P products): either
            # is independent of the engine checked
            how = "bishop" if bishop_route(prob) is not None else "autodiff"
            ev = torch.linalg.eigvalsh(hesse.hessian(prob, method=how, progress=False))
            shifted = ev + eps
            out["dense_check"] = {
                "num_negative": int((ev < -tau).sum()),
                "logdet": float(torch.log(shifted.abs()).sum()),
                "inertia": [int((shifted < 0).sum()), 0, int((shifted > 0).sum())],
            }
        return out

    def laplace_summary(self) -> dict[str, Any] | None:
        """The exact Laplace evidence (GGN posterior, laplace-torch's conventions) of the
        section's samples at prior precision 1 and at the scalar prior that maximises it;
        ``None`` for a loss that is not a likelihood hesse knows (cross-entropy: class
        labels; MSE: regression with sigma_noise 1)."""
        prob = self.exact_problem
        lf = prob.loss_fn
        if isinstance(lf, torch.nn.CrossEntropyLoss):
            likelihood = "classification"
        elif isinstance(lf, torch.nn.MSELoss):
            likelihood = "regression"
        else:
            return None
        # this rank's samples of the section (under torchrun a rank may hold none)
        batches = [(x, t) for x, t, _w in prob.batches()]
        try:
            la = hesse.Laplace(prob.model, likelihood, batches, method=self.method)
        except (ValueError, MemoryError) as err:
            return {"skipped": str(err).split(";")[0]}
        at_one = la.log_marginal_likelihood(1.0)
        best = la.optimize_prior_precision("marglik")
        return {
            "likelihood": likelihood,
            "method": la.engine.method,
            "log_evidence_prior_1": at_one,
            "best_prior_precision": best,
            "log_evidence_best": la.log_marginal_likelihood(),
        }

    # ------------------------------------------------------------------ the summary
    def summary(self) -> dict[str, Any]:
        """The exact curvature summary as a JSON-ready dict: the problem, then the dense
        (or, beyond ``max_dense``, Lanczos) section, then the plan and the exact section."""
        prob = self.problem
        t0 = time.perf_counter()
        loss, g = self.loss_and_gradient
        out: dict[str, Any] = {
            "model": self.setup.description,
            "num_params": prob.num_params,
            "num_samples": prob.num_samples,
            "dtype": str(prob.dtype).replace("torch.", ""),
            "loss": float(loss),
            "grad_norm": float(g.norm()),
        }
        out |= dense_summary(self) if self.dense else lanczos_summary(self)
        out["seconds"] = time.perf_counter() - t0
        if self.exact_samples > 0:
            out["plan"] = str(self.plan)
            out["exact"] = self.exact_summary()
        return out

    def report(self, seed: int) -> dict[str, Any]:
        """The ``--report`` data (`hesse._report.compute.build_report`), reusing what the
        summary computed."""
        from hesse._report.compute import build_report

        return build_report(
            self.problem,
            description=self.setup.description,
            max_dense=self.max_dense,
            seed=seed,
            progress=self.progress,
            loss_and_gradient=self.loss_and_gradient,
            decomposition=self.decomposition if self.dense else None,
            hessian_eigenvalues=self.hessian_eigenvalues if self.dense else None,
            engine=self.engine if self.exact_samples > 0 else None,
        )
