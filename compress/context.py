"""What a stage may use besides its input artifact: the recipe, its data, where to write, how to report."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from compress.data import ScoredPairs, TextSet, load_evaluation, load_texts
from compress.recipe import Recipe


@dataclass
class Context:
    """Shared by all stages of one run. out_dir is the current stage's (temporary) folder."""

    recipe: Recipe
    run_dir: Path
    console: Console = field(default_factory=lambda: Console(stderr=True))
    out_dir: Path = Path()
    warnings: list[str] = field(default_factory=list)

    @cached_property
    def calibration(self) -> TextSet:
        return load_texts(self.recipe.data.calibration)

    @cached_property
    def evaluation(self) -> ScoredPairs:
        return load_evaluation(self.recipe.data.evaluation)

    def warn(self, message: str) -> None:
        """A loud warning: printed now and kept for the report (no silent fallbacks)."""
        self.warnings.append(message)
        self.console.print(f"[bold yellow]warning:[/] {message}")

    def log(self, message: Any) -> None:
        self.console.print(message)

    def progress(self) -> Progress:
        """A rich progress bar on this run's console, for steps that take more than a moment."""
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
