"""Data-parallel curvature with torch.distributed (gloo on this CPU): 1 and 2 ranks against
one process with 2 threads.

Usage:
    python bench/bench_distributed.py [--samples 2048] [--repeats 5] [--json out.json]

float64, the digits-size MLP 64-256-256-10 (P = 85,002), cross-entropy, ``N`` samples
split evenly over the ranks (each rank one thread; the baseline one process with two).
For an HVP, Lanczos top-5 (``hesse.eigs``, seeded), a Hutch++ trace (60 products) and a
Hessian-free step (``hesse.optim.HessianFree``: at most 20 CG iterations on the GGN, which
at damping 1 stop near 10 at the residual tolerance; the closure on each rank's shard):
the wall time (median of ``--repeats``), its ratio to the one-process baseline, the part
of it spent in all-reduces (timed inside the run), and the bytes each all-reduce carries
(``P k`` numbers for a product; the mean over an HF step's).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import hesse
from hesse._autodiff import distributed as _dist


def _problem(n: int, rank: int, world: int) -> hesse.Problem:
    torch.manual_seed(0)
    f32 = torch.float32
    model = nn.Sequential(
        nn.Linear(64, 256, dtype=f32), nn.Tanh(), nn.Linear(256, 256, dtype=f32), nn.Tanh(),
        nn.Linear(256, 10, dtype=f32),
    ).double()  # fmt: skip
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, 64, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=g)
    a, b = n * rank // world, n * (rank + 1) // world
    return hesse.Problem(model, nn.CrossEntropyLoss(), (X[a:b], y[a:b]))


def _measure(prob: hesse.Problem, repeats: int) -> dict:
    comm = {"seconds": 0.0, "bytes": 0, "calls": 0}
    if prob.group is not None:
        real = _dist.Group.all_reduce

        def timed(self, t, what="product", op=None):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            out = real(self, t, what, op)
            comm["seconds"] += time.perf_counter() - t0
            comm["bytes"] += t.numel() * t.element_size()
            comm["calls"] += 1
            return out

        _dist.Group.all_reduce = timed  # type: ignore[method-assign]
    v = torch.randn(
        prob.num_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    op = hesse.HessianOperator(prob)
    X, y = prob.as_one_batch()
    hf = hesse.optim.HessianFree(
        prob.model, prob.loss_fn, cg_max_iter=20, cg_progress_tol=0.0,  # at most 20 products
        backtrack=False, line_search=False, adapt_damping=False,
    )  # fmt: skip

    def closure() -> torch.Tensor:
        hf.zero_grad()
        loss = prob.loss_fn(prob.model(X), y)
        loss.backward()
        return loss

    jobs = {
        "hvp": lambda: op @ v,
        "lanczos top-5": lambda: hesse.eigs(
            op, 5, tol=1e-6, max_steps=60, generator=torch.Generator().manual_seed(3)
        ),
        "hutch++ trace (60)": lambda: hesse.trace(
            op, num_products=60, generator=torch.Generator().manual_seed(4)
        ),
        "HF step (CG <= 20)": lambda: hf.step(closure, curvature_batch=(X, y), samples=len(X)),
    }
    out = {}
    for name, job in jobs.items():
        job()
        times, comms, nbytes, calls = [], [], [], []
        for _ in range(repeats):
            comm.update(seconds=0.0, bytes=0, calls=0)
            t0 = time.perf_counter()
            job()
            times.append(time.perf_counter() - t0)
            comms.append(comm["seconds"])
            nbytes.append(comm["bytes"])
            calls.append(comm["calls"])
        out[name] = {
            "seconds": statistics.median(times),
            "allreduce_seconds": statistics.median(comms),
            "bytes_per_call": (nbytes[0] / calls[0]) if calls[0] else 0,
            "allreduces": calls[0],
        }
    return out


def _worker(rank: int, world: int, port: int, n: int, repeats: int, path: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    res = _measure(_problem(n, rank, world), repeats)
    if rank == 0:
        with open(path, "w") as f:
            json.dump(res, f)
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = {"1 process, 2 threads": _measure(_problem(args.samples, 0, 1), args.repeats)}
    for world in (1, 2):
        path = f"/tmp/hesse_bench_dist_{os.getpid()}_{world}.json"
        mp.spawn(_worker, args=(world, _port(), args.samples, args.repeats, path), nprocs=world)
        with open(path) as f:
            rows[f"{world} rank{'s' if world > 1 else ''} (gloo), 1 thread each"] = json.load(f)
        os.remove(path)
    print(f"torch {torch.__version__}, float64, P = 85002, N = {args.samples}")
    print("| run | job | time | / 1 process | all-reduce | all-reduces | bytes each |")
    print("|---|---|---|---|---|---|---|")
    base = rows["1 process, 2 threads"]
    for run, jobs in rows.items():
        for job, r in jobs.items():
            r["ratio"] = r["seconds"] / base[job]["seconds"]
            print(
                f"| {run} | {job} | {r['seconds']:.3f} s | {r['ratio']:.2f} | "
                f"{r['allreduce_seconds']:.3f} s | {r['allreduces']} | "
                f"{r['bytes_per_call'] / 1e6:.2f} MB |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
