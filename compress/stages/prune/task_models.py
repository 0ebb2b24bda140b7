"""What pruning a Hugging Face classifier or tagger needs besides the encoder's surgery: the head is kept
out of every mask, the task metric is measured before and after, and a refit is judged by how often the
pruned model still predicts what the original did."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.artifact import usable_length
from compress.context import Context
from compress.models import hf
from compress.models.structure import encoder_of
from compress.tasks import MAIN_METRIC, TASKS
from compress.training import finetune_hf


def head_modules(model: nn.Module) -> set[str]:
    """Names of the modules of a task head (e.g. `classifier`): everything outside the encoder. Empty for
    a bare encoder or a zoo model. Masks never touch these, whatever prune.exclude says."""
    base = encoder_of(model)
    if base is model:
        return set()
    prefix = str(getattr(model, "base_model_prefix", ""))
    return {n for n, _ in model.named_modules() if n and n != prefix and not n.startswith(prefix + ".")}


def evaluator(ctx: Context, folder: Path) -> Callable[[nn.Module], dict[str, Any]]:
    """The task metric (accuracy, macro-F1; per word for a tagger) of a PyTorch model on data.evaluation,
    its labels matched to the head of the model in `folder` by name."""
    tokenizer = hf.load_tokenizer(folder)
    config = hf.read_config(folder)
    names = hf.input_names(tokenizer, config)
    max_length = usable_length(ctx.data.max_length, config.get("max_position_embeddings"))
    labels = hf.model_labels(folder) or ()
    run = finetune_hf.task_evaluation(ctx, tokenizer, names, max_length, labels).run

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, Any]:
        return run(model.eval())

    return evaluate


def report_task(before: dict[str, Any], after: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """The evaluation figures of the original and the pruned model, for metrics.json, and a log line."""
    metric = MAIN_METRIC[ctx.task]
    ctx.log(f"{metric} on data.evaluation: {before[metric]:.4f} before pruning, {after[metric]:.4f} after")
    return {"metric": metric, "before": before[metric], "after": after[metric], "scores": after}


@torch.no_grad()
def held_out_agreement(
    original: nn.Module, pruned: nn.Module, batches: list[dict[str, Any]], ctx: Context
) -> float | None:
    """The share of held-out predictions (per example; per real token for a tagger) the pruned model
    makes as the original does."""
    if not batches:
        return None
    task = TASKS[ctx.task]
    names = tuple(batches[0])
    a, b = task.build_module(original, ctx.model, names), task.build_module(pruned, ctx.model, names)
    same, total = 0, 0
    for batch in batches:
        x, y = a(**batch).argmax(-1), b(**batch).argmax(-1)  # (B,) or (B, S)
        hits = x == y
        if hits.ndim == 2:
            hits = hits[batch["attention_mask"].bool()]
        same, total = same + int(hits.sum()), total + hits.numel()
    return same / max(total, 1)
