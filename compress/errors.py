"""The two kinds of failure a person sees: bad input (exit 2) and a failed check (exit 1).

Both carry one line that says what, where and how to fix; the CLI prints it without a traceback.
"""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """Bad input: a recipe, model folder or data file that cannot be used as given. Exit code 2."""

    exit_code = 2


class StageFailed(Exception):
    """A stage ran but its own check failed (export mismatch, no int8 kernels...). Exit code 1."""

    exit_code = 1


class GateFailed(StageFailed):
    """validate: a target missed the recipe's gate. Carries the stage's metrics, which the report shows."""

    def __init__(self, message: str, metrics: dict[str, Any]) -> None:
        super().__init__(message)
        self.metrics = metrics
