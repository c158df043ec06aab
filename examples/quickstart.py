"""Quickstart: exact curvature of a small classifier on the digits data.

Run: python examples/quickstart.py
"""

import torch
from scipy.sparse.linalg import eigsh
from sklearn.datasets import load_digits
from torch import nn

import hesse

torch.manual_seed(0)
d = load_digits()
X = torch.tensor(d.data[:300] / 16.0)
y = torch.tensor(d.target[:300])
model = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)).double()
loss_fn = nn.CrossEntropyLoss()

# 3 batches of unequal size: the objective is still the mean over all 300 samples
data = [(X[:128], y[:128]), (X[128:256], y[128:256]), (X[256:], y[256:])]
problem = hesse.Problem(model, loss_fn, data)
print(problem)

g = hesse.gradient(problem)  # (P,)
H = hesse.hessian(problem)  # (P, P), cross-layer blocks included
Hv = hesse.hvp(problem, g)  # Hessian-vector product
split = hesse.decompose(problem)  # H = GGN + residual
print("|g| =", float(g.norm()), " |Hg| =", float(Hv.norm()))
print("H = GGN + residual:", torch.allclose(split.ggn + split.residual, H, atol=1e-12))

# operators work with scipy: top eigenvalues of the Hessian by Lanczos
top = eigsh(hesse.HessianOperator(problem).to_scipy(), k=3, which="LA", return_eigenvectors=False)
print("top eigenvalues (Lanczos):", [round(float(t), 10) for t in sorted(top)])
print("top eigenvalues (dense)  :", [round(t, 10) for t in torch.linalg.eigvalsh(H)[-3:].tolist()])

# Bishop's exact MLP Hessian agrees with autodiff
print("Bishop == autodiff:", torch.allclose(hesse.hessian(problem, method="bishop"), H, atol=1e-12))

# derivative checks against central finite differences
print(hesse.check(problem, hessian=False))
