"""The examples run (they double as documentation)."""

import runpy
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_default_dtype():
    """Run the examples as a user would: with PyTorch's own default dtype (float32), not
    the float64 default that the other tests set."""
    torch.set_default_dtype(torch.float32)
    yield


pytestmark = pytest.mark.once  # the first pass only (scripts/test.sh)

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path, capsys):
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    assert "False" not in out and "FAILED" not in out, out
