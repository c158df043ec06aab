"""Memory: dense and chain work estimate their peak before allocating, refuse up front
with the estimate when it exceeds the budget, and the estimate is within 30% of the
peak measured in a fresh process (the growth of its resident set's high-water mark over
the call); the dense matrix's estimate is from 25% under to 40% over it, as the
allocator moves that peak."""

from __future__ import annotations

import concurrent.futures
import os
import sys
import traceback
from typing import Any

import pytest
import torch
from torch import nn

import hesse
from hesse._util import memory as _memory

# the first pass only (scripts/test.sh): peak memory in fresh processes: the allocation pattern,
# not the thread count
pytestmark = pytest.mark.once


def _measure_here(case: tuple) -> dict:
    """The estimate and the peak of one case, in this (fresh, forked) process: the growth
    of the resident set's high-water mark over the call, the mark first reset to the
    resident set (``/proc/self/clear_refs``)."""
    import resource

    torch.set_default_dtype(torch.float64)
    kind, L, w, n, din, C = case
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(din, w), nn.Tanh()]
    for _ in range(L - 2):
        layers += [nn.Linear(w, w), nn.Tanh()]
    layers.append(nn.Linear(w, C))
    model = nn.Sequential(*layers).double()
    X, y = torch.randn(n, din), torch.randint(0, C, (n,))
    prob = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y))
    if kind == "dense":
        op = hesse.HessianOperator(prob)
        est, run = op.dense_memory(), lambda: op.to_dense(progress=False)
    elif kind.startswith("plan-"):  # an engine of hesse.factorize: its plan's peak
        method, curvature = kind.split("-")[1:]
        est = hesse.plan(prob, curvature).costs[method].memory
        v = torch.ones(prob.num_params)
        run = lambda: hesse.factorize(prob, 1e-2, curvature, method=method).solve(v)  # noqa: E731
    else:
        chain = hesse.Chain.from_problem(prob)
        est, run = chain.memory_estimate(), lambda: hesse.factorize(chain, 1e-2, "ggn")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def high_water() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc/self/status")

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark := the resident set now
    before = rss()
    run()
    return {"estimate": est, "peak": high_water() - before}


def _child(case: tuple, conn: Any) -> None:
    try:
        conn.send(_measure_here(case))
    except BaseException:  # reported to the parent
        conn.send({"error": traceback.format_exc()[-3000:]})


CASES = [
    # kind, depth, width, batch, inputs, classes: one case a class, no repeats (the
    # classes, not the shapes, are what an estimate can get wrong): the dense Hessian
    # dominated by the matrix (P = 4650, small batch) and by the batched pass's working
    # memory (batch 400), the chain (GGN sweeps dominated by stored factors, by a wide
    # stage, by the loss Hessian; its estimate is the plan's chain memory), and the plan's
    # memory for the dense engine (factoring the GGN and the Hessian, P = 4650) and the
    # observation-space engine (a kernel of M = 4500 outputs; P = 54,403, M = 3000)
    ("dense", 3, 40, 50, 64, 10),
    ("dense", 3, 30, 400, 64, 10),
    ("chain", 8, 64, 32, 16, 10),
    ("chain", 6, 96, 24, 64, 10),
    ("chain", 3, 16, 300, 10, 10),
    ("plan-dense-ggn", 3, 40, 50, 64, 10),
    ("plan-dense-hessian", 3, 40, 50, 64, 10),
    ("plan-gram-ggn", 4, 64, 450, 32, 10),
    ("plan-gram-ggn", 2, 800, 1000, 64, 3),
]


def _measure(case: tuple) -> dict:
    """One case in its own fresh process (`conftest.fork_server`)."""
    from conftest import fork_server

    ctx = fork_server()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(case, send))
    proc.start()
    send.close()
    try:
        if not recv.poll(300):
            proc.kill()
            return {"error": "the measurement ran past 300 s"}
        return recv.recv()
    except EOFError:
        return {"error": f"the measuring process died (exit code {proc.exitcode})"}
    finally:
        proc.join(10)


@pytest.fixture(scope="module")
def measured(request: pytest.FixtureRequest) -> dict:
    """Every selected case measured in its own fresh (forked) process, as many at a time as the
    cores allow at this run's thread count (a process's peak is its own: running them side
    by side only saves wall time; oversubscribed cores would lose it)."""
    chosen = []
    for item in request.session.items:
        spec = getattr(item, "callspec", None)
        if getattr(item, "module", None) is request.module and spec and "case" in spec.params:
            chosen.append(spec.params["case"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    workers = max(1, min(4, cores // torch.get_num_threads()))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(chosen, pool.map(_measure, chosen), strict=True))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_estimate_within_30_percent_of_the_measured_peak(case, measured):
    r = measured[case]
    assert "error" not in r, r.get("error")
    assert r["peak"] > 100 * 2**20  # large enough for the resident set to tell
    if case[0] == "dense":
        # to_dense's estimate is conservative: the live peak (measured with a fixed mmap
        # threshold) is 0.70-0.83 of it on these cases, and glibc's dynamic threshold moves
        # the resident peak by +-15% from run to run (0.76-1.19 of the estimate seen):
        # an estimate from 25% under to 40% over the peak (the refusal at 80% of the
        # available memory leaves room for the 25%)
        assert 0.75 * r["peak"] <= r["estimate"] <= 1.4 * r["peak"], r
    else:
        assert abs(r["estimate"] - r["peak"]) <= 0.3 * r["peak"], r


def _prob(n: int = 8) -> hesse.Problem:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    X = torch.randn(n, 5, generator=g, dtype=torch.float64)
    return hesse.Problem(model, nn.CrossEntropyLoss(), (X, torch.randint(0, 3, (n,))))


def test_dense_and_chain_refuse_up_front_with_the_estimate(monkeypatch):
    prob = _prob()
    monkeypatch.setattr(_memory, "available_memory", lambda device="cpu": 10_000)
    calls = []
    real = hesse.HessianOperator.columns
    monkeypatch.setattr(
        hesse.HessianOperator, "columns", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    with pytest.raises(
        hesse.MemoryBudgetError, match=r"dense 66 x 66 Hessian matrix would need about .* KB"
    ):
        hesse.hessian(prob)
    assert not calls  # refused before the first product
    with pytest.raises(hesse.MemoryBudgetError, match=r"chain sweep \(8 samples.*fewer samples"):
        hesse.factorize(prob, 0.1, method="chain")
    with pytest.raises(hesse.MemoryBudgetError):
        hesse.count_eigenvalues(prob, below=0.0)


def test_the_budget_is_a_fraction_of_what_is_available():
    avail = _memory.available_memory()
    assert avail > 2**20
    _memory.check_memory(0.5 * _memory.BUDGET_FRACTION * avail, "x", "y")  # fits: no error
    with pytest.raises(hesse.MemoryBudgetError, match="more than the"):
        _memory.check_memory(2 * avail, "x", "y")
