"""``hesse analyze``'s computations, done once and shared: the problem, its loss and
gradient, the dense decomposition and eigenvalues, and the chain of the first samples
(float64) feed the summary, the JSON, the chain section and the report alike."""

from __future__ import annotations

import functools
import time
from typing import Any

import torch
from torch import Tensor, nn

import hesse
from hesse._autodiff.problem import float64_problem
from hesse._cli.inputs import Setup
from hesse._util.memory import MemoryBudgetError, check_memory

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
    """The extreme eigenvalues by Lanczos (scipy's ``eigsh``), for models beyond
    ``--max-dense``."""
    from scipy.sparse.linalg import eigsh

    lin = hesse.HessianOperator(analysis.problem).to_scipy()
    top = eigsh(lin, k=1, which="LA", return_eigenvectors=False)
    bottom = eigsh(lin, k=1, which="SA", return_eigenvectors=False)
    return {"method": "lanczos", "eig_max": float(top[0]), "eig_min": float(bottom[0])}


class Analysis:
    """One setup's analysis; each quantity computed on first use and kept.

    Args:
        setup: the model, loss and data.
        max_dense: the largest ``P`` for the dense Hessian.
        chain_samples: samples of the chain section (0: none).
        damping: ``eps`` of the chain section's ``H + eps I``.
        progress: progress bars (``None``: when stderr is a terminal).
    """

    def __init__(
        self,
        setup: Setup,
        *,
        max_dense: int,
        chain_samples: int,
        damping: float,
        progress: bool | None,
    ) -> None:
        self.setup, self.max_dense, self.damping = setup, max_dense, damping
        self.chain_samples, self.progress = chain_samples, progress
        self.chain_skipped = "the model is not an nn.Sequential"

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

    # ------------------------------------------------------------------ the chain
    @property
    def has_chain(self) -> bool:
        return self.chain_samples > 0 and isinstance(self.setup.model, nn.Sequential)

    @functools.cached_property
    def chain(self) -> hesse.Chain | None:
        """The chain of the first ``chain_samples`` samples, always in float64 (on a
        copy: counts near zero and log-determinants need the digits); ``None`` when the
        model is not a chain the solver takes."""
        if not self.has_chain:
            return None
        s, n = self.setup, min(self.chain_samples, len(self.setup.X))
        try:
            return hesse.Chain.from_problem(float64_problem(s.model, s.loss_fn, s.X[:n], s.y[:n]))
        except (ValueError, TypeError) as err:
            self.chain_skipped = str(err)
            return None

    def check_chain_memory(self) -> None:
        """Refuse, before any other work, a chain section that would not fit in memory."""
        if self.chain is None:
            return
        try:
            check_memory(
                self.chain.memory_estimate(),
                f"the chain section ({self.chain.inputs.shape[0]} samples)",
                "pass a smaller --chain-samples (its memory grows as (samples x width)^2), "
                "or 0 to skip it",
            )
        except MemoryBudgetError as err:
            raise SystemExit(f"hesse analyze: {err}") from None

    def chain_summary(self) -> dict[str, Any]:
        """Exact chain-sweep quantities: the number of negative Hessian eigenvalues,
        ``log det(H + eps I)`` and the damped Newton and Gauss-Newton steps' predicted
        loss change, cross-checked against the dense eigendecomposition of the same
        problem when it is small enough."""
        chain, eps, tau = self.chain, self.damping, NEGATIVE_TOL
        assert chain is not None
        t0 = time.perf_counter()
        # "negative" = below -tau: a Hessian may have many eigenvalues within rounding of 0
        out: dict[str, Any] = {
            "samples": chain.inputs.shape[0],
            "damping": eps,
            "negative_below": -tau,
        }
        out["num_negative"] = hesse.count_eigenvalues(chain, below=-tau, progress=self.progress)
        f = hesse.factorize(chain, eps, "hessian", progress=self.progress)
        sign, logabs = f.logdet()
        out |= {"logdet_sign": sign, "logdet": logabs, "inertia": list(f.inertia())}
        st = f.status
        out["pivoting"] = {"max_delayed": st.max_delayed, "growth": st.growth, "kinds": st.kinds}
        for curvature in ("hessian", "ggn"):
            step = hesse.newton_step(chain, eps, curvature, method="chain")
            out[f"{curvature}_step_predicted_change"] = step.predicted_change
            out[f"{curvature}_step_norm"] = float(step.step.norm())
        out["seconds"] = time.perf_counter() - t0
        if chain.num_params <= self.max_dense:
            ev = torch.linalg.eigvalsh(hesse.hessian(chain.problem, progress=False))
            shifted = ev + eps
            out["dense_check"] = {
                "num_negative": int((ev < -tau).sum()),
                "logdet": float(torch.log(shifted.abs()).sum()),
                "inertia": [int((shifted < 0).sum()), 0, int((shifted > 0).sum())],
            }
        return out

    # ------------------------------------------------------------------ the summary
    def summary(self) -> dict[str, Any]:
        """The exact curvature summary as a JSON-ready dict: the problem, then the dense
        (or, beyond ``max_dense``, Lanczos) section, then the chain section."""
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
        if self.chain_samples > 0:
            if self.chain is not None:
                out["chain"] = self.chain_summary()
            else:
                out["chain_skipped"] = self.chain_skipped
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
            chain=self.chain,
        )
