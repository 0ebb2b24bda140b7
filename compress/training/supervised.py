"""Task training of zoo models (the train stage; prune's recovery with the task loss).

Fit a zoo model (new or from a checkpoint) on data.train, scored on data.evaluation each epoch.

Classification optimises accuracy; language modelling minimises bits per token (bits per byte with
the byte tokenizer). The best epoch's model is the stage's artifact; data.test, when given, is
scored once on it at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from compress.artifact import Artifact, usable_length
from compress.context import Context
from compress.errors import UserError
from compress.models.config import ZOO_FORMAT, ZOO_VERSION, ZooConfig
from compress.models.encoder import ZooCausalLM, build_model
from compress.models.zoo import ZooModel, load_zoo, save_zoo
from compress.training import feeds, finetune_hf
from compress.training.loop import Batch, StepHooks, fit
from compress.training.settings import TrainingSettings


def train(
    artifact: Artifact, cfg: TrainingSettings, ctx: Context, hooks: StepHooks | None = None
) -> tuple[Artifact, dict[str, Any]]:
    torch.manual_seed(cfg.seed)
    if artifact.kind == "new":
        model: ZooModel = build_model(
            ZooConfig.from_dict({"format": ZOO_FORMAT, "version": ZOO_VERSION, **artifact.meta["architecture"]})
        )
    elif artifact.kind == "zoo":
        model = load_zoo(artifact.file("model"))
    elif artifact.kind == "hf":
        return finetune_hf.finetune(artifact, cfg, ctx)
    else:
        raise UserError(f"stages: train works on zoo models, not on a {artifact.kind} artifact")
    tok = feeds.tokenizer(ctx)
    if tok.vocab_size > model.cfg.vocab_size:
        raise UserError(
            f"model: vocab_size {model.cfg.vocab_size} is smaller than the {ctx.data.tokenizer} "
            f"tokenizer's {tok.vocab_size}"
        )
    max_length = usable_length(ctx.data.max_length, model.cfg.max_len)
    lm = isinstance(model, ZooCausalLM)
    train_ids, train_labels = feeds.encode(ctx, "train", tok, max_length, lm=lm)
    eval_ids, eval_labels = feeds.encode(ctx, "evaluation", tok, max_length, lm=lm, limit=cfg.eval_samples)
    ctx.log(f"training on {len(train_ids['input_ids'])} texts, evaluating on {len(eval_ids['input_ids'])}")

    lengths = train_ids["attention_mask"].sum(1)

    def batches(order: np.ndarray) -> Iterator[Batch]:
        for rows in feeds.bucketed(order, lengths, cfg.batch_size, seed=cfg.seed):
            yield feeds.batch(train_ids, train_labels, rows)

    scoring = feeds.evaluation(lm, eval_ids, eval_labels, ctx.data.batch_size)
    work = ctx.work_dir
    best, state = fit(
        model,
        cfg,
        batches=batches,
        n_train=len(train_ids["input_ids"]),
        evaluation=scoring,
        work=work,
        ctx=ctx,
        hooks=hooks,
    )

    metrics: dict[str, Any] = {
        **state.summary(scoring.name),
        "parameters": sum(p.numel() for p in best.parameters()),
        "tokenizer": ctx.data.tokenizer,
        "max_length": max_length,
    }
    if ctx.data.test is not None:
        test_ids, test_labels = feeds.encode(ctx, "test", tok, max_length, lm=lm)
        with torch.no_grad():
            metrics["test"] = feeds.evaluation(lm, test_ids, test_labels, ctx.data.batch_size).run(best)
    out = ctx.out_dir / "model"
    save_zoo(best, out)
    return Artifact("zoo", {"model": out}, {"precision": "fp32", "tokenizer": ctx.data.tokenizer}), metrics
