"""Influence functions with the exact inverse Hessian: which training digits help, and
which harm, the prediction of a test digit (Koh & Liang 2017, no LiSSA, no CG).

Run: python examples/influence.py [--out DIR]   (DIR: where influence.png goes)
"""

import argparse
import tempfile
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

import hesse

parser = argparse.ArgumentParser()
parser.add_argument("--out", default=None, help="folder for influence.png (default: temporary)")
args, _ = parser.parse_known_args()

torch.manual_seed(0)
d = load_digits()
X = torch.tensor(d.data / 16.0, dtype=torch.float64)
y = torch.tensor(d.target)
Xtr, ytr, Xte, yte = X[:500], y[:500], X[1500:1520], y[1500:1520]

wd = 1e-2  # the L2 regulariser the model is trained with: the influence's damping
model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
opt = torch.optim.LBFGS(model.parameters(), max_iter=500, line_search_fn="strong_wolfe")


def closure() -> torch.Tensor:
    opt.zero_grad()
    reg = 0.5 * wd * sum((p**2).sum() for p in model.parameters())
    loss = nn.functional.cross_entropy(model(Xtr), ytr) + reg
    loss.backward()
    return loss


opt.step(closure)
problem = hesse.Problem(model, nn.CrossEntropyLoss(), (Xtr, ytr))
g = hesse.gradient(problem) + wd * problem.param_vector()
print(
    f"P = {problem.num_params}, N = {problem.num_samples}, |grad| at the fit {float(g.norm()):.1e}"
)

res = hesse.influence(problem, (Xte, yte), damping=wd)  # Hessian + wd I, one factorisation
print(f"scores {tuple(res.scores.shape)} by the {res.method} engine, residual {res.residual:.1e}")
helpful, harmful = hesse.top_influences(res.scores, k=3)
j = 0
print(f"test digit {j} (label {int(yte[j])}):")
print("  most helpful training digits:", [(int(i), int(ytr[i])) for i in helpful[j]])
print("  most harmful training digits:", [(int(i), int(ytr[i])) for i in harmful[j]])
selfs = hesse.self_influence(problem, damping=wd)
top = torch.topk(selfs, 3).indices
print("largest self-influence (memorised, often odd) digits:", [(int(i), int(ytr[i])) for i in top])

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    plt = None
if plt is not None:
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(1, 7, figsize=(13, 2.6))
    ax[0].imshow(Xte[j].reshape(8, 8).numpy(), cmap="gray_r")
    ax[0].set_title(f"test digit\nlabel {int(yte[j])}")
    for k, i in enumerate(helpful[j]):
        ax[1 + k].imshow(Xtr[i].reshape(8, 8).numpy(), cmap="gray_r")
        ax[1 + k].set_title(
            f"helpful #{k + 1}\nlabel {int(ytr[i])}, {float(res.scores[j, i]):+.1e}"
        )
    for k, i in enumerate(harmful[j]):
        ax[4 + k].imshow(Xtr[i].reshape(8, 8).numpy(), cmap="gray_r")
        ax[4 + k].set_title(
            f"harmful #{k + 1}\nlabel {int(ytr[i])}, {float(res.scores[j, i]):+.1e}"
        )
    for a in ax:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(
        "predicted change of the test loss when a training digit is removed (exact Hessian)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(out / "influence.png", dpi=110)
    plt.close(fig)
    print("figure:", out / "influence.png")
