"""``hesse analyze`` and ``hesse train`` under ``torchrun --nproc_per_node=2`` (gloo on
loopback): the numbers are one process's, rank 0 alone prints and writes, and a rank that
cannot go on stops the others. (A file of its own so that pytest-xdist can run it beside
the library's distributed tests.)"""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist

from hesse._cli import main as _cli

pytestmark = [
    pytest.mark.skipif(
        not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed"
    ),
    pytest.mark.distributed,  # torchrun's ranks run one thread each (OMP_NUM_THREADS=1)
]


def _fresh_main(argv: list[str]) -> int:
    """``hesse`` in this process as a fresh one runs it: torch's default dtype (the other
    tests set float64) and the launches' one thread."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)
    try:
        return _cli.main(argv)
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hesse_analyze_under_torchrun_equals_one_process(tmp_path):
    """``torchrun --nproc_per_node=2 -m hesse analyze``: the data sharded by rank, rank 0
    prints and writes; the numbers are one process's."""
    import json
    import subprocess

    args = ["analyze", "--samples", "120", "--hidden", "4", "--train-steps", "10"]
    args += ["--no-progress", "--chain-samples", "30"]
    one = tmp_path / "one.json"
    two = tmp_path / "two.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert _fresh_main([*args, "--json", str(one)]) == 0  # one process: this one
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    launch += [f"--master_port={_free_port()}", "-m", "hesse"]
    out = subprocess.run([*launch, *args, "--json", str(two)], check=True, capture_output=True,
                         text=True, env=env, timeout=300)  # fmt: skip
    assert out.stdout.count("parameters  ") == 1  # one rank prints
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["ranks"] == 2 and "sharded over 2 ranks" in b["model"]
    for key in ("loss", "grad_norm", "trace", "eig_max", "eig_min"):
        assert abs(a[key] - b[key]) <= 1e-10 * abs(a[key]), key
    assert a["num_negative"] == b["num_negative"]
    assert a["exact"]["samples"] == b["exact"]["samples"] == 30
    assert a["exact"]["num_negative"] == b["exact"]["num_negative"]
    assert abs(a["exact"]["logdet"] - b["exact"]["logdet"]) <= 1e-8 * abs(a["exact"]["logdet"])


def test_hesse_train_and_resume_under_torchrun_equal_one_process(tmp_path):
    """``torchrun --nproc_per_node=2 -m hesse train``: each rank its shard of the data and
    of each curvature batch; rank 0 alone writes. Stopped after 2 steps and resumed to 4
    under torchrun, the losses are one uninterrupted process's (to rounding)."""
    import subprocess

    from hesse._cli.training import read_csv

    kinds = ["hf", "chain-newton", "adam"]
    args = ["train", "--optimizer", ",".join(kinds), "--curvature-batch", "33"]
    args += ["--checkpoint-every", "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(*extra: str) -> str:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
        head += [f"--master_port={_free_port()}", "-m", "hesse"]
        done = subprocess.run([*head, *args, *extra], capture_output=True, text=True, env=env,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    assert _fresh_main([*args, "--steps", "4", "--out", str(tmp_path / "one")]) == 0
    two = tmp_path / "two"
    launch("--steps", "2", "--out", str(two))
    out = launch("--steps", "4", "--out", str(two), "--resume")
    assert out.count("curves: ") == 1  # one rank prints
    assert sorted(p.name for p in two.iterdir()) == sorted(
        [f"{f}_{k}.{e}" for k in kinds for f, e in (("checkpoint", "pt"), ("losses", "csv"))]
        + [f"weights_{k}.pt" for k in kinds]
        + ["curves.png"]
    )
    for kind in kinds:
        want = read_csv(tmp_path / "one" / f"losses_{kind}.csv")
        got = read_csv(two / f"losses_{kind}.csv")
        assert [r["step"] for r in got] == [0, 1, 2, 3, 4]
        for a, b in zip(got, want, strict=True):
            assert abs(a["loss"] - b["loss"]) <= 1e-12 * abs(b["loss"]), (kind, a, b)


def test_hesse_train_under_torchrun_stops_every_rank_when_rank_0_cannot_write(tmp_path):
    """Rank 0 alone checks --out; the others learn its answer and stop too (no hang)."""
    import subprocess

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    launch += [f"--master_port={_free_port()}", "-m", "hesse", "train", "--steps", "1"]
    done = subprocess.run([*launch, "--out", str(blocker / "out"), "--no-progress"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.count("hesse train: cannot write to --out") == 2  # both ranks say so
    assert blocker.read_text() == "not a directory"
