"""Data parallelism: curvature and second-order steps with torch.distributed.

Run:
    torchrun --nproc_per_node=2 examples/data_parallel.py   # 2 ranks (gloo on CPU)
    python examples/data_parallel.py                         # one process: the same numbers

Each rank holds its own shard of the data (here contiguous parts of unequal size); every
number hesse returns is the full-data one, identical on every rank.
"""

import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn

import hesse

if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

torch.manual_seed(0)  # the same initial model on every rank
d = load_digits()
X = torch.tensor(d.data[:500] / 16.0)
y = torch.tensor(d.target[:500])
model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
loss_fn = nn.CrossEntropyLoss()

lo, hi = 500 * rank // world, 500 * (rank + 1) // world  # this rank's shard
shard = (X[lo:hi], y[lo:hi])
problem = hesse.Problem(model, loss_fn, shard)  # under torchrun: reduced over the ranks

loss, g = hesse.loss_and_gradient(problem)  # the mean over all 500 samples
top = hesse.eigs(hesse.HessianOperator(problem), 3, generator=torch.Generator().manual_seed(0))
trace = hesse.trace(hesse.GGNOperator(problem), generator=torch.Generator().manual_seed(1))
exact = hesse.factorize(problem, 1e-3, "ggn")  # gathers the batch, factors it on every rank
sign, logdet = exact.logdet()

# Hessian-free steps: each rank's closure on its shard, samples= its share of the mean
opt = hesse.optim.HessianFree(model, loss_fn)


def closure() -> torch.Tensor:
    opt.zero_grad()
    out = loss_fn(model(shard[0]), shard[1])
    out.backward()
    return out


losses = [float(opt.step(closure, curvature_batch=shard, samples=hi - lo)) for _ in range(3)]

if rank == 0:  # every rank holds the same numbers; one prints
    print(f"{world} rank(s), {problem.num_samples} samples, P = {problem.num_params}")
    print(f"loss {float(loss):.6f}  |g| {float(g.norm()):.6f}")
    print("top-3 Hessian eigenvalues", [round(float(v), 6) for v in top.eigenvalues])
    print(f"GGN trace (Hutch++) {trace.estimate:.4f}  logdet(GGN + 1e-3 I) {logdet:.4f}")
    print("HF losses", [round(v, 6) for v in losses], "decreasing:", losses[2] < losses[0])
if dist.is_initialized() and __name__ == "__main__" and world > 1:
    dist.destroy_process_group()
