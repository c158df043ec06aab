"""The package's layers: every import, deferred ones inside functions included, goes to
a strictly lower layer, module by module and private package by private package, so no
import cycle can come back, between modules or between packages. Imports are absolute
(a relative one is an error here, not skipped). A new module must be given a layer here
(and in the README's layout section); a new private package a rank in PACKAGES."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

# the first pass only (scripts/test.sh): the import layers: no arithmetic
pytestmark = pytest.mark.once

SRC = Path(__file__).resolve().parents[1] / "src" / "hesse"

LAYERS: dict[str, int] = {
    # 0: leaves (no hesse imports); the private packages' __init__ files import nothing
    "hesse._util": 0,
    "hesse._util.progress": 0,
    "hesse._util.files": 0,
    "hesse._util.memory": 0,
    "hesse._util.checks": 0,
    "hesse._util.calls": 0,
    "hesse._autodiff": 0,
    "hesse._operators": 0,
    "hesse._spectral": 0,
    "hesse._factor": 0,
    "hesse._chain": 0,
    "hesse._linalg": 0,
    "hesse._apps": 0,
    "hesse._report": 0,
    "hesse._cli": 0,
    "hesse._autodiff.losses": 0,
    "hesse._autodiff.kernels": 0,
    "hesse._autodiff.distributed": 0,
    "hesse._autodiff.layers": 0,
    "hesse._factor.results": 0,
    "hesse._report.schema": 0,
    "hesse._cli.data": 0,
    # 1-3: the problem, its products, Bishop, checks; the chain's stages
    "hesse._autodiff.problem": 1,
    "hesse._autodiff.rop": 1,
    "hesse._factor.elimination": 1,
    "hesse._autodiff.products": 2,
    "hesse._autodiff.bishop": 2,
    "hesse._autodiff.check": 3,
    "hesse._chain.stages": 2,
    "hesse._chain.generic": 3,
    "hesse._chain.linear": 3,
    # 2-4: operators and the functional API; spectra
    "hesse._operators.base": 2,
    "hesse._operators.curvature": 3,
    "hesse._operators.functions": 4,
    "hesse._spectral.lanczos": 4,
    "hesse._spectral.stochastic": 5,
    "hesse._spectral.tracker": 7,
    # 3-8: exact factorisations: the shared base and the registry's entry type, the three
    # engines, the registry and the choice among them, and what is built on it (solves,
    # counts, certified eigenvalues)
    "hesse._factor.base": 3,
    "hesse._factor.cost": 4,
    "hesse._chain.chain": 4,
    "hesse._chain.factorization": 5,
    "hesse._linalg.dense": 5,
    "hesse._linalg.gram": 5,
    "hesse._chain.engine": 6,
    "hesse._linalg.factorize": 7,
    "hesse._linalg.eigen": 8,
    "hesse._linalg.solve": 8,
    # 9: the applications (per-sample gradients, the Laplace approximation, influence)
    "hesse._apps.per_sample": 2,
    "hesse._apps.laplace": 9,
    "hesse._apps.influence": 9,
    # 9-11: optimisers
    "hesse.optim._parts": 9,
    "hesse.optim._base": 9,
    "hesse.optim._hessian_free": 10,
    "hesse.optim._newton": 10,
    "hesse.optim": 11,
    # 12-17: the outer ring (files, figures, printing) and the public package
    "hesse._report.figures": 1,
    "hesse._report.files": 2,
    "hesse._report.compute": 12,
    "hesse._cli.output": 1,
    "hesse._cli.training": 12,
    "hesse": 13,
    "hesse._cli.inputs": 11,
    "hesse._cli.analysis": 15,
    "hesse._cli.train": 15,
    "hesse._cli.influence": 15,
    "hesse._cli.main": 16,
    "hesse._cli.__main__": 17,
    "hesse.__main__": 17,
}


PACKAGES: dict[str, int] = {
    # the private packages (and the public one): an import from one package to another
    # goes to a strictly lower rank. _factor (results, the engine contract, the stable
    # elimination) sits below both _chain and _linalg, which is what breaks their cycle.
    "hesse._util": 0,
    "hesse._autodiff": 1,
    "hesse._operators": 2,
    "hesse._spectral": 3,
    "hesse._factor": 3,
    "hesse._chain": 4,
    "hesse._report": 4,
    "hesse._linalg": 5,
    "hesse._apps": 6,
    "hesse.optim": 6,
    "hesse": 7,
    "hesse._cli": 8,
    "hesse.__main__": 9,
}


def _package(module: str) -> str:
    """The package a module belongs to for PACKAGES: ``hesse._x.y`` -> ``hesse._x``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _targets(node: ast.AST) -> list[str]:
    """The hesse modules an import statement names (``"<relative>"`` for a relative
    import, which this test refuses rather than skips)."""
    if isinstance(node, ast.ImportFrom) and node.level > 0:
        return ["<relative>"]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "hesse"]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        if node.module.split(".")[0] != "hesse":
            return []
        out = []
        for a in node.names:
            sub = f"{node.module}.{a.name}"
            is_module = (SRC.parent / Path(*sub.split("."))).with_suffix(".py").exists() or (
                SRC.parent / Path(*sub.split("."))
            ).is_dir()
            out.append(sub if is_module else node.module)
        return out
    return []


def _imports() -> list[tuple[str, str]]:
    """Every (importing module, imported hesse module) pair of the package's source."""
    pairs = []
    for path in sorted(SRC.rglob("*.py")):
        src = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            pairs += [(src, target) for target in _targets(node)]
    return pairs


def _against(pairs: list[tuple[str, str]], ranks: dict[str, int], key) -> list[str]:
    """The pairs whose imported side is not strictly lower than the importer under
    ``ranks`` (of ``key(module)``); an unranked side is reported too."""
    bad = []
    for src, target in pairs:
        a, b = key(src), key(target)
        if a == b and key is _package:
            continue  # inside one package the module layers rule
        if a not in ranks or b not in ranks:
            bad.append(f"{src} -> {target}: no rank for {a if a not in ranks else b}")
        elif ranks[b] >= ranks[a]:
            bad.append(f"{src} ({a}, {ranks[a]}) imports {target} ({b}, {ranks[b]})")
    return bad


def test_every_import_goes_down_the_layers():
    pairs = _imports()
    relative = sorted({src for src, target in pairs if target == "<relative>"})
    assert not relative, f"relative imports (write them absolute): {relative}"
    unknown = {_module_name(p) for p in SRC.rglob("*.py")} - set(LAYERS)
    assert not unknown, f"modules without a layer: {sorted(unknown)}"
    bad = _against(pairs, LAYERS, lambda m: m)
    assert not bad, "imports against the module layers:\n" + "\n".join(bad)


def test_no_import_cycle_between_packages():
    bad = _against(_imports(), PACKAGES, _package)
    assert not bad, "imports against the package ranks:\n" + "\n".join(bad)


def test_the_layering_test_catches_a_package_cycle_and_a_relative_import():
    # _chain importing _linalg (the cycle this package split removed) is refused, though
    # each module on its own could be given a consistent module layer
    pairs = [("hesse._chain.factorization", "hesse._linalg.base")]
    assert _against(pairs, PACKAGES, _package)
    assert not _against([("hesse._linalg.dense", "hesse._factor.elimination")], PACKAGES, _package)
    assert _against([("hesse._linalg.x", "hesse._newpkg.y")], PACKAGES, _package)  # unranked
    node = ast.parse("def f():\n    from .results import Inertia\n")
    assert _targets(node.body[0].body[0]) == ["<relative>"]


def test_the_layering_test_catches_a_deferred_upward_import(tmp_path):
    node = ast.parse("def f():\n    from hesse._spectral.stochastic import diagonal\n")
    assert _targets(node.body[0].body[0]) == ["hesse._spectral.stochastic"]
    assert LAYERS["hesse._spectral.stochastic"] > LAYERS["hesse._autodiff.products"]


def test_the_readme_layout_names_every_module():
    """The README's layout tree lists every module of the package, and nothing else."""
    readme = (SRC.parents[1] / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed, folder = set(), ""
    for line in block.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("src/hesse/"):
            continue
        indent = len(line) - len(line.lstrip())
        for word in stripped.split():
            if word.endswith("/") and indent == 2:
                folder = word
            elif word.endswith(".py"):
                listed.add((folder if indent > 2 else "") + word)
    actual = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if p.name != "__init__.py"}
    actual |= {"__init__.py"}
    assert listed == actual, (sorted(actual - listed), sorted(listed - actual))
