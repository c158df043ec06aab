"""The chain solver on a deep, narrow network: exact (H + eps I)^-1 v, log-determinant,
eigenvalue counts and single eigenvalues, in time linear in depth, checked against the
dense matrix (small enough here to form).

Run: python examples/chain_solver.py
"""

import time

import torch
from torch import nn

import hesse

torch.manual_seed(0)
depth, width, batch = 12, 6, 5
layers = [nn.Linear(4, width), nn.Tanh()]
for _ in range(depth - 2):
    layers += [nn.Linear(width, width), nn.Tanh()]
layers.append(nn.Linear(width, 3))
model = nn.Sequential(*layers).double()
X, y = torch.randn(batch, 4, dtype=torch.float64), torch.randint(0, 3, (batch,))
problem = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y))
print(problem, "->", hesse.Chain.from_problem(problem))

eps = 1e-2
t = time.perf_counter()
f = hesse.factorize(problem, damping=eps)  # one backward (Riccati) sweep
v = torch.randn(problem.num_params, dtype=torch.float64)
x = f.solve(v)
sign, logabs = f.logdet()
inertia = f.inertia()
print(f"factorise + solve: {time.perf_counter() - t:.3f} s")

H = hesse.hessian(problem)  # the dense reference
Ce = H + eps * torch.eye(len(H), dtype=H.dtype)
ev = torch.linalg.eigvalsh(H)
print("solve matches dense:", torch.allclose(x, torch.linalg.solve(Ce, v), rtol=1e-8, atol=1e-10))
print("log-determinant matches:", abs(logabs - float(torch.linalg.slogdet(Ce)[1])) < 1e-8)
print(
    f"inertia of H + eps I: {inertia.negative} negative, {inertia.positive} positive "
    f"(dense: {int((ev + eps < 0).sum())} negative)"
)
below = hesse.count_eigenvalues(problem, below=-1e-6)
print(f"eigenvalues below -1e-6: {below} (dense: {int((ev < -1e-6).sum())})")
lam1 = hesse.eigenvalue(problem, 1)  # the smallest, by bisection on exact counts
print(f"smallest eigenvalue: {lam1:.10f} (dense: {float(ev[0]):.10f})")
step = hesse.newton_step(problem, damping=0.1)  # damped Gauss-Newton step
print(f"Gauss-Newton step predicts a loss change of {step.predicted_change:.3e}")
