"""train: fit a zoo model (new or from a checkpoint) on data.train, scored on data.evaluation each epoch.

Classification optimises accuracy; language modelling minimises bits per token (bits per byte with
the byte tokenizer). The best epoch's model is the stage's artifact; data.test, when given, is
scored once on it at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from compress.artifact import Artifact
from compress.context import Context
from compress.data.tokenizers import Tokenizer, recipe_tokenizer
from compress.errors import UserError
from compress.models.config import ZOO_FORMAT, ZOO_VERSION, ZooConfig
from compress.models.encoder import ZooCausalLM, bits_per_token, build_model
from compress.models.zoo import ZooModel, load_zoo, save_zoo
from compress.stage_configs import TrainStage
from compress.tasks import classification
from compress.training import Batch, Evaluation, StepHooks, fit


def run(
    artifact: Artifact, cfg: TrainStage, ctx: Context, hooks: StepHooks | None = None
) -> tuple[Artifact, dict[str, Any]]:
    torch.manual_seed(cfg.seed)
    if artifact.kind == "new":
        model: ZooModel = build_model(
            ZooConfig.from_dict({"format": ZOO_FORMAT, "version": ZOO_VERSION, **artifact.meta["architecture"]})
        )
    elif artifact.kind == "zoo":
        model = load_zoo(artifact.file("model"))
    else:
        raise UserError(f"stages: train works on zoo models, not on a {artifact.kind} artifact")
    tokenizer = _tokenizer(ctx)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise UserError(
            f"model: vocab_size {model.cfg.vocab_size} is smaller than the {ctx.recipe.data.tokenizer} "
            f"tokenizer's {tokenizer.vocab_size}"
        )
    max_length = min(ctx.recipe.data.max_length, model.cfg.max_len)
    lm = isinstance(model, ZooCausalLM)
    train_ids, train_labels = _encode(ctx, "train", tokenizer, max_length, lm=lm)
    eval_ids, eval_labels = _encode(ctx, "evaluation", tokenizer, max_length, lm=lm, limit=cfg.eval_samples)
    ctx.log(f"training on {len(train_ids['input_ids'])} texts, evaluating on {len(eval_ids['input_ids'])}")

    lengths = train_ids["attention_mask"].sum(1)

    def batches(order: np.ndarray) -> Iterator[Batch]:
        for rows in bucketed(order, lengths, cfg.batch_size, seed=cfg.seed):
            yield _batch(train_ids, train_labels, rows)

    evaluation = _evaluation(lm, eval_ids, eval_labels, ctx.recipe.data.batch_size)
    work = ctx.work_dir
    best, state = fit(
        model,
        cfg,
        batches=batches,
        n_train=len(train_ids["input_ids"]),
        evaluation=evaluation,
        work=work,
        ctx=ctx,
        hooks=hooks,
    )

    metrics: dict[str, Any] = {
        "epochs_run": state.epoch,
        "best_epoch": state.best_epoch,
        f"best_{evaluation.name}": state.best_metric,
        "history": state.history,
        "steps": state.step,
        "parameters": sum(p.numel() for p in best.parameters()),
        "tokenizer": ctx.recipe.data.tokenizer,
        "max_length": max_length,
    }
    if ctx.recipe.data.test is not None:
        test_ids, test_labels = _encode(ctx, "test", tokenizer, max_length, lm=lm)
        with torch.no_grad():
            metrics["test"] = _evaluation(lm, test_ids, test_labels, ctx.recipe.data.batch_size).run(best)
    out = ctx.out_dir / "model"
    save_zoo(best, out)
    return Artifact("zoo", {"model": out}, {"precision": "fp32", "tokenizer": ctx.recipe.data.tokenizer}), metrics


def bucketed(order: np.ndarray, lengths: np.ndarray, size: int, seed: int) -> list[np.ndarray]:
    """Batches of similar length: sort each window of 32 batches' worth of rows by length, cut, shuffle.

    Emails range from a few bytes to the full window; random batches would pad most rows to the
    longest one. Windows keep the epoch's shuffle; the batch order is shuffled again (seeded).
    """
    window = size * 32
    out: list[np.ndarray] = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        out += [chunk[i : i + size] for i in range(0, len(chunk), size)]
    rng = np.random.default_rng([seed, int(order[0]) if len(order) else 0, len(order)])
    return [out[i] for i in rng.permutation(len(out))]


def _tokenizer(ctx: Context) -> Tokenizer:
    return recipe_tokenizer(ctx.recipe)


def _encode(
    ctx: Context, role: str, tok: Tokenizer, max_length: int, *, lm: bool, limit: int | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    if lm:
        texts, labels = ctx.texts(role).texts, None
    else:
        data = ctx.labeled(role)
        texts, labels = data.texts, np.asarray(data.labels, dtype=np.int64)
    if limit is not None and limit < len(texts):
        # A seeded sample, not the first rows: splits keep corpus order, which groups labels.
        keep = np.sort(np.random.default_rng(ctx.recipe.data.split_seed).permutation(len(texts))[:limit])
        texts = tuple(texts[i] for i in keep)
        labels = labels[keep] if labels is not None else None
    return tok.encode(texts, max_length), labels


def _batch(ids: dict[str, np.ndarray], labels: np.ndarray | None, rows: np.ndarray) -> Batch:
    mask = ids["attention_mask"][rows]
    width = max(int(mask.sum(1).max()), 2)  # trim the batch to its longest real text
    batch = {
        "input_ids": torch.from_numpy(ids["input_ids"][rows, :width]),
        "attention_mask": torch.from_numpy(mask[:, :width]),
    }
    if labels is not None:
        batch["labels"] = torch.from_numpy(labels[rows])
    return batch


def _evaluation(lm: bool, ids: dict[str, np.ndarray], labels: np.ndarray | None, size: int) -> Evaluation:
    rows = np.arange(len(ids["input_ids"]))
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]

    def run_lm(model: ZooModel) -> dict[str, Any]:
        total, tokens = 0.0, 0
        for chunk in chunks:
            batch = _batch(ids, None, chunk)
            n = int(batch["attention_mask"][:, 1:].sum())
            total += float(model.loss(batch)) * n
            tokens += n
        return {"bits_per_token": bits_per_token(total / max(tokens, 1)), "tokens": float(tokens)}

    def run_cls(model: ZooModel) -> dict[str, Any]:
        logits = [model(**_batch(ids, None, c)).numpy() for c in chunks]
        return classification.score(np.concatenate(logits), labels if labels is not None else np.zeros(0))

    if lm:
        return Evaluation("bits_per_token", higher_is_better=False, run=run_lm)
    return Evaluation("accuracy", higher_is_better=True, run=run_cls)
