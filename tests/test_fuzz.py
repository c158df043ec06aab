"""Bad and edge inputs across the API and the CLI, as a careless or unlucky user would
give them: each must finish (under a timeout), and either be refused with hesse's own
message naming what was expected (the regex) or give the right answer (checked against
a reference). None may hang, and none may return a wrong or NaN result without a word.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import hesse
from hesse._cli import main as _cli
from hesse.optim import truncated_cg, trust_region_subproblem

pytestmark = pytest.mark.timeout(120)


def _prob(n: int = 5, loss: str = "ce") -> hesse.Problem:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    if loss == "ce":
        return hesse.Problem(model, nn.CrossEntropyLoss(), (X, torch.randint(0, 3, (n,))))
    return hesse.Problem(model, nn.MSELoss(), (X, torch.randn(n, 3, dtype=torch.float64)))


P = _prob().num_params  # 31
V = torch.ones(P, dtype=torch.float64)


@dataclass
class Bad:
    """Calling ``fn`` must raise ``exc`` with a message matching ``match``."""

    name: str
    fn: Callable[[], Any]
    exc: type[BaseException] | tuple[type[BaseException], ...]
    match: str


def _nan_params() -> hesse.Problem:
    prob = _prob()
    with torch.no_grad():
        prob.model[0].weight[0, 0] = float("nan")
    return prob


def _mse_broadcast() -> hesse.Problem:
    model = nn.Linear(3, 1).double()
    X = torch.randn(6, 3, dtype=torch.float64)
    return hesse.Problem(model, nn.MSELoss(), (X, torch.randn(6, dtype=torch.float64)))


class _Tupled(nn.Module):
    def forward(self, x):
        return (x, x)


def _api_cases() -> list[Bad]:
    prob = _prob()
    cases: list[Bad] = []
    add = cases.append
    X = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    lin = nn.Linear(3, 3).double()
    ce = nn.CrossEntropyLoss()
    # --- Problem
    add(
        Bad(
            "problem-model-not-module",
            lambda: hesse.Problem(3, ce, (X, y)),
            TypeError,
            "model must be",
        )
    )
    add(
        Bad(
            "problem-loss-not-callable",
            lambda: hesse.Problem(lin, 3, (X, y)),
            TypeError,
            "loss_fn must be callable",
        )
    )
    add(Bad("problem-empty-data", lambda: hesse.Problem(lin, ce, []), ValueError, "data is empty"))
    add(
        Bad(
            "problem-nan-data",
            lambda: hesse.Problem(lin, ce, (X * math.nan, y)),
            ValueError,
            "NaN or inf",
        )
    )
    add(
        Bad(
            "problem-inf-data",
            lambda: hesse.Problem(lin, ce, (X * math.inf, y)),
            ValueError,
            "NaN or inf",
        )
    )
    add(Bad("problem-dtype", lambda: hesse.Problem(lin, ce, (X.float(), y)), TypeError, "dtype"))
    add(
        Bad(
            "problem-unknown-param",
            lambda: hesse.Problem(lin, ce, (X, y), params=["nope"]),
            ValueError,
            "nope",
        )
    )
    add(Bad("problem-batch-not-pair", lambda: hesse.Problem(lin, ce, [(X,)]), TypeError, "batch"))
    add(
        Bad(
            "problem-reduction",
            lambda: hesse.Problem(lin, ce, (X, y), reduction="max"),
            ValueError,
            "reduction",
        )
    )
    add(
        Bad(
            "problem-int-model",
            lambda: hesse.Problem(
                nn.Linear(3, 3).to(torch.int64) if False else _IntParam(), ce, (X, y)
            ),
            (TypeError, ValueError),
            "no parameters selected",
        )
    )
    add(
        Bad(
            "nonscalar-loss",
            lambda: hesse.gradient(
                hesse.Problem(lin, nn.CrossEntropyLoss(reduction="none"), (X, y))
            ),
            ValueError,
            "reduction",
        )
    )
    add(
        Bad(
            "mse-broadcast-(N,1)-vs-(N,)",
            lambda: hesse.gradient(_mse_broadcast()),
            ValueError,
            r"outputs have shape \(6, 1\) but the targets \(6,\)",
        )
    )
    add(
        Bad(
            "nan-params-after-build",
            lambda: hesse.gradient(_nan_params()),
            ValueError,
            "NaN or inf",
        )
    )
    add(Bad("nan-params-hvp", lambda: hesse.hvp(_nan_params(), V), ValueError, "NaN or inf"))
    add(
        Bad(
            "nan-params-chain",
            lambda: hesse.factorize(_nan_params(), 0.1),
            ValueError,
            "NaN or inf",
        )
    )
    # --- products
    for name, fn in [("hvp", hesse.hvp), ("ggn_vp", hesse.ggn_vp), ("fisher_vp", hesse.fisher_vp)]:
        add(
            Bad(
                f"{name}-wrong-length",
                lambda fn=fn: fn(prob, torch.ones(P + 1, dtype=torch.float64)),
                ValueError,
                rf"expected \({P},\)",
            )
        )
        add(
            Bad(
                f"{name}-3d",
                lambda fn=fn: fn(prob, torch.ones(P, 1, 1, dtype=torch.float64)),
                ValueError,
                "expected",
            )
        )
        add(
            Bad(
                f"{name}-int",
                lambda fn=fn: fn(prob, torch.ones(P, dtype=torch.int64)),
                TypeError,
                "floating-point",
            )
        )
        add(Bad(f"{name}-nan", lambda fn=fn: fn(prob, V * math.nan), ValueError, "non-finite"))
        add(Bad(f"{name}-inf", lambda fn=fn: fn(prob, V * math.inf), ValueError, "non-finite"))
        add(Bad(f"{name}-string", lambda fn=fn: fn(prob, "v"), TypeError, "must be a tensor"))
        add(
            Bad(
                f"{name}-list-count",
                lambda fn=fn: fn(prob, [torch.ones(3)]),
                ValueError,
                "expected",
            )
        )
    add(
        Bad(
            "hvp-method",
            lambda: hesse.hvp(prob, V, method="sideways"),
            ValueError,
            "method must be",
        )
    )
    add(Bad("fisher-kind", lambda: hesse.fisher_vp(prob, V, kind="fake"), ValueError, "kind"))
    add(
        Bad(
            "ggn-tuple-output",
            lambda: hesse.ggn_vp(
                hesse.Problem(nn.Sequential(lin, _Tupled()), lambda o, t: o[0].sum(), (X, y)),
                torch.ones(12, dtype=torch.float64),
            ),
            (TypeError, ValueError),
            "tensor",
        )
    )
    # --- operators
    op = hesse.HessianOperator(prob)
    add(
        Bad(
            "op-matmul-shape",
            lambda: op @ torch.ones(P + 2, dtype=torch.float64),
            ValueError,
            "expected",
        )
    )
    add(
        Bad(
            "op-block-unknown", lambda: op.block("0.weight", "nope"), (KeyError, ValueError), "nope"
        )
    )
    add(
        Bad(
            "op-max-memory-negative",
            lambda: op.to_dense(chunk_memory=-1),
            ValueError,
            "chunk_memory",
        )
    )
    # --- spectral
    for k in (0, P + 1, 1.5, -1):
        add(Bad(f"eigs-k={k}", lambda k=k: hesse.eigs(op, k), ValueError, "k must be"))
    add(Bad("eigs-which", lambda: hesse.eigs(op, 1, "middle"), ValueError, "which"))
    for tol in (0.0, -1.0, math.nan):
        add(
            Bad(
                f"eigs-tol={tol}",
                lambda tol=tol: hesse.eigs(op, 1, tol=tol),
                ValueError,
                "tol must be",
            )
        )
    for steps in (0, -3):
        add(
            Bad(
                f"eigs-max_steps={steps}",
                lambda s=steps: hesse.eigs(op, 1, max_steps=s),
                ValueError,
                "max_steps must be",
            )
        )
    add(
        Bad(
            "eigs-v0-zero",
            lambda: hesse.eigs(op, 1, v0=torch.zeros(P, dtype=torch.float64)),
            ValueError,
            "v0",
        )
    )
    add(
        Bad(
            "eigs-v0-shape",
            lambda: hesse.eigs(op, 1, v0=torch.ones(3, dtype=torch.float64)),
            ValueError,
            "v0",
        )
    )
    add(Bad("eigs-v0-nan", lambda: hesse.eigs(op, 1, v0=V * math.nan), ValueError, "v0"))
    for n in (0, -2, 1.5):
        add(
            Bad(
                f"trace-products={n}",
                lambda n=n: hesse.trace(op, num_products=n),
                ValueError,
                "num_products must be",
            )
        )
        add(
            Bad(
                f"density-probes={n}",
                lambda n=n: hesse.spectral_density(op, num_probes=n),
                ValueError,
                "num_probes must be",
            )
        )
    add(Bad("trace-method", lambda: hesse.trace(op, method="guess"), ValueError, "method"))
    add(Bad("diagonal-method", lambda: hesse.diagonal(op, method="guess"), ValueError, "method"))
    # --- chain
    for d in (math.nan, math.inf, -math.inf):
        add(
            Bad(
                f"factorize-damping={d}",
                lambda d=d: hesse.factorize(prob, d),
                ValueError,
                "damping must be a finite number",
            )
        )
    add(
        Bad(
            "factorize-curvature",
            lambda: hesse.factorize(prob, 0.1, "fisher-ish"),
            ValueError,
            "curvature",
        )
    )
    add(
        Bad(
            "factorize-rank-rtol",
            lambda: hesse.factorize(prob, 0.1, rank_rtol=2.0),
            ValueError,
            "rank_rtol",
        )
    )
    add(
        Bad(
            "factorize-not-sequential",
            lambda: hesse.factorize(hesse.Problem(_TwoLayer(), ce, (X, y)), 0.1, method="chain"),
            ValueError,
            "nn.Sequential",
        )
    )
    add(
        Bad(
            "logdet-not-sequential-names-the-other-engines",
            lambda: hesse.logdet(hesse.Problem(_TwoLayer(), ce, (X, y)), 0.1, method="chain"),
            ValueError,
            "dense and observation-space engines",
        )
    )
    f = hesse.factorize(prob, 0.1)
    add(Bad("solve-nan", lambda: f.solve(V * math.nan), ValueError, "non-finite"))
    add(
        Bad(
            "solve-shape",
            lambda: f.solve(torch.ones(5, dtype=torch.float64)),
            ValueError,
            "expected",
        )
    )
    add(Bad("solve-rtol-negative", lambda: f.solve(V, rtol=-1e-3), ValueError, "rtol must be"))
    add(Bad("solve-rtol-nan", lambda: f.solve(V, rtol=math.nan), ValueError, "rtol must be"))
    add(
        Bad(
            "solve-rtol-unreachable",
            lambda: f.solve(V, rtol=1e-40),
            hesse.InaccurateSolveError,
            "reached a relative residual",
        )
    )
    add(
        Bad("solve-max-refine", lambda: f.solve(V, max_refine=-2), ValueError, "max_refine must be")
    )
    add(
        Bad(
            "solve-singular",
            lambda: hesse.factorize(_prob(2, "mse"), 0.0, "ggn").solve(
                torch.ones(P, dtype=torch.float64)
            ),
            hesse.SingularPivotError,
            "near-null space of dimension",
        )
    )
    for b in (math.nan, "1", None):
        add(
            Bad(
                f"count-below={b}",
                lambda b=b: hesse.count_eigenvalues(prob, below=b),
                ValueError,
                "below must be a real number",
            )
        )
    for k in (0, P + 1, 1.5, True, "2", None):
        add(
            Bad(
                f"eigenvalue-k={k!r}",
                lambda k=k: hesse.eigenvalue(prob, k),
                ValueError,
                r"k must be in \[1, ",
            )
        )
    for tol in (0.0, -1e-3, math.nan, math.inf):
        add(
            Bad(
                f"eigenvalue-tol={tol}",
                lambda tol=tol: hesse.eigenvalue(prob, 1, tol=tol),
                ValueError,
                "tol must be a positive",
            )
        )
    add(
        Bad(
            "eigenvalue-bounds-reversed",
            lambda: hesse.eigenvalue(prob, 1, bounds=(1.0, -1.0)),
            ValueError,
            "bounds must be",
        )
    )
    add(
        Bad(
            "eigenvalue-bounds-miss",
            lambda: hesse.eigenvalue(prob, 1, bounds=(100.0, 200.0)),
            ValueError,
            "do not hold",
        )
    )
    add(
        Bad(
            "histogram-edges",
            lambda: hesse.eigenvalue_histogram(prob, [1.0, 0.0]),
            ValueError,
            "strictly increasing",
        )
    )
    add(
        Bad(
            "histogram-edges-nan",
            lambda: hesse.eigenvalue_histogram(prob, [0.0, math.nan]),
            ValueError,
            "edges must be a real number",
        )
    )
    add(
        Bad(
            "solve-method",
            lambda: hesse.solve(prob, V, 0.1, method="magic"),
            ValueError,
            "method must be",
        )
    )
    add(
        Bad(
            "newton-curvature",
            lambda: hesse.newton_step(prob, 0.1, "nope"),
            ValueError,
            "curvature",
        )
    )
    # --- optimisers and their parts
    model = nn.Sequential(nn.Linear(3, 3)).double()
    for d in (math.nan, math.inf, -1.0):
        add(
            Bad(
                f"hf-damping={d}",
                lambda d=d: hesse.optim.HessianFree(model, ce, damping=d),
                ValueError,
                "damping must be",
            )
        )
        add(
            Bad(
                f"newton-damping={d}",
                lambda d=d: hesse.optim.ChainNewton(model, ce, damping=d),
                ValueError,
                "damping must be",
            )
        )
    for name, make, match in (
        (
            "newton-saddle-free-0",
            lambda: hesse.optim.Newton(model, ce, saddle_free=0),
            "saddle_free must be an integer >= 1",
        ),
        (
            "newton-max-radius",
            lambda: hesse.optim.Newton(model, ce, trust_region=1.0, max_radius=-1),
            "max_radius must be a finite number > 0",
        ),
        (
            "newton-lr-inf",
            lambda: hesse.optim.Newton(model, ce, lr=math.inf),
            "lr must be a finite number > 0",
        ),
        (
            "newton-radius-nan",
            lambda: hesse.optim.Newton(model, ce, trust_region=math.nan),
            "trust_region must be",
        ),
        (
            "hf-warm-start-nan",
            lambda: hesse.optim.HessianFree(model, ce, warm_start_decay=math.nan),
            "warm_start_decay must be a finite number >= 0 and <= 1",
        ),
        (
            "hf-warm-start-2",
            lambda: hesse.optim.HessianFree(model, ce, warm_start_decay=2.0),
            "warm_start_decay",
        ),
        (
            "hf-cg-iter-0",
            lambda: hesse.optim.HessianFree(model, ce, cg_max_iter=0),
            "cg_max_iter must be an integer >= 1",
        ),
        (
            "hf-cg-tol-bool",
            lambda: hesse.optim.HessianFree(model, ce, cg_max_iter=True),
            "cg_max_iter must be an integer",
        ),
        (
            "newton-load-sgd-state",
            lambda: hesse.optim.Newton(model, ce).load_state_dict(
                torch.optim.SGD(model.parameters(), lr=0.1).state_dict()
            ),
            "not a Newton state_dict",
        ),
        (
            "newton-load-hf-state",
            lambda: hesse.optim.Newton(model, ce).load_state_dict(
                hesse.optim.HessianFree(model, ce).state_dict()
            ),
            r"lacks \['adapt_damping'|not a Newton state_dict",
        ),
    ):
        add(Bad(name, make, ValueError, match))
    add(
        Bad(
            "hf-lr-nan",
            lambda: hesse.optim.HessianFree(model, ce, lr=math.nan),
            ValueError,
            "lr must be",
        )
    )
    add(
        Bad(
            "hf-curvature",
            lambda: hesse.optim.HessianFree(model, ce, curvature="x"),
            ValueError,
            "curvature",
        )
    )
    add(Bad("hf-no-backward", _step_without_backward, RuntimeError, r"call loss.backward\(\)"))
    add(Bad("hf-no-batch", _hf_step_without_batch, ValueError, "curvature_batch"))
    add(
        Bad(
            "tr-radius-0",
            lambda: trust_region_subproblem(V, 0.0, None, None),
            ValueError,
            "radius must be positive",
        )
    )
    add(
        Bad(
            "tr-radius-nan",
            lambda: trust_region_subproblem(V, math.nan, None, None),
            ValueError,
            "radius must be positive",
        )
    )
    add(
        Bad(
            "cg-max-iter", lambda: truncated_cg(lambda v: v, V, max_iter=-1), ValueError, "max_iter"
        )
    )
    return cases


class _IntParam(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3, 3, dtype=torch.int64), requires_grad=False)

    def forward(self, x):
        return x @ self.w.double()


class _TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4).double(), nn.Linear(4, 3).double()

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _hf_step(backward: bool, with_batch: bool) -> None:
    """One HessianFree step with a closure that calls backward or forgets it, given a
    curvature batch or not."""
    model = nn.Sequential(nn.Linear(3, 3)).double()
    opt = hesse.optim.HessianFree(model, nn.CrossEntropyLoss())
    X, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 3, (4,))

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        if backward:
            loss.backward()
        return loss

    opt.step(closure, **({"curvature_batch": (X, y)} if with_batch else {}))


def _step_without_backward():
    _hf_step(backward=False, with_batch=True)


def _hf_step_without_batch():
    _hf_step(backward=True, with_batch=False)


API = _api_cases()


@pytest.mark.parametrize("case", API, ids=[c.name for c in API])
def test_api_refuses_bad_input_clearly(case: Bad):
    with pytest.raises(case.exc, match=case.match):
        case.fn()


# ----------------------------------------------------------------------------- CLI
SMALL = ["--samples", "60", "--hidden", "8", "--train-steps", "0", "--no-progress"]

CLI_NUMBERS = [
    ("analyze", "--samples", "-5"),
    ("analyze", "--samples", "abc"),
    ("analyze", "--hidden", "0"),
    ("analyze", "--hidden", "-3"),
    ("analyze", "--train-steps", "-1"),
    ("analyze", "--max-dense", "-1"),
    ("analyze", "--chain-samples", "-1"),
    ("analyze", "--damping", "nan"),
    ("analyze", "--damping", "inf"),
    ("analyze", "--damping", "x"),
    ("check", "--samples", "-1"),
    ("train", "--steps", "0"),
    ("train", "--steps", "-4"),
    ("train", "--lr", "nan"),
    ("train", "--lr", "-0.1"),
    ("train", "--lr", "0"),
    ("train", "--damping", "nan"),
    ("train", "--damping", "-1"),
    ("train", "--curvature-batch", "-1"),
    ("train", "--curvature-batch", "0"),
    ("train", "--checkpoint-every", "-1"),
    ("train", "--time-budget", "-2"),
    ("train", "--time-budget", "nan"),
]


@pytest.mark.parametrize(
    "cmd,flag,value", CLI_NUMBERS, ids=[f"{c}{f}={v}" for c, f, v in CLI_NUMBERS]
)
def test_cli_numbers_are_validated(cmd, flag, value, capsys, tmp_path):
    extra = ["--out", str(tmp_path / "o")] if cmd == "train" else SMALL
    with pytest.raises(SystemExit) as ex:
        _cli.main([cmd, *extra, flag, value])
    assert ex.value.code == 2  # argparse's usage error, before any work
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "expected" in err and repr(value) in err


def test_cli_takes_a_negative_shift_and_says_when_a_step_does_not_exist(capsys, tmp_path):
    """``--damping -1e6`` is a legal shift (argparse took ``-1e6`` for an option); at
    ``--damping 0`` a singular ``H`` has no Newton step: the analysis says so in its line
    and finishes (it was a traceback after the whole analysis)."""
    out = tmp_path / "a.json"
    assert _cli.main(["analyze", *SMALL, "--damping", "-1e6", "--json", str(out)]) == 0
    import json

    exact = json.loads(out.read_text())["exact"]
    # H - 1e6 I: every eigenvalue of this small model's H is below 1e6, so all negative
    assert exact["damping"] == -1e6
    assert exact["inertia"] == [sum(exact["inertia"]), 0, 0]
    capsys.readouterr()
    assert _cli.main(["analyze", *SMALL, "--damping", "0", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Newton: none (singular," in text and "raise --damping" in text
    exact = json.loads(out.read_text())["exact"]
    assert exact["hessian_step_predicted_change"] is None
    assert exact["hessian_step_singular"].startswith("singular, ")


def _cli_cases(tmp) -> list[tuple[str, list[str], str]]:
    afile = tmp / "afile.txt"
    afile.write_text("x")
    bad_npz = tmp / "bad.npz"
    bad_npz.write_text("not an npz")
    weights = tmp / "w.pt"
    torch.save({"nope": torch.ones(2)}, weights)
    factory = tmp / "m.py"
    factory.write_text("import torch\ndef make():\n    return torch.nn.Linear(64, 10)\n")
    readonly = tmp / "ro"
    readonly.mkdir()
    return [
        (
            "json-under-a-file",
            ["analyze", *SMALL, "--json", str(afile / "out.json")],
            "does not exist",
        ),
        (
            "json-missing-folder",
            ["analyze", *SMALL, "--json", str(tmp / "no" / "such" / "o.json")],
            "does not exist",
        ),
        ("json-is-a-folder", ["analyze", *SMALL, "--json", str(tmp)], "is a folder"),
        ("report-is-a-file", ["analyze", *SMALL, "--report", str(afile)], "not a directory"),
        ("data-missing", ["analyze", *SMALL, "--data", str(tmp / "none.npz")], "data"),
        ("data-not-npz", ["analyze", *SMALL, "--data", str(bad_npz)], "data"),
        ("weights-missing", ["analyze", *SMALL, "--weights", str(tmp / "none.pt")], "weights"),
        ("weights-wrong-model", ["analyze", *SMALL, "--weights", str(weights)], "weights"),
        (
            "model-missing-file",
            ["analyze", *SMALL, "--model", str(tmp / "none.py") + ":make"],
            "model",
        ),
        ("model-no-factory", ["analyze", *SMALL, "--model", str(factory) + ":nothere"], "nothere"),
        ("model-bad-spec", ["analyze", *SMALL, "--model", "justtext"], "FILE.py:FACTORY"),
        (
            "train-unknown-optimizer",
            ["train", "--optimizer", "lbfgs", "--out", str(tmp / "t")],
            "unknown optimizer",
        ),
    ]


def test_cli_bad_paths_and_files_fail_with_one_line(tmp_path, capsys):
    for name, argv, match in _cli_cases(tmp_path):
        with pytest.raises(SystemExit) as ex:
            _cli.main(argv)
        msg = str(ex.value.code) if not isinstance(ex.value.code, int) else capsys.readouterr().err
        assert match in msg and "Traceback" not in msg, (name, msg)
        assert msg.startswith("hesse") or "usage" in msg, (name, msg)
        assert "\n" not in msg.strip() or "usage" in msg, (name, msg)


def test_cli_model_line_counts_the_samples_used(capsys):
    assert _cli.main(["analyze", *SMALL, "--chain-samples", "0"]) == 0
    out = capsys.readouterr().out
    assert "first 60 of 1797 samples" in out and "(1797 samples)" not in out


def test_cli_float_targets_for_a_one_output_model(tmp_path, capsys):
    """The CLI reads float y of shape (N,) against a one-output model as (N, 1) targets,
    not an (N, N) broadcast: the loss equals the reference MSE."""
    import numpy as np

    g = np.random.default_rng(0)
    X, y = g.standard_normal((30, 4)), g.standard_normal(30)
    np.savez(tmp_path / "reg.npz", X=X, y=y)
    factory = tmp_path / "m.py"
    factory.write_text(
        "import torch\ndef make():\n    torch.manual_seed(0)\n    return torch.nn.Linear(4, 1)\n"
    )
    out = tmp_path / "s.json"
    argv = ["analyze", "--data", str(tmp_path / "reg.npz"), "--model", f"{factory}:make"]
    assert _cli.main([*argv, "--no-progress", "--chain-samples", "0", "--json", str(out)]) == 0
    import json

    loss = json.loads(out.read_text())["loss"]
    torch.manual_seed(0)
    ref = nn.functional.mse_loss(
        nn.Linear(4, 1).double()(torch.as_tensor(X)), torch.as_tensor(y)[:, None]
    )
    assert loss == pytest.approx(float(ref.detach()), rel=1e-12)


def test_train_resume_refuses_changed_settings_and_says_when_it_starts_fresh(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--optimizer", "sgd", "--steps", "3", "--checkpoint-every", "1"]
    base += ["--out", str(out), "--no-progress"]
    assert _cli.main([*base, "--resume"]) == 0
    assert "no checkpoint" in capsys.readouterr().err  # resume found nothing: it says so
    with pytest.raises(SystemExit, match=r"written with lr=None \(now 0.5\)"):
        _cli.main([*base, "--steps", "5", "--resume", "--lr", "0.5"])
    assert _cli.main([*base, "--steps", "5", "--resume"]) == 0
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers


def test_data_with_list_targets_names_the_targets():
    X = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="targets must be a tensor or None; got list"):
        hesse.Problem(nn.Linear(3, 3).double(), nn.CrossEntropyLoss(), (X, [0, 1, 2, 0]))


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_in_place_activations_in_the_chain(curvature):
    """ReLU(inplace=True) and ELU(inplace=True) work in the chain as they do in the
    products: the same log-determinant and solve as the dense matrix."""
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(3, 5),
        nn.ReLU(inplace=True),
        nn.Linear(5, 4),
        nn.ELU(inplace=True),
        nn.Linear(4, 3),
    ).double()
    X, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,))
    prob = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y))
    C = hesse.hessian(prob) if curvature == "hessian" else hesse.ggn(prob)
    Ce = C + 0.1 * torch.eye(len(C))
    f = hesse.factorize(prob, 0.1, curvature)
    sign, la = torch.linalg.slogdet(Ce)
    assert f.logdet()[0] == float(sign) and abs(f.logdet()[1] - float(la)) < 1e-9 * abs(float(la))
    v = torch.randn(len(C), generator=g, dtype=torch.float64)
    assert float((Ce @ f.solve(v) - v).norm() / v.norm()) < 1e-10


def test_files_get_the_usual_mode_and_no_temporaries_survive(tmp_path):
    import os

    from hesse._util.files import atomic_path

    umask = os.umask(0o022)
    try:
        target = tmp_path / "out.json"
        (tmp_path / ".out.json.abc123.tmp").write_text("left by a killed write")
        with atomic_path(target) as tmp:
            tmp.write_text("{}")
        assert target.read_text() == "{}"
        assert (target.stat().st_mode & 0o777) == 0o644  # not mkstemp's 0600
        assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
        with pytest.raises(RuntimeError), atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
        assert target.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    finally:
        os.umask(umask)


def test_report_without_matplotlib_refused_before_work(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    with pytest.raises(SystemExit, match="hesse analyze: --report draws figures with matplotlib"):
        _cli.main(["analyze", *SMALL, "--report", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_cli_chain_section_too_big_is_refused_before_the_analysis(monkeypatch, capsys):
    from hesse._util import memory as _memory

    monkeypatch.setattr(_memory, "available_memory", lambda device="cpu": 50 * 2**20)
    called = []
    from hesse._cli import analysis

    monkeypatch.setattr(analysis.Analysis, "summary", lambda *a, **k: called.append(1))
    with pytest.raises(SystemExit, match=r"hesse analyze: the exact section \(1797 samples\)"):
        _cli.main(["analyze", "--hidden", "8", "--train-steps", "0", "--chain-samples", "1797"])
    assert not called


def test_cli_train_out_not_writable(tmp_path):
    afile = tmp_path / "f"
    afile.write_text("x")
    with pytest.raises(SystemExit, match=r"hesse train: cannot write to --out"):
        _cli.main(["train", "--optimizer", "sgd", "--steps", "1", "--out", str(afile / "o")])


def test_hesse_calls_leave_batchnorm_statistics_alone():
    """A train-mode BatchNorm: products and spectra use the batch statistics, and the
    model's running statistics and counter are the same afterwards."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 3, (8,))
    with pytest.warns(UserWarning, match="BatchNorm"):
        prob = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    v = torch.ones(prob.num_params, dtype=torch.float64)
    hesse.hvp(prob, v)
    hesse.ggn_vp(prob, v)
    hesse.eigs(hesse.HessianOperator(prob), 2, max_steps=prob.num_params)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_mode_warnings_look_at_each_module():
    inner = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).double().eval()
    wrapper = nn.Sequential(inner).double()
    wrapper.training = True  # the wrapper alone in training mode: no active Dropout
    X, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 3, (4,))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hesse.Problem(wrapper, nn.CrossEntropyLoss(), (X, y))


def test_lanczos_basis_grows_with_the_steps_taken(monkeypatch):
    """The default max_steps allows 310 steps; a fast-converging run needs a few dozen,
    and its basis stays that small (checked against a budget far below 310 vectors)."""
    from hesse._util import memory as _memory

    prob = _prob(n=9)
    op = hesse.HessianOperator(prob)
    P = prob.num_params
    ref = torch.linalg.eigvalsh(hesse.hessian(prob))
    monkeypatch.setattr(_memory, "available_memory", lambda device="cpu": 64 * P * 8 / 0.8)
    r = hesse.eigs(op, 1, tol=1e-8)  # converges within P = 31 steps: fits
    assert abs(float(r.eigenvalues[0]) - float(ref[-1])) <= 1e-7 * float(ref.abs().max())
    monkeypatch.setattr(_memory, "available_memory", lambda device="cpu": 20 * P * 8 / 0.8)
    with pytest.raises(hesse.MemoryBudgetError, match="Lanczos basis of 32 vectors"):
        hesse.eigs(op, 1, tol=1e-8)


def test_integer_inputs_empty_parameters_and_scalar_outputs_get_clear_answers():
    """Issue 21 section 4: an integer-input model (nn.Embedding first) is refused by the
    chain by name (it was torch.finfo's TypeError) and taken by the dense engine; an empty
    parameter tensor changes nothing (it was _foreach_norm's RuntimeError); a 0-dim output
    makes the plan say the observation-space engine does not apply (an IndexError)."""
    torch.manual_seed(0)
    y = torch.randint(0, 2, (6,))
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2)).double()
    prob = hesse.Problem(emb, nn.CrossEntropyLoss(), (torch.randint(0, 10, (6, 2)), y))
    with pytest.raises(ValueError, match=r"floating-point input.*torch.int64.*method='dense'"):
        hesse.factorize(prob, 0.1, method="chain")
    assert not hesse.plan(prob).costs["chain"].applies
    H = hesse.hessian(prob)
    ref = torch.linalg.slogdet(H + 0.1 * torch.eye(len(H), dtype=H.dtype))[1]
    assert abs(hesse.factorize(prob, 0.1).logdet()[1] - float(ref)) <= 1e-10 * abs(float(ref))

    X = torch.randn(6, 3, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    plain = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y))
    want = hesse.factorize(plain, 0.1, "ggn", method="dense").logdet()[1]
    model.register_parameter("empty", nn.Parameter(torch.empty(0, dtype=torch.float64)))
    with_empty = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y))
    assert with_empty.num_params == plain.num_params
    for method in ("dense", "gram"):
        got = hesse.factorize(with_empty, 0.1, "ggn", method=method).logdet()[1]
        assert abs(got - want) <= 1e-10 * abs(want), method

    class Scalar(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1).double()

        def forward(self, x):
            return self.lin(x).sum()

    scalar = hesse.Problem(Scalar(), nn.MSELoss(), (X, torch.tensor(1.0, dtype=torch.float64)))
    p = hesse.plan(scalar, "ggn")
    assert not p.costs["gram"].applies and "batch dimension" in p.costs["gram"].reason
    assert p.choice == "dense"


def test_bool_inputs_an_identity_subclass_and_a_spent_generator():
    """Issue 21 section 4: bool inputs to a model that cannot take them fail with the
    inputs named (it was torch's bare "mat1 and mat2" error); an ``nn.Identity`` subclass
    with its own forward is a generic stage, exact on every engine; a generator of
    batches handed to `SpectrumTracker` is read once and kept (its second record said
    "data is empty")."""
    torch.manual_seed(0)
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    linear = nn.Sequential(nn.Linear(3, 3)).double()
    bad = hesse.Problem(linear, nn.CrossEntropyLoss(), (X > 0, y))
    with pytest.raises(
        RuntimeError, match=r"the model's forward failed on inputs of torch.bool \(6, 3\)"
    ):
        hesse.factorize(bad, 0.1)

    class Twice(nn.Identity):  # an Identity by type, not by what it computes
        def forward(self, x):
            return 2 * x + x**2

    model = nn.Sequential(nn.Linear(3, 4), Twice(), nn.Linear(4, 3)).double()
    prob = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y))
    for curvature, methods in (
        ("hessian", ("dense", "chain")),
        ("ggn", ("dense", "gram", "chain")),
    ):
        C = hesse.hessian(prob) if curvature == "hessian" else hesse.ggn(prob)
        ref = float(torch.linalg.slogdet(C + 0.5 * torch.eye(len(C), dtype=C.dtype))[1])
        for method in methods:
            got = hesse.factorize(prob, 0.5, curvature, method=method).logdet()[1]
            assert abs(got - ref) <= 1e-10 * abs(ref), (curvature, method)

    batches = [(X[i : i + 2], y[i : i + 2]) for i in range(0, 6, 2)]
    from_list = hesse.SpectrumTracker(model, nn.CrossEntropyLoss(), batches, every=1)
    from_gen = hesse.SpectrumTracker(model, nn.CrossEntropyLoss(), iter(batches), every=1)
    for _ in range(2):
        a, b = from_list.step(), from_gen.step()
        assert b is not None and b["top_eigenvalue"] == pytest.approx(a["top_eigenvalue"], rel=1e-6)
