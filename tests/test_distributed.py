"""Data parallelism with torch.distributed (gloo on loopback, 2 and 3 ranks forked from
the tests' fork server, uneven shards, float64): every quantity equals one process holding
all the data to 1e-12 relative and is bit-identical across ranks; bad input is refused;
a rank that dies makes the others fail with a clear error, not hang."""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import socket
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
from scipy.sparse.linalg import eigsh
from torch import nn

import hesse

pytestmark = [
    pytest.mark.skipif(
        not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed"
    ),
    pytest.mark.distributed,  # the ranks run one thread each, whatever OMP_NUM_THREADS says
]

SHARDS = {2: [(0, 5), (5, 11)], 3: [(0, 3), (3, 3), (3, 11)]}  # rank 1 of 3 holds nothing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# torch 2.13 segfaults building DDP over gloo under TORCH_DISTRIBUTED_DEBUG=DETAIL (without
# hesse too); that mode checks that every rank ran the same collectives, so the rest of this
# module runs under it (TORCH_DISTRIBUTED_DEBUG=DETAIL pytest tests/test_distributed.py)
DDP_SEGFAULTS = os.environ.get("TORCH_DISTRIBUTED_DEBUG") == "DETAIL"


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    f32 = torch.float32  # the same initial values whatever the default dtype of the process
    model = nn.Sequential(nn.Linear(4, 6, dtype=f32), nn.Tanh(), nn.Linear(6, 3, dtype=f32))
    model = model.double()
    X = torch.randn(11, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (11,), generator=g)
    return model, X, y


def _quantities(prob: hesse.Problem, data: tuple) -> dict:
    g = torch.Generator().manual_seed(7)
    V = torch.randn(prob.num_params, 3, generator=g, dtype=torch.float64)
    loss, grad = hesse.loss_and_gradient(prob)
    out = {
        "loss": loss.reshape(1),
        "gradient": grad,
        "hvp": hesse.hvp(prob, V),
        "hvp_forward": hesse.hvp(prob, V[:, 0], method="forward"),
        "ggn_vp": hesse.ggn_vp(prob, V),
        "ggn_vp1": hesse.ggn_vp(prob, V[:, 0]),
        "fisher_vp": hesse.fisher_vp(prob, V, kind="empirical"),
        "hessian": hesse.hessian(prob),
        "hessian_bishop": hesse.hessian(prob, method="bishop"),  # the ranks' parts summed
        "ggn_bishop": hesse.ggn(prob, method="bishop"),
        "jacobian": hesse.jacobian(prob),
        "top3": hesse.eigs(
            hesse.HessianOperator(prob), 3, generator=torch.Generator().manual_seed(1)
        ).eigenvalues,
        "top_unseeded": hesse.eigs(hesse.GGNOperator(prob), 1).eigenvalues,  # rank 0's v0
        "trace": torch.tensor(
            [
                hesse.trace(
                    hesse.HessianOperator(prob),
                    num_products=30,
                    generator=torch.Generator().manual_seed(2),
                ).estimate
            ]
        ),
        "solve": hesse.factorize(prob, 0.1, "ggn").solve(V[:, 0]),
        "logdet": torch.tensor([hesse.factorize(prob, 0.1, "hessian", method="dense").logdet()[1]]),
        "count": torch.tensor([float(hesse.count_eigenvalues(prob, below=0.0))]),
        "chain_batch": hesse.Chain.from_problem(prob).inputs,  # gathered: the whole batch
        "scipy_eigsh": torch.from_numpy(  # the same products on every rank: the same path
            eigsh(hesse.GGNOperator(prob).to_scipy(), k=2, v0=V[:, 1].numpy())[0].copy()
        ),
        "tracker": torch.tensor(
            [
                float(v)
                for v in hesse.SpectrumTracker(prob.model, prob.loss_fn, data).step().values()
            ],
            dtype=torch.float64,
        ),
    }
    return {k: v.detach().cpu() for k, v in out.items()}


def _worker(rank: int, world: int, port: int, outdir: str, case: str) -> None:
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=20),
        )
        torch.set_num_threads(1)
        os.environ["HESSE_TEST_DIR"] = outdir
        result = CASES[case](rank, world)
        torch.save(result, os.path.join(outdir, f"{rank}.pt"))
    except BaseException as err:  # reported to the parent through the file
        report = {"error": f"{type(err).__name__}: {err}", "tb": traceback.format_exc()}
        torch.save(report, os.path.join(outdir, f"{rank}.pt"))
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _case_products(rank: int, world: int) -> dict:
    model, X, y = _setup()
    a, b = SHARDS[world][rank]
    prob = hesse.Problem(model, nn.CrossEntropyLoss(), (X[a:b], y[a:b]))
    assert prob.distributed and prob.num_samples == 11 and prob.local_samples == b - a
    out = _quantities(prob, (X[a:b], y[a:b]))
    tracker = hesse.SpectrumTracker(model, nn.CrossEntropyLoss(), (X[a:b], y[a:b]))
    tracker.step()
    png = tracker.plot(os.path.join(os.environ["HESSE_TEST_DIR"], f"tracker-{rank}.png"))
    out["plotted"] = torch.tensor([float(png.exists())])  # rank 0 alone writes
    return out


def _case_bad_input(rank: int, world: int) -> dict:
    said = {}

    def weights(model, X):  # a rank whose weights differ
        with torch.no_grad():
            model[0].bias.add_(1e-9)
        return model, X

    def structure(model, X):  # one more hidden unit
        return nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3)).double(), X

    def dtype(model, X):  # float32, its data converted alike
        return model.float(), X.float()

    for what, change in (("differ", weights), ("structure", structure), ("dtype", dtype)):
        model, X, y = _setup()
        if rank == 1:
            model, X = change(model, X)
        try:
            hesse.Problem(model, nn.CrossEntropyLoss(), (X, y))
        except ValueError as err:
            said[what] = str(err)
    model, X, y = _setup()
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    ds = TensorDataset(X, y)  # 11 samples on 2 ranks: the sampler pads one
    loader = DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, world, rank))
    try:
        hesse.Problem(model, nn.CrossEntropyLoss(), loader)
    except ValueError as err:
        said["padded"] = str(err)
    exact = DataLoader(
        ds, batch_size=4, sampler=DistributedSampler(ds, world, rank, drop_last=True)
    )
    prob = hesse.Problem(model, nn.CrossEntropyLoss(), exact)
    said["dropped"] = prob.num_samples
    local = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y), process_group="local")
    said["local"] = local.num_samples
    shard = (X[rank::world], y[rank::world])
    if not DDP_SEGFAULTS:
        ddp = nn.parallel.DistributedDataParallel(model)  # its .module is taken
        P = local.num_params
        a = hesse.hvp(hesse.Problem(ddp, nn.CrossEntropyLoss(), shard), torch.ones(P))
        b = hesse.hvp(hesse.Problem(model, nn.CrossEntropyLoss(), shard), torch.ones(P))
        said["ddp"] = bool(torch.equal(a, b))
    else:
        said["ddp"] = True
    opt = hesse.optim.HessianFree(model, nn.CrossEntropyLoss())
    try:  # a 'mean' loss: the ranks' shares need each rank's sample count
        opt.step(_closure(opt, model, *shard), curvature_batch=shard)
    except ValueError as err:
        said["samples"] = str(err)
    if rank == 1:
        with torch.no_grad():
            model[0].bias.add_(1e-9)
    try:
        hesse.optim.Newton(model, nn.CrossEntropyLoss())
    except ValueError as err:
        said["optim_differ"] = str(err)
    return said


def _case_differing_arguments(rank: int, world: int) -> dict:
    """Each rank passes its own value of one argument: refused on every rank, naming the
    argument, no abort and no hang; then a call that agrees still works."""
    model, X, y = _setup()
    a, b = SHARDS[world][rank]
    prob = hesse.Problem(model, nn.CrossEntropyLoss(), (X[a:b], y[a:b]))
    P = prob.num_params
    v = torch.ones(P) * (1.0 + rank)
    calls = {
        "v": lambda: hesse.hvp(prob, v),
        "v0": lambda: hesse.eigs(hesse.HessianOperator(prob), 1, v0=v),
        "damping": lambda: hesse.factorize(prob, 0.1 + rank, "ggn"),
        "damping-engine": lambda: hesse.engine(prob, "ggn", method="dense").factor(
            0.1 * (1 + rank)
        ),
        "solve-damping": lambda: hesse.solve(prob, torch.ones(P), 0.1 + rank, "ggn"),
        "num_products": lambda: hesse.trace(hesse.GGNOperator(prob), num_products=9 + 3 * rank),
        "reduction": lambda: hesse.Problem(
            model, nn.CrossEntropyLoss(reduction="sum" if rank else "mean"), (X[a:b], y[a:b])
        ),
    }
    said = {}
    for key, call in calls.items():
        try:
            call()
            said[key] = "accepted"
        except ValueError as err:
            said[key] = str(err)
    said["agreed"] = hesse.hvp(prob, torch.ones(P))
    return said


def _closure(opt, model, X, y, loss_fn=None):
    """The usual closure on this rank's shard (by default a 'mean' loss over its samples)."""
    from conftest import closure_of

    return closure_of(opt, model, loss_fn or nn.CrossEntropyLoss(), X, y)


CURVATURE = 8  # the curvature batch: the first 8 samples (each rank its part of them)


def _train(kind: str, model, X, y, rank: int, world: int) -> dict:
    """A few steps of ``kind`` on this rank's shard; the loss history, the parameters and
    the last step's statistics."""
    a, b = SHARDS[world][rank] if world > 1 else (0, len(X))
    ca, cb = min(a, CURVATURE), min(b, CURVATURE)
    # one process (and DETAIL debugging): the same steps without the wrapper
    ddp = kind == "hf-ddp" and world > 1 and not DDP_SEGFAULTS
    net = nn.parallel.DistributedDataParallel(model) if ddp else model
    loss_fn = nn.CrossEntropyLoss(reduction="sum" if kind == "hf-sum" else "mean")
    opt = {
        "hf": lambda: hesse.optim.HessianFree(net, nn.CrossEntropyLoss(), preconditioner="martens"),
        "hf-sum": lambda: hesse.optim.HessianFree(net, loss_fn),
        "hf-ddp": lambda: hesse.optim.HessianFree(net, nn.CrossEntropyLoss(), cg_max_iter=20),
        "chain-newton": lambda: hesse.optim.ChainNewton(net, nn.CrossEntropyLoss(), damping=1e-2),
        "newton-tr": lambda: hesse.optim.Newton(
            net, nn.CrossEntropyLoss(), curvature="hessian", trust_region=0.5, method="dense"
        ),
    }[kind]()
    steps = {"hf": 5, "hf-sum": 2, "hf-ddp": 2, "chain-newton": 3, "newton-tr": 2}[kind]
    samples = None if kind == "hf-sum" else b - a  # a 'sum' needs no shares
    losses = []
    for _ in range(steps):
        loss = opt.step(
            _closure(opt, net, X[a:b], y[a:b], loss_fn),
            curvature_batch=(X[ca:cb], y[ca:cb]),
            samples=samples,
        )
        losses.append(float(loss))
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    stats = [float(v) for v in opt.last.values() if isinstance(v, (int, float))]
    f64 = torch.float64  # a spawned rank's default dtype is float32
    return {
        "losses": torch.tensor(losses, dtype=f64),
        "theta": theta,
        "stats": torch.tensor(stats, dtype=f64),
    }


TRAINED = ("hf", "hf-sum", "hf-ddp", "chain-newton", "newton-tr")


def _case_optim(rank: int, world: int) -> dict:
    out = {}
    for kind in TRAINED:
        model, X, y = _setup()
        out |= {f"{kind}/{k}": v for k, v in _train(kind, model, X, y, rank, world).items()}
    return out


def _case_dead_rank(rank: int, world: int) -> dict:
    model, X, y = _setup()
    prob = hesse.Problem(model, nn.CrossEntropyLoss(), (X[rank::2], y[rank::2]))
    if rank == 1:
        os._exit(0)  # dies before the product: rank 0 must not hang
    try:
        hesse.hvp(prob, torch.ones(prob.num_params))
    except RuntimeError as err:
        return {"error_message": str(err)}
    return {"error_message": ""}


def _zoo_quantities(prob: hesse.Problem) -> dict:
    """What the issue's bar names, on a zoo model: gradient, HVP, GGN and Fisher products,
    the dense Hessian, the split's residual, the top-3 eigenvalues and a seeded Hutch++
    trace."""
    V = torch.randn(prob.num_params, 2, generator=torch.Generator().manual_seed(3))
    V = V.to(torch.float64)
    seeded = {"generator": torch.Generator().manual_seed(4)}
    out = {
        "gradient": hesse.gradient(prob),
        "hvp": hesse.hvp(prob, V),
        "ggn_vp": hesse.ggn_vp(prob, V),
        "fisher_vp": hesse.fisher_vp(prob, V, kind="empirical"),
        "hessian": hesse.hessian(prob),
        # Bishop's propagation on an MLP, P products otherwise: decided alike on every rank
        # (an empty shard once chose the products and the collectives did not match)
        "residual": hesse.decompose(prob).residual,
        "top3": hesse.eigs(hesse.HessianOperator(prob), 3, **seeded).eigenvalues,
        "trace": torch.tensor(
            [hesse.trace(hesse.GGNOperator(prob), num_products=24, **seeded).estimate],
            dtype=torch.float64,
        ),
    }
    return {k: v.detach().cpu() for k, v in out.items()}


ZOO_SHARDS = {2: [(0, 3), (3, 7)], 3: [(0, 2), (2, 2), (2, 7)]}  # 7 samples; one rank empty


def _case_zoo(rank: int, world: int) -> dict:
    from conftest import LOSSES, MODELS, make_case

    torch.set_default_dtype(torch.float64)  # as conftest does for the tests
    a, b = ZOO_SHARDS[world][rank]
    out = {}
    for name in MODELS:
        for loss in LOSSES:
            case = make_case(name, loss)
            prob = hesse.Problem(case.model, case.loss_fn, (case.X[a:b], case.y[a:b]))
            out |= {f"{case.name}/{k}": v for k, v in _zoo_quantities(prob).items()}
    return out


CASES = {
    "zoo": _case_zoo,
    "products": _case_products,
    "bad": _case_bad_input,
    "dead": _case_dead_rank,
    "optim": _case_optim,
    "differing": _case_differing_arguments,
}


def _spawn(world: int, case: str, tmp_path, timeout: float = 120) -> list[dict]:
    from conftest import fork_server

    ctx = fork_server()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, str(tmp_path), case))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            pytest.fail(f"a rank of {case!r} hung past {timeout} s")
    out = []
    for r in range(world):
        path = tmp_path / f"{r}.pt"
        died = {"missing": True, "exitcode": procs[r].exitcode}  # no result: the rank died
        out.append(torch.load(path, weights_only=False) if path.exists() else died)
    return out


@functools.cache
def _one_process() -> dict:
    """The quantities of one process holding all the data (the same for every world)."""
    model, X, y = _setup()
    return _quantities(hesse.Problem(model, nn.CrossEntropyLoss(), (X, y)), (X, y))


@pytest.mark.parametrize("world", [2, 3])
def test_every_quantity_equals_one_process_and_agrees_across_ranks(world, tmp_path):
    results = _spawn(world, "products", tmp_path)
    errors = [r.get("tb", r) for r in results if "error" in r or "missing" in r]
    assert not errors, "\n".join(map(str, errors))
    assert [float(r.pop("plotted")) for r in results] == [1.0] + [0.0] * (world - 1)
    for key, want in _one_process().items():
        for rank, got in enumerate(results):
            assert torch.equal(got[key], results[0][key]), (key, rank)  # bit-identical
        scale = max(float(want.abs().max()), 1e-300)
        err = float((results[0][key] - want).abs().max()) / scale
        # products to 1e-12; Lanczos and Hutch++ amplify the products' summation order
        # (its QR, the Ritz values' conditioning) to a few 1e-8 at most
        # (its QR, the Ritz values' conditioning) to a few 1e-8 at most; the gathered
        # factorisations see the batches in another order than one process (the bound
        # of their backward error, test_engines.py)
        tol = {"top3": 1e-9, "top_unseeded": 1e-9, "trace": 1e-6, "tracker": 1e-6}.get(key, 1e-12)
        tol = 1e-9 if key == "scipy_eigsh" else tol
        tol = 1e-7 if key in ("solve", "logdet") else tol
        assert err <= tol, (key, err)


# 3 ranks only: their shards (uneven, one empty) hold every case 2 ranks' uneven ones do
@pytest.mark.parametrize("world", [3])
def test_the_model_zoo_equals_one_process_and_agrees_across_ranks(world, tmp_path):
    """The conftest zoo (MLPs of four activations, the CNN, the RNN; CE and MSE) sharded
    unevenly over 3 ranks (one empty): every quantity bit-identical across ranks and
    equal to one process to 1e-12 (products and the top-3 eigenvalues) and 1e-9 (Hutch++);
    the dense Hessian is also the independent torch.func reference's."""
    from conftest import LOSSES, MODELS, Reference, make_case

    results = _spawn(world, "zoo", tmp_path)
    errors = [r.get("tb", r) for r in results if "error" in r or "missing" in r]
    assert not errors, "\n".join(map(str, errors))
    for key in results[0]:
        for rank, got in enumerate(results):
            assert torch.equal(got[key], results[0][key]), (key, rank)
    for name in MODELS:
        for loss in LOSSES:
            case = make_case(name, loss)
            ref = _zoo_quantities(hesse.Problem(case.model, case.loss_fn, (case.X, case.y)))
            for k, want in ref.items():
                got = results[0][f"{case.name}/{k}"]
                err = float((got - want).abs().max()) / float(want.abs().max())
                # eigenvalues move by at most the products' error (Weyl); Hutch++'s QR of
                # its sketch can amplify it (1e-6 on the MLP of the first test)
                assert err <= (1e-9 if k == "trace" else 1e-12), (case.name, k, err)
            dense = Reference(case).hessian()
            err = float((results[0][f"{case.name}/hessian"] - dense).abs().max())
            assert err <= 1e-12 * float(dense.abs().max()), (case.name, err)


def test_bad_input_is_refused_on_every_rank(tmp_path):
    results = _spawn(2, "bad", tmp_path)
    for r in results:
        assert "error" not in r and "missing" not in r, r.get("tb", r)
        for what in ("differ", "structure", "dtype"):
            assert "rank(s) [1]" in r[what], (what, r[what])
        assert "pads 11 samples to 12" in r["padded"] and "drop_last=True" in r["padded"]
        assert r["dropped"] == 10 and r["local"] == 11 and r["ddp"]
        assert "needs samples=" in r["samples"]
        assert "rank(s) [1]" in r["optim_differ"]


def test_arguments_that_differ_between_ranks_are_refused_on_every_rank(tmp_path):
    results = _spawn(2, "differing", tmp_path)
    names = {
        "v": "'v'",
        "v0": "'v0'",
        "damping": "'damping'",
        "damping-engine": "'damping'",
        "solve-damping": "'damping'",
        "num_products": "'num_products'",
        "reduction": "'reduction'",
    }
    for r in results:
        assert "error" not in r and "missing" not in r, r.get("tb", r)
        for key, arg in names.items():
            assert f"the argument {arg} differs between the ranks: rank(s) [1]" in r[key], (
                key,
                r[key],
            )
    assert torch.equal(results[0]["agreed"], results[1]["agreed"])


@pytest.mark.parametrize("world", [3])  # as the zoo: uneven shards and an empty one
def test_optimiser_steps_equal_one_process_and_agree_across_ranks(world, tmp_path):
    """5 HF steps (Martens' preconditioner: the Fisher diagonal reduced too), 3
    ChainNewton steps, 2 exact trust-region Newton steps on the Hessian, 2 HF steps on a
    'sum' loss (no samples=) and 2 HF steps through a DDP-wrapped model (its closure
    under no_sync): each rank evaluates its
    shard, with uneven shards and an empty one; every rank takes the same
    step, and the trajectory is one process's."""
    results = _spawn(world, "optim", tmp_path)
    errors = [r.get("tb", r) for r in results if "error" in r or "missing" in r]
    assert not errors, "\n".join(map(str, errors))
    for key in results[0]:
        for rank, got in enumerate(results):
            assert torch.equal(got[key], results[0][key]), (key, rank)  # bit-identical
    for kind in TRAINED:
        model, X, y = _setup()
        ref = _train(kind, model, X, y, 0, 1)
        assert bool((ref["losses"].diff() < 0).all()), (kind, ref["losses"])  # it trains
        for k, want in ref.items():
            err = float((results[0][f"{kind}/{k}"] - want).abs().max()) / float(want.abs().max())
            assert err <= 1e-12, (kind, k, err)


def test_a_process_group_needs_torch_distributed():
    model, X, y = _setup()
    with pytest.raises(ValueError, match="not initialised"):
        hesse.Problem(model, nn.CrossEntropyLoss(), (X, y), process_group=object())


def test_collectives_go_to_the_device_the_backend_needs():
    """NCCL alone reduces CUDA tensors only: the small tensors hesse makes on the CPU
    (sample counts, flags, probes) are moved there; gloo and mixed backends take any."""
    from hesse._autodiff.distributed import backend_device

    assert backend_device("nccl") == torch.device("cuda")
    assert backend_device("gloo") is None and backend_device("cpu:gloo,cuda:nccl") is None


def test_a_dead_rank_fails_the_others_clearly(tmp_path):
    results = _spawn(2, "dead", tmp_path, timeout=90)
    assert "across 2 ranks failed on rank 0" in results[0]["error_message"]
