"""The analysis report (``hesse analyze --report DIR``) and spectrum tracking during
training. This module draws and writes files; the rest of the library never imports it
(matplotlib is imported lazily, with the Agg backend: no display needed).

The report directory holds ``report.json`` (schema: `REPORT_SCHEMA`) and four PNG
figures. It is written to a temporary directory beside the target and renamed into
place, so that no half-written report is ever left behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hesse._autodiff import products as _products
from hesse._autodiff.problem import Problem, float64_problem
from hesse._linalg.eigen import eigenvalue_histogram
from hesse._operators.curvature import HessianOperator
from hesse._operators.functions import decompose
from hesse._spectral.lanczos import eigs
from hesse._spectral.stochastic import spectral_density, trace
from hesse._util.files import save_png
from hesse._util.progress import progress_bar

__all__ = ["REPORT_SCHEMA", "SpectrumTracker", "build_report", "prepare_report_dir", "write_report"]

_num = {"type": "number"}
_nums = {"type": "array", "items": _num}
_matrix = {"type": "array", "items": _nums}

REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "hesse analysis report",
    "type": "object",
    "required": [
        "version",
        "model",
        "num_params",
        "num_samples",
        "dtype",
        "loss",
        "grad_norm",
        "top_eigenvalues",
        "smallest_eigenvalue",
        "trace",
        "density",
        "histogram",
        "blocks",
        "landscape",
        "figures",
        "seconds",
    ],
    "properties": {
        "version": {"type": "integer", "const": 1},
        "model": {"type": "string"},
        "num_params": {"type": "integer", "minimum": 1},
        "num_samples": {"type": "integer", "minimum": 1},
        "dtype": {"type": "string"},
        "loss": _num,
        "grad_norm": {"type": "number", "minimum": 0},
        "top_eigenvalues": {
            "type": "object",
            "required": ["values", "residuals", "num_products", "dense"],
            "properties": {
                "values": _nums,
                "residuals": _nums,
                "num_products": {"type": "integer"},
                "dense": {"oneOf": [_nums, {"type": "null"}]},
            },
        },
        "smallest_eigenvalue": _num,
        "trace": {
            "type": "object",
            "required": ["estimate", "std_error", "method", "num_products"],
            "properties": {
                "estimate": _num,
                "std_error": _num,
                "method": {"enum": ["exact", "hutch++", "hutchinson"]},
                "num_products": {"type": "integer"},
            },
        },
        "density": {
            "type": "object",
            "required": ["grid", "density", "sigma", "num_probes", "lanczos_steps"],
            "properties": {
                "grid": _nums,
                "density": _nums,
                "sigma": _num,
                "num_probes": {"type": "integer"},
                "lanczos_steps": {"type": "integer"},
            },
        },
        "histogram": {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["edges", "counts", "source"],
                    "properties": {
                        "edges": _nums,
                        "counts": {"type": "array", "items": {"type": "integer"}},
                        "source": {"enum": ["dense", "chain"]},
                    },
                },
            ]
        },
        "blocks": {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["layers", "hessian", "ggn", "residual"],
                    "properties": {
                        "layers": {"type": "array", "items": {"type": "string"}},
                        "hessian": _matrix,
                        "ggn": _matrix,
                        "residual": _matrix,
                    },
                },
            ]
        },
        "landscape": {
            "type": "object",
            "required": ["alphas", "losses", "quadratic"],
            "properties": {"alphas": _nums, "losses": _nums, "quadratic": _nums},
        },
        "figures": {"type": "array", "items": {"type": "string", "pattern": r"^[\w.-]+\.png$"}},
        "seconds": _num,
    },
}


def build_report(
    problem: Problem,
    *,
    description: str = "",
    top_k: int = 8,
    max_dense: int = 4000,
    chain_samples: int = 0,
    seed: int = 0,
    progress: bool | None = None,
    decomposition: Any = None,
    hessian_eigenvalues: Tensor | None = None,
) -> dict[str, Any]:
    """Compute everything the report shows, as a JSON-ready dict (`REPORT_SCHEMA`).

    Dense quantities (exact trace, exact histogram, the per-layer-block norms of the
    Hessian, GGN and residual) are included when ``P <= max_dense`` (pass a `Decomposition`
    already computed as ``decomposition``, and its Hessian's ascending eigenvalues as
    ``hessian_eigenvalues``, to reuse them); otherwise the
    histogram comes from the chain sweep on the first ``chain_samples`` samples when
    that is positive and the model is an ``nn.Sequential``, and is absent else.
    """
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    P = problem.num_params
    op = HessianOperator(problem)
    bar = progress_bar(6, "report", progress, unit="step")

    def tick() -> None:
        bar.update(1)

    loss, g = _products.loss_and_gradient(problem)
    k = min(top_k, P)
    top = eigs(op, k, "largest", tol=1e-8, generator=gen)
    bottom = eigs(op, 1, "smallest", tol=1e-8, generator=gen)
    tick()
    dense_ev = None
    blocks = None
    if P <= max_dense:
        dec = decomposition if decomposition is not None else decompose(problem, progress=False)
        dense_ev = (
            hessian_eigenvalues
            if hessian_eigenvalues is not None
            else torch.linalg.eigvalsh(dec.hessian)
        )
        tr = {
            "estimate": float(dense_ev.sum()),
            "std_error": 0.0,
            "method": "exact",
            "num_products": P,
        }
        layers, _counts, norms = dec.layer_blocks(problem)
        blocks = {"layers": layers, **{k: m.tolist() for k, m in norms.items()}}
    else:
        t = trace(op, method="hutch++", num_products=90, generator=gen)
        tr = {
            "estimate": t.estimate,
            "std_error": t.std_error,
            "method": t.method,
            "num_products": t.num_products,
        }
    tick()
    probes, steps = 8, min(80, P)
    sd = spectral_density(op, num_probes=probes, lanczos_steps=steps, generator=gen)
    tick()
    histogram = None
    if dense_ev is not None:
        edges = torch.linspace(float(dense_ev[0]), float(dense_ev[-1]), 61, dtype=dense_ev.dtype)
        edges[-1] = torch.nextafter(edges[-1], edges[-1] + 1)  # include the largest
        counts = torch.histogram(dense_ev.cpu(), edges.cpu()).hist.long()
        histogram = {"edges": edges.tolist(), "counts": counts.tolist(), "source": "dense"}
    elif chain_samples > 0 and isinstance(problem.model, nn.Sequential):
        inputs, targets, _w = next(iter(problem.batches()))
        # in float64, as the CLI's chain section: counts near zero need the digits
        sub = float64_problem(
            problem.model,
            problem.loss_fn,
            inputs[:chain_samples],
            targets[:chain_samples],
            problem.names,
        )
        lo, hi = float(sd.nodes.min()), float(sd.nodes.max())
        edges = torch.linspace(lo - 1e-9, hi + 1e-9, 31, dtype=torch.float64)
        counts = eigenvalue_histogram(sub, edges)
        histogram = {"edges": edges.tolist(), "counts": counts.tolist(), "source": "chain"}
    tick()
    # the loss along the top eigenvector: a 1-D slice of the landscape
    v = top.eigenvectors[:, 0]
    lam = float(top.eigenvalues[0])
    L0 = float(loss)
    radius = math.sqrt(2 * max(L0, 1e-3) / max(lam, 1e-12))
    alphas = torch.linspace(-radius, radius, 41, dtype=problem.dtype)
    theta = problem.param_vector()
    losses = [float(problem.loss(problem.unflatten(theta + a * v))) for a in alphas]
    gv = float(g @ v)
    quad = [L0 + float(a) * gv + 0.5 * lam * float(a) ** 2 for a in alphas]
    tick()
    report = {
        "version": 1,
        "model": description or type(problem.model).__name__,
        "num_params": P,
        "num_samples": problem.num_samples,
        "dtype": str(problem.dtype).replace("torch.", ""),
        "loss": L0,
        "grad_norm": float(g.norm()),
        "top_eigenvalues": {
            "values": top.eigenvalues.tolist(),
            "residuals": top.residuals.tolist(),
            "num_products": top.num_products,
            "dense": dense_ev.flip(0)[:k].tolist() if dense_ev is not None else None,
        },
        "smallest_eigenvalue": float(bottom.eigenvalues[0]),
        "trace": tr,
        "density": {
            "grid": sd.grid.tolist(),
            "density": sd.density.tolist(),
            "sigma": sd.sigma,
            "num_probes": probes,
            "lanczos_steps": steps,
        },
        "histogram": histogram,
        "blocks": blocks,
        "landscape": {"alphas": alphas.tolist(), "losses": losses, "quadratic": quad},
        "figures": [],
        "seconds": 0.0,
    }
    tick()
    bar.close()
    report["seconds"] = time.perf_counter() - t0
    return report


# ----------------------------------------------------------------------------- figures
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, folder: Path, name: str, tight: bool = True) -> str:
    """Lay out, write ``folder/name`` and close the figure; returns ``name``."""
    if tight:
        fig.tight_layout()
    fig.savefig(folder / name, dpi=120)
    plt.close(fig)
    return name


def _figures(report: dict[str, Any], folder: Path) -> list[str]:
    plt = _plt()
    names = []

    # 1. spectral density, log scale, with the exact histogram as a density
    fig, ax = plt.subplots(figsize=(7, 4.2))
    d = report["density"]
    dens = torch.tensor(d["density"]).clamp_min(1e-12)
    ax.semilogy(
        d["grid"],
        dens.tolist(),
        color="C0",
        lw=1.6,
        label=f"SLQ estimate ({d['num_probes']} probes x {d['lanczos_steps']} steps)",
    )
    h = report["histogram"]
    peak = float(dens.max())
    if h is not None:
        e = torch.tensor(h["edges"])
        c = torch.tensor(h["counts"], dtype=torch.float64)
        total = max(float(c.sum()), 1.0)
        height = c / (total * (e[1:] - e[:-1]))
        keep = c > 0  # empty bins have no height on a log scale: leave them out
        ax.bar(
            e[:-1][keep].tolist(),
            height[keep].tolist(),
            width=(e[1:] - e[:-1])[keep].tolist(),
            align="edge",
            color="C3",
            alpha=0.35,
            label=f"exact histogram ({h['source']})",
        )
        peak = max(peak, float(height.max()))
    ax.set_ylim(bottom=peak * 1e-7, top=peak * 3)
    ax.set_xlabel("eigenvalue of the Hessian")
    ax.set_ylabel("density (log scale)")
    ax.set_title("Hessian spectral density")
    ax.legend(loc="upper right", fontsize=8)
    names.append(_save(plt, fig, folder, "density.png"))

    # 2. top eigenvalues
    fig, ax = plt.subplots(figsize=(6, 3.8))
    t = report["top_eigenvalues"]
    ks = list(range(1, len(t["values"]) + 1))
    ax.plot(ks, t["values"], "o-", color="C0", label=f"Lanczos ({t['num_products']} products)")
    if t["dense"] is not None:
        ax.plot(ks, t["dense"], "x", color="C3", ms=9, label="dense eigvalsh")
    ax.set_xlabel("k")
    ax.set_ylabel("k-th largest eigenvalue")
    ax.set_title("Top Hessian eigenvalues")
    ax.legend(fontsize=8)
    names.append(_save(plt, fig, folder, "top_eigenvalues.png"))

    # 3. per-layer-block norms: Hessian = GGN + residual
    b = report["blocks"]
    if b is not None:
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
        mats = [torch.tensor(b[k]) for k in ("hessian", "ggn", "residual")]
        vmax = max(float(m.max()) for m in mats)
        floor = max(vmax * 1e-6, 1e-300)
        for ax, m, title in zip(axes, mats, ("Hessian", "GGN", "residual"), strict=True):
            im = ax.imshow(
                torch.log10(m.clamp_min(floor)).tolist(),
                cmap="viridis",
                vmin=math.log10(floor),
                vmax=math.log10(max(vmax, floor)),
            )
            ax.set_title(f"{title} blocks, log10 |.|_F")
            ax.set_xticks(range(len(b["layers"])), b["layers"], rotation=45, fontsize=8)
            ax.set_yticks(range(len(b["layers"])), b["layers"], fontsize=8)
        fig.colorbar(im, ax=list(axes), shrink=0.8)
        names.append(_save(plt, fig, folder, "blocks.png", tight=False))

    # 4. the loss along the top eigenvector
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ls = report["landscape"]
    ax.plot(ls["alphas"], ls["losses"], color="C0", lw=1.8, label="loss L(theta + a v_1)")
    ax.plot(
        ls["alphas"],
        ls["quadratic"],
        "--",
        color="C1",
        label="quadratic model L + a g.v + a^2 lambda_1 / 2",
    )
    ax.set_xlabel("a (step along the top eigenvector v_1)")
    ax.set_ylabel("loss")
    ax.set_title("Loss along the top Hessian eigenvector")
    ax.legend(fontsize=8)
    names.append(_save(plt, fig, folder, "landscape.png"))
    return names


# ----------------------------------------------------------------------------- writing
def prepare_report_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Check, before any heavy work, that ``path`` can receive a report: it is absent
    or an empty directory (or ``overwrite``), and its parent folder is writable."""
    target = Path(path)
    if target.exists():
        if not target.is_dir():
            raise ValueError(f"report path {str(target)!r} exists and is not a directory")
        if any(target.iterdir()):
            if not overwrite:
                raise ValueError(
                    f"report directory {str(target)!r} exists and is not empty; pass "
                    "--overwrite (overwrite=True) to replace an earlier hesse report there"
                )
            foreign = _not_a_report(target)
            if foreign:
                raise ValueError(
                    f"report directory {str(target)!r} holds files that are not a hesse "
                    f"report ({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}): "
                    "--overwrite replaces only an earlier report; choose another directory"
                )
    parent = target.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.check.")
        os.rmdir(probe)
    except OSError as err:
        raise ValueError(
            f"cannot write the report to {str(target)!r}: {err.strerror or err}"
        ) from None
    if target.exists() and not os.access(target, os.W_OK | os.X_OK):
        raise ValueError(f"report directory {str(target)!r} is not writable")
    return target


def _not_a_report(folder: Path) -> list[str]:
    """The entries of ``folder`` that an earlier hesse report does not account for (all
    of them when it has no readable ``report.json`` listing its figures)."""
    names = sorted(p.name for p in folder.iterdir())
    try:
        with open(folder / "report.json") as f:
            earlier = json.load(f)
        figures = set(earlier["figures"]) if isinstance(earlier, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        figures = None
    if figures is None:
        return names
    return [n for n in names if n != "report.json" and n not in figures]


def write_report(report: dict[str, Any], path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``report.json`` and the figures into ``path`` atomically: everything goes to
    a temporary directory beside it, which is then renamed into place."""
    target = prepare_report_dir(path, overwrite)
    tmp = Path(tempfile.mkdtemp(dir=target.resolve().parent, prefix=f".{target.name}.tmp."))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the report gets the usual mode
    try:
        report = dict(report)
        report["figures"] = _figures(report, tmp)
        with open(tmp / "report.json", "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        if target.exists():
            trash = Path(
                tempfile.mkdtemp(dir=target.resolve().parent, prefix=f".{target.name}.old.")
            )
            os.replace(target, trash / "old")
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ----------------------------------------------------------------------------- training
class SpectrumTracker:
    """Record the top Hessian eigenvalue and the trace every ``every`` steps of a
    training loop, and plot their history.

    Example:
        >>> tracker = hesse.SpectrumTracker(model, loss_fn, (X, y), every=10)
        >>> for step in range(100):
        ...     opt.zero_grad(); loss_fn(model(X), y).backward(); opt.step()
        ...     tracker.step()
        >>> tracker.plot("history.png")

    Args:
        model, loss_fn, data, params: as for `Problem` (the data used for the curvature;
            a fixed held-out batch is typical).
        every: record on steps ``0, every, 2 every, ...``.
        trace_products: Hutch++ budget per record.
        seed: seeds the Lanczos start vectors and the trace probes.

    Attributes:
        history: a list of ``{"step", "top_eigenvalue", "trace", "trace_se"}`` dicts.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        *,
        every: int = 10,
        trace_products: int = 30,
        params: Any = None,
        seed: int = 0,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1; got {every}")
        self.model, self.loss_fn, self.data, self.params = model, loss_fn, data, params
        self.every, self.trace_products = every, trace_products
        self._gen = torch.Generator().manual_seed(seed)
        self._step = 0
        self.history: list[dict[str, float]] = []

    def step(self) -> dict[str, float] | None:
        """Call once per training step; returns the new record on recording steps."""
        rec = None
        if self._step % self.every == 0:
            prob = Problem(self.model, self.loss_fn, self.data, params=self.params)
            op = HessianOperator(prob)
            top = eigs(op, 1, tol=1e-6, generator=self._gen)
            tr = trace(op, num_products=self.trace_products, generator=self._gen)
            rec = {
                "step": self._step,
                "top_eigenvalue": float(top.eigenvalues[0]),
                "trace": tr.estimate,
                "trace_se": tr.std_error,
            }
            self.history.append(rec)
        self._step += 1
        return rec

    def plot(self, path: str | os.PathLike) -> Path:
        """A PNG of the history (top eigenvalue and trace with its standard error),
        written atomically."""
        if not self.history:
            raise ValueError("nothing recorded yet: call step() during training first")
        plt = _plt()
        steps = [h["step"] for h in self.history]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
        a1.plot(steps, [h["top_eigenvalue"] for h in self.history], "o-")
        a1.set_xlabel("training step")
        a1.set_ylabel("top Hessian eigenvalue")
        a1.set_title("Sharpness")
        tr = torch.tensor([h["trace"] for h in self.history])
        se = torch.tensor([h["trace_se"] for h in self.history]).nan_to_num(0.0)
        a2.plot(steps, tr.tolist(), "o-", color="C1")
        a2.fill_between(
            steps,
            (tr - 2 * se).tolist(),
            (tr + 2 * se).tolist(),
            color="C1",
            alpha=0.25,
            label="+- 2 standard errors",
        )
        a2.set_xlabel("training step")
        a2.set_ylabel("Hessian trace (Hutch++)")
        a2.set_title("Trace")
        a2.legend(fontsize=8)
        fig.tight_layout()
        return save_png(fig, path)
