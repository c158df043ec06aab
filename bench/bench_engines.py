"""The three exact engines of ``hesse.factorize`` side by side, and ``auto``'s choice.

Usage:
    python bench/bench_engines.py [--rows a b ...] [--curvature ggn|hessian]
                                  [--max-seconds 90] [--no-paper] [--json out.json]
    python bench/bench_engines.py --overhead [--rows a b ...] [--curvature ggn|hessian]

float64, CPU, cross-entropy MLPs, the GGN (every engine applies; ``--curvature
hessian``: dense and chain), damping 1e-3 (the ``tiny-damping`` row: ``1e-6 ||C||``,
where the chain's delayed front grows and ``auto`` hands over to the dense engine). For
each problem shape (P from 1e3 to 1e5, samples x outputs M from 1e2 to 1e4, depth 2 to
64) each engine runs in a fresh process: ``hesse.factorize(problem, eps, method=m)`` on
a fresh problem (a second call on the same one would time its cache), then one solve
and the log-determinant; the wall time of a warm call (the second; the first pays the
kernels' start-up, unless it took over 30 s; the best of three under a second) and the
peak growth of the resident set over the first call (VmHWM). Engines the plan predicts
over ``--max-seconds`` or over the memory budget are not run (the table says so, with
the prediction). The last columns: ``method="auto"`` itself, the same way in a process
of its own (the plan, its calibration after the first call, the build and the
factorisation): the engine it chose, its time over the fastest engine measured, and over
naming its engine (the planning overhead: the same call with ``method=`` its engine),
and how far the plan's predictions are from the measured times (the worst factor over
the engines run; the chain's on the Hessian is a range, up to every pivot at the eigen
tier: outside it by that factor, 1.0 inside).

Table 3 (``--curvature hessian``): one exact trust-region Newton step on the digits row,
its factorisations counted, against planning, building and factoring anew for each of
its shifts (the step's route before the engine layer), timed in the same process.

Table 2, the reference paper's configuration (8 bias-free ReLU layers 768-24x7-10,
batch 64, P = 22,128, M = 640; damping 1e-3): solve + log-determinant by the
observation-space and the chain engines on the GGN, and by the chain on the Hessian, in
HVP-times, one Hessian-vector product timed in the same process by its default route
(the MLP route) and by reverse-over-reverse autodiff (the unit issue 23 measured in).

Table 4 (``--overhead``, alone): ``method="auto"`` against the engine it chooses named,
interleaved in one process, the best of 5 rounds (2 where a call takes over a second;
rows whose call takes over 30 s are left out): the planning overhead without the drift
between Table 1's separate processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import time

import torch
from torch import nn

import hesse

ROWS = {
    # name: (input, hidden widths, classes, batch, bias, activation)
    "small": (32, [24], 10, 10, True, "tanh"),
    "digits": (64, [32], 10, 128, True, "tanh"),
    "many-samples": (32, [64], 10, 1000, True, "tanh"),
    "deep-narrow": (16, [16] * 63, 10, 16, True, "tanh"),
    "deep-many": (16, [16] * 31, 10, 256, True, "tanh"),
    "paper": (768, [24] * 7, 10, 64, False, "relu"),
    "wide": (256, [128], 10, 32, True, "tanh"),
    "P=1e5": (512, [192], 10, 16, True, "tanh"),
    # issue 23's tiny damping: eps = 1e-6 ||C|| on 8 tanh layers of width 32, batch 32
    "tiny-damping": (16, [32] * 7, 10, 32, True, "tanh", 1e-6),
}
"""name: (input, hidden widths, classes, batch, bias, activation[, eps / ||C||]); eps is
1e-3 unless the row gives it relative to ``C``'s largest eigenvalue magnitude."""

_CHILD = """
import json, resource, sys, time, torch
sys.path.insert(0, {bench!r})
from bench_engines import damping, problem
import hesse
prob = problem({name!r})
eps = damping({name!r}, prob, {curvature!r})
v = torch.ones(prob.num_params, dtype=torch.float64)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
def hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
def run():
    # as a user calls it (auto: plan, build, factor; a named engine: build, factor), on
    # a fresh problem: factorize keeps the engine and the factorisation on the problem,
    # so a second call on the same one would time that cache
    p = problem({name!r})
    t0 = time.perf_counter()
    f = hesse.factorize(p, eps, {curvature!r}, method={method!r})
    f.solve(v)
    f.logdet()
    return time.perf_counter() - t0, f.status.method
before = rss()
first, used = run()
peak = hwm() - before
if first < 30:  # warm calls (the first pays the kernels' start-up): the best of 3
    # under a second each (the noise of one call is 10-20% at milliseconds), else one
    warm = [run()]
    while warm[-1][0] < 1 and len(warm) < 3:
        warm.append(run())
    first, used = min(warm)
print(json.dumps({{"seconds": first, "peak": peak, "method": used}}))
"""


def damping(name: str, prob: hesse.Problem, curvature: str) -> float:
    """The row's eps: 1e-3, or its relative eps times ``||C||`` (Lanczos, seeded)."""
    rel = ROWS[name][6:]
    if not rel:
        return 1e-3
    op = hesse.HessianOperator(prob) if curvature == "hessian" else hesse.GGNOperator(prob)
    top = hesse.eigs(op, 1, "magnitude", generator=torch.Generator().manual_seed(0))
    return float(rel[0] * top.eigenvalues.abs().max())


def problem(name: str) -> hesse.Problem:
    d_in, hidden, classes, n, bias, act = ROWS[name][:6]
    torch.manual_seed(0)
    widths = [d_in, *hidden, classes]
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=bias))
        if i < len(widths) - 2:
            layers.append(nn.ReLU() if act == "relu" else nn.Tanh())
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return hesse.Problem(nn.Sequential(*layers).double(), nn.CrossEntropyLoss(), (X, y))


def run_engine(name: str, method: str, curvature: str) -> dict:
    code = _CHILD.format(bench=sys.path[0], name=name, method=method, curvature=curvature)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=900
    )
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1][:80]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def engine_table(names: list[str], max_seconds: float, curvature: str) -> list[dict]:
    rows = []
    for name in names:
        prob = problem(name)
        plan = hesse.plan(prob, curvature)
        row: dict = {
            "row": name,
            "P": prob.num_params,
            "M": plan.num_outputs,
            "depth": len(ROWS[name][1]) + 1,
            "damping": damping(name, prob, curvature),
            "auto": plan.choice,
            "plan_choice": plan.choice,  # the plan in this process (auto's own may differ)
            "engines": {},
        }
        for m, cost in plan.costs.items():
            entry = {"predicted_s": cost.seconds, "predicted_memory": cost.memory}
            if cost.upper == cost.upper:  # a value-dependent range: [seconds, upper]
                entry["predicted_upper_s"] = cost.upper
            if not cost.applies:
                entry["skipped"] = "does not apply"
            elif cost.memory > plan.budget:
                entry["skipped"] = f"over the memory budget ({cost.memory / 2**30:.1f} GB)"
            elif cost.seconds > max_seconds:
                entry["skipped"] = f"predicted {cost.seconds:.0f} s"
            else:
                entry |= run_engine(name, m, curvature)
            row["engines"][m] = entry
        measured = {m: e["seconds"] for m, e in row["engines"].items() if "seconds" in e}
        if measured and row["auto"] in measured:
            # method="auto" itself (plan, build, factor) in a process of its own, whose
            # plan may choose otherwise where two predictions are close: its engine, its
            # time over the fastest engine measured and over naming its engine
            auto = run_engine(name, "auto", curvature)
            if "seconds" in auto and auto["method"] in measured:
                row["auto"] = auto["method"]
                row["auto_seconds"] = auto["seconds"]
                row["auto_over_fastest"] = auto["seconds"] / min(measured.values())
                row["auto_over_named"] = auto["seconds"] / measured[auto["method"]]
        rows.append(row)
        print_row(row)
    return rows


def print_row(row: dict) -> None:
    cells = []
    for m in ("dense", "gram", "chain"):
        e = row["engines"].get(m, {})
        if "seconds" in e:
            cells.append(f"{e['seconds']:.3g} s / {e['peak'] / 2**20:.0f} MB")
        else:
            cells.append(e.get("skipped", e.get("error", "-")))
    ratio, named = row.get("auto_over_fastest"), row.get("auto_over_named")
    off = [  # outside the predicted range [seconds, upper] by this factor (1: inside)
        max(
            e["predicted_s"] / e["seconds"],
            e["seconds"] / e.get("predicted_upper_s", e["predicted_s"]),
            1.0,
        )
        for e in row["engines"].values()
        if "seconds" in e
    ]
    row["prediction_off_by"] = max(off) if off else None
    print(
        f"| {row['row']} | {row['P']} | {row['M']} | {row['depth']} | "
        + " | ".join(cells)
        + f" | {row['auto']} | {'-' if ratio is None else f'{ratio:.2f}'}"
        + f" | {'-' if named is None else f'{named:.2f}'}"
        + f" | {'-' if not off else f'{max(off):.1f}x'} |",
        flush=True,
    )


def paper_table() -> dict:
    """Table 2: solve + log-determinant on the paper's configuration in HVP-times, the
    HVP timed in the same process by both of its routes on this MLP: the default (the
    MLP route, its forward pass kept at the point) and ``method="reverse"`` (the
    reverse-over-reverse autodiff that issue 23 measured its HVP-times in)."""
    prob = problem("paper")
    v = torch.randn(prob.num_params, dtype=torch.float64)
    hvp = {}
    for route in ("auto", "reverse"):
        op = hesse.HessianOperator(prob, method=route)
        op @ v  # warm-up
        ts = []
        for _ in range(20):
            t0 = time.perf_counter()
            op @ v
            ts.append(time.perf_counter() - t0)
        hvp[route] = sorted(ts)[len(ts) // 2]
    out: dict = {"hvp_seconds": hvp["auto"], "hvp_reverse_seconds": hvp["reverse"]}
    for m, curvature in (("gram", "ggn"), ("chain", "ggn"), ("chain", "hessian")):
        # hesse.engine, not factorize: factorize keeps the factorisation on the problem,
        # so a repeat would time the cache
        hesse.engine(prob, curvature, method=m).factor(1e-3).solve(v)  # warm-up
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            f = hesse.engine(prob, curvature, method=m).factor(1e-3)
            f.solve(v)
            f.logdet()
            best = min(best, time.perf_counter() - t0)
        key = m if curvature == "ggn" else f"{m} (Hessian)"
        out[key] = {
            "seconds": best,
            "hvp_times": best / hvp["auto"],
            "reverse_hvp_times": best / hvp["reverse"],
        }
        print(
            f"| {key} | {best:.3f} s | {best / hvp['auto']:.0f} | {best / hvp['reverse']:.0f} |",
            flush=True,
        )
    return out


def newton_table(name: str = "digits") -> dict:
    """Table 3: one exact trust-region Newton step (`hesse.optim.Newton`, the Hessian,
    ``trust_region=0.5``) prepares ``C`` once and factors it for each shift of the
    Moré-Sorensen iteration; the baseline, timed here, is what the step did before the
    engine layer: a fresh plan, build and factorisation for each of the same shifts."""
    from hesse._factor.base import Engine

    prob = problem(name)
    X, y, _w = next(iter(prob.batches()))
    model, loss_fn = prob.model, prob.loss_fn
    shifts: list[float] = []
    factor = Engine.factor

    def counted(self, damping=0.0, rank_rtol=None):  # type: ignore[no-untyped-def]
        shifts.append(float(damping))
        return factor(self, damping, rank_rtol)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    hesse.plan(prob, "hessian")  # the one-off calibration, outside both timings
    opt = hesse.optim.Newton(model, loss_fn, curvature="hessian", trust_region=0.5)
    Engine.factor = counted  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        opt.step(closure, curvature_batch=(X, y))
        step = time.perf_counter() - t0
    finally:
        Engine.factor = factor  # type: ignore[method-assign]
    t0 = time.perf_counter()
    for s in shifts:  # the former route: plan, build and factor anew for every shift
        with contextlib.suppress(ValueError, ArithmeticError):  # as the step's own
            hesse.factorize(problem(name), s, "hessian")
    rebuild = time.perf_counter() - t0
    out = {"row": name, "step_s": step, "factorisations": len(shifts), "rebuild_s": rebuild}
    print(
        f"| {name} | {prob.num_params} | {step:.3g} s | {len(shifts)} | {rebuild:.3g} s | "
        f"{rebuild / step:.2f} |",
        flush=True,
    )
    return out


def overhead_table(names: list[str], curvature: str) -> list[dict]:
    """Table 4 (``--overhead``): ``method="auto"`` against naming the engine it chooses,
    interleaved in this one process (a round times each once, on fresh problems; the
    best of 5 rounds, of 2 where a call takes over a second): the planning overhead
    without the drift between the separate processes of Table 1, which moves rows under
    a second by 20-30% from run to run on a shared machine."""
    out = []
    for name in names:
        eps = damping(name, problem(name), curvature)
        v = None

        def run(method: str, name: str = name, eps: float = eps) -> tuple[float, str]:
            nonlocal v
            p = problem(name)
            if v is None:
                v = torch.ones(p.num_params, dtype=torch.float64)
            t0 = time.perf_counter()
            f = hesse.factorize(p, eps, curvature, method=method)
            f.solve(v)
            f.logdet()
            return time.perf_counter() - t0, f.status.method

        first, chosen = run("auto")
        if first > 30:  # a row of minutes: not repeated
            continue
        run(chosen)  # warm both
        rounds = 5 if first < 1 else 2
        best = {"auto": math.inf, chosen: math.inf}
        for _ in range(rounds):
            for m in ("auto", chosen):
                best[m] = min(best[m], run(m)[0])
        row = {
            "row": name,
            "method": chosen,
            "auto_s": best["auto"],
            "named_s": best[chosen],
            "ratio": best["auto"] / best[chosen],
        }
        out.append(row)
        print(
            f"| {name} | {chosen} | {best['auto']:.3g} s | {best[chosen]:.3g} s | "
            f"{row['ratio']:.2f} |"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--max-seconds", type=float, default=90.0)
    ap.add_argument("--curvature", choices=["ggn", "hessian"], default="ggn")
    ap.add_argument("--no-paper", action="store_true", help="skip table 2")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--overhead", action="store_true", help="table 4 alone: auto against its engine named"
    )
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64, "
        f"{args.curvature}, eps 1e-3"
    )
    if args.overhead:
        print("| row | engine | auto | named | auto / named |")
        print("|---|---|---|---|---|")
        table = overhead_table(args.rows, args.curvature)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"overhead": table}, f, indent=1)
        return
    print(
        "| row | P | M | depth | dense | gram | chain | auto | auto / fastest | auto / named "
        "| predictions off by |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = engine_table(args.rows, args.max_seconds, args.curvature)
    paper = None
    if not args.no_paper:
        print(
            "\n| paper configuration, solve + logdet (GGN unless said) | time | HVP-times "
            "| reverse-over-reverse HVP-times |"
        )
        print("|---|---|---|---|")
        paper = paper_table()
    newton = None
    if args.curvature == "hessian":
        print(
            "\n| trust-region Newton step | P | step | factorisations | rebuilt per shift | "
            "speed-up |"
        )
        print("|---|---|---|---|---|---|")
        newton = newton_table()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "paper": paper, "newton": newton}, f, indent=1)


if __name__ == "__main__":
    main()
