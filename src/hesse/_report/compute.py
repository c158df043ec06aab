"""What ``hesse analyze --report`` shows, computed as a JSON-ready dict (`REPORT_SCHEMA`),
one section a function: top and bottom eigenvalues (Lanczos), the trace (exact or
Hutch++), the spectral density (SLQ), the exact histogram (dense eigenvalues or an
exact engine's counts), the per-layer blocks of the Hessian / GGN / residual, and the loss along the
top eigenvector. Whatever an analysis already computed (loss and gradient, the dense
decomposition and eigenvalues, the exact engine) is passed in and reused."""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import torch
from torch import Tensor

from hesse._autodiff import products
from hesse._autodiff.problem import Problem
from hesse._operators.curvature import HessianOperator
from hesse._operators.functions import Decomposition, decompose
from hesse._spectral.lanczos import EigResult, eigs
from hesse._spectral.stochastic import SpectralDensity, spectral_density, trace
from hesse._util.progress import progress_bar

__all__ = ["build_report"]


def _exact_trace_and_blocks(
    problem: Problem, dec: Decomposition, evals: Tensor
) -> tuple[dict[str, Any], dict[str, Any]]:
    layers, _counts, norms = dec.layer_blocks(problem)
    tr = {"estimate": float(evals.sum()), "std_error": 0.0, "method": "exact"}
    return tr | {"num_products": problem.num_params}, {
        "layers": layers,
        **{k: m.tolist() for k, m in norms.items()},
    }


def _eigvalsh(dec: Decomposition) -> Tensor:
    return torch.linalg.eigvalsh(dec.hessian)


def _estimated_trace(op: HessianOperator, gen: torch.Generator) -> dict[str, Any]:
    t = trace(op, method="hutch++", num_products=90, generator=gen)
    return {
        "estimate": t.estimate,
        "std_error": t.std_error,
        "method": t.method,
        "num_products": t.num_products,
    }


def _histogram(evals: Tensor | None, sd: SpectralDensity, engine: Any) -> dict[str, Any] | None:
    """Exact counts per bin: from the dense eigenvalues (60 bins over the spectrum), or
    from an exact engine's counts (30 bins over the SLQ nodes' range); ``None`` when
    neither is at hand."""
    if evals is not None:
        edges = torch.linspace(float(evals[0]), float(evals[-1]), 61, dtype=evals.dtype)
        edges[-1] = torch.nextafter(edges[-1], edges[-1] + 1)  # include the largest
        counts = torch.histogram(evals.cpu(), edges.cpu()).hist.long()
        return {"edges": edges.tolist(), "counts": counts.tolist(), "source": "dense"}
    if engine is None:
        return None
    lo, hi = float(sd.nodes.min()), float(sd.nodes.max())
    edges = torch.linspace(lo - 1e-9, hi + 1e-9, 31, dtype=torch.float64)
    below = [engine.factor(-float(x)).inertia().negative for x in edges]
    counts = [b - a for a, b in itertools.pairwise(below)]
    return {"edges": edges.tolist(), "counts": counts, "source": engine.method}


def _landscape(problem: Problem, top: EigResult, loss: float, g: Tensor) -> dict[str, Any]:
    """The loss along the top eigenvector (a 1-D slice of the landscape) against the
    quadratic model ``L + a g.v + a^2 lambda_1 / 2``."""
    v = top.eigenvectors[:, 0]
    lam = float(top.eigenvalues[0])
    radius = math.sqrt(2 * max(loss, 1e-3) / max(lam, 1e-12))
    alphas = torch.linspace(-radius, radius, 41, dtype=problem.dtype)
    theta = problem.param_vector()
    losses = [float(problem.loss(problem.unflatten(theta + a * v))) for a in alphas]
    gv = float(g @ v)
    quad = [loss + float(a) * gv + 0.5 * lam * float(a) ** 2 for a in alphas]
    return {"alphas": alphas.tolist(), "losses": losses, "quadratic": quad}


def _head(problem: Problem, description: str, loss: float, g: Tensor) -> dict[str, Any]:
    return {
        "version": 1,
        "model": description or type(problem.model).__name__,
        "num_params": problem.num_params,
        "num_samples": problem.num_samples,
        "dtype": str(problem.dtype).replace("torch.", ""),
        "loss": loss,
        "grad_norm": float(g.norm()),
    }


def _top(top: EigResult, evals: Tensor | None, k: int) -> dict[str, Any]:
    return {
        "values": top.eigenvalues.tolist(),
        "residuals": top.residuals.tolist(),
        "num_products": top.num_products,
        "dense": evals.flip(0)[:k].tolist() if evals is not None else None,
    }


def _density(sd: SpectralDensity, probes: int, steps: int) -> dict[str, Any]:
    return {
        "grid": sd.grid.tolist(),
        "density": sd.density.tolist(),
        "sigma": sd.sigma,
        "num_probes": probes,
        "lanczos_steps": steps,
    }


def build_report(
    problem: Problem,
    *,
    description: str = "",
    top_k: int = 8,
    max_dense: int = 4000,
    seed: int = 0,
    progress: bool | None = None,
    loss_and_gradient: tuple[Tensor, Tensor] | None = None,
    decomposition: Decomposition | None = None,
    hessian_eigenvalues: Tensor | None = None,
    engine: Any = None,
) -> dict[str, Any]:
    """Compute everything the report shows, as a JSON-ready dict (`REPORT_SCHEMA`).

    Dense quantities (exact trace, exact histogram, the per-layer-block norms of the
    Hessian, GGN and residual) are included when ``P <= max_dense``; otherwise the
    histogram comes from the counts of ``engine`` (a `hesse.engine` of the Hessian, e.g.
    of the first samples in float64) when one is given, and is absent else.
    ``loss_and_gradient``, ``decomposition`` and ``hessian_eigenvalues`` (ascending)
    reuse what an analysis already computed.
    """
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    P = problem.num_params
    op = HessianOperator(problem)
    bar = progress_bar(5, "report", progress, unit="step")
    loss, g = (
        loss_and_gradient if loss_and_gradient is not None else products.loss_and_gradient(problem)
    )
    k = min(top_k, P)
    top = eigs(op, k, "largest", tol=1e-8, generator=gen)
    bottom = eigs(op, 1, "smallest", tol=1e-8, generator=gen)
    bar.update(1)
    evals, blocks = None, None
    if P <= max_dense:
        dec = decomposition if decomposition is not None else decompose(problem, progress=False)
        evals = hessian_eigenvalues if hessian_eigenvalues is not None else _eigvalsh(dec)
        tr, blocks = _exact_trace_and_blocks(problem, dec, evals)
    else:
        tr = _estimated_trace(op, gen)
    bar.update(1)
    probes, steps = 8, min(80, P)
    sd = spectral_density(op, num_probes=probes, lanczos_steps=steps, generator=gen)
    histogram = _histogram(evals, sd, engine)
    bar.update(2)
    landscape = _landscape(problem, top, float(loss), g)
    bar.update(1)
    bar.close()
    report = _head(problem, description, float(loss), g) | {
        "top_eigenvalues": _top(top, evals, k),
        "smallest_eigenvalue": float(bottom.eigenvalues[0]),
        "trace": tr,
        "density": _density(sd, probes, steps),
        "histogram": histogram,
        "blocks": blocks,
        "landscape": landscape,
        "figures": [],
    }
    return report | {"seconds": time.perf_counter() - t0}
