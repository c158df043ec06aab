"""hesse train: checkpoints, resume, curves, bad checkpoints."""

from __future__ import annotations

import struct

import pytest
import torch

from hesse._cli import main as _cli
from hesse._cli import training as _train

# the first pass only (scripts/test.sh): checkpoints, resume and curves; the steps' arithmetic is
# the optimisers', run under both thread counts by tests/test_optim.py
pytestmark = pytest.mark.once

FAST = ["--no-progress", "--curvature-batch", "16"]


def _run(out, opt, steps, every=2, resume=False, example="classifier"):
    args = [
        "train",
        "--example",
        example,
        "--optimizer",
        opt,
        "--steps",
        str(steps),
        "--checkpoint-every",
        str(every),
        "--out",
        str(out),
        *FAST,
    ]
    return _cli.main([*args, "--resume"] if resume else args)


@pytest.mark.parametrize("opt", ["hf", "chain-newton", "adam"])
def test_resume_equals_uninterrupted(tmp_path, opt, capsys):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert _run(full, opt, 6) == 0
    # a run killed after step 3: its last checkpoint is the one of step 2
    assert _run(killed, opt, 3) == 0
    ck = torch.load(killed / f"checkpoint_{opt}.pt", weights_only=True)
    assert ck["step"] == 2
    assert _run(killed, opt, 6, resume=True) == 0
    a = _train.read_csv(full / f"losses_{opt}.csv")
    b = _train.read_csv(killed / f"losses_{opt}.csv")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit for bit
    assert a[-1]["loss"] < a[0]["loss"]


def test_curves_and_csv(tmp_path, capsys):
    assert (
        _cli.main(
            [
                "train",
                "--example",
                "autoencoder",
                "--optimizer",
                "adam,sgd,hf",
                "--steps",
                "3",
                "--out",
                str(tmp_path),
                *FAST,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "curves:" in out and "adam" in out and "hf" in out
    data = (tmp_path / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24])[0] > 800
    rows = _train.read_csv(tmp_path / "losses_hf.csv")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(r["seconds"] >= 0 for r in rows)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_bad_checkpoints_and_options(tmp_path):
    assert _run(tmp_path, "adam", 2) == 0
    ck = tmp_path / "checkpoint_adam.pt"
    good = ck.read_bytes()
    ck.write_bytes(good[: len(good) // 3])  # truncated: corrupt
    with pytest.raises(SystemExit, match="corrupt or not a hesse checkpoint"):
        _run(tmp_path, "adam", 4, resume=True)
    assert ck.read_bytes() == good[: len(good) // 3]  # nothing overwritten
    ck.write_bytes(good)
    with pytest.raises(
        SystemExit, match="from example 'classifier' with optimizer 'adam', not 'autoencoder'"
    ):
        _run(tmp_path, "adam", 4, resume=True, example="autoencoder")
    torch.save({"hello": 1}, ck)
    with pytest.raises(SystemExit, match="not a hesse training checkpoint"):
        _run(tmp_path, "adam", 4, resume=True)
    with pytest.raises(SystemExit, match="unknown optimizer"):
        _run(tmp_path, "lbfgs", 2)


def test_checkpoint_for_another_model_shape(tmp_path):
    assert _run(tmp_path, "hf", 2) == 0
    ck_path = tmp_path / "checkpoint_hf.pt"
    ck = torch.load(ck_path, weights_only=True)
    ck["model"]["0.weight"] = torch.zeros(3, 3, dtype=torch.float64)
    ck["checksum"] = _train.weights_checksum(ck["model"])  # a consistent, foreign file
    torch.save(ck, ck_path)
    with pytest.raises(SystemExit, match="does not fit this model"):
        _run(tmp_path, "hf", 4, resume=True)


def test_damaged_checkpoints_are_refused_not_resumed(tmp_path):
    """A flipped bit in a stored weight, NaN weights, a checkpoint without its settings
    or with another format version: each refused with what is wrong, nothing written."""
    assert _run(tmp_path, "adam", 2) == 0
    ck_path = tmp_path / "checkpoint_adam.pt"
    good = torch.load(ck_path, weights_only=True)

    def damaged(edit, match):
        ck = {**good, "model": {k: v.clone() for k, v in good["model"].items()}}
        edit(ck)
        torch.save(ck, ck_path)
        before = (tmp_path / "losses_adam.csv").read_bytes()
        with pytest.raises(SystemExit, match=match):
            _run(tmp_path, "adam", 4, resume=True)
        assert (tmp_path / "losses_adam.csv").read_bytes() == before

    def flip(ck):
        w = ck["model"]["0.weight"]
        w.view(torch.int64)[0, 0] ^= 1 << 40  # one bit of one weight

    def nan(ck):
        ck["model"]["2.bias"][0] = float("nan")
        ck["checksum"] = _train.weights_checksum(ck["model"])

    damaged(flip, "do not match their checksum")
    damaged(nan, r"non-finite weights in \['2.bias'\]")
    damaged(lambda ck: ck.pop("settings"), r"lacks \['settings'\]")
    damaged(lambda ck: ck.update(version=7), "format version 7")
    damaged(lambda ck: ck.update(version=1), "format version 1")
    torch.save(good, ck_path)  # the intact checkpoint resumes
    assert _run(tmp_path, "adam", 4, resume=True) == 0


# ----------------------------------------------------------------------------- a user's model
USER_MODELS = """
from torch import nn

def mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))

def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)
    )

class Two(nn.Module):  # not an nn.Sequential: no chain
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.b(self.a(x).tanh())

def two():
    return Two()

def bn():
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1))
"""


def _user_files(tmp_path):
    import numpy as np

    (tmp_path / "models.py").write_text(USER_MODELS)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 5))
    np.savez(tmp_path / "reg.npz", X=X, y=np.sin(X @ rng.standard_normal(5)))  # y: (N,)
    np.savez(tmp_path / "img.npz", X=rng.standard_normal((30, 1, 8, 8)), y=rng.integers(0, 3, 30))
    return tmp_path / "models.py"


def _train_user(out, spec, data, opt, steps, *extra):
    args = ["train", "--model", spec, "--data", str(data), "--optimizer", opt]
    args += ["--steps", str(steps), "--checkpoint-every", "2", "--out", str(out), *FAST, *extra]
    return _cli.main(args)


def _analyzed_loss(tmp_path, spec, data, weights) -> float:
    import json

    js = tmp_path / f"{weights.stem}.json"
    args = ["analyze", "--model", spec, "--data", str(data), "--weights", str(weights)]
    args += ["--json", str(js), "--no-progress", "--chain-samples", "0"]
    assert _cli.main(args) == 0
    return json.loads(js.read_text())["loss"]


def test_train_a_users_mlp_with_mse_resume_and_analyze_its_weights(tmp_path, capsys):
    """``hesse train --model FILE.py:FACTORY --data FILE.npz``: MSE on float targets, HF
    and ChainNewton; stopped after 2 steps and resumed to 4, the losses are the
    uninterrupted run's bit for bit; the written weights load in ``hesse analyze
    --weights``, whose loss is the run's last."""
    spec = f"{_user_files(tmp_path)}:mlp"
    data = tmp_path / "reg.npz"
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _train_user(full, spec, data, "hf,chain-newton", 4) == 0
    assert "weights_*.pt" in capsys.readouterr().out
    assert _train_user(cut, spec, data, "hf,chain-newton", 2) == 0
    assert _train_user(cut, spec, data, "hf,chain-newton", 4, "--resume") == 0
    for kind in ("hf", "chain-newton"):
        a = _train.read_csv(full / f"losses_{kind}.csv")
        b = _train.read_csv(cut / f"losses_{kind}.csv")
        assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 5
        assert a[-1]["loss"] < a[0]["loss"], kind
        loss = _analyzed_loss(tmp_path, spec, data, full / f"weights_{kind}.pt")
        assert loss == pytest.approx(a[-1]["loss"], rel=1e-12), kind
    assert "MSELoss" in capsys.readouterr().out
    # a resume with other data is refused, nothing written
    import numpy as np

    other = tmp_path / "other.npz"
    np.savez(other, X=np.ones((40, 5)), y=np.ones(40))
    before = (cut / "losses_hf.csv").read_bytes()
    with pytest.raises(SystemExit, match=r"written with data="):
        _train_user(cut, spec, other, "hf", 6, "--resume")
    assert (cut / "losses_hf.csv").read_bytes() == before


def test_train_a_users_cnn_with_cross_entropy(tmp_path, capsys):
    spec = f"{_user_files(tmp_path)}:cnn"
    data = tmp_path / "img.npz"
    out = tmp_path / "out"
    assert _train_user(out, spec, data, "hf,adam", 3) == 0
    assert sorted(p.name for p in out.glob("weights_*.pt")) == ["weights_adam.pt", "weights_hf.pt"]
    rows = _train.read_csv(out / "losses_hf.csv")
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert _analyzed_loss(tmp_path, spec, data, out / "weights_hf.pt") == pytest.approx(
        rows[-1]["loss"], rel=1e-12
    )
    assert "CrossEntropyLoss" in capsys.readouterr().out


def test_train_refuses_bad_user_inputs_before_any_work(tmp_path):
    models = _user_files(tmp_path)
    out = tmp_path / "out"
    reg, img = tmp_path / "reg.npz", tmp_path / "img.npz"
    cases = [
        (["--example", "classifier", "--model", f"{models}:mlp"], "not both"),
        (["--data", str(reg)], "go with --model"),
        (
            ["--model", f"{models}:two", "--data", str(reg), "--optimizer", "chain-newton"],
            "ChainNewton needs an nn.Sequential",
        ),
        (["--model", f"{models}:mlp", "--data", str(img)], "does not accept the data's inputs"),
        (["--model", f"{models}:mlp", "--data", str(reg), "--loss", "ce"], "integer class labels"),
        (  # MSELoss would broadcast (N, 3) outputs against (N, 1) labels, with a warning
            ["--model", f"{models}:cnn", "--data", str(img), "--loss", "mse"],
            r"MSELoss needs targets shaped like the model's outputs.*\(3,\).*\(1,\).*--loss ce",
        ),
        (["--model", f"{models}:nothing", "--data", str(reg)], "no callable 'nothing'"),
        (  # the chain's refusal of a train-mode BatchNorm, before hf trains for seconds
            ["--model", f"{models}:bn", "--data", str(reg)],
            r"chain-newton cannot train this model \(stage '1': BatchNorm.*--optimizer hf",
        ),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message):
            _cli.main(["train", "--steps", "1", "--out", str(out), *FAST, *extra])
        assert not out.exists()  # refused before --out was made


def test_train_a_batchnorm_model_without_the_chain(tmp_path):
    """A train-mode BatchNorm model passes the one-sample probe (run in eval mode) and
    trains with the optimisers that take it."""
    models = _user_files(tmp_path)
    assert _train_user(tmp_path / "out", f"{models}:bn", tmp_path / "reg.npz", "adam", 2) == 0
    assert (tmp_path / "out" / "weights_adam.pt").is_file()


def test_an_out_that_cannot_be_written_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    """What needs no folder made (a file in the way, an earlier run's files) is checked
    before the model, the data and torch's optimisers load (seconds a refusal need not
    wait); nothing of the user's changes."""
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    monkeypatch.setattr(_train.Source, "build", lambda *a, **k: pytest.fail("built first"))
    with pytest.raises(SystemExit, match=r"cannot write to --out .*Not a directory"):
        _cli.main(["train", "--steps", "1", "--out", str(blocker / "out"), "--no-progress"])
    earlier = tmp_path / "run"
    earlier.mkdir()
    (earlier / "losses_hf.csv").write_text("mine")
    with pytest.raises(SystemExit, match="already holds losses_hf.csv"):
        _cli.main(["train", "--optimizer", "hf", "--steps", "1", "--out", str(earlier)])
    assert blocker.read_text() == (earlier / "losses_hf.csv").read_text() == "mine"
