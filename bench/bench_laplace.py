"""The exact Laplace evidence against laplace-torch's FullLaplace, KronLaplace and
DiagLaplace, and influence scores against LiSSA and CG at equal products.

Usage:
    python bench/bench_laplace.py [--rows a b ...] [--json out.json] [--plot out.png]
        [--no-influence]
    python bench/bench_laplace.py --from-json out.json --plot out.png

Table 1 (the evidence): tanh MLPs on the digits (classification, the sum of the
cross-entropy over N points, a scalar prior precision 1), P from 1e3 to 1e5. Each
library runs in a fresh process: its fit plus one evidence (wall time, peak growth of
the resident set), then a grid of 21 prior precisions (logspace(-2, 2)) and the prior it
selects (hesse: `optimize_prior_precision("gridsearch")`, one spectrum for every
value), and for hesse a layerwise `optimize_prior_precision("marglik", "layerwise")`
("layerwise": its time; the exact per-tensor traces (O7)). The values of Kron and Diag
are printed as their distance from the exact one (hesse's); FullLaplace is not run where
its P x P matrix would not fit (the table says
so). Ratios are to hesse's own evidence in the same row.

Table 2 (influence): a 64-16-10 MLP on 400 digits, the Hessian + 1e-2 I; hesse's exact
scores of 10 test points against LiSSA (pytorch_influence_functions' defaults: damp
0.01, scale 25, recursion depth 5000, here capped at the products of a few exact solves)
and CG at the same number of Hessian-vector products: the relative error of the scores
and their Spearman correlation with the exact ones.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from torch import nn

ROWS = {
    # name: (hidden widths, samples)
    "P=2e3": ([32], 1000),
    "P=1e4": ([128], 1000),
    "P=5e4": ([256, 128], 400),
    "P=1e5": ([512, 128], 500),
}

_CHILD = r"""
import json, math, resource, sys, time, warnings, torch
warnings.simplefilter("ignore")
sys.path.insert(0, {bench!r})
from bench_laplace import setup
torch.set_default_dtype(torch.float64)
model, X, y = setup({name!r})
which = {which!r}
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
def hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
grid = torch.logspace(-2, 2, 21)
before = rss()
t0 = time.perf_counter()
if which == "hesse":
    import hesse
    la = hesse.Laplace(model, "classification", (X, y), prior_precision=1.0)
    ev = la.log_marginal_likelihood(1.0)
    t1 = time.perf_counter()
    best = la.optimize_prior_precision("gridsearch", grid=grid)  # one spectrum, every value
    t2 = time.perf_counter()
    la.optimize_prior_precision("marglik", "layerwise")
    t3 = time.perf_counter()
else:
    from laplace import Laplace
    from torch.utils.data import DataLoader, TensorDataset
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=which,
                 prior_precision=1.0)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=256))
    ev = float(la.log_marginal_likelihood(torch.tensor(1.0)))
    t1 = time.perf_counter()
    values = [float(la.log_marginal_likelihood(torch.tensor(float(g)))) for g in grid]
    t2 = time.perf_counter()
    best = float(grid[int(torch.tensor(values).argmax())])
    t3 = float("nan")
print(json.dumps({{"evidence": ev, "seconds": t1 - t0, "grid_seconds": t2 - t1,
                  "layerwise_seconds": t3 - t2,
                  "peak_mb": (hwm() - before) / 2**20, "best_prior": best}}))
"""


def setup(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The row's MLP (seeded, trained 200 Adam steps) and its digits."""
    from sklearn.datasets import load_digits

    widths, n = ROWS[name]
    d = load_digits()
    reps = -(-n // len(d.data))
    X = torch.tensor(d.data / 16.0, dtype=torch.float64).repeat(reps, 1)[:n]
    y = torch.tensor(d.target).repeat(reps)[:n]
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip([64, *widths[:-1]], widths, strict=True):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model.eval(), X, y


def _run_child(name: str, which: str, timeout: float) -> dict:
    code = _CHILD.format(
        bench=str(__import__("pathlib").Path(__file__).parent), name=name, which=which
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": last[:60]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def evidence_table(rows: list[str], timeout: float) -> list[dict]:
    out = []
    for name in rows:
        widths, n = ROWS[name]
        P = sum(a * b + b for a, b in zip([64, *widths], [*widths, 10], strict=True))
        row = {"row": name, "P": P, "N": n, "M": 10 * n}
        row["hesse"] = _run_child(name, "hesse", timeout)
        for which in ("full", "kron", "diag"):
            if which == "full" and 8 * 3 * P * P > 0.6 * 24 * 2**30:
                row[which] = {"error": f"P x P = {8 * P * P / 2**30:.0f} GB: not run"}
                continue
            row[which] = _run_child(name, which, timeout)
        out.append(row)
    return out


def _print_evidence(table: list[dict]) -> None:
    print("\nTable 1: the Laplace evidence (classification, prior precision 1; grid of 21)")
    head = f"{'row':<7}{'P':>8}{'M':>7}  {'library':<6}{'time':>9}{'x hesse':>9}{'grid':>8}"
    print(
        head + f"{'peak MB':>9}{'evidence':>13}{'- exact':>10}{'best prior':>11}{'layerwise':>10}"
    )
    for r in table:
        base = r["hesse"]
        for which in ("hesse", "full", "kron", "diag"):
            c = r[which]
            if "error" in c:
                print(f"{r['row']:<7}{r['P']:>8}{r['M']:>7}  {which:<6}  {c['error']}")
                continue
            ratio = c["seconds"] / base["seconds"] if "seconds" in base else float("nan")
            diff = c["evidence"] - base.get("evidence", float("nan"))
            print(
                f"{r['row']:<7}{r['P']:>8}{r['M']:>7}  {which:<6}{c['seconds']:>8.2f}s"
                f"{ratio:>9.2f}{c['grid_seconds']:>7.2f}s{c['peak_mb']:>9.0f}"
                f"{c['evidence']:>13.6g}{diff:>10.3g}{c['best_prior']:>11.3g}"
                + (
                    f"{c['layerwise_seconds']:>9.2f}s"
                    if c["layerwise_seconds"] == c["layerwise_seconds"]
                    else f"{'-':>10}"
                )
            )


def influence_table() -> dict:
    """Exact scores against LiSSA and CG at equal Hessian-vector products."""
    import numpy as np
    import scipy.sparse.linalg as sla

    import hesse

    torch.set_default_dtype(torch.float64)
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data[:400] / 16.0)
    y = torch.tensor(d.target[:400])
    Xt, yt = torch.tensor(d.data[1500:1510] / 16.0), torch.tensor(d.target[1500:1510])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(500):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    prob = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y))
    eps = 1e-2
    t0 = time.perf_counter()
    exact = hesse.influence(prob, (Xt, yt), damping=eps).scores
    t_exact = time.perf_counter() - t0
    test = hesse.Problem(model, nn.CrossEntropyLoss(), (Xt, yt))
    Gt = hesse.per_sample_gradients(test) * len(Xt)
    G = hesse.per_sample_gradients(prob)
    op = hesse.HessianOperator(prob)
    P = prob.num_params
    hvp_t = time.perf_counter()
    op @ torch.ones(P)
    hvp_t = time.perf_counter() - hvp_t
    budget = max(10, int(t_exact / hvp_t / len(Xt)))  # products a test point, equal time

    def lissa(v: torch.Tensor, depth: int, damp: float = 0.01, scale: float = 25.0):
        h = v.clone()
        for _ in range(depth):
            h = v + (1 - damp) * h - (op @ h + eps * h) / scale
        return h / scale

    A = sla.LinearOperator(
        (P, P),
        matvec=lambda x: (op @ torch.as_tensor(x, dtype=torch.float64)).numpy() + eps * x,
        dtype=np.float64,
    )

    def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
        ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
        return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])

    rows = {"exact": {"seconds": t_exact, "rel_err": 0.0, "spearman": 1.0}}
    for name, solve in (
        ("lissa", lambda v: lissa(v, budget)),
        ("cg", lambda v: torch.as_tensor(sla.minres(A, v.numpy(), maxiter=budget)[0])),
    ):
        t0 = time.perf_counter()
        S = torch.stack([solve(g) for g in Gt])
        sc = S @ G.T
        rows[name] = {
            "seconds": time.perf_counter() - t0,
            "rel_err": float((sc - exact).norm() / exact.norm()),
            "spearman": float(np.mean([spearman(sc[j], exact[j]) for j in range(len(Xt))])),
        }
    print(
        f"\nTable 2: influence, P = {P}, N = 400, 10 test points, Hessian + {eps} I; "
        f"{budget} products a test point for LiSSA and MINRES (the exact solve's time)"
    )
    print(f"{'method':<8}{'time':>9}{'x exact':>9}{'rel. error':>12}{'Spearman':>10}")
    for name, r in rows.items():
        print(
            f"{name:<8}{r['seconds']:>8.2f}s{r['seconds'] / t_exact:>9.2f}"
            f"{r['rel_err']:>12.2e}{r['spearman']:>10.4f}"
        )
    return {"P": P, "products": budget, "rows": rows}


def plot(table: list[dict], path: str) -> None:
    """Two panels from the evidence table: each library's time (fit plus one evidence)
    against ``P``, and how far its evidence is below the exact one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    marks = {"hesse": "o-", "full": "s--", "kron": "^-.", "diag": "v:"}
    names = {
        "hesse": "hesse (exact)",
        "full": "FullLaplace",
        "kron": "KronLaplace",
        "diag": "DiagLaplace",
    }
    for which, mark in marks.items():
        rows = [r for r in table if "seconds" in r[which]]
        if not rows:
            continue
        P = [r["P"] for r in rows]
        ax_t.plot(P, [r[which]["seconds"] for r in rows], mark, label=names[which])
        if which == "hesse":  # each row's M: what the observation-space engine costs
            for r in rows:
                ax_t.annotate(
                    f"M={r['M']}",
                    (r["P"], r["hesse"]["seconds"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(4, -10),
                )
        if which in ("kron", "diag"):
            gap = [r["hesse"]["evidence"] - r[which]["evidence"] for r in rows]
            ax_e.plot(P, gap, mark, label=names[which])
    unfit = [r["P"] for r in table if "error" in r["full"]]
    if unfit:  # one shaded band, labelled once at the top (not a label a row over the lines)
        from matplotlib.transforms import blended_transform_factory

        lo, hi = min(unfit) / 1.25, max(unfit) * 1.25
        ax_t.axvspan(lo, hi, color="C1", alpha=0.08, lw=0)
        ax_t.text(
            (lo * hi) ** 0.5,
            0.97,
            "FullLaplace:\nP x P does not fit",
            transform=blended_transform_factory(ax_t.transData, ax_t.transAxes),
            ha="center",
            va="top",
            fontsize=7,
        )
    ax_t.set(
        xscale="log",
        yscale="log",
        xlabel="parameters P",
        ylabel="fit + one evidence (s)",
        title="Time (2-core CPU, float64)",
    )
    ax_e.set(
        xscale="log",
        yscale="log",
        xlabel="parameters P",
        ylabel="exact evidence - approximate (nats)",
        title="How far below the exact evidence",
    )
    for ax in (ax_t, ax_e):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--no-influence", action="store_true")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--plot", metavar="PNG", help="the evidence table as a figure")
    parser.add_argument("--from-json", metavar="PATH", help="plot a saved run, run nothing")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        _print_evidence(saved["evidence"])
        if args.plot:
            plot(saved["evidence"], args.plot)
        return
    result: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    result["evidence"] = evidence_table(args.rows, args.timeout)
    _print_evidence(result["evidence"])
    if args.plot:
        plot(result["evidence"], args.plot)
    if not args.no_influence:
        result["influence"] = influence_table()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
