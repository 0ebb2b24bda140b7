"""What `check` and `run` refuse before any work: one function, so the two cannot disagree.

preflight(recipe) resolves and checks the input model (folder, config, tokenizer, weights file structure),
the user's data files, and the lengths the stages will ask of the model. `deep=True` (the `check` command)
also loads the weights once, so a checkpoint whose tensors do not fit its config is refused before a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.artifact import Artifact
from compress.context import Context
from compress.data import load_evaluation, load_labeled, load_texts
from compress.data.spec import FileSet
from compress.errors import UserError
from compress.models import hf
from compress.models.architectures import BERT_LAYOUT, usable_positions
from compress.models.config import ZOO_FORMAT, ZOO_VERSION, ZooConfig, read_zoo_config
from compress.models.spec import HFModel, NewModel, PackageModel, ZooModel
from compress.recipe import Recipe
from compress.serving.bundle_check import sha256_of  # the one file hash, shared with validate and the server
from compress.stages.export.config import ExportStage
from compress.stages.export.kind import windowed_kind
from compress.stages.prune.config import PruneStage
from compress.stages.validate.config import ValidateStage
from compress.tasks.classification import label_map

DATA_ROLES = ("train", "calibration", "evaluation", "test")


def preflight(recipe: Recipe, deep: bool = False) -> Artifact:
    """The recipe's input model as an artifact, after every check that needs no stage to run."""
    source = source_artifact(recipe)
    for role in DATA_ROLES:
        spec = getattr(recipe.data, role)
        if isinstance(spec, FileSet) and not spec.path.is_file():
            raise UserError(f"data.{role}.path: {spec.path} does not exist")
    _check_lengths(recipe, _positions(recipe, source))
    _check_layout(recipe, source)
    _check_attention(recipe, source)
    for where, teacher in teachers(recipe):
        _check_teacher(recipe, where, teacher)
        _check_teacher_labels(recipe, where, teacher, source)
    if deep:
        _load_files(recipe)
        check_task_data(recipe, source, Context(recipe=recipe, run_dir=recipe.output.dir / recipe.name))
        _load_weights(source)
    return source


def source_artifact(recipe: Recipe) -> Artifact:
    """The recipe's input model as an artifact, checked: a Hugging Face folder, a zoo checkpoint, or a new one."""
    model = recipe.model
    if isinstance(model, HFModel | PackageModel):
        if isinstance(model, HFModel) and not model.hf.is_dir():
            raise UserError(f"model.hf: {model.hf} is not a folder{_made_by(model.hf)}")
        folder = hf.model_folder(model)
        hf.check_weights(folder)
        return Artifact("hf", {"model": folder}, {"precision": "fp32"})
    if isinstance(model, ZooModel):
        if not model.zoo.is_dir():
            raise UserError(f"model.zoo: {model.zoo} is not a folder{_made_by(model.zoo)}")
        read_zoo_config(model.zoo)
        if not (model.zoo / "model.safetensors").is_file():
            raise UserError(f"model.zoo: {model.zoo} holds no model.safetensors")
        hf.check_safetensors(model.zoo / "model.safetensors")
        return Artifact("zoo", {"model": model.zoo}, {"precision": "fp32"})
    return Artifact("new", {}, {"architecture": model.architecture})


def _made_by(checkpoint: Path) -> str:
    """Which recipe (under ./recipes) trains the missing checkpoint RUNS/NAME/NN_train/model (a zoo model, or a
    fine-tuned Hugging Face one), as a hint."""
    parts = checkpoint.parts
    if len(parts) < 3 or parts[-1] != "model" or not parts[-2].endswith("_train"):
        return ""
    name = parts[-3]
    for path in sorted(Path("recipes").rglob("*.yaml")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if f"\nname: {name}\n" in f"\n{text}":
            return f"; it is made by `edge-compress train {path}`: run that first"
    return ""


def teachers(recipe: Recipe) -> list[tuple[str, Path]]:
    """The teacher folders the recipe's stages name (distill.teacher, prune.recovery.teacher), with where."""
    found = []
    for index, stage in enumerate(recipe.stages):
        teacher = getattr(stage, "teacher", None) or getattr(getattr(stage, "recovery", None), "teacher", None)
        if teacher is not None:
            found.append((f"stages[{index}].teacher", teacher))
    return found


def _check_teacher(recipe: Recipe, where: str, teacher: Path) -> None:
    """A teacher is checked like the input model: a folder of the same kind, whole weights, enough positions."""
    positions: Any
    zoo = isinstance(recipe.model, ZooModel | NewModel)
    if zoo:
        source_artifact(recipe.model_copy(update={"model": ZooModel(zoo=teacher)}))
        positions = read_zoo_config(teacher).max_len
    else:
        folder = hf.model_folder(HFModel(hf=teacher))
        hf.check_weights(folder)
        positions = usable_positions(hf.read_config(folder))
    length = recipe.data.max_length
    if isinstance(positions, int) and length > positions and not zoo:  # zoo stages cut to the shorter model
        raise UserError(f"{where}: the teacher takes {positions} tokens, less than data.max_length {length}")


def _check_teacher_labels(recipe: Recipe, where: str, teacher: Path, source: Artifact) -> None:
    """A Hugging Face teacher reads the model's tokens (one vocabulary: the student's batches feed it), and a
    classifier's or tagger's predicts the model's labels in the model's order (the soft targets are compared
    output by output). After a train stage the head is made then: checked there."""
    if source.kind != "hf":
        return
    if hf.load_tokenizer(teacher).get_vocab() != hf.load_tokenizer(source.file("model")).get_vocab():
        raise UserError(
            f"{where}: {teacher} has another vocabulary than the model: the teacher reads the student's tokens, "
            "so it must come from the same tokenizer"
        )
    if recipe.task == "embedding" or any(s.type == "train" for s in recipe.stages):
        return
    ours, theirs = hf.model_labels(source.file("model")), hf.model_labels(teacher)
    if theirs != ours:
        raise UserError(
            f"{where}: {teacher} predicts labels {list(theirs or ())[:8]}, the model {list(ours or ())[:8]}: "
            "a teacher needs one head with the same labels in the same order"
        )


def teacher_fingerprint(stage: Any) -> dict[str, str]:
    """sha256 of the files of the teacher a stage names: a teacher replaced in place recomputes the stage."""
    teacher = getattr(stage, "teacher", None) or getattr(getattr(stage, "recovery", None), "teacher", None)
    if teacher is None or not Path(teacher).is_dir():
        return {}
    return {str(p.relative_to(teacher)): sha256_of(p) for p in hf.model_files(Path(teacher))}


def _positions(recipe: Recipe, source: Artifact) -> int | None:
    """How many tokens the input model can take (None: the model does not say)."""
    model = recipe.model
    if isinstance(model, ZooModel):
        return read_zoo_config(model.zoo).max_len
    if isinstance(model, NewModel):
        return ZooConfig.from_dict({"format": ZOO_FORMAT, "version": ZOO_VERSION, **model.architecture}).max_len
    return usable_positions(hf.read_config(source.file("model")))


def _check_attention(recipe: Recipe, source: Artifact) -> None:
    """An export of attention our ops cannot keep (or would lose) is refused before any work, as the
    export stage would refuse it."""
    if source.kind != "hf":
        return
    config = hf.read_config(source.file("model"))
    windowed = None
    for i, stage in enumerate(recipe.stages):
        if isinstance(stage, ExportStage):
            try:
                windowed = windowed_kind(config, stage)
            except UserError as exc:
                raise UserError(f"stages[{i}] (export): {exc}") from None
        if stage.type == "qat" and windowed:
            raise UserError(
                f"stages[{i}] (qat): a {windowed} exports its attention as our ops, which quantization-aware "
                "training does not keep yet; use a quantize stage"
            )


def _check_layout(recipe: Recipe, source: Artifact) -> None:
    """Structured pruning, its refit and distillation work on the layers of BERT-layout encoders; another
    architecture is refused before any work (masks and the other stages work on every architecture)."""
    if source.kind != "hf":
        return
    needs = [
        f"stages[{i}] ({stage.type})"
        for i, stage in enumerate(recipe.stages)
        if stage.type == "distill"
        or (
            isinstance(stage, PruneStage)
            and (
                stage.method == "structured"
                or stage.reconstruct is not None
                or bool(getattr(stage.recovery, "distill", False))
            )
        )
    ]
    kind = hf.read_config(source.file("model")).get("model_type")
    if needs and kind not in BERT_LAYOUT:
        raise UserError(
            f"{needs[0]}: structured pruning and distillation work on {', '.join(sorted(BERT_LAYOUT))} encoders "
            f"so far, not {kind} (unstructured, N:M and block masks, export, quantize and qat work on it)"
        )


def _check_lengths(recipe: Recipe, positions: int | None) -> None:
    if positions is None:
        return
    if recipe.data.max_length > positions and not isinstance(recipe.model, ZooModel | NewModel):
        raise UserError(f"data.max_length: {recipe.data.max_length} exceeds the model's {positions} positions")
    for index, stage in enumerate(recipe.stages):
        if isinstance(stage, ValidateStage) and stage.sequence_length > positions:
            raise UserError(
                f"stages[{index}].sequence_length: {stage.sequence_length} exceeds the model's {positions} positions"
            )


def _load_files(recipe: Recipe) -> None:
    """Parse the user's data files as the stages will (reference sets are pinned by checksum: not fetched here)."""
    for role in DATA_ROLES:
        spec = getattr(recipe.data, role)
        if not isinstance(spec, FileSet) or getattr(spec, "tags_field", None) is not None:
            continue  # tagged words are read by check_task_data
        if role == "evaluation" and recipe.task == "embedding":
            load_evaluation(spec)
        elif spec.label_field is not None:
            load_labeled(spec, recipe.data.split_seed)
        else:
            load_texts(spec, recipe.data.split_seed)


def check_task_data(recipe: Recipe, source: Artifact, ctx: Context) -> None:
    """A Hugging Face classifier or tagger: every data role holds the model's kind of example (single texts,
    pairs or tagged words) and, without a train stage, the folder has a trained head that knows the data's
    labels by name. Run before any stage (the data is loaded once, then cached by the context)."""
    if source.kind != "hf" or recipe.task not in ("classification", "token-classification"):
        return
    roles = [role for role in ("train", "evaluation", "test") if getattr(recipe.data, role) is not None]
    for role in roles:
        ctx.examples(role)
    folder = source.file("model")
    recorded = hf.read_config(folder).get(hf.INPUT_KIND_KEY)
    if recorded is not None and recorded != ctx.input_kind:
        raise UserError(
            f"model: {folder} was fine-tuned on {recorded} examples, but data.evaluation holds {ctx.input_kind} ones"
        )
    if any(stage.type == "train" for stage in recipe.stages):
        return  # the train stage gives the model a head for the data's labels
    names = hf.model_labels(folder)
    if names is None:
        raise UserError(
            f"model: {folder} has no classification head (no id2label in config.json); "
            "add a train stage to fine-tune one"
        )
    for role in roles:
        if recipe.task == "token-classification":
            label_map(ctx.tagged(role).tag_names, names, f"data.{role}")
        else:
            label_map(ctx.labeled(role).label_names, names, f"data.{role}")


def _load_weights(source: Artifact) -> None:
    if source.kind == "hf":
        hf.load_model(source.file("model"))
        hf.load_tokenizer(source.file("model"))
    elif source.kind == "zoo":
        from compress.models.zoo import load_zoo  # torch: loaded only once the weights are checked

        load_zoo(source.file("model"))


def content_fingerprint(recipe: Recipe, source: Artifact) -> dict[str, Any]:
    """sha256 of the bytes a run reads: the model folder's files and the user's data files, not their paths."""
    files: dict[str, str] = {}
    folder = source.files.get("model")
    if folder is not None:
        for path in hf.model_files(folder):
            files[f"model/{path.relative_to(folder)}"] = sha256_of(path)
    for role in DATA_ROLES:
        spec = getattr(recipe.data, role)
        if isinstance(spec, FileSet) and spec.path.is_file():
            files[f"data.{role}"] = sha256_of(spec.path)
    return files
