"""Atomic writes: the target is replaced whole or not at all."""

import pytest

from hesse._util.files import atomic_path

# the first pass only (scripts/test.sh): atomic writes: no arithmetic
pytestmark = pytest.mark.once


def test_atomic_path_success_and_failure(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half-writ")
        raise RuntimeError("boom")
    assert target.read_text() == "first"  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temporary file left


# ----------------------------------------------------------------------------- users' files
SMALL = ["--samples", "60", "--hidden", "4", "--train-steps", "5", "--no-progress"]


def test_json_over_an_input_file_is_refused_and_the_input_kept(tmp_path):
    import numpy as np

    from hesse._cli import main as _cli

    data = tmp_path / "d.npz"
    np.savez(data, X=np.random.default_rng(0).standard_normal((20, 64)), y=np.arange(20) % 10)
    before = data.read_bytes()
    for argv in (
        ["analyze", "--data", str(data), "--json", str(data), "--chain-samples", "0"],
        ["check", "--data", str(data), "--json", str(tmp_path / "." / "d.npz")],
    ):
        with pytest.raises(SystemExit, match=r"--json .* is the --data file"):
            _cli.main([*argv, *SMALL])
        assert data.read_bytes() == before


def test_train_keeps_an_earlier_run_unless_told(tmp_path, capsys):
    """Without --resume or --overwrite a second ``hesse train`` into the same --out is
    refused, every file kept; --overwrite replaces that run."""
    from hesse._cli import main as _cli

    out = tmp_path / "run"
    argv = ["train", "--optimizer", "adam", "--steps", "2", "--checkpoint-every", "1"]
    argv += ["--out", str(out), "--no-progress"]
    assert _cli.main(argv) == 0
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(files) == {"checkpoint_adam.pt", "losses_adam.csv", "weights_adam.pt", "curves.png"}
    with pytest.raises(SystemExit, match=r"already holds checkpoint_adam.pt.*--overwrite"):
        _cli.main(argv)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    mine = tmp_path / "mine"  # a user's folder with a figure of their own
    mine.mkdir()
    (mine / "curves.png").write_bytes(b"my figure")
    with pytest.raises(SystemExit, match="already holds curves.png"):
        _cli.main([*argv[:-3], "--out", str(mine), "--no-progress"])
    assert (mine / "curves.png").read_bytes() == b"my figure"
    odd = tmp_path / "odd"  # a folder named like a run's checkpoint is never replaced
    (odd / "checkpoint_adam.pt").mkdir(parents=True)
    for extra in (["--overwrite"], ["--resume"]):
        with pytest.raises(SystemExit, match="checkpoint_adam.pt, which is not a file hesse"):
            _cli.main([*argv[:-3], "--out", str(odd), "--no-progress", *extra])
    assert (odd / "checkpoint_adam.pt").is_dir() and [p.name for p in odd.iterdir()] == [
        "checkpoint_adam.pt"
    ]
    assert _cli.main([*argv, "--overwrite", "--steps", "3"]) == 0
    from hesse._cli.training import read_csv

    assert [r["step"] for r in read_csv(out / "losses_adam.csv")] == [0, 1, 2, 3]


def test_overwrite_trusts_only_the_files_hesse_writes(tmp_path):
    """A crafted or edited report.json listing a user's file does not make --overwrite
    delete it: only hesse's own figure names count as the report's."""
    import json

    from hesse._cli import main as _cli

    rep = tmp_path / "rep"
    rep.mkdir()
    (rep / "thesis.tex").write_text("my thesis")
    (rep / "report.json").write_text(json.dumps({"version": 2, "figures": ["thesis.tex"]}))
    with pytest.raises(SystemExit, match=r"not a hesse report \(thesis.tex\)"):
        _cli.main(["analyze", *SMALL, "--chain-samples", "0", "--report", str(rep), "--overwrite"])
    assert (rep / "thesis.tex").read_text() == "my thesis"
    (rep / "report.json").write_text(json.dumps({"figures": ["density.png"]}))  # no version
    (rep / "thesis.tex").unlink()
    (rep / "density.png").write_bytes(b"x")
    with pytest.raises(SystemExit, match="not a hesse report"):
        _cli.main(["analyze", *SMALL, "--chain-samples", "0", "--report", str(rep), "--overwrite"])
    assert (rep / "density.png").read_bytes() == b"x"


def test_sigterm_during_a_report_leaves_nothing_half_written(tmp_path):
    """SIGTERM while the report is being drawn: the process stops with one line and
    removes its temporary folder; the target does not exist."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = (
        "import os, signal, sys\n"
        "import hesse._report.figures as F\n"
        "orig = F._top_figure\n"
        "def slow(*a):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"  # the signal arrives mid-report
        "    return orig(*a)\n"
        "F._top_figure = slow\n"
        "from hesse._cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    rep = tmp_path / "rep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t = time.time()
    argv = ["analyze", *SMALL, "--chain-samples", "0", "--report", str(rep)]
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert done.returncode != 0 and time.time() - t < 300
    assert "stopped by signal 15" in done.stderr, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no .rep.tmp.* left
    assert signal.getsignal(signal.SIGTERM) is not None


def test_report_into_the_current_folder_and_a_full_disk_get_one_line(tmp_path, monkeypatch):
    import errno

    from hesse._cli import main as _cli
    from hesse._cli import output

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    for target in (".", str(tmp_path), str(tmp_path.parent)):
        with pytest.raises(SystemExit, match="is the current folder or holds it"):
            _cli.main(["analyze", *SMALL, "--chain-samples", "0", "--report", target])
    assert (tmp_path / "notes.txt").read_text() == "mine"

    def full(path, payload):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(output, "write_json_atomic", full)
    monkeypatch.setattr(_cli, "write_json_atomic", full)
    with pytest.raises(SystemExit) as ex:
        _cli.main(["analyze", *SMALL, "--chain-samples", "0", "--json", "s.json"])
    msg = str(ex.value.code)
    assert msg.startswith("hesse: analyze: could not write") and "No space left" in msg
    assert "s.json" in msg and "\n" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def _full_disk(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_disk_that_fills_mid_write_keeps_the_earlier_files_and_leaves_no_temporary(
    tmp_path, monkeypatch
):
    """ENOSPC where a real full disk raises it, after bytes were written: at the flush of
    a file (``--json``, a checkpoint), and amid a report's figures. Each run ends in one
    ``hesse: ...`` line; the earlier file or report is as it was; no temporary remains."""
    import os

    from hesse._cli import main as _cli
    from hesse._report import files as report_files

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.json").write_text("earlier")
    rep = tmp_path / "rep"
    assert _cli.main(["analyze", *SMALL, "--chain-samples", "0", "--report", str(rep)]) == 0
    before = {p.name: p.read_bytes() for p in rep.iterdir()}

    def one_line(argv, command):
        with pytest.raises(SystemExit) as ex:
            _cli.main(argv)
        msg = str(ex.value.code)
        assert msg.startswith(f"hesse: {command}: could not write"), msg
        assert "No space left on device" in msg and "\n" not in msg

    with monkeypatch.context() as m:  # the flush of --json's temporary file
        m.setattr(os, "fsync", _full_disk)
        one_line(["analyze", *SMALL, "--chain-samples", "0", "--json", "s.json"], "analyze")
    assert (tmp_path / "s.json").read_text() == "earlier"

    draw = report_files.draw_figures

    def draw_then_fill(report, folder):
        draw(report, folder)  # the figures are on disk in the temporary folder
        _full_disk()

    with monkeypatch.context() as m:  # amid the report, over an earlier one
        m.setattr(report_files, "draw_figures", draw_then_fill)
        argv = ["analyze", *SMALL, "--chain-samples", "0", "--report", str(rep), "--overwrite"]
        one_line(argv, "analyze")
    assert {p.name: p.read_bytes() for p in rep.iterdir()} == before

    with monkeypatch.context() as m:  # hesse train's first checkpoint
        m.setattr(os, "fsync", _full_disk)
        argv = ["train", "--optimizer", "adam", "--steps", "2", "--checkpoint-every", "1"]
        one_line([*argv, "--out", "run", "--no-progress"], "train")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep", "run", "s.json"]
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]
