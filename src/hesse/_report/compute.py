"""What ``hesse analyze --report`` shows, computed as a JSON-ready dict (`REPORT_SCHEMA`),
one section a function: top and bottom eigenvalues (Lanczos), the trace (exact or
Hutch++), the spectral density (exact from the dense eigenvalues, else SLQ), the exact
histogram (dense eigenvalues, with symmetric-log counts, or an exact engine's counts), the
blocks of the Hessian / GGN / residual between parameter tensors, the Hessian as an image,
and the loss along the top eigenvector. Whatever an analysis already computed (loss and
gradient, the dense decomposition and eigenvalues, the exact engine) is passed in and
reused."""

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


def _exact_trace(problem: Problem, evals: Tensor) -> dict[str, Any]:
    tr = {"estimate": float(evals.sum()), "std_error": 0.0, "method": "exact"}
    return tr | {"num_products": problem.num_params}


def _tensor_blocks(problem: Problem, dec: Decomposition) -> dict[str, Any]:
    """Frobenius norms of the blocks of the Hessian, GGN and residual between parameter
    tensors (addressed by their ``named_parameters()`` names), and which blocks are
    exactly zero (a structural zero, e.g. the residual of a layer the output is linear
    in, against a block that is merely small)."""
    slices = list(problem.slices.values())
    out: dict[str, Any] = {
        "tensors": list(problem.slices),
        "sizes": [sl.stop - sl.start for sl in slices],
        "exact_zero": {},
    }
    for key in ("hessian", "ggn", "residual"):
        M = getattr(dec, key)
        norms = [[float(M[a, b].norm()) for b in slices] for a in slices]
        out[key] = norms
        out["exact_zero"][key] = [[v == 0.0 for v in row] for row in norms]
    return out


HESSIAN_IMAGE_PIXELS = 160


def _hessian_image(problem: Problem, H: Tensor, pixels: int = HESSIAN_IMAGE_PIXELS) -> dict:
    """The Hessian as an image of at most ``pixels`` squared cells, each the largest
    ``|H_ij|`` of the entries it covers (max pooling: no entry is averaged away), with
    the parameter tensors' boundaries in cell coordinates."""
    P = H.shape[0]
    n = min(pixels, P)
    bins = torch.tensor_split(torch.arange(P, device=H.device), n)
    A = H.abs()
    rows = torch.stack([A[b].amax(0) for b in bins])  # (n, P)
    cells = torch.stack([rows[:, b].amax(1) for b in bins], 1)  # (n, n)
    starts = [sl.start for sl in problem.slices.values()]
    return {
        "cells": cells.cpu().tolist(),
        "tensors": list(problem.slices),
        "boundaries": [s * n / P for s in starts] + [float(n)],
        "num_params": P,
    }


def _exact_density(evals: Tensor, points: int = 500) -> dict[str, Any]:
    """The eigenvalue density ``(1/P) sum_i N(t; lambda_i, sigma^2)`` from the dense
    eigenvalues, with the SLQ default's kernel (``sigma`` 1% of the spectrum's range)
    and grid: the curve SLQ estimates, computed exactly and without products."""
    ev = evals.double().cpu()
    lo, hi = float(ev[0]), float(ev[-1])
    sig = 0.01 * max(hi - lo, 1e-12 * max(1.0, abs(hi)))
    grid = torch.linspace(lo - 5 * sig, hi + 5 * sig, points, dtype=torch.float64)
    dens = torch.zeros_like(grid)
    for part in torch.split(ev, 1024):  # (points, 1024) at a time
        diff = (grid[:, None] - part[None]) / sig
        dens += torch.exp(-0.5 * diff**2).sum(1)
    dens /= len(ev) * sig * math.sqrt(2 * math.pi)
    return {
        "grid": grid.tolist(),
        "density": dens.tolist(),
        "sigma": sig,
        "method": "exact",
        "num_probes": 0,
        "lanczos_steps": 0,
    }


def _symlog_counts(evals: Tensor) -> dict[str, Any]:
    """Exact counts on a symmetric logarithmic axis, so that a few small negative
    eigenvalues are not lost in the first bin of a linear histogram: ``|lambda|`` at
    most ``linthresh`` (the summary's zero tolerance ``P u max|lambda|``, ``u`` the unit
    roundoff of the eigenvalues' dtype) counts as zero, and each side has log-spaced bins
    from ``linthresh`` to its largest magnitude."""
    u = torch.finfo(evals.dtype).eps
    ev = evals.double().cpu()
    top = float(ev.abs().max()) if len(ev) else 0.0
    lin = max(len(ev) * u * top, 1e-300)

    def side(values: Tensor) -> tuple[list[float], list[int]]:
        if not len(values):
            return [], []
        hi = float(values.max()) * (1 + 1e-9)
        edges = torch.logspace(
            math.log10(lin), math.log10(max(hi, lin * 1.01)), 21, dtype=torch.float64
        )
        return edges.tolist(), torch.histogram(values, edges).hist.long().tolist()

    neg_edges, neg = side(-ev[ev < -lin])
    pos_edges, pos = side(ev[ev > lin])
    return {
        "linthresh": lin,
        "negative": {"edges": neg_edges, "counts": neg},  # edges of |lambda|
        "positive": {"edges": pos_edges, "counts": pos},
        "num_negative": int((ev < -lin).sum()),
        "num_zero": int((ev.abs() <= lin).sum()),
        "num_positive": int((ev > lin).sum()),
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


def _histogram(
    evals: Tensor | None, sd: SpectralDensity | None, engine: Any
) -> dict[str, Any] | None:
    """Exact counts per bin: from the dense eigenvalues (60 bins over the spectrum, and
    the symmetric-log counts), or from an exact engine's counts (30 bins over the SLQ
    nodes' range); ``None`` when neither is at hand."""
    if evals is not None:
        ev = evals.double().cpu()
        edges = torch.linspace(float(ev[0]), float(ev[-1]), 61, dtype=torch.float64)
        edges[-1] = torch.nextafter(edges[-1], edges[-1] + 1)  # include the largest
        counts = torch.histogram(ev, edges).hist.long()
        return {
            "edges": edges.tolist(),
            "counts": counts.tolist(),
            "source": "dense",
            "symlog": _symlog_counts(evals),
        }
    if engine is None or sd is None:
        return None
    lo, hi = float(sd.nodes.min()), float(sd.nodes.max())
    edges = torch.linspace(lo - 1e-9, hi + 1e-9, 31, dtype=torch.float64)
    below = [engine.factor(-float(x)).inertia().negative for x in edges]
    counts = [b - a for a, b in itertools.pairwise(below)]
    return {"edges": edges.tolist(), "counts": counts, "source": engine.method, "symlog": None}


def _landscape(problem: Problem, top: EigResult, loss: float, g: Tensor) -> dict[str, Any]:
    """The loss along the top eigenvector (a 1-D slice of the landscape) against the
    quadratic model ``L + a g.v + a^2 lambda_1 / 2``."""
    v = top.eigenvectors[:, 0]
    top_eig = float(top.eigenvalues[0])
    radius = math.sqrt(2 * max(loss, 1e-3) / max(top_eig, 1e-12))
    alphas = torch.linspace(-radius, radius, 41, dtype=problem.dtype)
    theta = problem.param_vector()
    losses = [float(problem.loss(problem.unflatten(theta + a * v))) for a in alphas]
    gv = float(g @ v)
    quad = [loss + float(a) * gv + 0.5 * top_eig * float(a) ** 2 for a in alphas]
    return {"alphas": alphas.tolist(), "losses": losses, "quadratic": quad}


def _head(problem: Problem, description: str, loss: float, g: Tensor) -> dict[str, Any]:
    return {
        "version": 2,
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
        "method": "slq",
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
    evals, blocks, image = None, None, None
    if P <= max_dense:
        dec = decomposition if decomposition is not None else decompose(problem, progress=False)
        evals = hessian_eigenvalues if hessian_eigenvalues is not None else _eigvalsh(dec)
        tr, blocks = _exact_trace(problem, evals), _tensor_blocks(problem, dec)
        image = _hessian_image(problem, dec.hessian)
    else:
        tr = _estimated_trace(op, gen)
    bar.update(1)
    if evals is not None:  # the exact density: no products
        sd, density = None, _exact_density(evals)
    else:
        probes, steps = 8, min(80, P)
        sd = spectral_density(op, num_probes=probes, lanczos_steps=steps, generator=gen)
        density = _density(sd, probes, steps)
    histogram = _histogram(evals, sd, engine)
    bar.update(2)
    landscape = _landscape(problem, top, float(loss), g)
    bar.update(1)
    bar.close()
    report = _head(problem, description, float(loss), g) | {
        "top_eigenvalues": _top(top, evals, k),
        "smallest_eigenvalue": float(bottom.eigenvalues[0]),
        "trace": tr,
        "density": density,
        "histogram": histogram,
        "blocks": blocks,
        "hessian_image": image,
        "landscape": landscape,
        "figures": [],
    }
    return report | {"seconds": time.perf_counter() - t0}
