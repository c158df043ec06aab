"""Second-order training and spectra during training: Hessian-free, exact Gauss-Newton
with a trust region, and the top eigenvalue / trace tracked along the way.

Run: python examples/second_order_training.py
"""

import torch
from torch import nn

import hesse

torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
X = torch.randn(64, 5, generator=g, dtype=torch.float64)
y = (X[:, :3].sum(1) > 0).long() + (X[:, 3] > 1).long()  # 3 classes
loss_fn = nn.CrossEntropyLoss()


def make_model() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
    ).double()


def train(name: str) -> nn.Sequential:
    model = make_model()
    if name == "HessianFree":
        opt = hesse.optim.HessianFree(model, loss_fn, damping=1.0)
    else:
        opt = hesse.optim.ChainNewton(model, loss_fn, curvature="hessian", trust_region=0.5)
    tracker = hesse.SpectrumTracker(model, loss_fn, (X, y), every=5, trace_products=12)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    first = float(closure().detach())
    for _ in range(15):
        if name == "HessianFree":
            opt.step(closure, curvature_batch=(X[:32], y[:32]))
        else:
            opt.step(closure, curvature_batch=(X, y))
        tracker.step()
    last = float(closure().detach())
    print(f"{name}: loss {first:.4f} -> {last:.4f}; decreased: {last < first}")
    for h in tracker.history:
        print(
            f"   step {h['step']:2d}: top eigenvalue {h['top_eigenvalue']:.4f}, "
            f"trace {h['trace']:.3f} +- {h['trace_se']:.3f}"
        )
    return model


train("HessianFree")
model = train("ChainNewton (trust region)")

# the spectrum of the trained model, estimated and exact
problem = hesse.Problem(model, loss_fn, (X, y))
op = hesse.HessianOperator(problem)
top = hesse.eigs(op, 3, generator=torch.Generator().manual_seed(0))
exact = hesse.eigvalsh(op)
print(
    "top-3 by Lanczos match the dense ones:",
    torch.allclose(top.eigenvalues, exact.flip(0)[:3], rtol=1e-6, atol=1e-9),
    f"({top.num_products} products for P = {problem.num_params})",
)
