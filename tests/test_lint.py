"""The code base stays ruff clean (lint rules in pyproject.toml)."""

import shutil
import subprocess
from pathlib import Path

import pytest

# the first pass only (scripts/test.sh): the source's lint: no arithmetic
pytestmark = pytest.mark.once

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    shutil.which("ruff") is None, reason="ruff not installed (pip install -e .[test])"
)
def test_ruff_clean():
    r = subprocess.run(
        ["ruff", "check", "src", "tests", "bench", "examples"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_test_command_exits_with_the_status_of_its_two_passes():
    """scripts/test.sh exits 0 when both passes pass and non-zero when either fails.

    Its exit trap once failed under `set -e` (`kill` of an ended pass 2), so a green suite
    exited 1: CI read a failure with every test passed.
    """

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "scripts/test.sh", "tests/test_seeds.py", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )

    ok = run("-k", "seed004")
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert "---- pass 2 (2 threads) ----" in ok.stdout
    # a selection with no test is a failing pass (pytest's exit status 5) in both passes
    empty = run("-k", "no_test_has_this_name")
    assert empty.returncode != 0
