"""The report's figures, one function each (matplotlib, imported lazily with the Agg
backend: no display needed). Each returns what ``report.json`` lists of it: its file,
title, axis labels and a one-line caption written from the report's numbers."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import torch

__all__ = ["draw_figures"]

Figure = dict[str, str]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, folder: Path, meta: Figure, tight: bool = True) -> Figure:
    """Lay out, write ``folder/meta["file"]`` and close the figure; returns ``meta``."""
    if tight:
        fig.tight_layout()
    fig.savefig(folder / meta["file"], dpi=120)
    plt.close(fig)
    return meta


def _meta(file: str, title: str, x_label: str, y_label: str, caption: str) -> Figure:
    return {
        "file": file,
        "title": title,
        "x_label": x_label,
        "y_label": y_label,
        "caption": caption,
    }


def _sizes(report: dict[str, Any]) -> str:
    return f"P = {report['num_params']} parameters, {report['num_samples']} samples"


# ----------------------------------------------------------------------------- density
def _density_panel(ax: Any, report: dict[str, Any]) -> None:
    d = report["density"]
    dens = torch.tensor(d["density"]).clamp_min(1e-12)
    exact = d.get("method") == "exact"
    label = (
        f"exact, Gaussian-smoothed (sigma = {d['sigma']:.2g})"
        if exact
        else f"SLQ estimate ({d['num_probes']} probes x {d['lanczos_steps']} steps)"
    )
    ax.semilogy(d["grid"], dens.tolist(), color="C0", lw=1.6, label=label)
    peak = float(dens.max())
    h = report["histogram"]
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
            label=f"exact histogram ({h['source']}, {len(c)} bins)",
        )
        peak = max(peak, float(height.max()))
    ax.set_ylim(bottom=peak * 1e-7, top=peak * 3)
    ax.set_xlabel("eigenvalue of the Hessian")
    ax.set_ylabel("density (eigenvalues per unit, log scale)")
    ax.set_title("Spectral density")
    ax.legend(loc="upper right", fontsize=8)


def _symlog_panel(ax: Any, s: dict[str, Any]) -> None:
    lin = s["linthresh"]
    for side, color, sign in (("negative", "C3", -1.0), ("positive", "C0", 1.0)):
        e, c = s[side]["edges"], s[side]["counts"]
        for a, b, n in zip(e[:-1], e[1:], c, strict=True):
            if n:
                left = a if sign > 0 else -b
                ax.bar(left, n, width=b - a, align="edge", color=color, alpha=0.8)
    if s["num_zero"]:
        ax.bar(-lin, s["num_zero"], width=2 * lin, align="edge", color="0.4")
    ax.set_xscale("symlog", linthresh=lin, linscale=0.6)
    # a few decades a side (matplotlib's default symlog ticks crowd into each other)
    top = max([lin, *s["negative"]["edges"], *s["positive"]["edges"]])
    lo_dec, hi_dec = math.ceil(math.log10(lin)), math.floor(math.log10(top))
    step = max(1, math.ceil((hi_dec - lo_dec + 1) / 4))
    decades = list(range(hi_dec, lo_dec - 1, -step))
    ticks = [-(10.0**k) for k in decades] + [0.0] + [10.0**k for k in reversed(decades)]
    labels = [f"-1e{k}" for k in decades] + ["0"] + [f"1e{k}" for k in reversed(decades)]
    ax.set_xticks(ticks, labels, fontsize=8, rotation=45)
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.axvline(0.0, color="0.2", lw=0.8)
    ax.set_xlabel(f"eigenvalue (symmetric log axis; |lambda| <= {lin:.1e} is zero)")
    ax.set_ylabel("eigenvalues per bin (log scale)")
    ax.set_title(
        f"Exact counts: {s['num_negative']} negative, {s['num_zero']} zero, "
        f"{s['num_positive']} positive",
        fontsize=10,
    )


def _density_figure(plt: Any, report: dict[str, Any], folder: Path) -> Figure | None:
    """Spectral density (log scale) with the exact histogram, and beside it, when the
    dense eigenvalues are known, their counts on a symmetric log axis: the negative
    eigenvalues that a linear axis crowds into one bin."""
    s = (report["histogram"] or {}).get("symlog")
    fig, axes = plt.subplots(1, 2 if s else 1, figsize=(12 if s else 7, 4.2), squeeze=False)
    _density_panel(axes[0, 0], report)
    d = report["density"]
    how = (
        "exact, from the dense eigenvalues"
        if d.get("method") == "exact"
        else f"stochastic Lanczos quadrature, {d['num_probes'] * d['lanczos_steps']} products"
    )
    caption = f"Eigenvalue density of the Hessian ({_sizes(report)}; {how})"
    if s:
        _symlog_panel(axes[0, 1], s)
        caption += (
            f"; right: exact counts on a symmetric log axis, {s['num_negative']} negative "
            f"(red), {s['num_zero']} within {s['linthresh']:.1e} of zero (grey)"
        )
    fig.suptitle("Hessian spectrum", fontsize=11)
    return _save(
        plt,
        fig,
        folder,
        _meta(
            "density.png",
            "Hessian spectrum",
            "eigenvalue of the Hessian",
            "density (log scale); right: eigenvalues per bin",
            caption + ".",
        ),
    )


# ----------------------------------------------------------------------------- top eigenvalues
def _top_figure(plt: Any, report: dict[str, Any], folder: Path) -> Figure | None:
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
    ax.set_xticks(ks)
    ax.legend(fontsize=8)
    check = " and the dense eigendecomposition (crosses)" if t["dense"] is not None else ""
    caption = (
        f"The {len(ks)} largest Hessian eigenvalues by Lanczos ({t['num_products']} "
        f"Hessian-vector products){check}; lambda_1 = {t['values'][0]:.4g}."
    )
    meta = _meta(
        "top_eigenvalues.png", "Top Hessian eigenvalues", "k", "k-th largest eigenvalue", caption
    )
    return _save(plt, fig, folder, meta)


# ----------------------------------------------------------------------------- blocks
def _short(names: list[str]) -> list[str]:
    return [n if len(n) <= 18 else "..." + n[-15:] for n in names]


def _blocks_figure(plt: Any, report: dict[str, Any], folder: Path) -> Figure | None:
    """The Frobenius norms of the blocks between parameter tensors (named as
    ``named_parameters()`` names them) of the Hessian = GGN + residual, one heat map each,
    the value written in each cell; exact zeros drawn hatched and labelled ``0``."""
    b = report["blocks"]
    if b is None:
        return None
    names, T = b["tensors"], len(b["tensors"])
    mats = {k: torch.tensor(b[k], dtype=torch.float64) for k in ("hessian", "ggn", "residual")}
    nonzero = torch.cat([m[m > 0] for m in mats.values()])
    vmax = float(nonzero.max()) if len(nonzero) else 1.0
    vmin = float(nonzero.min()) if len(nonzero) else vmax * 1e-6
    vmin = min(vmin, vmax * 0.999)
    side = min(max(3.2, 0.55 * T + 1.6), 6.0)
    fig, axes = plt.subplots(1, 3, figsize=(3 * side + 1.6, side + 1.2))
    fig.subplots_adjust(left=0.08, right=0.88, bottom=0.24, top=0.84, wspace=0.45)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    im = None
    for ax, (key, m) in zip(axes, mats.items(), strict=True):
        zero = torch.tensor(b["exact_zero"][key])
        logm = torch.where(zero, torch.nan, torch.log10(m.clamp_min(vmin)))
        im = ax.imshow(logm.tolist(), cmap=cmap, vmin=math.log10(vmin), vmax=math.log10(vmax))
        for i in range(T):
            for j in range(T):
                if zero[i, j]:
                    ax.add_patch(
                        plt.Rectangle(
                            (j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", ec="0.6", lw=0
                        )
                    )
                    text, color = "0", "0.3"
                else:
                    text = f"{float(m[i, j]):.1e}" if T <= 8 else ""
                    color = (
                        "white"
                        if logm[i, j] < (math.log10(vmin) + math.log10(vmax)) / 2
                        else "black"
                    )
                if text:
                    ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
        title = {"hessian": "Hessian H", "ggn": "GGN  J^T Lambda J", "residual": "residual H - GGN"}
        ax.set_title(title[key], fontsize=10)
        ax.set_xticks(range(T), _short(names), rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(T), _short(names), fontsize=8)
        ax.set_xlabel("parameter tensor")
    axes[0].set_ylabel("parameter tensor")
    cb = fig.colorbar(im, cax=fig.add_axes((0.9, 0.24, 0.015, 0.6)))
    cb.set_label("log10 ||block||_F")
    fig.suptitle("Blocks between parameter tensors (hatched: exactly zero)", fontsize=11)
    zeros = [
        f"{names[i]} x {names[j]}"
        for i in range(T)
        for j in range(i, T)
        if b["exact_zero"]["residual"][i][j]
    ]
    caption = (
        f"Frobenius norms of the blocks of the Hessian, the Gauss-Newton matrix and the "
        f"residual between the {T} parameter tensors ({_sizes(report)})"
    )
    caption += (
        f"; exactly zero residual blocks: {', '.join(zeros)}."
        if zeros
        else "; no block is exactly zero."
    )
    meta = _meta(
        "blocks.png",
        "Blocks between parameter tensors",
        "parameter tensor",
        "parameter tensor",
        caption,
    )
    return _save(plt, fig, folder, meta, tight=False)


def _hessian_figure(plt: Any, report: dict[str, Any], folder: Path) -> Figure | None:
    """The Hessian as an image (log10 of the largest |H_ij| a cell covers), with the
    parameter tensors' boundaries and names."""
    img = report.get("hessian_image")
    if img is None:
        return None
    cells = torch.tensor(img["cells"], dtype=torch.float64)
    n = cells.shape[0]
    pos = cells[cells > 0]
    vmax = float(pos.max()) if len(pos) else 1.0
    vmin = max(float(pos.min()) if len(pos) else vmax, vmax * 1e-8)
    logc = torch.where(cells > 0, torch.log10(cells.clamp_min(vmin)), torch.nan)
    cmap = plt.get_cmap("magma").with_extremes(bad="white")
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    im = ax.imshow(logc.tolist(), cmap=cmap, vmin=math.log10(vmin), vmax=math.log10(vmax),
                   interpolation="nearest", extent=(0, n, n, 0))  # fmt: skip
    bounds = img["boundaries"]
    for x in bounds[1:-1]:
        ax.axhline(x, color="cyan", lw=0.7)
        ax.axvline(x, color="cyan", lw=0.7)
    keep = [
        (name, (a + b) / 2)
        for name, (a, b) in zip(img["tensors"], itertools.pairwise(bounds), strict=True)
        if b - a >= 0.04 * n
    ]  # room for a label
    wide, labels = [m for _, m in keep], [name for name, _ in keep]
    ax.set_xticks(wide, _short(labels), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(wide, _short(labels), fontsize=8)
    ax.set_xlabel(f"parameter index (grouped by tensor; {n} cells of {img['num_params']})")
    ax.set_ylabel("parameter index")
    ax.set_title("The Hessian, |H_ij| (largest in each cell)", fontsize=10)
    cb = fig.colorbar(im, ax=ax, shrink=0.85)
    cb.set_label("log10 |H_ij|")
    pooled = "" if n == img["num_params"] else f", max-pooled to {n} x {n} cells"
    caption = (
        f"The dense Hessian ({_sizes(report)}{pooled}); lines separate the parameter "
        "tensors; white cells are exactly zero."
    )
    meta = _meta("hessian.png", "The Hessian", "parameter index", "parameter index", caption)
    return _save(plt, fig, folder, meta)


# ----------------------------------------------------------------------------- landscape
def _landscape_figure(plt: Any, report: dict[str, Any], folder: Path) -> Figure | None:
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
    ax.set_ylabel("training loss")
    ax.set_title("Loss along the top Hessian eigenvector")
    ax.legend(fontsize=8)
    caption = (
        "The training loss along the top Hessian eigenvector v_1 (unit norm) against its "
        "second-order model; they agree near a = 0 and part where the loss stops being "
        "quadratic."
    )
    meta = _meta(
        "landscape.png",
        "Loss along the top Hessian eigenvector",
        "a (step along v_1)",
        "training loss",
        caption,
    )
    return _save(plt, fig, folder, meta)


def draw_figures(report: dict[str, Any], folder: Path) -> list[Figure]:
    """Draw every figure the report's data allows into ``folder``; what ``report.json``
    lists of each (``file``, ``title``, ``x_label``, ``y_label``, ``caption``)."""
    plt = _plt()
    out = []
    for draw in (_density_figure, _top_figure, _blocks_figure, _hessian_figure, _landscape_figure):
        meta = draw(plt, report, folder)
        if meta is not None:
            out.append(meta)
    return out
