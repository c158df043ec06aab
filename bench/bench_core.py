"""Core products against one gradient, and the dense Hessian against torch.func.

Usage:
    python bench/bench_core.py [--dtype float32|float64] [--repeats 30] [--json out.json]

Table 1: the digits MLP 64-128-128-10 at batch 512 (cross-entropy); every time is
a ratio to one gradient (forward + backward) measured in the same process, with the
plain-PyTorch autodiff of each product (no flattening, no checks) beside hesse's. On an
MLP hesse takes the MLP route (design note (P1)-(P4)), which reuses the forward pass
while the point stays; the "moved" rows change a weight before every call, the price
of a product at a new point.
Table 2: the dense Hessian of a 64-16-10 tanh net at batch 512, hesse vs
``torch.func.hessian``; each runs in its own subprocess so that its peak memory
(resident set growth over the process's state before the call) is its own.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.autograd import forward_ad as fwAD
from torch.func import functional_call, grad, jvp, vjp

import hesse
from hesse._cli.data import load_digits_data


def digits(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    X, y = load_digits_data(dtype)
    return X[:n], y[:n]


def mlp(widths: list[int], dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(dtype)


def timeit(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def products_table(dtype: torch.dtype, repeats: int) -> list[dict]:
    X, y = digits(512, dtype)
    model = mlp([64, 128, 128, 10], dtype)
    lf = nn.CrossEntropyLoss()
    prob = hesse.Problem(model, lf, (X, y))
    names = prob.names
    params = [p.detach() for p in prob.params]
    v = torch.randn(prob.num_params, dtype=dtype)
    vs = prob.unflatten(v)

    def f(ps):
        return lf(functional_call(model, dict(zip(names, ps, strict=True)), (X,)), y)

    def fo(ps):
        return functional_call(model, dict(zip(names, ps, strict=True)), (X,))

    def func_ggn():
        o, jv = jvp(fo, (params,), (vs,))
        p = torch.softmax(o, -1)
        hjv = (p * jv - p * (p * jv).sum(-1, keepdim=True)) / X.shape[0]
        return vjp(fo, params)[1](hjv)

    hop_a = hesse.HessianOperator(prob)  # auto: the MLP route here
    hop_r = hesse.HessianOperator(prob, method="reverse")
    hop_f = hesse.HessianOperator(prob, method="forward")
    gop = hesse.GGNOperator(prob)
    V8 = torch.randn(prob.num_params, 8, dtype=dtype)

    own = list(model.parameters())

    def plain_gradient():  # the baseline: what a training step computes
        return torch.autograd.grad(lf(model(X), y), own)

    def plain_hvp():  # the floor of reverse-over-reverse: no flattening, no checks
        gs = torch.autograd.grad(lf(model(X), y), own, create_graph=True)
        return torch.autograd.grad(gs, own, vs)

    def plain_ggn():  # the floor of forward-mode J v, closed-form Lambda, then J^T
        with fwAD.dual_level():
            duals = {n: fwAD.make_dual(p, t) for n, p, t in zip(names, own, vs, strict=True)}
            o, jv = fwAD.unpack_dual(functional_call(model, duals, (X,)))
        p = torch.softmax(o.detach(), -1)
        return torch.autograd.grad(o, own, (p * jv - p * (p * jv).sum(-1, keepdim=True)) / len(X))

    step = [1e-3]

    def moved(op):  # the point moves before each product: no forward pass to reuse
        def call():
            with torch.no_grad():
                own[0].add_(step[0])
            step[0] = -step[0]
            return op @ v

        return call

    rows = [
        ("gradient (baseline, plain PyTorch)", plain_gradient, 1),
        ("hesse gradient", lambda: hesse.gradient(prob), 1),
        ("plain PyTorch hvp (reverse-over-reverse)", plain_hvp, 1),
        ("hesse hvp (auto: the MLP route)", lambda: hop_a @ v, 1),
        ("hesse hvp, the point moved each call", moved(hop_a), 1),
        ("hesse hvp (reverse-over-reverse)", lambda: hop_r @ v, 1),
        ("hesse hvp (forward-over-reverse)", lambda: hop_f @ v, 1),
        ("torch.func hvp jvp(grad)", lambda: jvp(grad(f), (params,), (vs,)), 1),
        ("plain PyTorch ggn_vp (forward J v, J^T)", plain_ggn, 1),
        ("hesse ggn_vp (the MLP route)", lambda: gop @ v, 1),
        ("hesse ggn_vp, the point moved each call", moved(gop), 1),
        ("torch.func ggn_vp jvp+vjp", func_ggn, 1),
        ("hesse hvp, 8 columns (per column)", lambda: hop_a @ V8, 8),
        ("hesse ggn_vp, 8 columns (per column)", lambda: gop @ V8, 8),
    ]
    # rounds over all rows, each row's best round median: a drift of the machine's speed
    # during the run falls on every row alike
    rounds = [[timeit(fn, repeats) / cols for _, fn, cols in rows] for _ in range(3)]
    times = [min(col) for col in zip(*rounds, strict=True)]
    return [
        {"operation": name, "seconds": t, "ratio_to_gradient": t / times[0]}
        for (name, _, _), t in zip(rows, times, strict=True)
    ]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def dense_child(which: str, dtype: torch.dtype) -> None:
    """Runs in a subprocess: one dense Hessian, prints time and peak RSS growth."""
    X, y = digits(512, dtype)
    model = mlp([64, 16, 10], dtype)
    lf = nn.CrossEntropyLoss()
    prob = hesse.Problem(model, lf, (X, y))
    names = prob.names
    theta = prob.param_vector()

    def L(flat):
        return lf(
            functional_call(model, dict(zip(names, prob.unflatten(flat), strict=True)), (X,)), y
        )

    before = _rss_mb()
    t = time.perf_counter()
    H = hesse.hessian(prob, progress=False) if which == "hesse" else torch.func.hessian(L)(theta)
    secs = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    H64 = H.double()
    print(
        json.dumps(
            {
                "seconds": secs,
                "peak_mb": peak - before,
                "P": prob.num_params,
                "checksum": float(H64.abs().sum()),
            }
        )
    )


def dense_table(dtype: torch.dtype) -> list[dict]:
    rows = []
    for which in ("torch.func.hessian", "hesse"):
        best = None
        for _ in range(3):  # best of three fresh processes
            r = subprocess.run(
                [sys.executable, __file__, "--_dense", which, "--dtype", str(dtype).split(".")[1]],
                capture_output=True,
                text=True,
                check=True,
            )
            res = json.loads(r.stdout.strip().splitlines()[-1])
            best = res if best is None or res["seconds"] < best["seconds"] else best
        rows.append({"method": which, **best})
    base = rows[0]
    for r in rows:
        r["time_ratio"] = r["seconds"] / base["seconds"]
        r["memory_ratio"] = r["peak_mb"] / max(base["peak_mb"], 1e-9)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--_dense", help=argparse.SUPPRESS)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if args._dense:
        dense_child("hesse" if args._dense == "hesse" else "func", dtype)
        return
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}, {args.dtype}")
    prods = products_table(dtype, args.repeats)
    print("\nDigits MLP 64-128-128-10, batch 512, cross-entropy: time / one gradient")
    print(f"{'operation':<44}{'ms':>9}{'ratio':>8}")
    for r in prods:
        print(f"{r['operation']:<44}{1e3 * r['seconds']:>9.2f}{r['ratio_to_gradient']:>8.2f}")
    dense = dense_table(dtype)
    print(f"\nDense Hessian, tanh MLP 64-16-10 (P = {dense[0]['P']}), batch 512")
    print(f"{'method':<22}{'s':>8}{'time ratio':>12}{'peak MB':>10}{'mem ratio':>11}")
    for r in dense:
        print(
            f"{r['method']:<22}{r['seconds']:>8.2f}{r['time_ratio']:>12.2f}{r['peak_mb']:>10.0f}"
            f"{r['memory_ratio']:>11.2f}"
        )
    if abs(dense[0]["checksum"] - dense[1]["checksum"]) > 1e-6 * dense[0]["checksum"] * (
        1e3 if dtype == torch.float32 else 1
    ):
        print("WARNING: the two dense Hessians differ")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "dtype": args.dtype,
                    "torch": torch.__version__,
                    "products": prods,
                    "dense": dense,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
