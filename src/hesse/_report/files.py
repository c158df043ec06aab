"""Writing a report directory: checked before any heavy work, written to a temporary
directory beside the target and renamed into place, so that no half-written report is
ever left behind and nothing but an earlier hesse report is ever replaced."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hesse._report.figures import draw_figures

__all__ = ["prepare_report_dir", "write_report"]


def prepare_report_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Check, before any heavy work, that ``path`` can receive a report: it is absent
    or an empty directory (or ``overwrite``), and its parent folder is writable."""
    target = Path(path)
    here = Path.cwd().resolve()
    if target.resolve() == here or target.resolve() in here.parents:
        raise ValueError(
            f"report directory {str(target)!r} is the current folder or holds it; the report "
            "replaces its directory as a whole: name a new sub-folder, e.g. --report report"
        )
    if target.exists():
        if not target.is_dir():
            raise ValueError(f"report path {str(target)!r} exists and is not a directory")
        if any(target.iterdir()):
            if not overwrite:
                raise ValueError(
                    f"report directory {str(target)!r} exists and is not empty; pass "
                    "--overwrite (overwrite=True) to replace an earlier hesse report there"
                )
            foreign = _not_a_report(target)
            if foreign:
                raise ValueError(
                    f"report directory {str(target)!r} holds files that are not a hesse "
                    f"report ({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}): "
                    "--overwrite replaces only an earlier report; choose another directory"
                )
    parent = target.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.check.")
        os.rmdir(probe)
    except OSError as err:
        raise ValueError(
            f"cannot write the report to {str(target)!r}: {err.strerror or err}"
        ) from None
    if target.exists() and not os.access(target, os.W_OK | os.X_OK):
        raise ValueError(f"report directory {str(target)!r} is not writable")
    return target


FIGURE_FILES = frozenset(
    {"density.png", "top_eigenvalues.png", "blocks.png", "hessian.png", "landscape.png"}
)
"""Every file name a hesse report has held (versions 1 and 2): ``--overwrite`` replaces
only these and ``report.json``, whatever an earlier ``report.json`` lists."""


def _not_a_report(folder: Path) -> list[str]:
    """The entries of ``folder`` that an earlier hesse report does not account for (all
    of them when it has no readable hesse ``report.json``). Its list of figures is
    trusted only as far as hesse writes such files: a name outside `FIGURE_FILES` (a
    crafted or edited ``report.json``) is the user's, and so is every sub-folder."""
    names = sorted(p.name for p in folder.iterdir())
    try:
        with open(folder / "report.json") as f:
            earlier = json.load(f)
        if not isinstance(earlier, dict) or earlier.get("version") not in (1, 2):
            raise ValueError("not a hesse report")
        # version 1 listed file names, version 2 a dict a figure
        figures = {f["file"] if isinstance(f, dict) else f for f in earlier["figures"]}
    except (OSError, ValueError, KeyError, TypeError):
        return names
    return [
        n
        for n in names
        if n != "report.json"
        and not (n in figures and n in FIGURE_FILES and (folder / n).is_file())
    ]


def write_report(report: dict[str, Any], path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``report.json`` and the figures into ``path`` atomically: everything goes to
    a temporary directory beside it, which is then renamed into place."""
    # a symbolic link is followed: its target folder is replaced, the link kept, and the
    # temporary folders sit beside that target (a rename cannot cross file systems)
    target = prepare_report_dir(path, overwrite).resolve()
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp."))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the report gets the usual mode
    try:
        report = dict(report)
        report["figures"] = draw_figures(report, tmp)
        with open(tmp / "report.json", "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        if target.exists():
            trash = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
            os.replace(target, trash / "old")
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(path)
