"""Stages: each turns one artifact into a new one inside its own folder.

STAGES is the only registry: stage type -> its config class and its run, in the order stages run. The
recipe's stage union, the order check and the config map are derived from it. Adding a stage is one new
package (config.py with its pydantic model, stage.py with `run`) and one line here
(docs/ARCHITECTURE.md has a worked example). A stage's package __init__ stays empty: the configs load
with the recipe (`edge-compress check`, a bad recipe's one-line error) without torch, ONNX Runtime or the
exporters, which stage.py imports when a run reaches the stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Annotated, Any, Generic, TypeVar, Union

from pydantic import Field

from compress.artifact import Artifact
from compress.context import Context
from compress.stages.distill.config import DistillStage
from compress.stages.export.config import ExportStage
from compress.stages.prune.config import PruneStage
from compress.stages.qat.config import QatStage
from compress.stages.quantize.config import QuantizeStage
from compress.stages.train.config import TrainStage
from compress.stages.validate.config import ValidateStage
from compress.strict import Strict

C = TypeVar("C", bound=Strict)
Metrics = dict[str, Any]


@dataclass(frozen=True)
class StageKind(Generic[C]):
    """One kind of stage: the config class a recipe's entry parses into, and the function that runs it."""

    config: type[C]
    module: str  # where its run lives: imported when a run reaches the stage (torch, ONNX Runtime, exporters)

    @property
    def run(self) -> Callable[[Artifact, C, Context], tuple[Artifact, Metrics]]:
        runner: Callable[[Artifact, C, Context], tuple[Artifact, Metrics]] = import_module(self.module).run
        return runner


STAGES: dict[str, StageKind[Any]] = {  # in the order stages run
    "train": StageKind(TrainStage, "compress.stages.train.stage"),
    "prune": StageKind(PruneStage, "compress.stages.prune.stage"),
    "distill": StageKind(DistillStage, "compress.stages.distill.stage"),
    "export": StageKind(ExportStage, "compress.stages.export.stage"),
    "quantize": StageKind(QuantizeStage, "compress.stages.quantize.stage"),
    "qat": StageKind(QatStage, "compress.stages.qat.stage"),
    "validate": StageKind(ValidateStage, "compress.stages.validate.stage"),
}
STAGE_ORDER: tuple[str, ...] = tuple(STAGES)
STAGE_CONFIGS: dict[str, type[Strict]] = {name: kind.config for name, kind in STAGES.items()}

if TYPE_CHECKING:

    class StageConfig(Strict):  # what a type checker knows of any stage's config
        type: str

else:  # the recipe's `stages:` entries: one of the registered configs, chosen by `type`
    StageConfig = Annotated[Union[tuple(STAGE_CONFIGS.values())], Field(discriminator="type")]  # noqa: UP007

__all__ = [
    "STAGES",
    "STAGE_CONFIGS",
    "STAGE_ORDER",
    "DistillStage",
    "ExportStage",
    "PruneStage",
    "QatStage",
    "QuantizeStage",
    "StageConfig",
    "StageKind",
    "TrainStage",
    "ValidateStage",
]
