"""Which folder is a run folder, and what in it edge-compress may delete.

A run folder (output.dir/name) carries MARKER, written when edge-compress first made or claimed it. A folder
without it is used only when it is empty (or missing); a non-empty folder without it is refused with one
line and nothing in it is touched. Inside a run folder, edge-compress deletes only names it writes itself:
its stage folders (NN_<stage type>, and their hidden .tmp/.work twins), its reports, the resolved recipe,
its lock and atomic-write temporaries. Anything else a user puts there stays.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from compress.data.cache import write_atomic
from compress.errors import UserError
from compress.stages import STAGE_ORDER

MARKER = ".edge-compress-run"
FILES = ("resolved_recipe.yaml", "report.json", "report.md", "report.html", "sweep.json", "sweep.md", ".lock", MARKER)
_STAGE = re.compile(rf"^\.?(\d\d)_({'|'.join(STAGE_ORDER)})(\.tmp|\.work)?$")
# write_atomic's temporary names
_TEMPORARY = re.compile(r"^\.(resolved_recipe\.yaml|report\.(json|md|html)|sweep\.(json|md))\..+$")
_LEGACY_HEADER = "# resolved by edge-compress"  # runs made before the marker existed


def check_claim(run_dir: Path) -> bool:
    """Whether `run_dir` is already ours (True) or free to become ours (False); refuses anything else."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output: {run_dir} exists and is not a folder")
    if (run_dir / MARKER).is_file():
        return True
    if run_dir.is_dir() and any(run_dir.iterdir()) and not _legacy_run(run_dir):
        raise UserError(
            f"output: {run_dir} is not empty and was not made by edge-compress (no {MARKER}); "
            "nothing in it was changed: choose another output.dir or name"
        )
    return False


def claim(run_dir: Path) -> None:
    """Make `run_dir` ours, or refuse: it must be missing, empty, already ours, or a run of an earlier release."""
    if check_claim(run_dir):
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / MARKER, (json.dumps({"format": "edge-compress-run", "version": 1}) + "\n").encode())
    except OSError as exc:
        raise UserError(f"output: cannot write the run folder {run_dir} ({exc.strerror or exc})") from None


def _legacy_run(run_dir: Path) -> bool:
    recipe = run_dir / "resolved_recipe.yaml"
    try:
        return recipe.is_file() and recipe.read_text(encoding="utf-8").startswith(_LEGACY_HEADER)
    except (OSError, UnicodeDecodeError):
        return False


def stage_index(name: str) -> int | None:
    """NN of one of our stage folders (NN_<stage>, .NN_<stage>.tmp, .NN_<stage>.work), else None."""
    match = _STAGE.match(name)
    return int(match.group(1)) if match else None


def ours(path: Path) -> bool:
    """Whether edge-compress wrote this entry of a run folder (and so may delete it)."""
    return path.name in FILES or stage_index(path.name) is not None or bool(_TEMPORARY.match(path.name))


def clear(run_dir: Path) -> list[str]:
    """--fresh: delete what edge-compress wrote in `run_dir` (not the lock or the marker); returns what stayed."""
    kept = []
    for path in sorted(run_dir.iterdir()):
        if path.name in (".lock", MARKER):
            continue
        if not ours(path):
            kept.append(path.name)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return kept


def drop_stages_after(run_dir: Path, count: int) -> None:
    """Our stage folders numbered beyond `count` (the recipe got shorter) would mislead: remove them."""
    for path in run_dir.iterdir():
        index = stage_index(path.name)
        if index is not None and index > count and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
