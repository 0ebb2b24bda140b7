"""The recipe: YAML parsed once, strictly, into frozen pydantic models.

Every field has a description: they become `edge-compress schema`. Validators only validate;
turning names into models, data and sessions happens later, in the stages.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from compress.data.spec import DataSpec, FileSet, ReferenceSet
from compress.errors import UserError
from compress.models.spec import MODEL_SPECS, HFModel, ModelSpec, NewModel, PackageModel, ZooModel
from compress.recipe.errors import describe
from compress.recipe.reader import MAX_BYTES, RecipeYamlError, parse
from compress.recipe.sweep import SweepSpec
from compress.stages import (
    STAGE_ORDER,
    DistillStage,
    ExportStage,
    PruneStage,
    QatStage,
    QuantizeStage,
    StageConfig,
    TrainStage,
    ValidateStage,
)
from compress.strict import Strict
from compress.targets import check_name

__all__ = [
    "MODEL_SPECS",
    "DataSpec",
    "ExportStage",
    "FileSet",
    "HFModel",
    "NewModel",
    "PackageModel",
    "PruneStage",
    "QatStage",
    "QuantizeStage",
    "Recipe",
    "ReferenceSet",
    "TrainStage",
    "ValidateStage",
    "ZooModel",
    "load_recipe",
    "recipe_from_dict",
    "recipe_from_text",
    "recipe_schema",
]


# ---------------------------------------------------------------------------------------- recipe
PSEUDO_FILESYSTEMS = (Path("/proc"), Path("/sys"), Path("/dev"))  # kernel views, never a place for runs


class OutputSpec(Strict):
    dir: Path = Field(
        Path("runs"),
        description=(
            "Runs are written to DIR/<name>/. A run folder carries a marker edge-compress wrote: an existing "
            "non-empty folder without it is refused, never cleared."
        ),
    )

    @field_validator("dir")
    @classmethod
    def _a_place_for_runs(cls, value: Path) -> Path:
        if "\x00" in str(value):
            raise ValueError("a path cannot hold a NUL character")
        try:
            resolved = value.expanduser().resolve()
        except (OSError, RuntimeError) as exc:  # a symbolic-link loop, a name too long
            raise ValueError(f"{value}: cannot be resolved ({exc})") from None
        if resolved == Path(resolved.anchor):
            raise ValueError(f"{value} is the root of the file system; give a folder for runs, e.g. runs")
        inside = [str(p) for p in PSEUDO_FILESYSTEMS if resolved.is_relative_to(p)]
        if inside:
            raise ValueError(f"{value} is inside {inside[0]}, a view of the kernel, not a place for runs")
        try:
            if resolved.exists() and not resolved.is_dir():
                raise ValueError(f"{value} exists and is not a folder")
        except OSError as exc:
            raise ValueError(f"{value}: cannot be used ({exc.strerror})") from None
        return value


def _default_targets() -> list[str]:
    return ["x86_64"]


def _target_name(name: str) -> str:
    return check_name(name)


TargetName = Annotated[str, AfterValidator(_target_name)]


class Recipe(Strict):
    name: str = Field(
        description="Run name: the run directory is output.dir/name.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
    )
    model: ModelSpec = Field(description="The model to compress (or, with a train stage, to train).")
    task: Literal["embedding", "classification", "token-classification", "lm"] = Field(
        description=(
            "What the model is for; decides the exported outputs and the metrics: embedding (Hugging Face "
            "encoders), classification (of a text or a text pair: Hugging Face and zoo models), "
            "token-classification (one label per word: Hugging Face models) and lm (zoo models)."
        )
    )
    data: DataSpec
    stages: list[StageConfig] = Field(min_length=1, description="Stages, run in order.")
    targets: list[TargetName] = Field(
        default_factory=_default_targets,
        min_length=1,
        description=(
            "CPU targets the validate stage runs the artifact on: x86_64 (this CPU), x86_64-avx2 (emulated, no "
            "VNNI), aarch64 (emulated Neoverse-N1, dot product), aarch64-neon (emulated Cortex-A72), docker:IMAGE."
        ),
    )
    output: OutputSpec = Field(default_factory=OutputSpec)
    sweep: SweepSpec | None = Field(
        None,
        description=(
            "Run the recipe once per structure level (`edge-compress sweep` or `run`), score and time every "
            "level's final artifact beside the teacher's fp32 export, and with a goal keep the fastest within it."
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        kinds = [s.type for s in self.stages]
        for kind in set(kinds):
            if kinds.count(kind) > 1:
                raise ValueError(f"stage {kind!r} appears {kinds.count(kind)} times; each stage runs once")
        if kinds != sorted(kinds, key=STAGE_ORDER.index):
            raise ValueError(f"stages must run in the order {' -> '.join(STAGE_ORDER)}; got {' -> '.join(kinds)}")
        if ("quantize" in kinds or "validate" in kinds or "qat" in kinds) and "export" not in kinds:
            raise ValueError("quantize, qat and validate work on ONNX: add an export stage before them")
        if "quantize" in kinds and "qat" in kinds:
            raise ValueError("qat quantizes the model itself (int8 QDQ export): use quantize or qat, not both")
        if "qat" in kinds and self.task == "lm":
            raise ValueError("qat trains embedding and classification models; language models are not supported yet")
        if self.task == "lm" and any(isinstance(s, QuantizeStage) and s.goal for s in self.stages):
            raise ValueError("quantize.goal: accuracy-aware quantization measures classification and embedding tasks")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets: each target once; got {self.targets}")
        for stage in self.stages:
            if isinstance(stage, ValidateStage):
                unknown = sorted(set(stage.gate) - {"default", *self.targets})
                if unknown:
                    raise ValueError(
                        f"validate.gate: {', '.join(unknown)} is not one of the recipe's targets "
                        f"({', '.join(self.targets)}) or 'default'"
                    )
        return self

    @model_validator(mode="after")
    def _fits_the_model(self) -> Recipe:
        kinds = [s.type for s in self.stages]
        zoo = isinstance(self.model, ZooModel | NewModel)
        _check_task(self.task, zoo)
        if not zoo and self.task != "embedding" and "train" in kinds:
            _check_teachers(self.stages, self.task)
        if isinstance(self.model, NewModel) and kinds[0] != "train":
            raise ValueError("model.architecture is a new, untrained model: the first stage must be train")
        if "train" in kinds and not zoo and self.task == "embedding":
            raise ValueError(
                "the train stage fine-tunes Hugging Face models for classification and token-classification"
            )
        if ("train" in kinds or "distill" in kinds or "qat" in kinds) and self.data.train is None:
            raise ValueError("the train, distill and qat stages need data.train")
        for stage in self.stages:
            if isinstance(stage, DistillStage):
                _check_distill(stage, self.task, zoo)
        if self.task == "lm" and "validate" in kinds:
            raise ValueError("validate of zoo language models is not available yet; classification is")
        if zoo and any(isinstance(s, ExportStage) and s.exporter == "torchscript" for s in self.stages):
            raise ValueError("export: zoo models export with the dynamo exporter (their attention becomes custom ops)")
        if zoo and self.data.tokenizer == "model":
            raise ValueError("zoo models need data.tokenizer: bytes or wordpiece")
        if any(isinstance(s, QuantizeStage) and s.mode == "static" for s in self.stages) and not self.data.calibration:
            raise ValueError("static quantization needs data.calibration")
        _check_reconstruct(self.stages, self.data, zoo)
        _check_compression(self, zoo)
        if isinstance(self.model, NewModel) and self.model.architecture.get("task", "classification") != self.task:
            raise ValueError("model.architecture.task must match the recipe's task")
        return self


def _check_task(task: str, zoo: bool) -> None:
    if zoo and task not in ("classification", "lm"):
        raise ValueError(f"task {task} goes with Hugging Face models; zoo models do classification and lm")
    if not zoo and task == "lm":
        raise ValueError("task lm is for zoo models; Hugging Face models do embedding and (token-)classification")


def _check_teachers(stages: Any, task: str) -> None:
    """After a train stage, the recipe's model (the default teacher) is not the fine-tuned one."""
    for stage in stages:
        if isinstance(stage, DistillStage):
            reads = stage.losses_for(task).reads_teacher()
            teacher = stage.teacher
        elif isinstance(stage, PruneStage) and stage.recovery is not None and stage.recovery.distill:
            reads = stage.recovery.losses is None or stage.recovery.losses.reads_teacher()
            teacher = stage.recovery.teacher
        else:
            continue
        if reads and teacher is None:
            raise ValueError(
                f"{stage.type}: the default teacher is the recipe's model, which the train stage has not "
                "fine-tuned: name a fine-tuned folder with teacher:, or fine-tune in a recipe of its own"
            )


def _check_reconstruct(stages: Any, data: DataSpec, zoo: bool) -> None:
    for stage in stages:
        if isinstance(stage, PruneStage) and stage.reconstruct is not None:
            if zoo:
                raise ValueError("prune.reconstruct refits Hugging Face BERT-family encoders, not zoo models")
            if getattr(data, stage.reconstruct.data) is None:
                raise ValueError(f"prune.reconstruct reads data.{stage.reconstruct.data}: give it")


def _check_compression(recipe: Recipe, zoo: bool) -> None:
    if recipe.sweep is not None:
        _check_sweep(recipe.sweep, recipe.stages, zoo)
    if recipe.data.transfer:
        _check_transfer(recipe.stages, recipe.task, zoo)


def _check_transfer(stages: Any, task: str, zoo: bool) -> None:
    """data.transfer teaches through the teacher's outputs: a Hugging Face task model's distillation must read them."""
    if zoo or task not in ("classification", "token-classification"):
        raise ValueError(
            "data.transfer is for distilling Hugging Face classifiers and taggers (an embedding model's "
            "distillation reads data.train's texts, which need no labels: put them there)"
        )
    for stage in stages:
        if isinstance(stage, DistillStage):
            losses = stage.losses_for(task)
        elif isinstance(stage, PruneStage) and stage.recovery is not None and stage.recovery.distill:
            if stage.recovery.losses is None:
                return  # the task's default losses: kl and ce
            losses = stage.recovery.losses
        else:
            continue
        if losses.kl or losses.hidden_mse or losses.hidden_relative:
            return
    raise ValueError(
        "data.transfer: no distillation reads the teacher's outputs (distill with kl or hidden losses): "
        "its unlabelled examples would teach nothing"
    )


def _check_sweep(sweep: SweepSpec, stages: Any, zoo: bool) -> None:
    kinds = {s.type: s for s in stages}
    prune = next((s for s in stages if isinstance(s, PruneStage)), None)
    distill = next((s for s in stages if isinstance(s, DistillStage)), None)
    if zoo:
        raise ValueError("sweep: structure levels are for Hugging Face BERT-family encoders, not zoo models")
    if "train" in kinds:
        raise ValueError("sweep: compresses a trained model (the teacher): fine-tune it in a recipe of its own")
    if "export" not in kinds:
        raise ValueError("sweep: the front scores and times ONNX artifacts: add an export stage")
    if any(level.heads or level.ffn for level in sweep.levels) and (prune is None or prune.method != "structured"):
        raise ValueError("sweep: levels that remove heads or ffn need a prune stage with method: structured")
    if any(level.layers is not None for level in sweep.levels):
        if distill is None:
            raise ValueError("sweep: levels that drop layers need a distill stage (the teacher trains them back)")
        if distill.keep_every is not None or distill.keep_layers is not None:
            raise ValueError("sweep: the levels set the layers distill keeps: remove distill.keep_every/keep_layers")


def _check_distill(stage: DistillStage, task: str, zoo: bool) -> None:
    losses = stage.losses_for(task)
    if not zoo and stage.student is not None:
        raise ValueError("distill.student (a fresh zoo config) is for zoo models; use keep_every / keep_layers")
    if task == "embedding":
        wrong = [n for n in ("kl", "ce") if getattr(losses, n)]
    else:
        wrong = [n for n in ("embedding_cosine", "embedding_mse", "attention") if getattr(losses, n)]
        if stage.select == "fidelity":
            raise ValueError("distill.select: fidelity is for the embedding task; task models are kept by task metric")
    if wrong:
        raise ValueError(f"distill.losses: {', '.join(wrong)} do not apply to task {task}")


# --------------------------------------------------------------------------------------- loading
def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe; any problem is a UserError naming file:line, the field and what is allowed."""
    path = Path(path)
    try:
        # Non-blocking open, then a regular file only: a FIFO would block open() itself, and a device such
        # as /dev/zero never ends; a regular file is read no further than the cap.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise UserError(f"{path}: not a regular file; a recipe is a YAML file")
            raw = handle.read(MAX_BYTES + 1)
        if len(raw) > MAX_BYTES:
            raise UserError(f"{path}: the file is over {MAX_BYTES // 1024} KB; a recipe is a short YAML file")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: recipe not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: a folder, not a recipe file") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the recipe ({exc})") from None
    return recipe_from_text(text, str(path))


def recipe_from_text(text: str, source_name: str = "<string>") -> Recipe:
    """A recipe from YAML text, read within the same bounds as a file; errors name source_name:line."""
    try:
        node, data = parse(text)
    except RecipeYamlError as exc:
        raise UserError(f"{source_name}:{exc.line}: {exc}" if exc.line else f"{source_name}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{source_name}:1: a recipe is a mapping with name, model, task, data, stages")
    return _validate(data, node, source_name)


def recipe_from_dict(data: Any, source_name: str = "<dict>") -> Recipe:
    """A recipe from Python data (e.g. yaml.safe_load's); errors name source_name and the field, no line."""
    if not isinstance(data, dict):
        raise UserError(f"{source_name}: a recipe is a mapping with name, model, task, data, stages")
    return _validate(data, None, source_name)


def _validate(data: dict[Any, Any], node: Any, source_name: str) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        line, field, why = describe(exc.errors()[0], node, Recipe)
        where = f"{source_name}:{line}" if node is not None else source_name
        raise UserError(f"{where}: {field}: {why}") from None


def recipe_schema() -> dict[str, Any]:
    """The JSON Schema of a recipe, for editors' autocompletion."""
    schema = Recipe.model_json_schema()
    schema["title"] = "edge-compress recipe"
    return schema
