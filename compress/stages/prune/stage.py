"""prune: one-shot magnitude pruning of a Hugging Face encoder (bare, or with a task head) or a zoo model.

Masks (unstructured, N:M, block) zero weights in place: the model keeps its shape, and the win is
size after compression unless a sparse kernel runs it (ONNX Runtime's CPU provider has none for these
patterns: the report says so). Structured pruning removes heads and FFN neurons: a smaller dense model.
A classifier's or tagger's head is loaded with its encoder, never pruned or masked, and saved with it.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.artifact import Artifact
from compress.context import Context
from compress.errors import UserError
from compress.models import hf
from compress.models.structure import record_structure
from compress.models.zoo import load_zoo, save_zoo
from compress.stages.prune import masks
from compress.stages.prune.config import PruneStage
from compress.stages.prune.gradual import MaskKeeper
from compress.stages.prune.reconstruct import reconstruct_bert
from compress.stages.prune.structured import kept_counts, prune_bert, prune_zoo
from compress.stages.prune.task_models import evaluator, head_modules, held_out_agreement, report_task
from compress.tasks import HEADS, TASKS
from compress.training import distill_hf, supervised
from compress.training.loop import StepHooks
from compress.training.settings import DistillLosses, DistillSettings, TrainingSettings

SPEED_NOTE = {
    "unstructured": "size only: ONNX Runtime's CPU kernels are dense, zeros cost the same time",
    "nm": "size only: ONNX Runtime's CPU provider has no N:M sparse kernel",
    "block": "size only: ONNX Runtime's CPU provider has no block-sparse MatMul",
    "structured": "speed and size: heads and neurons are removed, the graph is smaller",
}


def run(artifact: Artifact, cfg: PruneStage, ctx: Context) -> tuple[Artifact, dict[str, Any]]:
    model = _load(artifact, ctx)
    before = {name: p.numel() for name, p in model.named_parameters()}
    evaluate = evaluator(ctx, artifact.file("model")) if _has_head(artifact, ctx) else None
    task_before = evaluate(model) if evaluate is not None else None
    by_error = cfg.reconstruct is not None and cfg.reconstruct.select == "error"
    keep: list[tuple[int, int]] = []
    structure: dict[str, Any] = {}
    if cfg.method == "structured":
        p = 1 if cfg.norm == "l1" else 2
        try:
            if artifact.kind == "zoo":
                model, structure = prune_zoo(model, cfg.heads, cfg.ffn, p)
            elif by_error:
                keep = kept_counts(model, cfg.heads, cfg.ffn)
            else:
                structure = prune_bert(model, cfg.heads, cfg.ffn, p)
        except ValueError as exc:
            raise UserError(f"stages: prune: {exc}") from None
    reconstruction = None
    if cfg.reconstruct is not None:
        reconstruction = _reconstruct(model, artifact, cfg, ctx, keep if by_error else None)
        structure = record_structure(model)
    if cfg.method == "structured":
        how = "least reconstruction error" if by_error else f"{cfg.norm} weight norm"
        ctx.log(f"structured pruning ({how}): heads per layer {structure['heads']}, FFN {structure['intermediate']}")
    selected = _selected(model, cfg)
    if cfg.method != "structured" and cfg.schedule == "one_shot":
        _apply_masks(selected, cfg)
    recovery: dict[str, Any] | None = None
    if cfg.recovery is not None:  # masks only: structured recovery is a distill stage (checked in the recipe)
        model, recovery = _recover(model, artifact, cfg, ctx, selected)
    layers = _layer_report(model, selected)  # by name: recovery returns a new model object
    task_after = evaluate(model) if evaluate is not None else None
    out = ctx.out_dir / "model"
    _save(model, artifact, out)
    weights = out / "model.safetensors"
    params = sum(p.numel() for p in model.parameters())
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    zipped = _zipped_size(weights)
    metrics: dict[str, Any] = {
        "method": cfg.method,
        "layers": layers,
        "parameters_before": sum(before.values()),
        "parameters": params,
        "zeros": zeros,
        "sparsity_total": zeros / params,
        "dense_size_bytes": weights.stat().st_size,
        "compressed_size_bytes": zipped,
        "speed": SPEED_NOTE[cfg.method],
        "schedule": cfg.schedule,
    }
    if recovery is not None:
        metrics["recovery"] = recovery
    if reconstruction is not None:
        metrics["reconstruction"] = reconstruction
    if task_before is not None and task_after is not None:
        metrics["task"] = report_task(task_before, task_after, ctx)
    ctx.log(
        f"pruned: {metrics['sparsity_total']:.1%} of {params:,} parameters zero; "
        f"zip {zipped / 1e6:.1f} MB ({SPEED_NOTE[cfg.method]})"
    )
    return Artifact(artifact.kind, {"model": out}, {**artifact.meta, "pruning": cfg.method}), metrics


def _has_head(artifact: Artifact, ctx: Context) -> bool:
    """A Hugging Face classifier or tagger (its head is loaded, kept and saved with the encoder)."""
    return artifact.kind == "hf" and HEADS[ctx.task] is not None


def _load(artifact: Artifact, ctx: Context) -> nn.Module:
    if artifact.kind == "hf":
        return hf.load_model(artifact.file("model"), HEADS[ctx.task])
    if artifact.kind == "zoo":
        return load_zoo(artifact.file("model"))
    raise UserError(f"stages: prune works on a PyTorch model, not on a {artifact.kind} artifact")


def _selected(model: nn.Module, cfg: PruneStage) -> dict[str, tuple[nn.Linear, float]]:
    """Linear layers to prune with their target sparsity (never a task head's); a target pattern matching
    nothing is an error."""
    head = head_modules(model)
    linears = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name not in head and not any(re.search(p, name) for p in cfg.exclude)
    }
    if not linears:
        raise UserError("stages: prune: every Linear layer is excluded; nothing to prune")
    if not cfg.targets:
        return {name: (module, cfg.sparsity) for name, module in linears.items()}
    chosen: dict[str, tuple[nn.Linear, float]] = {}
    for target in cfg.targets:
        hits = [n for n in linears if re.search(target.pattern, n) and n not in chosen]
        if not hits:
            raise UserError(f"stages: prune.targets: {target.pattern!r} matches no Linear layer of the model")
        chosen.update({n: (linears[n], target.sparsity) for n in hits})
    return chosen


@torch.no_grad()
def _apply_masks(selected: dict[str, tuple[nn.Linear, float]], cfg: PruneStage) -> None:
    weights = {name: module.weight for name, (module, _) in selected.items()}
    targets = {name: s for name, (_, s) in selected.items()}
    for name, mask in _masks_for(weights, targets, cfg, 1.0).items():
        weights[name].mul_(mask)


def _masks_for(
    weights: dict[str, torch.Tensor], targets: dict[str, float], cfg: PruneStage, fraction: float
) -> dict[str, torch.Tensor]:
    """Magnitude masks at `fraction` of each layer's target sparsity (1.0: the target itself)."""
    sparsity = {name: s * fraction for name, s in targets.items()}
    if cfg.method == "unstructured" and cfg.scope == "global":
        sparsity = masks.global_thresholds(
            weights, cfg.sparsity * fraction, cfg.min_sparsity * fraction, cfg.max_sparsity
        )
    out = {}
    for name, w in weights.items():
        try:
            if cfg.method == "nm":
                out[name] = masks.n_of_m(w, cfg.n, cfg.m)
            elif cfg.method == "block":
                out[name] = masks.blocks(w, cfg.block, sparsity[name])
            else:
                out[name] = masks.unstructured(w, sparsity[name])
        except ValueError as exc:
            raise UserError(f"stages: prune: {name}: {exc}") from None
    return out


def _layer_report(model: nn.Module, selected: dict[str, Any]) -> list[dict[str, Any]]:
    modules = dict(model.named_modules())
    rows = []
    for name in selected:
        w = modules[name].weight
        rows.append(
            {
                "name": name,
                "shape": list(w.shape),
                "parameters": w.numel(),
                "sparsity": float((w == 0).float().mean()),
            }
        )
    return rows


def _save(model: nn.Module, artifact: Artifact, out: Path) -> None:
    if artifact.kind == "zoo":
        save_zoo(model, out)  # type: ignore[arg-type]
        return
    hf.save_model(model, out)
    hf.copy_tokenizer_files(artifact.file("model"), out)


def _zipped_size(path: Path) -> int:
    """Bytes of the weights file after DEFLATE: what zeros save on disk and over the wire."""
    target = path.with_suffix(".zip.tmp")
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        zf.write(path, arcname=path.name)
    size = target.stat().st_size
    target.unlink()
    return size


def _reconstruct(
    model: nn.Module, artifact: Artifact, cfg: PruneStage, ctx: Context, keep: list[tuple[int, int]] | None
) -> dict[str, Any]:
    """Refit the pruned encoder's output projections to the original's states on calibration text (texts,
    text pairs or sentences of words: what the model reads; a head is not refitted, its inputs are).

    Every 10th example (of at least 20) is held out of the fit: the refitted model, and the plain
    magnitude-pruned one for comparison, are scored against the original on them (embeddings: mean
    cosine; classifiers and taggers: the share of predictions that agree)."""
    rec = cfg.reconstruct
    assert rec is not None
    if artifact.kind != "hf":
        raise UserError("stages: prune.reconstruct works on Hugging Face BERT-family encoders, not on zoo models")
    folder = artifact.file("model")
    source = ctx.calibration_examples if rec.data == "calibration" else ctx.examples("train")
    texts = list(source[: rec.texts])
    held = texts[9::10] if len(texts) >= 20 else []
    fit = [t for i, t in enumerate(texts) if not (held and i % 10 == 9)]
    tokenizer = hf.load_tokenizer(folder)
    names = hf.input_names(tokenizer, hf.read_config(folder))
    batches = _token_batches(tokenizer, fit, names, ctx)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    ctx.log(
        f"reconstruction: {len(fit)} examples of data.{rec.data} ({tokens:,} tokens, {len(held)} more held out), "
        f"ridge {rec.ridge}" + (", heads and neurons chosen by least error" if keep else "")
    )
    original = _load(artifact, ctx)
    baseline = None
    if held and keep:  # what magnitude ranking alone gives, for the report (select: magnitude: the model itself)
        baseline = _load(artifact, ctx)
        prune_bert(baseline, cfg.heads, cfg.ffn, 1 if cfg.norm == "l1" else 2)
    held_batches = _token_batches(tokenizer, held, names, ctx)
    measure, held_out = ("cosine", _held_out_cosine) if ctx.task == "embedding" else ("agreement", held_out_agreement)
    before = held_out(original, baseline or model, held_batches, ctx)
    layers = reconstruct_bert(original, model, batches, rec.ridge, keep)
    for row in layers:
        a, f = row["attention_output"], row["ffn_output"]
        ctx.log(
            f"  layer {row['layer']}: attention output error {a['error_before']:.3f} -> {a['error_after']:.3f}, "
            f"FFN output {f['error_before']:.3f} -> {f['error_after']:.3f}"
        )
    after = held_out(original, model, held_batches, ctx)
    if held:
        ctx.log(f"held-out {measure} to the original: magnitude pruning alone {before:.4f}, reconstructed {after:.4f}")
    return {
        "data": rec.data,
        "texts": len(fit),
        "held_out_texts": len(held),
        "tokens": tokens,
        "ridge": rec.ridge,
        "select": rec.select,
        f"held_out_{measure}_magnitude_only": before,
        f"held_out_{measure}": after,
        "layers": layers,
    }


def _token_batches(tokenizer: Any, examples: list[Any], names: tuple[str, ...], ctx: Context) -> list[dict[str, Any]]:
    data, kind = ctx.data, ctx.input_kind
    # similar lengths together: less padding (an example is a text, a pair of texts or a tuple of words)
    order = sorted(range(len(examples)), key=lambda i: len(" ".join(_parts(examples[i]))))
    batches = []
    for start in range(0, len(order), data.batch_size):
        chunk = [examples[i] for i in order[start : start + data.batch_size]]
        ids = hf.encode(tokenizer, chunk, data.max_length, names, kind=kind)
        batches.append({k: torch.from_numpy(v) for k, v in ids.items()})
    return batches


def _parts(example: Any) -> tuple[str, ...]:
    return (example,) if isinstance(example, str) else tuple(example)


@torch.no_grad()
def _held_out_cosine(
    original: nn.Module, pruned: nn.Module, batches: list[dict[str, Any]], ctx: Context
) -> float | None:
    """Mean cosine between the pruned and the original model's embeddings (as deployed) of the batches."""
    if not batches:
        return None
    spec, task = ctx.model, TASKS["embedding"]
    names = tuple(batches[0])
    a, b = task.build_module(original, spec, names), task.build_module(pruned, spec, names)
    sims = [torch.nn.functional.cosine_similarity(a(**batch), b(**batch)) for batch in batches]
    return float(torch.cat(sims).mean())


def _recover(
    model: nn.Module, artifact: Artifact, cfg: PruneStage, ctx: Context, selected: dict[str, tuple[nn.Linear, float]]
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the masked model with its masks kept (gradual: tightened along the cubic ramp)."""
    rec = cfg.recovery
    assert rec is not None
    start = ctx.work_dir / "start"  # the masked (or, gradual, unpruned) model recovery starts from
    _save(model, artifact, start)
    begin = Artifact(artifact.kind, {"model": start}, artifact.meta)
    settings = rec.model_dump(exclude={"distill", "teacher", "losses"})
    n_train = len(ctx.examples("train"))
    steps = -(-n_train // rec.batch_size)
    if rec.max_steps_per_epoch:
        steps = min(steps, rec.max_steps_per_epoch)
    ramp_steps = cfg.ramp() * steps if cfg.schedule == "gradual" else 0
    targets = {name: s for name, (_, s) in selected.items()}

    def make(weights: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
        return _masks_for(weights, targets, cfg, fraction)

    task_model = _has_head(artifact, ctx)
    if artifact.kind == "hf" and not task_model and not rec.distill:
        raise UserError("stages: prune.recovery: the embedding task has no labels: recovery needs distill: true")
    root: Any
    if not rec.distill or task_model:  # the trained module is the model itself (a task model: with its head)
        root = lambda m: m  # noqa: E731
    elif artifact.kind == "zoo":
        root = lambda m: m.student  # noqa: E731
    else:
        root = lambda m: m.encoder  # noqa: E731
    keeper = MaskKeeper(list(selected), make, ramp_steps=ramp_steps, frequency=cfg.frequency, root=root)
    hooks = StepHooks(after_step=keeper, eligible=keeper.eligible)
    ctx.log(
        f"recovery: {rec.epochs} epochs ({steps} steps each), "
        + (f"sparsity ramp over {ramp_steps} steps, masks every {cfg.frequency}" if ramp_steps else "masks kept")
    )
    if rec.distill or task_model:
        # A task model learns from its labels alone as a distillation with cross-entropy only: no teacher
        # is read, the head is kept.
        losses = rec.losses if rec.distill else DistillLosses(ce=1.0)
        distill_cfg = DistillSettings(teacher=rec.teacher, losses=losses, **settings)
        done, metrics = distill_hf.distill(begin, distill_cfg, ctx, hooks)
    else:
        done, metrics = supervised.train(begin, TrainingSettings(**settings), ctx, hooks)
    return _load(done, ctx), metrics
