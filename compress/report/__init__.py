"""report.json (for machines) and report.md (for people) of one run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.data.cache import write_atomic
from compress.errors import UserError
from compress.report.html import provenance
from compress.report.html import render as render_html
from compress.report.markdown import markdown, stage_note, stage_time, summary_rows

if TYPE_CHECKING:  # the pipeline hands the recipe over; the report never imports it
    from compress.recipe import Recipe


@dataclass(frozen=True)
class StageRecord:
    """One stage of a run as the report shows it."""

    index: int
    type: str
    dir: Path
    reused: bool
    seconds: float
    metrics: dict[str, Any]


def write_report(run_dir: Path, recipe: Recipe, folder: Path | None, records: list[StageRecord]) -> dict[str, Any]:
    stages = [
        {
            "index": r.index,
            "type": r.type,
            "dir": r.dir.name,
            "reused": r.reused,
            "seconds": round(r.seconds, 2),
            "metrics": r.metrics,
        }
        for r in records
    ]
    warnings = [w for r in records for w in r.metrics.get("warnings", [])]
    targets: dict[str, Any] = {}
    for record in records:
        targets.update(record.metrics.get("targets", {}))
    validate = next((r.metrics for r in records if r.type == "validate"), None)
    report = {
        "name": recipe.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": recipe.task,
        "model": str(folder.resolve()) if folder is not None else "new (trained in this run)",
        "stages": stages,
        "targets": targets,
        "warnings": warnings,
        "provenance": provenance(run_dir, validate),
    }
    write_atomic(run_dir / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    render(run_dir, report)
    return report


def read_report(run_dir: Path) -> dict[str, Any]:
    """A finished run's report.json, checked to be a JSON object; a one-line UserError otherwise."""
    path = run_dir / "report.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: no report.json (is this a finished run directory?)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a report (a JSON object)")
    return data


def render(run_dir: Path, report: dict[str, Any] | None = None) -> dict[str, Any]:
    """(Re)write report.md and report.html from report.json (or the report given)."""
    if report is None:
        report = read_report(run_dir)
    write_atomic(run_dir / "report.md", markdown(report).encode())
    write_atomic(run_dir / "report.html", render_html(report).encode())
    return report


__all__ = [
    "StageRecord",
    "markdown",
    "read_report",
    "render",
    "stage_note",
    "stage_time",
    "summary_rows",
    "write_report",
]
