"""qat: quantization-aware training of the exported model, then int8 QDQ ONNX that ONNX Runtime runs as int8.

Follows export: the export artifact names the PyTorch model it came from. That model is traced
(torch.export, our attention ops as single nodes), prepared with int8 fake quantization for the
target preset, trained by the fp32 model itself (the distillation losses: cosine of embeddings, or
soft targets plus labels), converted and exported with the dynamo exporter. The stage fails unless
ONNX Runtime's outputs match the converted PyTorch model's and its optimized graph runs int8 kernels.

The epoch kept is the one closest to the fp32 model (embeddings: mean cosine on a seeded 10% of
data.train held out of training) or the most accurate on data.evaluation (classification; Hugging Face
classifiers and taggers keep their head: qat/task.py, which also scores the int8 graph on the task).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from compress.artifact import Artifact, usable_length
from compress.context import Context
from compress.errors import StageFailed, UserError
from compress.models import hf
from compress.models.spec import HFModel, PackageModel
from compress.models.zoo import load_zoo
from compress.runtime import presets
from compress.runtime.fidelity import QDQ_SESSION, quick_fidelity
from compress.runtime.kernels import count_kernels
from compress.runtime.session import session
from compress.stages.qat.config import QatStage
from compress.stages.qat.lifecycle import Lifecycle, QatModel
from compress.stages.qat.setup import Setup, dims
from compress.stages.qat.task import task_report, task_setup
from compress.tasks import TASKS
from compress.tasks.metrics import cosine_fidelity
from compress.training import feeds
from compress.training.loop import Batch, Evaluation, Persistence, fit
from compress.training.losses import embedding_cosine, held_out_count, held_out_rows, soft_kl
from exporters.onnx_export import rename_shadowed_values
from exporters.ops import attach_functions, register_schemas
from exporters.ops.torch_ops import exportable, translation_table

WEIGHTS = "qat_model.safetensors"


def run(artifact: Artifact, cfg: QatStage, ctx: Context) -> tuple[Artifact, dict[str, Any]]:
    if artifact.kind != "onnx" or "torch" not in artifact.files or artifact.meta.get("precision") != "fp32":
        raise UserError("stages: qat follows export (it trains the PyTorch model the fp32 ONNX came from)")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    preset, chosen_by = presets.choose(cfg.preset, ctx.targets)
    ctx.log(f"qat for preset {preset.name} ({chosen_by})")
    setup = _setup(artifact, cfg, ctx, preset)
    life = setup.lifecycle
    state = _train(life, setup, cfg, ctx)
    out = ctx.out_dir / "model.onnx"
    diff, cosine, kernels = _export_checked(life, setup, out, cfg, ctx)
    fidelity = quick_fidelity(artifact, out, QDQ_SESSION, ctx)
    shutil.copytree(artifact.file("tokenizer"), ctx.out_dir / "tokenizer")
    (ctx.out_dir / "session.json").write_text(json.dumps(QDQ_SESSION, indent=2, sort_keys=True) + "\n")
    metrics = {
        "preset": {"name": preset.name, "chosen_by": chosen_by, "why": preset.why},
        "selection": setup.evaluation.name,
        "epochs_run": state.epoch,
        "best_epoch": state.best_epoch,
        "best": state.best_metric,
        "history": state.history,
        "ort_vs_torch_max_abs_diff": diff,
        "ort_vs_torch_cosine_min": cosine,
        "kernels": kernels,
        "size_bytes": out.stat().st_size,
        "fp32_size_bytes": artifact.file("model").stat().st_size,
        "size_ratio": out.stat().st_size / artifact.file("model").stat().st_size,
        "fidelity_check": fidelity,
    }
    if _task_model(ctx):
        metrics["task"] = task_report(artifact, out, QDQ_SESSION, cfg, ctx)
    meta = {
        **artifact.meta,
        "precision": "int8",
        "session": QDQ_SESSION,
        "preset": preset.name,
        "int8_types": preset.settings(),
    }
    files = {k: v for k, v in artifact.files.items() if k != "torch"}
    files.update(model=out, tokenizer=ctx.out_dir / "tokenizer")
    return Artifact("onnx", files, meta), metrics


def _task_model(ctx: Context) -> bool:
    """A Hugging Face classifier or tagger (zoo models are classifiers too, with their own setup)."""
    return ctx.task != "embedding" and isinstance(ctx.model, HFModel | PackageModel)


def _setup(artifact: Artifact, cfg: QatStage, ctx: Context, preset: presets.Preset) -> Setup:
    if (ctx.task == "embedding" or _task_model(ctx)) and artifact.meta.get("custom_ops"):
        # An HF model whose export holds our attention ops (Longformer, ModernBERT): QAT traces the
        # transformers model itself, which would come out dense. Refused, not silently made dense.
        raise UserError(
            "stages: qat: this Hugging Face model's attention exports as our ops (Longformer, ModernBERT), "
            "which quantization-aware training does not keep yet; use a quantize stage"
        )
    if ctx.task == "embedding":
        return _embedding(artifact, cfg, ctx, preset)
    if _task_model(ctx):
        return task_setup(artifact, cfg, ctx, preset)
    return _zoo(artifact, cfg, ctx, preset)


def _train(life: Lifecycle, setup: Any, cfg: QatStage, ctx: Context) -> Any:
    """prepare -> train with fake quantization (the training loop, resumable) -> adopt the best epoch."""
    prepared = life.prepare()
    ctx.log("prepared: int8 fake quantization on the linear layers, attention kept float")
    lengths = setup.train["attention_mask"].sum(1)

    def batches(order: np.ndarray) -> Iterator[Batch]:
        for rows in feeds.bucketed(order, lengths, cfg.batch_size, seed=cfg.seed):
            width = max(int(lengths[rows].max()), 2)
            yield {
                **{n: torch.from_numpy(setup.train[n][rows, :width]) for n in setup.names},
                **{k: torch.from_numpy(setup.train[k][rows]) for k in ("targets", "labels") if k in setup.train},
                "rows": torch.from_numpy(rows),
            }

    def save(model: QatModel, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, folder / WEIGHTS)

    def load(folder: Path) -> QatModel:
        from safetensors.torch import load_file

        model = life.fresh()
        model.load_state_dict(load_file(folder / WEIGHTS))
        return model

    best, state = fit(
        prepared,
        cfg,
        batches=batches,
        n_train=len(lengths),
        evaluation=setup.evaluation,
        work=ctx.work_dir,
        ctx=ctx,
        loss_fn=setup.loss,
        persistence=Persistence(save=save, load=load),
    )
    life.adopt(best)
    return state


def _export_checked(
    life: Lifecycle, setup: Any, out: Path, cfg: QatStage, ctx: Context
) -> tuple[float, float, dict[str, Any]]:
    """convert -> QDQ ONNX, checked against the converted PyTorch model and for int8 kernels."""
    life.convert()
    life.export(
        out, input_names=setup.names, output_names=setup.outputs, translation=setup.translation, finish=setup.finish
    )
    rename_shadowed_values(out, tuple(setup.outputs))
    diff, cosine = _ort_vs_torch(life, out, setup)
    ctx.log(f"ONNX Runtime vs the converted PyTorch model: cosine min {cosine:.6f}, max |diff| {diff:.2e}")
    if 1 - cosine > cfg.tolerance:
        raise StageFailed(
            f"qat: ONNX Runtime's outputs differ from PyTorch's: cosine {cosine:.6f} < 1 - tolerance {cfg.tolerance:g}"
        )
    kernels = count_kernels(out, QDQ_SESSION)
    if kernels["int8_total"] == 0:
        raise StageFailed(f"qat: ONNX Runtime runs the QAT model with no int8 kernel (float: {kernels['float']})")
    ctx.log(f"ONNX Runtime runs {kernels['int8_total']} int8 kernels: {kernels['int8']}")
    return diff, cosine, kernels


def _ort_vs_torch(life: Lifecycle, path: Path, setup: Setup) -> tuple[float, float]:
    """Max |difference| and the smallest row cosine of ONNX Runtime's outputs to the converted PyTorch model's.

    Both compute the same int8 arithmetic, but a value that lands on a rounding boundary can quantize
    one step apart (division vs multiplication by the scale), and such flips add up over layers: the
    check is on the cosine, the max |difference| is reported.
    """
    assert life.converted is not None
    sess = session(path, threads=2, settings=QDQ_SESSION)
    worst, cosine = 0.0, 1.0
    for inputs in setup.checks:
        got = sess.run(None, {n: inputs[n] for n in setup.names})[0]
        with torch.no_grad():
            want = life.converted(*(torch.from_numpy(inputs[n]) for n in setup.names)).numpy()
        worst = max(worst, float(np.abs(got - want).max()))
        cosine = min(cosine, cosine_fidelity(got, want)["cosine_min"])
    return worst, cosine


def _split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded 10% (at least 16) held out of n training texts, and the rest."""
    if n - held_out_count(n) < 16:
        raise UserError(f"data.train: qat needs at least 32 texts (has {n})")
    return held_out_rows(n, [seed, 7])


# ---------------------------------------------------------------------------------------- embedding
def _embedding(artifact: Artifact, cfg: QatStage, ctx: Context, preset: presets.Preset) -> Setup:
    folder = artifact.file("torch")
    task, spec = TASKS["embedding"], ctx.model
    tokenizer = hf.load_tokenizer(folder)
    names = list(hf.input_names(tokenizer, hf.read_config(folder)))
    teacher = task.build_module(hf.load_model(folder), spec, tuple(names)).eval().requires_grad_(False)
    student = task.build_module(hf.load_model(folder), spec, tuple(names))
    max_length = artifact.usable_length(ctx.data.max_length)
    texts = list(ctx.texts("train").texts)
    train_rows, held_rows = _split(len(texts), cfg.seed)
    ids = hf.encode(tokenizer, tuple(texts), max_length, tuple(names))
    with torch.no_grad():
        targets = np.concatenate(
            [teacher(*(torch.from_numpy(ids[n][i : i + 32]) for n in names)).numpy() for i in range(0, len(texts), 32)]
        )
    train = {**{n: ids[n][train_rows] for n in names}, "targets": targets[train_rows]}
    held = {n: ids[n][held_rows] for n in names}
    held_targets = torch.from_numpy(targets[held_rows])
    w = cfg.losses_for("embedding")
    if not (w.embedding_cosine or w.embedding_mse):
        raise UserError("qat.losses: the embedding task learns from embedding_cosine and/or embedding_mse")

    def loss(model: Any, batch: Batch) -> torch.Tensor:
        got = model(*(batch[n] for n in names))
        value = w.embedding_cosine * embedding_cosine(got, batch["targets"])
        if w.embedding_mse:
            value = value + w.embedding_mse * F.mse_loss(got, batch["targets"])
        return value

    def evaluate(model: Any) -> dict[str, Any]:
        got = torch.cat(
            [
                model(*(torch.from_numpy(held[n][i : i + 16, : _width(held, i)]) for n in names))
                for i in range(0, len(held_rows), 16)
            ]
        )
        return {"cosine_to_fp32": float(F.cosine_similarity(got, held_targets, dim=-1).mean())}

    batch = ("batch", "sequence")
    shape = dims(batch, max_length)
    example = tuple(torch.from_numpy(ids[n][:2]) for n in names)
    checks = [
        {n: ids[n][held_rows[:4]] for n in names},
        hf.encode(tokenizer, tuple(texts[:1]), max_length, tuple(names)),
    ]
    return Setup(
        lifecycle=Lifecycle(student, example, dict.fromkeys(names, shape), preset),
        names=names,
        outputs=list(task.OUTPUT_NAMES),
        train=train,
        loss=loss,
        evaluation=Evaluation("cosine_to_fp32", True, evaluate),
        checks=checks,
    )


def _width(ids: dict[str, np.ndarray], start: int) -> int:
    return max(int(ids["attention_mask"][start : start + 16].sum(1).max()), 2)


# ---------------------------------------------------------------------------------------------- zoo
def _zoo(artifact: Artifact, cfg: QatStage, ctx: Context, preset: presets.Preset) -> Setup:
    import onnx

    folder = artifact.file("torch")
    teacher = load_zoo(folder).eval().requires_grad_(False)
    student = load_zoo(folder)
    max_len = student.cfg.max_len
    max_length = usable_length(ctx.data.max_length, max_len)
    tokenizer = feeds.tokenizer(ctx)
    train_ids, train_labels = feeds.encode(ctx, "train", tokenizer, max_length, lm=False)
    eval_ids, eval_labels = feeds.encode(ctx, "evaluation", tokenizer, max_length, lm=False, limit=cfg.eval_samples)
    assert train_labels is not None and eval_labels is not None
    names = ["input_ids", "attention_mask"]
    # Teacher logits on first use of each text, then kept: a capped epoch (max_steps_per_epoch) never pays
    # for the texts it does not reach.
    cache = np.full((len(train_labels), student.cfg.num_labels), np.nan, dtype=np.float32)

    def teacher_logits(rows: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
        idx = rows.numpy()
        todo = np.isnan(cache[idx, 0])
        if todo.any():
            with torch.no_grad():
                cache[idx[todo]] = teacher(*(t[torch.from_numpy(todo)] for t in inputs)).numpy()
        return torch.from_numpy(cache[idx])

    w = cfg.losses_for("classification")
    if not (w.kl or w.ce):
        raise UserError("qat.losses: a classifier learns from kl and/or ce")

    def loss(model: Any, batch: Batch) -> torch.Tensor:
        inputs = [batch[n] for n in names]
        logits = model(*inputs)
        value = torch.zeros((), dtype=logits.dtype)
        if w.kl:
            value = value + w.kl * soft_kl(logits, teacher_logits(batch["rows"], inputs), w.temperature)
        if w.ce:
            value = value + w.ce * F.cross_entropy(logits, batch["labels"])
        return value

    def evaluate(model: Any) -> dict[str, Any]:
        preds = np.concatenate(
            [
                model(*(torch.from_numpy(eval_ids[n][i : i + 16, : _width(eval_ids, i)]) for n in names))
                .argmax(-1)
                .numpy()
                for i in range(0, len(eval_labels), 16)
            ]
        )
        return {"accuracy": float((preds == eval_labels).mean())}

    def finish(model: Any) -> None:
        attach_functions(model)
        onnx.checker.check_model(model, full_check=True)

    register_schemas()
    example = tuple(torch.from_numpy(eval_ids[n][:2]) for n in names)
    checks = [
        {n: eval_ids[n][:3] for n in names},
        {n: eval_ids[n][:1, : max(2, _width(eval_ids, 0) // 2)] for n in names},
    ]
    dyn = dims(("batch", "sequence"), max_len)
    return Setup(
        lifecycle=Lifecycle(student, example, dict.fromkeys(names, dyn), preset, lambda: exportable(student, max_len)),
        names=names,
        outputs=["logits"],
        train={**train_ids, "labels": train_labels},
        loss=loss,
        evaluation=Evaluation("accuracy", True, evaluate),
        checks=checks,
        translation=translation_table(),
        finish=finish,
    )
