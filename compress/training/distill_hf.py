"""Distillation of Hugging Face embedding encoders (classifiers and taggers: distill_task.py; zoo classifiers
and LMs: distill_zoo.py), for the distill stage and prune's recovery: the original model teaches the
compressed one.

The teacher (the recipe's input model, or `teacher:`) is frozen in eval mode; its embeddings of the
training texts are computed once and reused every epoch. The student is the current artifact, or a
copy of it with layers dropped. Training reuses the train stage's loop (checkpoints, resume, early
stopping on Lee Spearman).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from compress.artifact import Artifact
from compress.context import Context
from compress.errors import UserError
from compress.models import hf
from compress.tasks import TASKS
from compress.training import distill_task, distill_zoo
from compress.training.feeds import bucketed
from compress.training.loop import Batch, Evaluation, Persistence, StepHooks, fit
from compress.training.losses import (
    attention_kl,
    check_map,
    drop_layers,
    embedding_cosine,
    held_out_count,
    held_out_rows,
    hidden_mse,
    hidden_relative,
    uniform_map,
)
from compress.training.settings import DistillSettings


def distill(
    artifact: Artifact, cfg: DistillSettings, ctx: Context, hooks: StepHooks | None = None
) -> tuple[Artifact, dict[str, Any]]:
    """Train the student (the artifact, or a layer-dropped copy of it) from the teacher; hf or zoo."""
    if artifact.kind == "zoo":
        if cfg.select == "fidelity":
            raise UserError("distill: select: fidelity is for embedding models; zoo students are kept by task metric")

        return distill_zoo.distill(artifact, cfg, ctx, hooks)
    if artifact.kind != "hf":
        raise UserError(f"stages: distill works on PyTorch models, not on a {artifact.kind} artifact")
    if ctx.task != "embedding":  # a classifier or a tagger: logits and labels, the head kept
        return distill_task.distill(artifact, cfg, ctx, hooks)
    torch.manual_seed(cfg.seed)
    teacher_folder, tokenizer, names, teacher, student, layer_map = _teacher_and_student(artifact, cfg, ctx)
    spec, task = ctx.model, TASKS["embedding"]
    n_student, n_teacher = len(student.encoder.encoder.layer), len(teacher.encoder.encoder.layer)

    texts, held_out = _split_for_selection(list(ctx.texts("train").texts), cfg)
    ids, cached = _encoded(teacher, tokenizer, texts, ctx, names)  # the teacher is frozen: reused every epoch
    held_ids, held_teacher = _encoded(teacher, tokenizer, held_out, ctx, names) if held_out else (None, None)
    lengths = ids["attention_mask"].sum(1)

    def batches(order: np.ndarray) -> Iterator[Batch]:
        for rows in bucketed(order, lengths, cfg.batch_size, seed=cfg.seed):
            yield {**_tensors(ids, rows), "rows": torch.from_numpy(rows)}

    def loss_fn(model: Any, batch: Batch) -> torch.Tensor:
        return _loss(model, teacher, batch, cached, cfg=cfg, layer_map=layer_map)

    data = ctx.evaluation
    eval_ids, eval_teacher = _encoded(teacher, tokenizer, list(data.texts), ctx, names)

    def evaluate(model: Any) -> dict[str, Any]:
        emb = _embed(model, eval_ids, len(data.texts))
        scores = task.score(emb.numpy(), data)
        # How close the student is to the teacher on the evaluation texts: reported every epoch, never selected on.
        scores["evaluation_cosine"] = float(torch.nn.functional.cosine_similarity(emb, eval_teacher).mean())
        if held_ids is not None and held_teacher is not None:
            student_emb = _embed(model, held_ids, len(held_out))
            scores["fidelity"] = float(torch.nn.functional.cosine_similarity(student_emb, held_teacher).mean())
        return scores

    persistence = Persistence(
        save=lambda m, folder: hf.save_model(m.encoder, folder),
        load=lambda folder: task.build_module(hf.load_model(folder), spec, names),
    )
    best, state = fit(
        student,
        cfg,
        batches=batches,
        n_train=len(texts),
        evaluation=Evaluation("fidelity" if held_out else "spearman", higher_is_better=True, run=evaluate),
        work=ctx.work_dir,
        ctx=ctx,
        loss_fn=loss_fn,
        persistence=persistence,
        hooks=hooks,
    )
    out = ctx.out_dir / "model"
    hf.save_model(best.encoder, out)
    hf.copy_tokenizer_files(artifact.file("model"), out)
    metrics = {
        "teacher": str(teacher_folder),
        "student_layers": n_student,
        "teacher_layers": n_teacher,
        "layer_map": list(layer_map),
        "parameters": sum(p.numel() for p in best.parameters()),
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "epochs_run": state.epoch,
        "best_epoch": state.best_epoch,
        "best_spearman": next(h["spearman"] for h in state.history if h["epoch"] == state.best_epoch),
        "select": cfg.select,
        "best_fidelity": state.best_metric if held_out else None,
        "history": state.history,
        "train_texts": len(texts),
        "held_out_texts": len(held_out),
    }
    return Artifact("hf", {"model": out}, {**artifact.meta, "distilled_from": str(teacher_folder)}), metrics


def _teacher_and_student(artifact: Artifact, cfg: DistillSettings, ctx: Context) -> tuple[Any, ...]:
    """(teacher folder, tokenizer, input names, frozen teacher, student, layer map), checked to fit together."""
    if cfg.teacher is None and ctx.source is None:
        raise UserError("distill: no teacher: name one with teacher:")
    teacher_folder = cfg.teacher or ctx.source.file("model")  # type: ignore[union-attr]
    spec, task = ctx.model, TASKS["embedding"]
    tokenizer = hf.load_tokenizer(artifact.file("model"))
    teacher_tok = hf.load_tokenizer(teacher_folder)
    if teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"distill: teacher {teacher_folder} and student use different vocabularies")
    names = hf.input_names(tokenizer, hf.read_config(artifact.file("model")))
    teacher: Any = task.build_module(hf.load_model(teacher_folder), spec, names).requires_grad_(False)
    encoder: Any = hf.load_model(artifact.file("model"))
    keep = cfg.kept_layers(len(encoder.encoder.layer))
    if keep is not None:
        encoder = drop_layers(encoder, keep)
        ctx.log(f"student: layers {list(keep)} of {len(teacher.encoder.encoder.layer)}")
    student = task.build_module(encoder, spec, names)
    n_student, n_teacher = len(encoder.encoder.layer), len(teacher.encoder.encoder.layer)
    layer_map = cfg.layer_map or uniform_map(n_student, n_teacher)
    check_map(layer_map, n_student, n_teacher)
    _check_widths(cfg, encoder.config.hidden_size, teacher.encoder.config.hidden_size)
    return teacher_folder, tokenizer, names, teacher, student, layer_map


def _split_for_selection(texts: list[str], cfg: DistillSettings) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): select fidelity holds a seeded 10% (at least 16) out of training."""
    if cfg.select != "fidelity":
        return texts, []
    n_held = held_out_count(len(texts))
    if len(texts) - n_held < 2 * n_held:
        raise UserError(
            f"distill: select: fidelity holds out {n_held} of the {len(texts)} training texts; "
            f"data.train needs at least {3 * n_held}"
        )
    kept, held = held_out_rows(len(texts), cfg.seed)
    return [texts[i] for i in kept], [texts[i] for i in held]


def _encoded(
    teacher: Any, tokenizer: Any, texts: list[str], ctx: Context, names: Any
) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """The texts encoded for the student, and the teacher's embeddings of them (computed once)."""
    ids = hf.encode(tokenizer, texts, ctx.data.max_length, names)
    return ids, _embed(teacher, ids, len(texts))


@torch.no_grad()
def _embed(model: Any, ids: dict[str, np.ndarray], n: int) -> torch.Tensor:
    """The model's embeddings of n encoded texts, in batches of 32, without gradients."""
    return torch.cat([model(**_tensors(ids, np.arange(i, min(i + 32, n)))) for i in range(0, n, 32)])


def _check_widths(cfg: DistillSettings, student: int, teacher: int) -> None:
    if cfg.losses_for("embedding").hidden_relative and student != teacher:
        raise UserError(f"distill: hidden_relative needs student and teacher of one width, not {student} and {teacher}")


def _tensors(ids: dict[str, np.ndarray], rows: np.ndarray | None) -> dict[str, torch.Tensor]:
    picked = {k: (v[rows] if rows is not None else v) for k, v in ids.items()}
    width = max(int(picked["attention_mask"].sum(1).max()), 1)
    return {k: torch.from_numpy(np.ascontiguousarray(v[:, :width])) for k, v in picked.items()}


def _loss(
    student: Any, teacher: Any, batch: Batch, cached: torch.Tensor, *, cfg: DistillSettings, layer_map: tuple[int, ...]
) -> torch.Tensor:
    w = cfg.losses_for("embedding")
    inputs = {k: v for k, v in batch.items() if k != "rows"}
    target = cached[batch["rows"]]
    deep = w.hidden_mse > 0 or w.hidden_relative > 0 or w.attention > 0
    if not deep:
        emb = student(**inputs)
        return w.embedding_cosine * embedding_cosine(emb, target) + w.embedding_mse * ((emb - target) ** 2).mean()
    mask = inputs["attention_mask"]
    s_out = student.encoder(**inputs, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        t_out = teacher.encoder(**inputs, output_hidden_states=True, output_attentions=True)
    emb = student.pool(s_out.last_hidden_state, mask)
    loss = w.embedding_cosine * embedding_cosine(emb, target) + w.embedding_mse * ((emb - target) ** 2).mean()
    for i, j in enumerate(layer_map):
        if w.hidden_mse:
            loss = loss + w.hidden_mse * hidden_mse(s_out.hidden_states[i + 1], t_out.hidden_states[j + 1], mask)
        if w.hidden_relative:
            s_h, t_h = s_out.hidden_states[i + 1], t_out.hidden_states[j + 1]
            loss = loss + w.hidden_relative * hidden_relative(s_h, t_h, mask) / len(layer_map)
        if w.attention:
            s_att, t_att = s_out.attentions[i], t_out.attentions[j]
            if s_att.shape != t_att.shape:
                raise UserError("distill: attention transfer needs the same number of heads in student and teacher")
            loss = loss + w.attention * attention_kl(s_att, t_att, mask)
    return loss
