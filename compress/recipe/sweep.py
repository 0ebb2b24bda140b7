"""The recipe's `sweep:` block: structure levels run one after another, an accuracy-vs-latency front, a goal.

Validators only validate; compress/sweep runs the levels (each a run of its own) and measures the front.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from compress.strict import Strict


class SweepLevel(Strict):
    """One structure level: what the recipe's structured prune stage removes and the layers distill keeps."""

    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,40}$",
        description="The level's name; its run is output.dir/<recipe name>-<name>. Default level1, level2, ...",
    )
    heads: float = Field(0.0, ge=0, lt=1, description="Fraction of attention heads the prune stage removes per layer.")
    ffn: float = Field(0.0, ge=0, lt=1, description="Fraction of FFN neurons the prune stage removes per layer.")
    layers: int | None = Field(
        None,
        ge=1,
        le=1000,
        description=(
            "Transformer layers the distill stage keeps (evenly spaced, the top layer always kept: a layer-dropped "
            "student the teacher trains back); default all of them."
        ),
    )

    def removes(self) -> tuple[float, float, float]:
        """(heads, ffn, -layers kept): each is larger when the level removes more (all layers: -inf)."""
        return (self.heads, self.ffn, -float(self.layers) if self.layers is not None else float("-inf"))


class SweepGoal(Strict):
    max_drop: float = Field(
        ge=0,
        le=2,
        description=(
            "Largest drop of the task's main metric (accuracy: 0.01 is one point; embeddings: Spearman) of a "
            "level's final artifact below the teacher's fp32 export, on data.evaluation. The fastest level "
            "within it is chosen; when none is, the sweep names the most accurate level and fails (exit 1)."
        ),
    )


class SweepSpec(Strict):
    """Runs the recipe once per level, then times and scores every level's final artifact beside the teacher."""

    levels: tuple[SweepLevel, ...] = Field(
        min_length=2,
        max_length=8,
        description=(
            "The structure levels, each removing at least as much as the one before it in heads, FFN neurons "
            "and layers, and more in one of them. Each level is a resumable run of its own."
        ),
    )
    goal: SweepGoal | None = Field(None, description="Keep the fastest level within this drop (default: no choice).")
    examples: int | None = Field(
        None, ge=10, le=10**6, description="Score and time on at most this many data.evaluation examples."
    )
    warmup: int = Field(5, ge=0, le=1000, description="Untimed examples through each model first.")

    @model_validator(mode="after")
    def _increasing(self) -> SweepSpec:
        names = self.level_names()
        if len(set(names)) != len(names):
            raise ValueError(f"sweep.levels: names must differ; got {names}")
        for i in range(1, len(self.levels)):
            before, now = self.levels[i - 1].removes(), self.levels[i].removes()
            if any(b > n for b, n in zip(before, now, strict=True)) or before == now:
                raise ValueError(
                    f"sweep.levels must increase: level {i + 1} ({_shown(self.levels[i])}) must remove at least as "
                    f"much as level {i} ({_shown(self.levels[i - 1])}) in heads, ffn and layers, and more in one"
                )
        return self

    def level_names(self) -> list[str]:
        return [level.name or f"level{i}" for i, level in enumerate(self.levels, 1)]


def _shown(level: SweepLevel) -> str:
    layers = f", layers {level.layers}" if level.layers is not None else ""
    return f"heads {level.heads}, ffn {level.ffn}{layers}"
