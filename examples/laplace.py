"""The Laplace approximation of a digits classifier with exact curvature: the prior
precision chosen by the exact evidence, and the linearised predictive's uncertainty on
the test digits (against accuracy) and on inputs unlike any digit.

Run: python examples/laplace.py [--out DIR]   (DIR: where laplace.png goes)
"""

import argparse
import itertools
import math
import tempfile
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

import hesse

parser = argparse.ArgumentParser()
parser.add_argument("--out", default=None, help="folder for laplace.png (default: a temporary one)")
args, _ = parser.parse_known_args()

torch.manual_seed(0)
d = load_digits()
X = torch.tensor(d.data / 16.0, dtype=torch.float64)
y = torch.tensor(d.target)
Xtr, ytr, Xte, yte = X[:1000], y[:1000], X[1000:1400], y[1000:1400]

model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
for _ in range(300):
    opt.zero_grad()
    nn.functional.cross_entropy(model(Xtr), ytr).backward()
    opt.step()
model.eval()

la = hesse.Laplace(model, "classification", (Xtr, ytr), prior_precision=1.0)
print(f"P = {la.n_params}, N = {la.n_data}, engine: {la.engine.method}")
grid = torch.logspace(-2, 2, 21)
evidence = [la.log_marginal_likelihood(float(g)) for g in grid]  # one eigendecomposition
best_grid = la.optimize_prior_precision("gridsearch", grid=grid)
best = la.optimize_prior_precision("marglik")
print(f"prior precision by the grid: {best_grid:.3g}, by the exact gradient: {best:.4g}")
print(f"log evidence at the optimum: {la.log_marginal_likelihood():.3f}")
layerwise = la.optimize_prior_precision("marglik", "layerwise")  # Newton (A4)
print("layer-wise prior precisions:", [round(v, 3) for v in layerwise])
print(f"log evidence, layer-wise: {la.log_marginal_likelihood():.3f}")
la.prior_precision = best

with torch.no_grad():
    map_probs = torch.softmax(model(Xte), -1)
probs = la.predictive(Xte)  # the GLM predictive, probit: exact solves
acc = float((probs.argmax(1) == yte).double().mean())
nll_map = float(nn.functional.nll_loss(map_probs.log(), yte))
nll_la = float(nn.functional.nll_loss(probs.log(), yte))
print(f"test accuracy {acc:.3f}; test NLL: MAP {nll_map:.3f}, Laplace {nll_la:.3f}")

# inputs unlike any digit: uniform noise images
g = torch.Generator().manual_seed(1)
Xood = torch.rand(100, 64, generator=g, dtype=torch.float64)
ood = la.predictive(Xood)


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-300).log()).sum(1)


print(
    f"mean predictive entropy: test digits {float(entropy(probs).mean()):.3f}, noise "
    f"{float(entropy(ood).mean()):.3f} (max {math.log(10):.3f})"
)

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:  # the figure is optional
    plt = None
if plt is not None:
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    ax[0].semilogx(grid.numpy(), evidence, "o-")
    ax[0].axvline(best, color="k", ls="--", label=f"optimum {best:.3g}")
    ax[0].set(
        xlabel="prior precision", ylabel="log evidence (nats)", title="exact Laplace evidence"
    )
    ax[0].legend()
    ax[1].plot([0, 1], [0, 1], "k:", label="calibrated")
    for p, label in ((map_probs, "MAP"), (probs, "Laplace (GLM, probit)")):
        conf = p.max(1).values
        correct = (p.argmax(1) == yte).double()
        mids, accs = [], []
        for a, b in itertools.pairwise(torch.linspace(0.1, 1.0, 10)):
            sel = (conf >= a) & (conf < b if b < 1 else conf <= b)
            if int(sel.sum()) >= 5:
                mids.append(float(conf[sel].mean()))
                accs.append(float(correct[sel].mean()))
        ax[1].plot(mids, accs, "o-", label=label)
    ax[1].set(xlabel="confidence", ylabel="accuracy", title="test digits: reliability")
    ax[1].legend()
    ax[2].hist(entropy(probs).numpy(), bins=30, alpha=0.6, density=True, label="test digits")
    ax[2].hist(entropy(ood).numpy(), bins=30, alpha=0.6, density=True, label="noise images")
    ax[2].set(
        xlabel="predictive entropy (nats)",
        ylabel="density",
        title="uncertainty in and out of distribution",
    )
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(out / "laplace.png", dpi=110)
    plt.close(fig)
    print("figure:", out / "laplace.png")
