"""The report's four figures, one function each (matplotlib, imported lazily with the Agg
backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

__all__ = ["draw_figures"]


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


def _density_figure(plt: Any, report: dict[str, Any], folder: Path) -> str | None:
    """Spectral density, log scale, with the exact histogram as a density."""
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
    return _save(plt, fig, folder, "density.png")


def _top_figure(plt: Any, report: dict[str, Any], folder: Path) -> str | None:
    """Top eigenvalues."""
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
    return _save(plt, fig, folder, "top_eigenvalues.png")


def _blocks_figure(plt: Any, report: dict[str, Any], folder: Path) -> str | None:
    """Per-layer-block norms: Hessian = GGN + residual."""
    b = report["blocks"]
    if b is None:
        return None
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
    return _save(plt, fig, folder, "blocks.png", tight=False)


def _landscape_figure(plt: Any, report: dict[str, Any], folder: Path) -> str | None:
    """The loss along the top eigenvector."""
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
    return _save(plt, fig, folder, "landscape.png")


def draw_figures(report: dict[str, Any], folder: Path) -> list[str]:
    """Draw every figure the report's data allows into ``folder``; their file names."""
    plt = _plt()
    names = []
    for draw in (_density_figure, _top_figure, _blocks_figure, _landscape_figure):
        name = draw(plt, report, folder)
        if name is not None:
            names.append(name)
    return names
