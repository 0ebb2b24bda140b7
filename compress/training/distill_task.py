"""Distillation of Hugging Face task models (a classifier of texts or text pairs, a word tagger), for the
distill stage and prune's recovery: the fine-tuned model teaches the compressed one.

The teacher (`teacher:`, default the recipe's input model) is frozen with its head. The student is the
current artifact (e.g. after structured pruning) or a copy of it with layers dropped, its head copied
whole. Each step adds soft-target KL at a temperature (Hinton et al. 2015), cross-entropy on the labels
and hidden-state MSE at mapped layers (TinyBERT, Jiao et al. 2020); a tagger's KL and cross-entropy
count each word's first sub-token only, where its label is read (as the train stage learns it). The
teacher runs beside the student on each batch: a tagger's per-token logits over a training set are too
large to keep. With cross-entropy alone (prune's recovery on the labels) no teacher is loaded. The loop
is the train stage's (checkpoints, resume, early stopping); the epoch kept is the one with the best task
metric on data.evaluation (accuracy; per word for a tagger).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from compress.artifact import Artifact, usable_length
from compress.context import Context
from compress.errors import UserError
from compress.models import hf
from compress.models.structure import encoder_of
from compress.tasks import HEADS
from compress.training import finetune_hf
from compress.training.feeds import bucketed
from compress.training.loop import Batch, Persistence, StepHooks, fit
from compress.training.losses import check_map, drop_layers, hidden_mse, hidden_relative, soft_kl, uniform_map
from compress.training.settings import DistillLosses, DistillSettings


def distill(
    artifact: Artifact, cfg: DistillSettings, ctx: Context, hooks: StepHooks | None = None
) -> tuple[Artifact, dict[str, Any]]:
    """Train the student (the artifact's classifier or tagger, or a layer-dropped copy) from the teacher."""
    if cfg.select != "task":
        raise UserError("distill: select: fidelity is for embedding models; task models are kept by task metric")
    torch.manual_seed(cfg.seed)
    folder, head = artifact.file("model"), HEADS[ctx.task]
    assert head is not None
    w = cfg.losses_for(ctx.task)
    labels = hf.model_labels(folder)
    if labels is None:
        raise UserError(f"distill: {folder} has no {head}-classification head (no id2label in config.json)")
    teacher_folder, teacher = _teacher(cfg, ctx, folder, head, labels) if w.reads_teacher() else (None, None)
    student, layer_map = _student(cfg, ctx, hf.load_model(folder, head), teacher, w)

    tokenizer = hf.load_tokenizer(folder)
    config = hf.read_config(folder)
    names = hf.input_names(tokenizer, config)
    max_length = usable_length(ctx.data.max_length, config.get("max_position_embeddings"))
    ids, gold, _ = finetune_hf.encoded(ctx, "train", tokenizer, names, max_length, labels)
    if ctx.data.transfer:
        ids, gold = _with_transfer(ctx, tokenizer, (ids, gold), names, max_length)
    evaluation = finetune_hf.task_evaluation(ctx, tokenizer, names, max_length, labels, limit=cfg.eval_samples)
    lengths = ids["attention_mask"].sum(1)
    with torch.no_grad():
        taught = evaluation.run(teacher)[evaluation.name] if teacher is not None else None
    ctx.log(
        f"training a {depth(student)}-layer {head} model on {len(gold)} examples ({ctx.input_kind}), "
        + (f"taught by {teacher_folder} ({evaluation.name} {taught:.4f})" if teacher is not None else "labels only")
    )

    def batches(order: np.ndarray) -> Iterator[Batch]:
        for rows in bucketed(order, lengths, cfg.batch_size, seed=cfg.seed):
            yield finetune_hf.task_batch(ids, gold, rows, int(lengths[rows].max()))

    def loss_fn(model: Any, batch: Batch) -> torch.Tensor:
        return task_loss(model, teacher, batch, w, layer_map)

    persistence = Persistence(
        save=hf.save_model,
        load=lambda path: hf.load_model(path, head),
    )
    best, state = fit(
        student,
        cfg,
        batches=batches,
        n_train=len(gold),
        evaluation=evaluation,
        work=ctx.work_dir,
        ctx=ctx,
        loss_fn=loss_fn,
        persistence=persistence,
        hooks=hooks,
    )
    metrics: dict[str, Any] = {
        **state.summary(evaluation.name),
        "teacher": str(teacher_folder) if teacher_folder is not None else None,
        f"teacher_{evaluation.name}": taught,
        "student_layers": depth(best),
        "teacher_layers": depth(teacher) if teacher is not None else None,
        "layer_map": list(layer_map),
        "losses": w.model_dump(),
        "labels": list(labels),
        "input_kind": ctx.input_kind,
        "parameters": sum(p.numel() for p in best.parameters()),
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()) if teacher is not None else None,
        "train_examples": len(gold) - len(ctx.transfer_examples) if ctx.data.transfer else len(gold),
        "transfer_examples": len(ctx.transfer_examples) if ctx.data.transfer else 0,
    }
    if ctx.data.test is not None:
        with torch.no_grad():
            test = finetune_hf.task_evaluation(ctx, tokenizer, names, max_length, labels, role="test")
            metrics["test"] = test.run(best)
    out = ctx.out_dir / "model"
    hf.save_model(best, out)  # the encoder and its head, id2label included
    hf.copy_tokenizer_files(folder, out)
    meta = {**artifact.meta, **({"distilled_from": str(teacher_folder)} if teacher_folder is not None else {})}
    return Artifact("hf", {"model": out}, meta), metrics


def _with_transfer(
    ctx: Context, tokenizer: Any, labelled: tuple[dict[str, np.ndarray], np.ndarray], names: tuple[str, ...], width: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """data.train followed by data.transfer's examples, labelled UNLABELED (a tagger: at each word's first
    sub-token), every array padded to one width."""
    ids, gold = labelled
    examples = ctx.transfer_examples
    more = hf.encode(tokenizer, examples, width, names, kind=ctx.input_kind)
    extra: np.ndarray
    if gold.ndim == 2:  # a tagger: the teacher's soft targets at each word's first sub-token
        extra = np.full(more["input_ids"].shape, finetune_hf.IGNORE, dtype=np.int64)
        for i, first in enumerate(hf.word_starts(tokenizer, examples, width)):
            extra[i, [p for p in first if p >= 0]] = finetune_hf.UNLABELED
    else:
        extra = np.full(len(examples), finetune_hf.UNLABELED, dtype=np.int64)
    span = max(ids["input_ids"].shape[1], more["input_ids"].shape[1])
    pad = tokenizer.pad_token_id or 0

    def padded(array: np.ndarray, value: int) -> np.ndarray:
        return np.pad(array, ((0, 0), (0, span - array.shape[1])), constant_values=value)

    fill = {name: pad if name == "input_ids" else 0 for name in ids}  # masks and token types pad with 0
    joined = {name: np.concatenate([padded(ids[name], fill[name]), padded(more[name], fill[name])]) for name in ids}
    if gold.ndim == 2:
        gold, extra = padded(gold, finetune_hf.IGNORE), padded(extra, finetune_hf.IGNORE)
    ctx.log(f"distill: {len(examples)} unlabelled examples of data.transfer besides {len(gold)} of data.train")
    return joined, np.concatenate([gold, extra])


def depth(model: Any) -> int:
    """Transformer layers of a Hugging Face model, with or without a head."""
    return len(encoder_of(model).encoder.layer)


def _teacher(cfg: DistillSettings, ctx: Context, folder: Path, head: str, labels: tuple[str, ...]) -> tuple[Path, Any]:
    """(teacher folder, frozen teacher with its head), checked to fit the student: one vocabulary and the
    same labels in the same order (the KL compares the outputs one by one)."""
    if cfg.teacher is None and ctx.source is None:
        raise UserError("distill: no teacher: name one with teacher:")
    teacher_folder = cfg.teacher or ctx.source.file("model")  # type: ignore[union-attr]
    if hf.load_tokenizer(teacher_folder).get_vocab() != hf.load_tokenizer(folder).get_vocab():
        raise UserError(f"distill: teacher {teacher_folder} and student use different vocabularies")
    teacher_labels = hf.model_labels(teacher_folder)
    if teacher_labels != labels:
        raise UserError(
            f"distill: teacher {teacher_folder} predicts labels {list(teacher_labels or ())[:8]}, the student "
            f"{list(labels)[:8]}: the soft targets need one head with the same labels in the same order"
        )
    return teacher_folder, hf.load_model(teacher_folder, head).eval().requires_grad_(False)


def _student(
    cfg: DistillSettings, ctx: Context, model: Any, teacher: Any, w: DistillLosses
) -> tuple[Any, tuple[int, ...]]:
    """The student (the model, or a copy with layers dropped: head included) and its layer map to the teacher."""
    keep = cfg.kept_layers(depth(model))
    if keep is not None:
        ctx.log(f"student: layers {list(keep)} of {depth(model)}, head copied")
        model = drop_layers(model, keep)
    if teacher is None:
        return model, ()
    layer_map = cfg.layer_map or uniform_map(depth(model), depth(teacher))
    check_map(layer_map, depth(model), depth(teacher))
    _check_widths(w, model.config.hidden_size, teacher.config.hidden_size)
    return model, layer_map


def _check_widths(w: DistillLosses, student: int, teacher: int) -> None:
    if (w.hidden_mse or w.hidden_relative) and student != teacher:
        raise UserError(
            f"distill: hidden_mse and hidden_relative need student and teacher of one width, not {student} and "
            f"{teacher} (layer dropping and structured pruning keep the width)"
        )


def task_loss(student: Any, teacher: Any, batch: Batch, w: DistillLosses, layer_map: tuple[int, ...]) -> torch.Tensor:
    """kl · KL_T(teacher || student) + ce · CE(labels) + hidden losses at mapped layers, for one batch of
    Hugging Face models with a head."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    deep = bool(w.hidden_mse or w.hidden_relative)
    s_out = student(**inputs, output_hidden_states=deep)
    t_out = None
    if w.kl or deep:
        with torch.no_grad():
            t_out = teacher(**inputs, output_hidden_states=deep)
    loss = logit_loss(s_out.logits, t_out.logits if t_out is not None else None, batch["labels"], w)
    if deep:
        assert t_out is not None
        mask = inputs["attention_mask"]
        for i, j in enumerate(layer_map):
            s_h, t_h = s_out.hidden_states[i + 1], t_out.hidden_states[j + 1]  # (B, S, D)
            if w.hidden_mse:
                loss = loss + w.hidden_mse * hidden_mse(s_h, t_h, mask)
            if w.hidden_relative:
                loss = loss + w.hidden_relative * hidden_relative(s_h, t_h, mask) / len(layer_map)
    return loss


def logit_loss(
    logits: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor, w: DistillLosses
) -> torch.Tensor:
    """kl · KL_T(teacher || student) + ce · CE(labels) of a classifier's or a tagger's logits.

    A sequence classifier's logits are (B, L) with (B,) labels; a tagger's are (B, S, L) with (B, S') labels
    (S' >= S: cut to S), IGNORE off each word's first sub-token: both losses then run over the (N, L)
    logits of those tokens. A label UNLABELED (data.transfer) counts in the KL, not in the cross-entropy.
    `teacher` (the teacher's logits, same shape) is needed for kl only."""
    if labels.ndim == 2:  # a tagger: the words' first sub-tokens only
        labels = labels[:, : logits.shape[1]]
        at = labels != finetune_hf.IGNORE  # (B, S)
        logits, labels = logits[at], labels[at]  # (N, L), (N,)
        teacher = teacher[at] if teacher is not None else None
    loss = logits.sum() * 0.0  # zero, on the graph (a batch without labelled words adds nothing)
    if not len(labels):
        return loss
    if w.kl:
        assert teacher is not None
        loss = loss + w.kl * soft_kl(logits, teacher, w.temperature)
    known = labels >= 0  # data.transfer's examples (UNLABELED) learn from the teacher alone
    if w.ce and bool(known.any()):
        loss = loss + w.ce * F.cross_entropy(logits[known], labels[known])
    return loss
