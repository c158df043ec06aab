"""The hesse command line, on small settings so that it runs in seconds."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from hesse._cli import main as _cli

# the first pass only (scripts/test.sh): the command line's parsing, files and output; its numbers
# are the library's, run under both thread counts by the library's tests
pytestmark = pytest.mark.once

SMALL = ["--samples", "150", "--hidden", "5", "--train-steps", "25", "--no-progress"]


def _reference_summary(args: list[str]) -> dict:
    """Rebuild the CLI's setup and compute the summary with torch.func / eigvalsh."""
    ns = _cli.argparse.Namespace(
        model=None,
        data=None,
        weights=None,
        loss="auto",
        samples=150,
        hidden=5,
        train_steps=25,
        seed=0,
        dtype="float64",
    )
    for i, a in enumerate(args):
        if a == "--seed":
            ns.seed = int(args[i + 1])
    setup = _cli.build_setup(ns)
    names = [n for n, _ in setup.model.named_parameters()]
    shapes = [p.shape for p in setup.model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in setup.model.parameters()])

    def L(flat):
        ps, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            ps[n] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        return setup.loss_fn(functional_call(setup.model, ps, (setup.X,)), setup.y)

    H = hessian(L)(theta)
    ev = torch.linalg.eigvalsh(H)
    return {
        "loss": float(L(theta)),
        "trace": float(H.trace()),
        "eig_max": float(ev[-1]),
        "eig_min": float(ev[0]),
        "num_params": len(theta),
    }


def test_analyze_default_matches_reference(tmp_path, capsys):
    out = tmp_path / "sub" / "summary.json"
    out.parent.mkdir()  # hesse creates no folders for an output file (a typo would)
    assert _cli.main(["analyze", *SMALL, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "parameters" in printed and "negative" in printed and "layer" in printed
    s = json.loads(out.read_text())
    ref = _reference_summary(SMALL)
    assert s["num_params"] == ref["num_params"] == 64 * 5 + 5 + 5 * 10 + 10
    for k in ("loss", "trace", "eig_max", "eig_min"):
        assert s[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12)
    assert s["trace"] == pytest.approx(s["ggn_trace"] + s["residual_trace"], rel=1e-10)
    assert [r["layer"] for r in s["layers"]] == ["0", "2"]
    assert s["layers"][1]["residual_norm"] < 1e-12  # the output layer is linear in its weights
    assert list(out.parent.iterdir()) == [out]  # no temporary files left behind


def test_analyze_lanczos_path(tmp_path):
    out = tmp_path / "s.json"
    assert _cli.main(["analyze", *SMALL, "--max-dense", "10", "--json", str(out)]) == 0
    s = json.loads(out.read_text())
    ref = _reference_summary(SMALL)
    assert s["method"] == "lanczos"
    assert s["eig_max"] == pytest.approx(ref["eig_max"], rel=1e-6)
    assert s["eig_min"] == pytest.approx(ref["eig_min"], rel=1e-4, abs=1e-8)


FACTORY = """
import torch
from torch import nn

def make():
    return nn.Sequential(nn.Linear(4, 6), nn.Softplus(), nn.Linear(6, 2))
"""


def test_user_model_data_and_weights(tmp_path, capsys):
    (tmp_path / "m.py").write_text(FACTORY)
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((30, 4)), rng.standard_normal((30, 2))
    np.savez(tmp_path / "d.npz", X=X, y=y)
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 6), nn.Softplus(), nn.Linear(6, 2))
    torch.save(net.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "s.json"
    args = [
        "analyze",
        "--model",
        f"{tmp_path / 'm.py'}:make",
        "--data",
        str(tmp_path / "d.npz"),
        "--weights",
        str(tmp_path / "w.pt"),
        "--json",
        str(out),
        "--no-progress",
    ]
    assert _cli.main(args) == 0
    s = json.loads(out.read_text())
    with torch.no_grad():
        expected = nn.MSELoss()(net.double()(torch.tensor(X)), torch.tensor(y))
    assert s["loss"] == pytest.approx(float(expected), rel=1e-12)
    assert s["num_params"] == 4 * 6 + 6 + 6 * 2 + 2 and s["num_samples"] == 30
    assert "MSELoss" in s["model"]


BATCHNORM_FACTORY = """
from torch import nn

def make():
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))
"""


def test_a_train_mode_batchnorm_model_is_analysed_in_eval_mode(tmp_path):
    """A factory returns its model in train mode: the one-sample probe must not refuse
    BatchNorm, and no probe may move the running statistics of the loaded weights."""
    (tmp_path / "m.py").write_text(BATCHNORM_FACTORY)
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((40, 4)), rng.standard_normal((40, 2))
    np.savez(tmp_path / "d.npz", X=X, y=y)
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).double()
    net(torch.randn(64, 4, dtype=torch.float64) * 3 + 2)  # train mode: running stats move
    torch.save(net.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "s.json"
    args = ["analyze", "--model", f"{tmp_path / 'm.py'}:make", "--data", str(tmp_path / "d.npz")]
    args += ["--weights", str(tmp_path / "w.pt"), "--json", str(out), "--no-progress"]
    assert _cli.main(args) == 0
    net.eval()
    with torch.no_grad():
        expected = nn.MSELoss()(net(torch.tensor(X)), torch.tensor(y))
    assert json.loads(out.read_text())["loss"] == pytest.approx(float(expected), rel=1e-12)
    ns = _cli.argparse.Namespace(model=f"{tmp_path / 'm.py'}:make", data=str(tmp_path / "d.npz"))
    ns.__dict__.update(weights=str(tmp_path / "w.pt"), loss="auto", samples=0, hidden=5)
    ns.__dict__.update(train_steps=0, seed=0, dtype="float64")
    setup = _cli.build_setup(ns)
    assert not setup.model.training
    bn = setup.model[1]
    assert torch.equal(bn.running_mean, net[1].running_mean)
    assert torch.equal(bn.running_var, net[1].running_var)


def test_check_command(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert _cli.main(["check", *SMALL, "--json", str(out)]) == 0
    assert "all passed" in capsys.readouterr().out
    rep = json.loads(out.read_text())
    # P = 385 <= 600: the dense Hessian is checked too by default
    assert rep["passed"] and {r["quantity"] for r in rep["rows"]} == {"gradient", "hvp", "hessian"}


def test_bad_cli_input(tmp_path):
    with pytest.raises(SystemExit, match="FILE.py:FACTORY"):
        _cli.main(["analyze", "--model", "nocolon.py", *SMALL])
    with pytest.raises(SystemExit, match="no such file"):
        _cli.main(["analyze", "--model", "missing.py:make", *SMALL])
    np.savez(tmp_path / "bad.npz", a=np.zeros(3))
    with pytest.raises(SystemExit, match="must hold arrays 'X' and 'y'"):
        _cli.main(["analyze", "--data", str(tmp_path / "bad.npz"), *SMALL])
    (tmp_path / "m.py").write_text("def make():\n    return 3\n")
    with pytest.raises(SystemExit, match="not an nn.Module"):
        _cli.main(["analyze", "--model", f"{tmp_path / 'm.py'}:make", *SMALL])


def test_json_target_that_is_a_directory_leaves_nothing(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    with pytest.raises(OSError):
        _cli.write_json_atomic(str(target), {"a": 1})
    assert list(tmp_path.iterdir()) == [target] and list(target.iterdir()) == []


def test_console_script_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "hesse._cli", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0 and r.stdout.startswith("hesse ")


def test_analyze_chain_section_matches_dense(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert (
        _cli.main(
            [
                "analyze",
                *SMALL,
                "--chain-samples",
                "40",
                "--damping",
                "0.01",
                "--method",
                "chain",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert "chain sweep" in capsys.readouterr().out
    c = json.loads(out.read_text())["exact"]
    d = c["dense_check"]  # the dense eigendecomposition of the same 40-sample problem
    assert c["samples"] == 40 and c["num_negative"] == d["num_negative"] > 0
    assert c["logdet"] == pytest.approx(d["logdet"], rel=1e-9)
    assert c["inertia"] == d["inertia"]
    assert c["ggn_step_predicted_change"] < 0  # damped Gauss-Newton: a descent direction


def test_analyze_exact_section_for_a_non_sequential_model(tmp_path, capsys):
    """Not a chain: the exact section takes the engine the plan picks, and its counts
    and log-determinant match the dense eigendecomposition."""
    (tmp_path / "m.py").write_text(
        "from torch import nn\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.l = nn.Linear(64, 10)\n"
        "    def forward(self, x):\n"
        "        return self.l(x)\n"
        "def make():\n"
        "    return M()\n"
    )
    out = tmp_path / "s.json"
    model = f"{tmp_path / 'm.py'}:make"
    args = ["analyze", "--model", model, "--samples", "50", "--no-progress", "--json", str(out)]
    assert _cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "<- auto" in printed and "does not apply: the chain solver needs" in printed
    c = json.loads(out.read_text())["exact"]
    assert c["method"] in ("dense", "gram")
    assert c["num_negative"] == c["dense_check"]["num_negative"]
    assert c["logdet"] == pytest.approx(c["dense_check"]["logdet"], rel=1e-9)


def test_chain_section_is_float64_for_a_float32_model(tmp_path):
    out = tmp_path / "s.json"
    args = ["analyze", *SMALL, "--dtype", "float32", "--chain-samples", "30", "--json", str(out)]
    assert _cli.main(args) == 0
    s = json.loads(out.read_text())
    assert s["dtype"] == "float32"
    c = s["exact"]
    assert c["num_negative"] == c["dense_check"]["num_negative"]
    assert c["logdet"] == pytest.approx(c["dense_check"]["logdet"], rel=1e-9)


def test_influence_command_equals_the_library(tmp_path, capsys):
    import argparse

    import hesse
    from hesse._cli.inputs import DEFAULT_HIDDEN, build_setup
    from hesse._cli.main import main

    out = tmp_path / "inf.json"
    argv = ["influence", "--samples", "80", "--test", "0,3", "--top-k", "2"]
    rc = main([*argv, "--train-steps", "50", "--json", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "test #0 (label 0)" in text and "most helpful" in text and "most harmful" in text
    got = json.loads(out.read_text())
    assert got["test"] == [0, 3] and len(got["train"]) == 78
    scores = torch.tensor(got["scores"])
    assert scores.shape == (2, 78)
    # the same scores from the library on the same trained model
    args = argparse.Namespace(
        model=None,
        data=None,
        weights=None,
        loss="auto",
        samples=80,
        hidden=DEFAULT_HIDDEN,
        train_steps=50,
        seed=0,
        dtype="float64",
    )
    setup = build_setup(args)
    train = got["train"]
    prob = hesse.Problem(setup.model, setup.loss_fn, (setup.X[train], setup.y[train]))
    ref = hesse.influence(prob, (setup.X[[0, 3]], setup.y[[0, 3]]), damping=1e-3).scores
    assert torch.allclose(scores, ref, rtol=1e-9, atol=1e-15)
    for j, row in enumerate(got["top"]):
        assert row["helpful"][0] == train[int(scores[j].argmax())]
        assert row["harmful"][0] == train[int(scores[j].argmin())]
    with pytest.raises(SystemExit, match="outside the 80 samples"):
        main(["influence", "--samples", "80", "--test", "99", "--train-steps", "1"])


def test_threads_option_sets_torchs_threads_and_refuses_zero(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        assert (
            _cli.main(["check", *SMALL, "--threads", "1", "--json", str(tmp_path / "c.json")]) == 0
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        _cli.main(["check", *SMALL, "--threads", "0"])
    assert "positive integer" in capsys.readouterr().err
