"""What a stage may use besides its input artifact: the recipe, its data, where to write, how to report."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from compress import data as data_sets
from compress import distributed, targets
from compress.artifact import Artifact
from compress.data import LabeledTexts, ScoredPairs, TextSet, load_evaluation, load_labeled, load_texts, load_unlabeled
from compress.data.spec import DataSpec, FileSet, ReferenceSet
from compress.errors import UserError
from compress.targets import Target

if TYPE_CHECKING:  # the pipeline builds the context from the recipe; the context never imports it
    from compress.recipe import Recipe


@dataclass
class Context:
    """Shared by all stages of one run. out_dir is the current stage's (temporary) folder."""

    recipe: Recipe
    run_dir: Path
    # torchrun ranks other than 0 stay quiet: one progress display, one log
    console: Console = field(default_factory=lambda: Console(stderr=True, quiet=not distributed.is_main()))
    source: Artifact | None = None  # the recipe's input model (the default distillation teacher)
    out_dir: Path = Path()
    work_dir: Path = Path()  # the current stage's scratch folder, kept across a kill (resumable stages)
    warnings: list[str] = field(default_factory=list)

    @property
    def task(self) -> str:
        """embedding | classification | token-classification | lm."""
        return str(self.recipe.task)

    @cached_property
    def input_kind(self) -> str:
        """What one example the model takes is: text, pair (a classifier of text pairs) or words (a tagger)."""
        if self.task == "token-classification":
            return "words"
        if self.task == "classification" and self.labeled("evaluation").text_pairs is not None:
            return "pair"
        return "text"

    def examples(self, role: str) -> list[Any]:
        """data.<role>'s model inputs, in order: texts, (text, text) pairs, or tuples of words."""
        if self.task == "token-classification":
            return list(self.tagged(role).sentences)
        if self.task == "classification":
            return examples_of(self.labeled(role), self.input_kind, f"data.{role}")
        if self.task == "embedding" and role == "evaluation":
            return list(self.evaluation.texts)
        return list(self.texts(role).texts)

    @cached_property
    def transfer_examples(self) -> list[Any]:
        """data.transfer's unlabelled examples, source after source, as the model takes them (load_unlabeled)."""
        kind, seed = self.input_kind, self.data.split_seed
        return [example for spec in self.data.transfer for example in load_unlabeled(spec, kind, seed)]

    @cached_property
    def calibration_examples(self) -> list[Any]:
        """Model inputs for calibration: real text (split into words for a tagger), or real text pairs."""
        spec = self._source("calibration")
        if self.input_kind == "pair":
            return examples_of(load_labeled(spec, self.data.split_seed), "pair", "data.calibration")
        if self.input_kind == "words":
            if _has_tags(spec):
                return list(data_sets.load_tagged(spec, self.data.split_seed).sentences)
            return [tuple(t.split()) for t in self.calibration.texts if t.split()]
        return list(self.calibration.texts)

    @property
    def data(self) -> DataSpec:
        return self.recipe.data

    @property
    def model(self) -> Any:
        """The recipe's model spec (compress.models.spec): pooling and normalisation for embeddings."""
        return self.recipe.model

    @cached_property
    def targets(self) -> list[Target]:
        """The recipe's targets, resolved once (architecture, CPU features, how the worker runs).

        A docker:IMAGE target's architecture is known once its image is inspected: done here, so the int8
        preset of a quantize stage before validate already sees an arm64 image as arm64.
        """
        resolved = [targets.get(name) for name in self.recipe.targets]
        for target in resolved:
            problem = target.problem() if target.kind == "docker" else None
            if problem:
                self.warn(f"{target.name}: {problem}; until then it counts as an amd64 image on this CPU")
        return resolved

    @cached_property
    def calibration(self) -> TextSet:
        if self.data.calibration is None:
            raise UserError("data.calibration is required by this recipe's stages")
        return load_texts(self.data.calibration, self.data.split_seed)

    @cached_property
    def evaluation(self) -> ScoredPairs:
        """The embedding task's scored pairs."""
        return load_evaluation(self.data.evaluation)

    def labeled(self, role: str) -> LabeledTexts:
        """data.<role> (train, evaluation, test) as labelled texts (classification)."""
        return load_labeled(self._source(role), self.data.split_seed)

    def tagged(self, role: str) -> Any:
        """data.<role> as sentences of words with one tag each (token classification)."""
        return data_sets.load_tagged(self._source(role), self.data.split_seed)

    def texts(self, role: str) -> TextSet:
        """data.<role> (train, evaluation, test) as plain texts (language modelling)."""
        return load_texts(self._source(role), self.data.split_seed)

    def _source(self, role: str) -> ReferenceSet | FileSet:
        source = getattr(self.recipe.data, role)
        if source is None:
            raise UserError(f"data.{role} is required by this recipe's stages")
        return source

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


def examples_of(data: LabeledTexts, kind: str, where: str) -> list[Any]:
    """A labelled set's model inputs: its texts, or (text, text) pairs; a pair model given single texts
    (or the reverse) is a one-line error."""
    if kind == "pair":
        if data.text_pairs is None:
            raise UserError(f"{where}: the model classifies text pairs, but {data.name} holds single texts")
        return list(zip(data.texts, data.text_pairs, strict=True))
    if data.text_pairs is not None:
        raise UserError(f"{where}: {data.name} holds text pairs, but the evaluation set holds single texts")
    return list(data.texts)


def _has_tags(spec: ReferenceSet | FileSet) -> bool:
    if isinstance(spec, FileSet):
        return getattr(spec, "tags_field", None) is not None
    return spec.reference == "brown-pos"
