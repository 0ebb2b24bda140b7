"""prune: one-shot magnitude pruning of a Hugging Face encoder or a zoo model.

Masks (unstructured, N:M, block) zero weights in place: the model keeps its shape, and the win is
size after compression unless a sparse kernel runs it (ONNX Runtime's CPU provider has none for these
patterns: the report says so). Structured pruning removes heads and FFN neurons: a smaller dense model.
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
from compress.tasks import TASKS
from compress.training import distill_hf, supervised
from compress.training.loop import StepHooks
from compress.training.settings import DistillSettings, TrainingSettings

SPEED_NOTE = {
    "unstructured": "size only: ONNX Runtime's CPU kernels are dense, zeros cost the same time",
    "nm": "size only: ONNX Runtime's CPU provider has no N:M sparse kernel",
    "block": "size only: ONNX Runtime's CPU provider has no block-sparse MatMul",
    "structured": "speed and size: heads and neurons are removed, the graph is smaller",
}


def run(artifact: Artifact, cfg: PruneStage, ctx: Context) -> tuple[Artifact, dict[str, Any]]:
    model = _load(artifact)
    before = {name: p.numel() for name, p in model.named_parameters()}
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
    ctx.log(
        f"pruned: {metrics['sparsity_total']:.1%} of {params:,} parameters zero; "
        f"zip {zipped / 1e6:.1f} MB ({SPEED_NOTE[cfg.method]})"
    )
    return Artifact(artifact.kind, {"model": out}, {**artifact.meta, "pruning": cfg.method}), metrics


def _load(artifact: Artifact) -> nn.Module:
    if artifact.kind == "hf":
        return hf.load_model(artifact.file("model"))
    if artifact.kind == "zoo":
        return load_zoo(artifact.file("model"))
    raise UserError(f"stages: prune works on a PyTorch model, not on a {artifact.kind} artifact")


def _selected(model: nn.Module, cfg: PruneStage) -> dict[str, tuple[nn.Linear, float]]:
    """Linear layers to prune with their target sparsity; a target pattern matching nothing is an error."""
    linears = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(re.search(p, name) for p in cfg.exclude)
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
    model.save_pretrained(out, safe_serialization=True)  # type: ignore[operator]
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
    """Refit the pruned encoder's output projections to the original's states on calibration text.

    Every 10th text (of at least 20) is held out of the fit: the embeddings of the refitted model, and of
    the plain magnitude-pruned one for comparison, are scored against the original's on them."""
    rec = cfg.reconstruct
    assert rec is not None
    if artifact.kind != "hf":
        raise UserError("stages: prune.reconstruct works on Hugging Face BERT-family encoders, not on zoo models")
    folder = artifact.file("model")
    source = ctx.calibration if rec.data == "calibration" else ctx.texts("train")
    texts = list(source.texts[: rec.texts])
    held = texts[9::10] if len(texts) >= 20 else []
    fit = [t for i, t in enumerate(texts) if not (held and i % 10 == 9)]
    tokenizer = hf.load_tokenizer(folder)
    names = hf.input_names(tokenizer, hf.read_config(folder))
    batches = _token_batches(tokenizer, fit, names, ctx)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    ctx.log(
        f"reconstruction: {len(fit)} texts of data.{rec.data} ({tokens:,} tokens, {len(held)} more held out), "
        f"ridge {rec.ridge}" + (", heads and neurons chosen by least error" if keep else "")
    )
    original = _load(artifact)
    baseline = None
    if held and keep:  # what magnitude ranking alone gives, for the report (select: magnitude: the model itself)
        baseline = _load(artifact)
        prune_bert(baseline, cfg.heads, cfg.ffn, 1 if cfg.norm == "l1" else 2)
    held_batches = _token_batches(tokenizer, held, names, ctx)
    before = _held_out_cosine(original, baseline or model, held_batches, ctx)
    layers = reconstruct_bert(original, model, batches, rec.ridge, keep)
    for row in layers:
        a, f = row["attention_output"], row["ffn_output"]
        ctx.log(
            f"  layer {row['layer']}: attention output error {a['error_before']:.3f} -> {a['error_after']:.3f}, "
            f"FFN output {f['error_before']:.3f} -> {f['error_after']:.3f}"
        )
    after = _held_out_cosine(original, model, held_batches, ctx)
    if held:
        ctx.log(f"held-out cosine to the original: magnitude pruning alone {before:.4f}, reconstructed {after:.4f}")
    return {
        "data": rec.data,
        "texts": len(fit),
        "held_out_texts": len(held),
        "tokens": tokens,
        "ridge": rec.ridge,
        "select": rec.select,
        "held_out_cosine_magnitude_only": before,
        "held_out_cosine": after,
        "layers": layers,
    }


def _token_batches(tokenizer: Any, texts: list[str], names: tuple[str, ...], ctx: Context) -> list[dict[str, Any]]:
    data = ctx.data
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together: less padding
    batches = []
    for start in range(0, len(order), data.batch_size):
        ids = hf.encode(tokenizer, [texts[i] for i in order[start : start + data.batch_size]], data.max_length, names)
        batches.append({k: torch.from_numpy(v) for k, v in ids.items()})
    return batches


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
    task = ctx.task
    n_train = len(ctx.labeled("train").texts if task == "classification" else ctx.texts("train").texts)
    steps = -(-n_train // rec.batch_size)
    if rec.max_steps_per_epoch:
        steps = min(steps, rec.max_steps_per_epoch)
    ramp_steps = cfg.ramp() * steps if cfg.schedule == "gradual" else 0
    targets = {name: s for name, (_, s) in selected.items()}

    def make(weights: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
        return _masks_for(weights, targets, cfg, fraction)

    if artifact.kind == "hf" and not rec.distill:
        raise UserError("stages: prune.recovery: the embedding task has no labels: recovery needs distill: true")
    root: Any
    if not rec.distill:
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
    if rec.distill:
        distill_cfg = DistillSettings(teacher=rec.teacher, losses=rec.losses, **settings)
        done, metrics = distill_hf.distill(begin, distill_cfg, ctx, hooks)
    else:
        done, metrics = supervised.train(begin, TrainingSettings(**settings), ctx, hooks)
    return _load(done), metrics
