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
    torch.save(ck, ck_path)
    with pytest.raises(SystemExit, match="does not fit this model"):
        _run(tmp_path, "hf", 4, resume=True)
