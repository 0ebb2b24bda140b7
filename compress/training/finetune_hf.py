"""Fine-tuning a Hugging Face encoder for a task (the train stage on a Hugging Face folder).

A pretrained encoder gets a new head for the data's labels (or keeps the folder's own head when it has
exactly those labels) and is trained with the zoo's loop: per-epoch checkpoints, resume after a kill,
early stopping on the task metric, torchrun DDP. Classification reads a text or a text pair; token
classification learns one label per word at the word's first sub-token (the other sub-tokens are ignored
by the loss, as in the original BERT tagging setup). The saved folder records its input kind (text, pair
or words), so a later recipe that feeds it another kind is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.artifact import Artifact, usable_length
from compress.context import Context
from compress.data.cache import write_atomic
from compress.models import hf
from compress.tasks import HEADS, classification, token_classification
from compress.training.loop import Batch, Evaluation, Persistence, fit
from compress.training.settings import TrainingSettings

IGNORE = -100  # label of sub-tokens the loss skips (torch's cross-entropy ignore_index)
UNLABELED = -2  # an example (a tagger: a word's first sub-token) the teacher labels: soft targets, no cross-entropy
FINE_TUNE_LR = 5e-5  # the learning rate when the recipe gives none (3e-4, the zoo's default, breaks BERTs)


def finetune(artifact: Artifact, cfg: TrainingSettings, ctx: Context) -> tuple[Artifact, dict[str, Any]]:
    torch.manual_seed(cfg.seed)
    if "lr" not in cfg.model_fields_set:
        cfg = cfg.model_copy(update={"lr": FINE_TUNE_LR})
    folder, head, kind = artifact.file("model"), HEADS[ctx.task], ctx.input_kind
    assert head is not None
    tokenizer = hf.load_tokenizer(folder)
    config = hf.read_config(folder)
    names = hf.input_names(tokenizer, config)
    labels = label_names(ctx)
    own = hf.model_labels(folder)
    model = hf.load_model(folder, head) if own == labels else hf.fresh_head_model(folder, head, labels)
    new_head = own != labels
    ctx.log(f"fine-tuning {'a new' if new_head else 'its own'} {head} head for {len(labels)} labels (lr {cfg.lr:g})")
    max_length = usable_length(ctx.data.max_length, config.get("max_position_embeddings"))

    train = encoded(ctx, "train", tokenizer, names, max_length, labels)
    evaluation = task_evaluation(ctx, tokenizer, names, max_length, labels, limit=cfg.eval_samples)
    ctx.log(f"training on {len(train[1])} examples ({kind}), evaluating on data.evaluation each epoch")
    lengths = train[0]["attention_mask"].sum(1)

    def batches(order: np.ndarray) -> Iterator[Batch]:
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            yield task_batch(train[0], train[1], rows, int(lengths[rows].max()))

    persistence = Persistence(
        save=hf.save_model,
        load=lambda path: hf.load_model(path, head),
    )
    best, state = fit(
        model,
        cfg,
        batches=batches,
        n_train=len(train[1]),
        evaluation=evaluation,
        work=ctx.work_dir,
        ctx=ctx,
        loss_fn=lambda m, b: m(**b).loss,
        persistence=persistence,
    )
    metrics: dict[str, Any] = {
        **state.summary(evaluation.name),
        "labels": list(labels),
        "new_head": new_head,
        "input_kind": kind,
        "lr": cfg.lr,
        "max_length": max_length,
        "parameters": sum(p.numel() for p in best.parameters()),
    }
    if ctx.data.test is not None:
        with torch.no_grad():
            metrics["test"] = task_evaluation(ctx, tokenizer, names, max_length, labels, role="test").run(best)
    out = ctx.out_dir / "model"
    hf.save_model(best, out)
    hf.copy_tokenizer_files(folder, out)
    _record_input_kind(out, kind)
    return Artifact("hf", {"model": out}, {"precision": "fp32"}), metrics


def label_names(ctx: Context) -> tuple[str, ...]:
    """The head's labels: the training set's, in its order (the evaluation set's must be among them)."""
    if ctx.task == "token-classification":
        return ctx.tagged("train").tag_names
    return ctx.labeled("train").label_names


def encoded(  # noqa: PLR0917
    ctx: Context, role: str, tokenizer: Any, names: tuple[str, ...], max_length: int, labels: tuple[str, ...]
) -> tuple[dict[str, np.ndarray], np.ndarray, list[Any]]:
    """data.<role> tokenized (padded to its longest example) with its labels in the head's numbering:
    (N,) for classification, (N, S) per token with IGNORE off the words' first sub-tokens."""
    examples = ctx.examples(role)
    ids = hf.encode(tokenizer, examples, max_length, names, kind=ctx.input_kind)
    if ctx.task == "token-classification":
        data = ctx.tagged(role)
        to_head = classification.label_map(data.tag_names, labels, f"data.{role}")
        per_token = np.full(ids["input_ids"].shape, IGNORE, dtype=np.int64)
        starts = hf.word_starts(tokenizer, examples, max_length)
        for i, (first, tags) in enumerate(zip(starts, data.tags, strict=True)):
            for pos, tag in zip(first, tags, strict=True):
                if pos >= 0:
                    per_token[i, pos] = to_head[tag]
        return ids, per_token, starts
    labeled = ctx.labeled(role)
    to_head = classification.label_map(labeled.label_names, labels, f"data.{role}")
    return ids, to_head[np.asarray(labeled.labels)], []


def task_batch(ids: dict[str, np.ndarray], labels: np.ndarray, rows: np.ndarray, width: int) -> Batch:
    width = max(width, 2)  # trim the batch to its longest real example
    batch = {name: torch.from_numpy(array[rows, :width]) for name, array in ids.items()}
    batch["labels"] = torch.from_numpy(labels[rows, :width] if labels.ndim == 2 else labels[rows])
    return batch


def task_evaluation(  # noqa: PLR0917
    ctx: Context,
    tokenizer: Any,
    names: tuple[str, ...],
    max_length: int,
    labels: tuple[str, ...],
    limit: int | None = None,
    role: str = "evaluation",
) -> Evaluation:
    """The task metric on data.<role> (accuracy; per word for a tagger), computed by the PyTorch model."""
    ids, gold, starts = encoded(ctx, role, tokenizer, names, max_length, labels)
    count = min(limit or len(gold), len(gold))
    size = ctx.data.batch_size
    lengths = ids["attention_mask"].sum(1)
    tags = None
    if ctx.task == "token-classification":  # every word's tag, also of words truncation cut (counted apart)
        data = ctx.tagged(role)
        to_head = classification.label_map(data.tag_names, labels, f"data.{role}")
        tags = [tuple(int(to_head[t]) for t in row) for row in data.tags]

    def run(model: Any) -> dict[str, Any]:
        chunks = []
        for start in range(0, count, size):
            rows = np.arange(start, min(start + size, count))
            batch = task_batch(ids, gold, rows, int(lengths[rows].max()))
            batch.pop("labels")
            out = model(**batch).logits.float().numpy()
            if out.ndim == 3:  # pad per-token logits to one width across batches
                out = np.pad(out, ((0, 0), (0, ids["input_ids"].shape[1] - out.shape[1]), (0, 0)))
            chunks.append(out)
        logits = np.concatenate(chunks)
        if tags is not None:
            return token_classification.score(logits, starts[:count], tags[:count])
        return classification.score(logits, gold[:count])

    return Evaluation("accuracy", higher_is_better=True, run=run)


def _record_input_kind(folder: Path, kind: str) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config[hf.INPUT_KIND_KEY] = kind
    write_atomic(path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
