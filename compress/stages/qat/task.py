"""qat of a Hugging Face classifier (of texts or text pairs) or tagger: the model with its head is trained
with int8 fake quantization, taught by its fp32 self (soft targets at a temperature) and the labels (a
tagger's at each word's first sub-token); the epoch kept is the best on the task metric of data.evaluation.
After export, the int8 graph is scored against the fp32 one on data.evaluation: task metric and agreement.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from compress.artifact import Artifact
from compress.context import Context
from compress.errors import UserError
from compress.models import hf
from compress.runtime import feeds, presets
from compress.runtime.evaluation import pad_outputs, task_scoring
from compress.runtime.session import session
from compress.stages.qat.config import QatStage
from compress.stages.qat.lifecycle import Lifecycle
from compress.stages.qat.setup import Setup, dims
from compress.tasks import HEADS, MAIN_METRIC, TASKS
from compress.training import finetune_hf
from compress.training.distill_task import logit_loss
from compress.training.loop import Batch, Evaluation

EVAL_BATCH = 16


def task_setup(artifact: Artifact, cfg: QatStage, ctx: Context, preset: presets.Preset) -> Setup:
    folder = artifact.file("torch")
    task, head = TASKS[ctx.task], HEADS[ctx.task]
    tokenizer = hf.load_tokenizer(folder)
    names = list(hf.input_names(tokenizer, hf.read_config(folder)))
    teacher = task.build_module(hf.load_model(folder, head), ctx.model, tuple(names)).eval().requires_grad_(False)
    student = task.build_module(hf.load_model(folder, head), ctx.model, tuple(names))
    max_length = artifact.usable_length(ctx.data.max_length)
    labels = tuple(artifact.meta.get("labels") or ()) or hf.model_labels(folder) or ()
    ids, gold, _ = finetune_hf.encoded(ctx, "train", tokenizer, tuple(names), max_length, labels)
    w = cfg.losses_for(ctx.task)
    if not (w.kl or w.ce):
        raise UserError("qat.losses: a classifier or tagger learns from kl and/or ce")

    def loss(model: Any, batch: Batch) -> torch.Tensor:
        inputs = [batch[n] for n in names]
        logits = model(*inputs)  # (B, L), or (B, S, L) for a tagger
        target = None
        if w.kl:
            with torch.no_grad():
                target = teacher(*inputs)
        return logit_loss(logits, target, batch["labels"], w)

    examples = ctx.examples("evaluation")[: cfg.eval_samples or None]
    batches = _encoded(artifact, examples, max_length)
    scoring = task_scoring(ctx, artifact, max_length)

    def evaluate(model: Any) -> dict[str, Any]:
        out = pad_outputs([model(*(torch.from_numpy(b[n]) for n in names)).numpy() for b in batches])
        return scoring.score(out, len(examples))

    width = max(int(ids["attention_mask"][:2].sum(1).max()), 2)
    # contiguous: a strided slice makes torch.export guard on the padded width (sequence != stride)
    example = tuple(torch.from_numpy(np.ascontiguousarray(ids[n][:2, :width])) for n in names)
    checks = [batches[0], _encoded(artifact, examples[:1], max_length)[0]]
    return Setup(
        lifecycle=Lifecycle(student, example, dict.fromkeys(names, dims(("batch", "sequence"), max_length)), preset),
        names=names,
        outputs=list(task.OUTPUT_NAMES),
        train={**{n: ids[n] for n in names}, "labels": gold},
        loss=loss,
        evaluation=Evaluation(MAIN_METRIC[ctx.task], True, evaluate),
        checks=checks,
    )


def task_report(artifact: Artifact, int8: Any, settings: dict[str, Any], cfg: QatStage, ctx: Context) -> dict[str, Any]:
    """The fp32 and the int8 ONNX graphs on data.evaluation (the first eval_samples): the task metric of
    each, and how often the int8 graph predicts what the fp32 one does (per word for a tagger)."""
    length = artifact.usable_length(ctx.data.max_length)
    examples = ctx.examples("evaluation")[: cfg.eval_samples or None]
    batches = _encoded(artifact, examples, length)
    fp32 = session(artifact.file("reference"), threads=cfg.threads)
    quantized = session(int8, threads=cfg.threads, settings=settings)
    ref = pad_outputs([fp32.run(None, b)[0] for b in batches])
    got = pad_outputs([quantized.run(None, b)[0] for b in batches])
    scoring = task_scoring(ctx, artifact, length)
    int8_scores, fp32_scores = scoring.score(got, len(examples)), scoring.score(ref, len(examples))
    agreement = scoring.agree(got, ref)
    metric = scoring.metric
    ctx.log(
        f"int8 {metric} {int8_scores[metric]:.4f} (fp32 {fp32_scores[metric]:.4f}), {agreement['metric']} "
        f"{agreement['value']:.4f} on {len(examples)} examples of {scoring.data_name}"
    )
    return {
        "metric": metric,
        "examples": len(examples),
        "int8": int8_scores,
        "fp32": fp32_scores,
        "drop": fp32_scores[metric] - int8_scores[metric],
        "agreement": agreement,
    }


def _encoded(artifact: Artifact, examples: list[Any], max_length: int) -> list[dict[str, np.ndarray]]:
    """The examples as the ONNX graph takes them (the artifact's tokenizer and input kind), in batches."""
    encode = feeds.encoder(artifact)
    return [encode(examples[i : i + EVAL_BATCH], max_length, None) for i in range(0, len(examples), EVAL_BATCH)]
