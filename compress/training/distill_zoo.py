"""distill for zoo models (classification and lm): the teacher's soft targets teach the student.

The teacher (`teacher:` or the recipe's input model) is frozen in eval mode; for classification its
logits over the training set are computed once and reused every epoch (an LM's per-token logits are
too large to keep: they are computed per batch). The student is the current artifact (e.g. after
structured pruning), a layer-dropped copy of it (`keep_every` / `keep_layers`, flat stacks), or a
fresh smaller model (`student:` overrides of the architecture). Hidden-state MSE maps student blocks
to teacher blocks and, when widths differ, learns a projection per mapped layer (TinyBERT); the
projections are trained with the student, checkpointed beside it for resume, and not exported.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compress.artifact import Artifact, usable_length
from compress.context import Context
from compress.errors import UserError
from compress.models.blocks import Block
from compress.models.config import ZooConfig
from compress.models.encoder import ZooCausalLM, build_model
from compress.models.zoo import ZooModel, load_zoo, save_zoo
from compress.training import feeds
from compress.training.loop import Batch, Evaluation, Persistence, StepHooks, fit
from compress.training.losses import check_map, hidden_mse, soft_kl, uniform_map
from compress.training.settings import DistillLosses, DistillSettings

PROJECTIONS = "distill_projections.safetensors"


class Pupil(nn.Module):
    """The student plus the hidden-state projections that exist only while distilling."""

    def __init__(self, student: ZooModel, projections: nn.ModuleList) -> None:
        super().__init__()
        self.student = student
        self.projections = projections


def distill(
    artifact: Artifact, cfg: DistillSettings, ctx: Context, hooks: StepHooks | None = None
) -> tuple[Artifact, dict[str, Any]]:
    torch.manual_seed(cfg.seed)
    teacher_folder = _teacher_folder(cfg, ctx)
    teacher = load_zoo(teacher_folder).requires_grad_(False).eval()
    student = _student(load_zoo(artifact.file("model")), cfg)
    _check_pair(teacher.cfg, student.cfg)
    lm = isinstance(student, ZooCausalLM)
    w = cfg.losses_for(ctx.task)
    t_blocks, s_blocks = _blocks(teacher), _blocks(student)
    layer_map = cfg.layer_map or uniform_map(len(s_blocks), len(t_blocks))
    check_map(layer_map, len(s_blocks), len(t_blocks))
    pupil = Pupil(student, _projections(teacher, student, w, layer_map))

    tok = feeds.tokenizer(ctx)
    max_length = usable_length(ctx.data.max_length, student.cfg.max_len, teacher.cfg.max_len)
    train_ids, train_labels = feeds.encode(ctx, "train", tok, max_length, lm=lm)
    eval_ids, eval_labels = feeds.encode(ctx, "evaluation", tok, max_length, lm=lm, limit=cfg.eval_samples)
    n_train = len(train_ids["input_ids"])
    size = ctx.data.batch_size
    cached = None
    if not lm and w.kl:
        ctx.log(f"teacher logits for {n_train} training texts (computed once, reused every epoch)")
        with torch.no_grad():
            rows = np.arange(n_train)
            cached = torch.cat(
                [teacher(**feeds.batch(train_ids, None, rows[i : i + size])) for i in range(0, n_train, size)]
            )
    lengths = train_ids["attention_mask"].sum(1)

    def batches(order: np.ndarray) -> Iterator[Batch]:
        for rows in feeds.bucketed(order, lengths, cfg.batch_size, seed=cfg.seed):
            yield {**feeds.batch(train_ids, train_labels, rows), "rows": torch.from_numpy(rows)}

    def loss_fn(model: Pupil, batch: Batch) -> torch.Tensor:
        return _loss(model, teacher, batch, cached, w=w, layer_map=layer_map, lm=lm)

    ev = feeds.evaluation(lm, eval_ids, eval_labels, size)
    evaluation = Evaluation(ev.name, ev.higher_is_better, run=lambda p: ev.run(p.student))
    persistence = Persistence(save=_save_pupil, load=_load_pupil)
    best, state = fit(
        pupil,
        cfg,
        batches=batches,
        n_train=n_train,
        evaluation=evaluation,
        work=ctx.work_dir,
        ctx=ctx,
        loss_fn=loss_fn,
        persistence=persistence,
        hooks=hooks,
    )
    final: ZooModel = best.student.eval()
    metrics: dict[str, Any] = {
        "teacher": str(teacher_folder),
        "student": _describe(final.cfg),
        "teacher_architecture": _describe(teacher.cfg),
        "layer_map": list(layer_map),
        "losses": w.model_dump(),
        "parameters": sum(p.numel() for p in final.parameters()),
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "epochs_run": state.epoch,
        "best_epoch": state.best_epoch,
        f"best_{ev.name}": state.best_metric,
        "history": state.history,
        "train_texts": n_train,
    }
    if ctx.data.test is not None:
        test_ids, test_labels = feeds.encode(ctx, "test", tok, max_length, lm=lm)
        test = feeds.evaluation(lm, test_ids, test_labels, size)
        with torch.no_grad():
            metrics["test"] = test.run(final)
            metrics["teacher_test"] = test.run(teacher)
        key = "accuracy" if not lm else "bits_per_token"
        ctx.log(f"test {key}: student {metrics['test'][key]:.4f}, teacher {metrics['teacher_test'][key]:.4f}")
    out = ctx.out_dir / "model"
    save_zoo(final, out)
    return Artifact("zoo", {"model": out}, {**artifact.meta, "distilled_from": str(teacher_folder)}), metrics


def _projections(teacher: ZooModel, student: ZooModel, w: DistillLosses, layer_map: tuple[int, ...]) -> nn.ModuleList:
    """Learned projections from the student's hidden width to the teacher's, one per mapped layer (hidden_mse)."""
    if w.hidden_relative:
        raise UserError("distill.losses.hidden_relative is for Hugging Face models; zoo models use hidden_mse")
    if w.hidden_mse and (teacher.cfg.reversible or student.cfg.reversible):
        raise UserError("distill.losses.hidden_mse: reversible stacks do not expose per-block hidden states")
    return nn.ModuleList(
        nn.Identity()
        if student.cfg.d_model == teacher.cfg.d_model
        else nn.Linear(student.cfg.d_model, teacher.cfg.d_model)
        for _ in (layer_map if w.hidden_mse else ())
    )


def _teacher_folder(cfg: DistillSettings, ctx: Context) -> Path:
    if cfg.teacher is not None:
        return cfg.teacher
    if ctx.source is None or ctx.source.kind != "zoo":
        raise UserError("distill: no teacher: the recipe's model is not a trained zoo model; name one with teacher:")
    return ctx.source.file("model")


def _student(current: ZooModel, cfg: DistillSettings) -> ZooModel:
    if cfg.student is not None:
        raw = current.cfg.to_dict()
        if "n_heads" in cfg.student or "d_model" in cfg.student:
            raw["attention_head_dim"] = None  # a pruned model's head width does not carry over to a new shape
        try:
            small = ZooConfig.from_dict({**raw, **cfg.student})
        except (TypeError, ValueError) as exc:
            raise UserError(f"distill.student: {exc}") from None
        return build_model(small).train()
    keep = cfg.keep_layers
    if cfg.keep_every is not None:
        depth = current.cfg.n_layers
        keep = tuple(range(depth - 1, -1, -cfg.keep_every))[::-1]
    if keep is None:
        return current.requires_grad_(True)
    if current.cfg.hourglass is not None:
        raise UserError("distill: layer dropping works on flat stacks; for an Hourglass model use student:")
    depth = current.cfg.n_layers
    bad = [i for i in keep if not 0 <= i < depth]
    if bad or not keep:
        raise UserError(f"distill: cannot keep layers {list(keep)} of a {depth}-layer model")
    dropped = copy.deepcopy(current).requires_grad_(True)
    blocks: Any = dropped.backbone.body.blocks
    dropped.backbone.body.blocks = nn.ModuleList(blocks[i] for i in keep)
    dropped.cfg = dataclasses.replace(current.cfg, n_layers=len(keep))
    dropped.backbone.cfg = dropped.cfg
    return dropped


def _check_pair(teacher: ZooConfig, student: ZooConfig) -> None:
    if teacher.task != student.task:
        raise UserError(f"distill: teacher is a {teacher.task} model, student a {student.task} model")
    if teacher.vocab_size != student.vocab_size:
        raise UserError(
            f"distill: teacher vocabulary ({teacher.vocab_size}) and student vocabulary ({student.vocab_size}) "
            "differ: they must share a tokenizer"
        )
    if teacher.task == "classification" and teacher.num_labels != student.num_labels:
        raise UserError(f"distill: teacher has {teacher.num_labels} labels, student {student.num_labels}")


def _blocks(model: nn.Module) -> list[Block]:
    return [m for m in model.modules() if isinstance(m, Block)]


def _describe(cfg: ZooConfig) -> dict[str, Any]:
    keys = ("d_model", "n_heads", "n_layers", "d_ff")
    return {**{k: getattr(cfg, k) for k in keys}, "head_dim": cfg.head_dim, "attention": cfg.attention.kind}


def _hidden(model: nn.Module, run: Any) -> tuple[Any, list[torch.Tensor]]:
    """Run `run()` while collecting every block's output, in execution order."""
    states: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: states.append(out)) for b in _blocks(model)]
    try:
        return run(), states
    finally:
        for h in hooks:
            h.remove()


def _loss(
    pupil: Pupil,
    teacher: ZooModel,
    batch: Batch,
    cached: torch.Tensor | None,
    *,
    w: DistillLosses,
    layer_map: tuple[int, ...],
    lm: bool,
) -> torch.Tensor:
    student = pupil.student
    ids, mask = batch["input_ids"], batch["attention_mask"]
    need_teacher = w.hidden_mse or (w.kl and (lm or cached is None))
    t_states: list[torch.Tensor] = []
    t_logits = None
    if need_teacher:
        with torch.no_grad():
            t_logits, t_states = _hidden(teacher, lambda: teacher(ids, mask))
    s_logits, s_states = _hidden(student, lambda: student(ids, mask))
    loss = s_logits.new_zeros(())
    if w.kl:
        if lm:
            real = mask[:, 1:].bool()  # positions that predict a real next byte
            assert t_logits is not None
            loss = loss + w.kl * soft_kl(s_logits[:, :-1][real], t_logits[:, :-1][real], w.temperature)
        else:
            target = cached[batch["rows"]] if cached is not None else t_logits
            assert target is not None
            loss = loss + w.kl * soft_kl(s_logits, target, w.temperature)
    if w.ce:
        if lm:
            target_ids = ids[:, 1:].masked_fill(~mask[:, 1:].bool(), -100)
            flat = s_logits[:, :-1].reshape(-1, s_logits.shape[-1])
            loss = loss + w.ce * F.cross_entropy(flat, target_ids.reshape(-1), ignore_index=-100)
        else:
            loss = loss + w.ce * F.cross_entropy(s_logits, batch["labels"])
    if w.hidden_mse:
        for proj, (i, j) in zip(pupil.projections, enumerate(layer_map), strict=True):
            s, t = proj(s_states[i]), t_states[j]
            if s.shape[1] != t.shape[1]:
                raise UserError(
                    f"distill.layer_map: student block {i} sees {s.shape[1]} positions, teacher block {j} "
                    f"{t.shape[1]} (an Hourglass shortens inner blocks): map blocks of the same length"
                )
            loss = loss + w.hidden_mse * hidden_mse(s, t, _mask_for(mask, s.shape[1]))
    return loss


def _mask_for(mask: torch.Tensor, length: int) -> torch.Tensor:
    """The key mask at a block's length: block-sparse models pad the sequence to whole blocks."""
    if length >= mask.shape[1]:
        return F.pad(mask, (0, length - mask.shape[1]), value=0)
    return torch.ones(mask.shape[0], length, dtype=mask.dtype)


def _save_pupil(pupil: Pupil, folder: Path) -> None:
    from safetensors.torch import save_file

    save_zoo(pupil.student, folder)
    tensors = {k: v.detach().contiguous() for k, v in pupil.projections.state_dict().items()}
    save_file(tensors, str(folder / PROJECTIONS), metadata={"format": "pt", "layers": str(len(pupil.projections))})


def _load_pupil(folder: Path) -> Pupil:
    from safetensors import safe_open
    from safetensors.torch import load_file

    student = load_zoo(folder)
    with safe_open(str(folder / PROJECTIONS), framework="pt") as f:
        n = int((f.metadata() or {}).get("layers", "0"))
    state = load_file(str(folder / PROJECTIONS))
    projections = nn.ModuleList(
        nn.Linear(state[f"{i}.weight"].shape[1], state[f"{i}.weight"].shape[0])
        if f"{i}.weight" in state
        else nn.Identity()
        for i in range(n)
    )
    projections.load_state_dict(state, strict=True)
    return Pupil(student, projections)
