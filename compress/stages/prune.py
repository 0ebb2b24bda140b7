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
from compress.models.zoo import load_zoo, save_zoo
from compress.pruning import masks
from compress.pruning.structured import prune_bert
from compress.stage_configs import PruneStage

SPEED_NOTE = {
    "unstructured": "size only: ONNX Runtime's CPU kernels are dense, zeros cost the same time",
    "nm": "size only: ONNX Runtime's CPU provider has no N:M sparse kernel",
    "block": "size only: ONNX Runtime's CPU provider has no block-sparse MatMul",
    "structured": "speed and size: heads and neurons are removed, the graph is smaller",
}


def run(artifact: Artifact, cfg: PruneStage, ctx: Context) -> tuple[Artifact, dict[str, Any]]:
    model = _load(artifact)
    before = {name: p.numel() for name, p in model.named_parameters()}
    if cfg.method == "structured":
        if artifact.kind != "hf":
            raise UserError("stages: structured pruning of zoo models is not available yet; use a mask method")
        try:
            structure = prune_bert(model, cfg.heads, cfg.ffn, 1 if cfg.norm == "l1" else 2)
        except ValueError as exc:
            raise UserError(f"stages: prune: {exc}") from None
        ctx.log(f"structured pruning: heads per layer {structure['heads']}, FFN {structure['intermediate']}")
        layers = _layer_report(model, _selected(model, cfg))
    else:
        selected = _selected(model, cfg)
        _apply_masks(selected, cfg)
        layers = _layer_report(model, selected)
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
    }
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
    sparsity = {name: s for name, (_, s) in selected.items()}
    if cfg.method == "unstructured" and cfg.scope == "global":
        weights = {name: module.weight for name, (module, _) in selected.items()}
        sparsity = masks.global_thresholds(weights, cfg.sparsity, cfg.min_sparsity, cfg.max_sparsity)
    for name, (module, _) in selected.items():
        w = module.weight
        try:
            if cfg.method == "nm":
                mask = masks.n_of_m(w, cfg.n, cfg.m)
            elif cfg.method == "block":
                mask = masks.blocks(w, cfg.block, sparsity[name])
            else:
                mask = masks.unstructured(w, sparsity[name])
        except ValueError as exc:
            raise UserError(f"stages: prune: {name}: {exc}") from None
        w.mul_(mask)


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
