"""The dense chain-rule split ``H = GGN + residual`` of the main job's models: Bishop's
propagation (design note (B1), ``decompose``'s default for an MLP) against the ``3 P``
products of ``decompose(method="autodiff")`` and a user's ``torch.func.hessian``.

Usage:
    python bench/bench_decompose.py [--quick] [--json out.json]

float64, CPU, one process, the digits (1,797 samples), cross-entropy, tanh MLPs
64-h-10 (h = 32 is ``hesse analyze``'s default). Each row: best of 2 wall times, as
ratios to one gradient over all the data (``hesse.gradient``) measured in the same
process, and the largest relative difference between the two routes' matrices.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_chain_accuracy import _best  # best-of-n wall time and the last result
from torch import nn
from torch.func import functional_call
from torch.func import hessian as func_hessian

import hesse
from hesse._cli.data import load_digits_data


def _func_hessian(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What a user writes: ``torch.func.hessian`` of the loss in the flat parameters."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    lf = nn.CrossEntropyLoss()

    def loss(t: torch.Tensor) -> torch.Tensor:
        parts = torch.split(t, sizes)
        params = {n: v.reshape(s) for n, v, s in zip(names, parts, shapes, strict=True)}
        return lf(functional_call(model, params, (X,)), y)

    return func_hessian(loss)(theta)


def row(hidden: int) -> dict:
    X, y = load_digits_data(torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()
    prob = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y))
    t_grad, _ = _best(lambda: hesse.gradient(prob), 5)
    t_fast, fast = _best(lambda: hesse.decompose(prob, method="bishop"))
    t_slow, slow = _best(lambda: hesse.decompose(prob, method="autodiff", progress=False), 1)
    t_func, Hf = _best(lambda: _func_hessian(model, X, y), 1)
    diff = max(
        float((a - b).abs().max() / b.abs().max())
        for a, b in zip(fast, slow, strict=True)
        if float(b.abs().max()) > 0
    )
    diff_func = float((fast.hessian - Hf).abs().max() / Hf.abs().max())
    return {
        "hidden": hidden,
        "P": prob.num_params,
        "gradient_s": t_grad,
        "bishop_s": t_fast,
        "autodiff_s": t_slow,
        "torch_func_hessian_s": t_func,
        "bishop_gradients": t_fast / t_grad,
        "autodiff_gradients": t_slow / t_grad,
        "torch_func_gradients": t_func / t_grad,
        "speedup": t_slow / t_fast,
        "max_rel_diff": diff,
        "max_rel_diff_torch_func": diff_func,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the default model only")
    ap.add_argument("--json", type=Path, help="write the rows as JSON")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64")
    print(
        f"{'hidden':>7}{'P':>7}{'gradient s':>12}{'bishop s':>10}{'autodiff s':>12}"
        f"{'func.hessian s':>16}{'bishop/grad':>13}{'autodiff/grad':>15}{'speedup':>9}"
        f"{'max diff':>10}"
    )
    rows = []
    for hidden in [32] if args.quick else [16, 32, 64]:
        r = row(hidden)
        rows.append(r)
        print(
            f"{r['hidden']:>7}{r['P']:>7}{r['gradient_s']:>12.4f}{r['bishop_s']:>10.2f}"
            f"{r['autodiff_s']:>12.2f}{r['torch_func_hessian_s']:>16.2f}"
            f"{r['bishop_gradients']:>13.0f}{r['autodiff_gradients']:>15.0f}"
            f"{r['speedup']:>9.1f}{r['max_rel_diff']:>10.1e}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
