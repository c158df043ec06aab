"""The analysis report and spectrum tracking during training."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import jsonschema
import pytest
import torch
from torch import nn

import hesse
from hesse._cli import main as _cli

# the first pass only (scripts/test.sh): the report's files and figures; its numbers are the
# library's, run under both thread counts by the library's tests
pytestmark = pytest.mark.once

SMALL = [
    "--samples",
    "120",
    "--hidden",
    "5",
    "--train-steps",
    "20",
    "--no-progress",
    "--chain-samples",
    "30",
]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


def _check_report(folder: Path) -> dict:
    rep = json.loads((folder / "report.json").read_text())
    jsonschema.validate(rep, hesse.REPORT_SCHEMA)
    files = [f["file"] for f in rep["figures"]]
    assert sorted(p.name for p in folder.iterdir()) == sorted([*files, "report.json"])
    for fig in rep["figures"]:
        w, h = _png_size(folder / fig["file"])
        assert 400 <= w <= 2000 and 250 <= h <= 1200, (fig["file"], w, h)
        # every figure says what it shows: a title, both axes, one sentence of caption
        assert all(fig[k].strip() for k in ("title", "x_label", "y_label")), fig
        assert fig["caption"].endswith(".") and "\n" not in fig["caption"], fig
    return rep


def test_report_dense(tmp_path, capsys):
    out = tmp_path / "rep"
    js = ["--json", str(tmp_path / "s.json")]
    assert _cli.main(["analyze", *SMALL, *js, "--report", str(out)]) == 0
    assert "report:" in capsys.readouterr().out
    rep = _check_report(out)
    assert [f["file"] for f in rep["figures"]] == [
        "density.png",
        "top_eigenvalues.png",
        "blocks.png",
        "hessian.png",
        "landscape.png",
    ]
    # the blocks are between parameter tensors, by their named_parameters() names; the
    # residual is exactly zero on the output layer (the output is linear in it), and the
    # Hessian's blocks there equal the GGN's
    b = rep["blocks"]
    assert b["tensors"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert b["sizes"] == [64 * 5, 5, 5 * 10, 10]
    z = b["exact_zero"]["residual"]
    assert z[2][2] and z[2][3] and z[3][3] and not z[0][0]
    assert not any(v for row in b["exact_zero"]["hessian"] for v in row[:2])
    assert "2.weight x 2.weight" in rep["figures"][2]["caption"]
    # the density is exact (no products) and integrates to 1; the symmetric-log counts
    # account for every eigenvalue, with the summary's zero tolerance
    d = rep["density"]
    assert d["method"] == "exact" and d["num_probes"] == 0
    top = torch.tensor(rep["top_eigenvalues"]["values"])
    dense = torch.tensor(rep["top_eigenvalues"]["dense"])
    assert torch.allclose(top, dense, rtol=1e-6, atol=1e-10)
    assert rep["trace"]["method"] == "exact" and rep["histogram"]["source"] == "dense"
    assert sum(rep["histogram"]["counts"]) == rep["num_params"]
    sl = rep["histogram"]["symlog"]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert (sl["num_negative"], sl["num_zero"]) == (summary["num_negative"], summary["num_zero"])
    assert sl["num_negative"] + sl["num_zero"] + sl["num_positive"] == rep["num_params"]
    assert sum(sl["negative"]["counts"]) == sl["num_negative"] > 0
    assert sum(sl["positive"]["counts"]) == sl["num_positive"]
    assert sl["linthresh"] == pytest.approx(summary["zero_tol"], rel=1e-12)
    img = rep["hessian_image"]
    assert len(img["cells"]) == min(160, rep["num_params"]) and img["boundaries"][0] == 0
    assert float(
        torch.trapezoid(torch.tensor(d["density"]), torch.tensor(d["grid"]))
    ) == pytest.approx(1.0, abs=1e-3)
    # the landscape's quadratic model touches the loss at a = 0
    mid = len(rep["landscape"]["alphas"]) // 2
    assert rep["landscape"]["losses"][mid] == pytest.approx(rep["loss"], rel=1e-12)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep", "s.json"]  # no temporaries


def test_report_large_model_path(tmp_path):
    """Beyond --max-dense: Hutch++ trace and a chain-sweep histogram, no block figure."""
    out = tmp_path / "rep"
    args = ["analyze", *SMALL, "--max-dense", "50", "--method", "chain", "--report", str(out)]
    assert _cli.main(args) == 0
    rep = _check_report(out)
    assert rep["trace"]["method"] == "hutch++" and rep["trace"]["std_error"] > 0
    assert rep["blocks"] is None and rep["hessian_image"] is None
    assert {f["file"] for f in rep["figures"]} == {
        "density.png",
        "top_eigenvalues.png",
        "landscape.png",
    }
    assert rep["density"]["method"] == "slq" and rep["histogram"]["symlog"] is None
    assert rep["histogram"]["source"] == "chain"
    assert sum(rep["histogram"]["counts"]) == rep["num_params"]


def test_report_directory_rules(tmp_path):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="exists and is not empty; pass --overwrite"):
        _cli.main(["analyze", *SMALL, "--report", str(out)])
    assert (out / "old.txt").read_text() == "keep me"
    # --overwrite replaces only an earlier hesse report: a user's files are never deleted
    with pytest.raises(SystemExit, match=r"holds files that are not a hesse report \(old.txt\)"):
        _cli.main(["analyze", *SMALL, "--report", str(out), "--overwrite"])
    assert (out / "old.txt").read_text() == "keep me"
    fresh = tmp_path / "fresh"
    assert _cli.main(["analyze", *SMALL, "--report", str(fresh)]) == 0
    first = _check_report(fresh)
    assert _cli.main(["analyze", *SMALL, "--report", str(fresh), "--overwrite"]) == 0
    assert _check_report(fresh)["figures"] == first["figures"]
    (fresh / "thesis.tex").write_text("my thesis")  # a user's file added to a report
    with pytest.raises(SystemExit, match=r"not a hesse report \(thesis.tex\)"):
        _cli.main(["analyze", *SMALL, "--report", str(fresh), "--overwrite"])
    assert (fresh / "thesis.tex").read_text() == "my thesis"
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(SystemExit, match="exists and is not a directory"):
        _cli.main(["analyze", *SMALL, "--report", str(afile)])
    with pytest.raises(SystemExit, match="cannot write the report"):
        _cli.main(["analyze", *SMALL, "--report", str(afile / "sub")])
    # a symbolic link to a folder elsewhere (another file system, in practice): the
    # report goes into that folder, the link stays, no temporaries beside either
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "real").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(elsewhere / "real", target_is_directory=True)
    assert _cli.main(["analyze", *SMALL, "--report", str(link)]) == 0
    assert link.is_symlink() and _check_report(elsewhere / "real")["figures"] == first["figures"]
    assert [p.name for p in elsewhere.iterdir()] == ["real"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "elsewhere",
        "file.txt",
        "fresh",
        "link",
        "rep",
    ]


def test_report_read_only_directory(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere; /proc refuses even root
        target = "/proc/hesse-report"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "rep")
    with pytest.raises(SystemExit, match="cannot write the report"):
        _cli.main(["analyze", *SMALL, "--report", target])


def test_spectrum_tracker(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    lf = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = hesse.SpectrumTracker(model, lf, (X, y), every=4, trace_products=30)
    recs = []
    for _ in range(9):
        opt.zero_grad()
        lf(model(X), y).backward()
        opt.step()
        recs.append(tracker.step())
    assert [h["step"] for h in tracker.history] == [0, 4, 8]
    assert [r is not None for r in recs] == [
        True,
        False,
        False,
        False,
        True,
        False,
        False,
        False,
        True,
    ]
    H = hesse.hessian(hesse.Problem(model, lf, (X, y)))  # the model as at the last record
    ev = torch.linalg.eigvalsh(H)
    last = tracker.history[-1]
    assert last["top_eigenvalue"] == pytest.approx(float(ev[-1]), rel=1e-5)
    assert abs(last["trace"] - float(ev.sum())) <= 4 * last["trace_se"]
    path = tracker.plot(tmp_path / "history.png")
    w, h = _png_size(path)
    assert w > 600 and h > 250
    with pytest.raises(ValueError, match="every must be >= 1"):
        hesse.SpectrumTracker(model, lf, (X, y), every=0)
    with pytest.raises(ValueError, match="nothing recorded yet"):
        hesse.SpectrumTracker(model, lf, (X, y)).plot(tmp_path / "x.png")
