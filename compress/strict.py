"""The base of every recipe model: strict, frozen, finite, and without NUL in paths."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, model_validator


class Strict(BaseModel):
    """Base of every recipe model: unknown fields are errors, parsed values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # no .inf / .nan anywhere

    @model_validator(mode="after")
    def _paths_without_nul(self) -> Strict:
        for name, value in self:
            if isinstance(value, Path) and "\x00" in str(value):
                raise ValueError(f"{name}: a path cannot hold a NUL character")
        return self
