"""What the command line writes: the summary table, and JSON files (atomically, to a
folder checked before any work)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hesse._util.files import atomic_path

__all__ = ["check_output_file", "format_summary", "write_json_atomic"]


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve() or (
            Path(a).exists() and Path(b).exists() and os.path.samefile(a, b)
        )
    except OSError:
        return False


def check_output_file(path: str, flag: str, inputs: dict[str, str | None] | None = None) -> None:
    """Refuse, before any work, an output file that cannot be written: its folder must
    exist (no folders are created: a typo would make a tree) and be writable, the path
    must not be a folder, and it must not be one of the run's ``inputs`` (``{flag:
    path}``: writing the JSON over ``--data`` would destroy the user's data)."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    for other, given in (inputs or {}).items():
        if given and _same_file(path, given):
            raise SystemExit(
                f"hesse: {flag} {path!r} is the {other} file; writing it would replace "
                f"your input: choose another {flag} path"
            )
    if target.is_dir():
        raise SystemExit(f"hesse: {flag} {path!r} is a folder; expected a file path")
    if not parent.is_dir():
        raise SystemExit(
            f"hesse: {flag} {path!r}: the folder {str(parent)!r} does not exist "
            "(create it first; hesse creates no folders for an output file)"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SystemExit(f"hesse: {flag} {path!r}: the folder {str(parent)!r} is not writable")


def write_json_atomic(path: str, payload: dict[str, Any]) -> None:
    """Write JSON to a temporary file in the target folder, then rename it into place,
    so that no half-written file is ever left at ``path``."""
    target = Path(path)
    with atomic_path(target) as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def _format_dense(s: dict[str, Any]) -> list[str]:
    lines = [
        f"Hessian     trace {s['trace']:.6g}    eigenvalues in "
        f"[{s['eig_min']:.4g}, {s['eig_max']:.4g}]",
        f"            {s['num_negative']} negative, {s['num_zero']} zero "
        f"(|lambda| <= {s['zero_tol']:.1e}) of {s['num_params']}",
        f"split       trace H = trace GGN {s['ggn_trace']:.6g} + trace residual "
        f"{s['residual_trace']:.4g}",
        "",
        f"{'layer':<12}{'params':>8}{'|H| block':>13}{'|GGN|':>12}{'|residual|':>13}",
    ]
    for r in s["layers"]:
        lines.append(
            f"{r['layer']:<12}{r['params']:>8}{r['hessian_norm']:>13.4e}"
            f"{r['ggn_norm']:>12.4e}{r['residual_norm']:>13.4e}"
        )
    return lines


def _row(label: str, value: str) -> str:
    return f"  {label:<31}{value}"


_ENGINES = {
    "chain": "chain sweep, exact, linear in depth",
    "dense": "dense factorisation, exact",
    "gram": "observation-space factorisation, exact",
}


def _format_exact(c: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"{_ENGINES[c['method']]} (first {c['samples']} samples, "
        f"eps = {c['damping']:g}, float64; Gauss-Newton step: {c['ggn_method']}):",
        _row(f"Hessian eigenvalues < {c['negative_below']:.0e}", str(c["num_negative"])),
        _row(
            "log|det(H + eps I)|",
            f"{c['logdet']:.6g}   (sign {c['logdet_sign']:+.0f}; "
            f"inertia {c['inertia'][0]} negative, {c['inertia'][2]} positive)",
        ),
        _row("predicted loss change", _steps(c)),
        _row(
            "pivoting (stable sweep)",
            f"largest delayed front {c['pivoting']['max_delayed']}, "
            f"growth {c['pivoting']['growth']:.2g}",
        ),
    ]
    if "dense_check" in c:
        d = c["dense_check"]
        lines.append(
            _row(
                "dense check (same samples)",
                f"{d['num_negative']} below, log|det| {d['logdet']:.6g}",
            )
        )
    lap = c.get("laplace")
    if lap and "skipped" not in lap:
        lines.append(
            _row(
                "Laplace log evidence (GGN)",
                f"{lap['log_evidence_prior_1']:.6g} at prior precision 1; "
                f"{lap['log_evidence_best']:.6g} at its optimum {lap['best_prior_precision']:.4g}",
            )
        )
    elif lap:
        lines.append(_row("Laplace log evidence", f"skipped: {lap['skipped']}"))
    lines.append(f"  ({c['seconds']:.1f} s)")
    return lines


def format_summary(s: dict[str, Any]) -> str:
    """The analysis summary (`hesse._cli.analysis.Analysis.summary`) as a table."""
    lines = [
        f"model       {s['model']}",
        f"parameters  {s['num_params']}    samples {s['num_samples']}    dtype {s['dtype']}",
        f"loss        {s['loss']:.6g}    |grad| {s['grad_norm']:.3e}",
    ]
    if s["method"] == "dense":
        lines += _format_dense(s)
    else:
        lines.append(
            f"Hessian     eigenvalues in [{s['eig_min']:.4g}, {s['eig_max']:.4g}] (Lanczos; "
            f"P > --max-dense, so no trace or counts)"
        )
    lines.append(f"({s['seconds']:.1f} s)")
    if s.get("exact"):
        lines += ["", s["plan"], *_format_exact(s["exact"])]
    return "\n".join(lines)


def _steps(c: dict[str, Any]) -> str:
    """The damped Newton and Gauss-Newton steps' predicted loss change, or why a step does
    not exist (a singular ``C + eps I`` at ``--damping 0``)."""
    parts = []
    for key, name in (("hessian", "Newton"), ("ggn", "Gauss-Newton")):
        value = c[f"{key}_step_predicted_change"]
        if value is None:
            parts.append(f"{name}: none ({c[f'{key}_step_singular']}; raise --damping)")
        else:
            parts.append(f"{name} {value:.4e}")
    return ", ".join(parts)
