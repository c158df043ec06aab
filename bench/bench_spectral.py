"""Spectral estimates: products needed for a given accuracy.

Usage:
    python bench/bench_spectral.py [--dtype float64] [--json out.json]

Digits MLP 64-128-128-10 at batch 512 (cross-entropy, a few seeded Adam steps so the
curvature is that of a trained net):

1. the top Hessian eigenvalue to 1e-4 relative: Lanczos (hesse.eigs) against the power
   iteration that PyHessian-style tools use (implemented here, as they do: normalise,
   multiply, Rayleigh quotient; stop at 1e-4 relative change; median over seeds), both
   against a reference from a long Lanczos run; in Hessian-vector products and in
   gradient-times (wall time / one gradient);
2. the trace to 1% relative standard error: Hutch++ against plain Hutchinson (doubling
   the budget until the reported standard error is below 1% of the estimate; median
   over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import hesse
from hesse._cli.data import load_digits_data


def setup(dtype: torch.dtype) -> hesse.Problem:
    X, y = load_digits_data(dtype)
    X, y = X[:512], y[:512]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
    ).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(50):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return hesse.Problem(model, nn.CrossEntropyLoss(), (X, y))


def power_iteration(
    op: hesse.HessianOperator, rtol: float, gen: torch.Generator, max_iter: int = 2000
) -> tuple[float, int]:
    """PyHessian's loop: v <- Hv / |Hv|, eigenvalue = v . Hv, stop on relative change."""
    v = torch.randn(op.shape[0], generator=gen, dtype=torch.float64).to(op.dtype)
    v /= v.norm()
    lam_old = None
    for it in range(1, max_iter + 1):
        Hv = op @ v
        lam = float(v @ Hv)
        v = Hv / Hv.norm()
        if lam_old is not None and abs(lam - lam_old) <= rtol * abs(lam):
            return lam, it
        lam_old = lam
    return lam, max_iter


def lanczos_to(op, ref: float, rtol: float, gen_seed: int) -> tuple[float, int]:
    """The shortest Lanczos run whose top Ritz value is within rtol of the reference
    (found by trying 2, 3, ... steps; only that run is what the caller times)."""
    for steps in range(2, 400):
        run = hesse.eigs(
            op, 1, max_steps=steps, tol=0.0, generator=torch.Generator().manual_seed(gen_seed)
        )
        lam = float(run.eigenvalues[0])
        if abs(lam - ref) <= rtol * abs(ref):
            return lam, run.num_products
    return lam, 400


def timed_lanczos(op, steps: int, gen_seed: int) -> float:
    t = time.perf_counter()
    hesse.eigs(op, 1, max_steps=steps, tol=0.0, generator=torch.Generator().manual_seed(gen_seed))
    return time.perf_counter() - t


def hutchinson_needed(op, seed: int, target: float = 0.01, pilot: int = 200) -> tuple[int, float]:
    """Hutchinson's standard error is sigma / sqrt(m): a pilot run gives sigma and the
    estimate, and hence the m that reaches ``target`` relative standard error."""
    t = hesse.trace(
        op, method="hutchinson", num_products=pilot, generator=torch.Generator().manual_seed(seed)
    )
    sigma = t.std_error * pilot**0.5
    return max(2, int((sigma / (target * abs(t.estimate))) ** 2) + 1), t.estimate


def hutchpp_needed(op, seed: int, target: float = 0.01, cap: int = 3072) -> tuple[int, float]:
    """Hutch++ by doubling the budget until its standard error is below ``target``."""
    m = 12
    while True:
        t = hesse.trace(
            op, method="hutch++", num_products=m, generator=torch.Generator().manual_seed(seed)
        )
        if t.std_error <= target * abs(t.estimate) or m >= cap:
            return m, t.estimate
        m *= 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    import warnings

    warnings.simplefilter("ignore", UserWarning)  # the truncated Lanczos runs warn by design
    dtype = getattr(torch, args.dtype)
    prob = setup(dtype)
    op = hesse.HessianOperator(prob)
    t = time.perf_counter()
    for _ in range(20):
        hesse.gradient(prob)
    t_grad = (time.perf_counter() - t) / 20
    t = time.perf_counter()
    for _ in range(20):
        op @ torch.ones(prob.num_params, dtype=dtype)
    t_hvp = (time.perf_counter() - t) / 20
    ref = hesse.eigs(op, 1, tol=1e-12, max_steps=600, generator=torch.Generator().manual_seed(99))
    lam_ref = float(ref.eigenvalues[0])
    print(
        f"torch {torch.__version__}, {args.dtype}, P = {prob.num_params}; one HVP = "
        f"{t_hvp / t_grad:.2f} gradients; reference top eigenvalue {lam_ref:.8g}"
    )

    rows = {}
    for name, fn in [
        ("power iteration", lambda s: power_iteration(op, 1e-4, torch.Generator().manual_seed(s))),
        ("hesse.eigs (Lanczos)", lambda s: lanczos_to(op, lam_ref, 1e-4, s)),
    ]:
        prods, errs, secs = [], [], []
        for s in range(args.seeds):
            t = time.perf_counter()
            lam, n = fn(s)
            took = time.perf_counter() - t
            if name.startswith("hesse"):  # time the one run that sufficed, not the search
                took = timed_lanczos(op, n, s)
            secs.append(took / t_grad)
            prods.append(n)
            errs.append(abs(lam - lam_ref) / abs(lam_ref))
        rows[name] = {
            "hvps": statistics.median(prods),
            "gradient_times": statistics.median(secs),
            "rel_error_median": statistics.median(errs),
            "rel_error_max": max(errs),
        }
    print("\nTop eigenvalue to 1e-4 relative (median over seeds)")
    print(f"{'method':<24}{'HVPs':>8}{'grad-times':>12}{'rel err (median / max)':>26}")
    for name, r in rows.items():
        print(
            f"{name:<24}{r['hvps']:>8.0f}{r['gradient_times']:>12.0f}"
            f"{r['rel_error_median']:>13.1e} / {r['rel_error_max']:.1e}"
        )

    trows = {}
    for method, fn in (("hutchinson", hutchinson_needed), ("hutch++", hutchpp_needed)):
        res = [fn(op, s) for s in range(min(args.seeds, 3))]
        trows[method] = {
            "hvps": statistics.median(r[0] for r in res),
            "estimates": [r[1] for r in res],
        }
    print(
        "\nTrace to 1% relative standard error (median over 3 seeds; Hutchinson from a "
        "200-vector pilot's sigma, Hutch++ by doubling, capped at 3072)"
    )
    for method, r in trows.items():
        est = ", ".join(f"{e:.4g}" for e in r["estimates"])
        print(f"{method:<24}{r['hvps']:>8.0f} HVPs   (estimates {est})")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "dtype": args.dtype,
                    "P": prob.num_params,
                    "hvp_over_gradient": t_hvp / t_grad,
                    "top_eigenvalue": lam_ref,
                    "eigs": rows,
                    "trace": trows,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
