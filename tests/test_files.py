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
