"""Benchmark: the whole stack (structured pruning + refit + layer dropping + distillation + int8) against the
fine-tuned teacher and against what a user could do instead, on the teacher's test set, side by side.

    .venv/bin/python benchmarks/full_stack.py runs/bbc-news-full-stack [runs/bbc-news-sweep ...]
        [--baseline runs/bbc-news-layerdrop] [--speedup 5] [--max-drop 0.5] [--limit N]

SWEEPS are output folders of `edge-compress sweep` of the full stack (each sweep.json names the teacher's fp32
run and each level's run; the first one's teacher is the yardstick); --baseline another sweep's folder, e.g.
layer dropping alone + int8 (no pruning, no refit): each of its levels is set against the most accurate level
of the full stack that is at least as fast. The variants:
the teacher in PyTorch fp32, ONNX Runtime fp32 of a plain export (the yardstick of the speed-up), our fused fp32
export, quantize_dynamic with its defaults, and the int8 artifact of every level of both sweeps. Every variant
runs every test example in turn (batch 1, the example's own length up to max_length, 2 threads, the order
rotating per example); the same outputs give the accuracy. Writes benchmarks/results/full_stack_<name>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` from a checkout, run as a script
from benchmarks.tasks import (
    FUSED,
    PLAIN,
    ROOT,
    THREADS,
    TORCH,
    baseline_variants,
    header,
    log,
    on_test_split,
    ort_variant,
    run_interleaved,
    score_variants,
    shown,
)
from compress.api import load
from compress.context import Context
from compress.data.cache import write_atomic
from compress.models import hf
from compress.models.spec import HFModel, PackageModel
from compress.runtime.evaluation import task_scoring
from compress.sweep.front import final_onnx


def main() -> None:
    if "OMP_WAIT_POLICY" not in os.environ:  # PyTorch's idle threads must sleep (see benchmarks/tasks.py)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    parser = argparse.ArgumentParser(description="The whole stack against the teacher and the alternatives.")
    parser.add_argument("sweeps", type=Path, nargs="+", help="`edge-compress sweep` output folders (sweep.json)")
    parser.add_argument("--baseline", type=Path, action="append", default=[], help="another sweep's folder")
    parser.add_argument("--speedup", type=float, default=5.0, help="target: x faster than ORT fp32 plain")
    parser.add_argument("--max-drop", type=float, default=1.0, help="target: accuracy points below the teacher")
    parser.add_argument("--limit", type=int, default=None, help="the first N test examples (default: all)")
    args = parser.parse_args()
    command = shlex.join([shown(Path(sys.executable)), *sys.argv])
    os.chdir(ROOT)
    ours, bases = [_read(f) for f in args.sweeps], [_read(b) for b in args.baseline]
    sweeps = [*ours, *bases]
    import torch

    torch.set_num_threads(THREADS)
    rows, c = compare(sweeps, args.limit, Path("runs/bench-full-stack") / sweeps[0]["name"])
    name = sweeps[0]["name"]
    lines = [*header(command, None, args.limit), *render(rows, c, (ours, bases), args.speedup, args.max_drop)]
    lines[0] = f"# Benchmark: the whole stack on {name} ({c['task']}), against the teacher and the alternatives"
    out = Path(f"benchmarks/results/full_stack_{name}.md")
    write_atomic(out, "\n".join(lines).encode())
    print("\n".join(lines))
    log(f"written: {out}")


def _read(folder: Path) -> dict[str, Any]:
    path = folder / "sweep.json"
    if not path.is_file():
        sys.exit(f"{folder}: no sweep.json; run `edge-compress sweep RECIPE` first")
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def compare(
    sweeps: list[dict[str, Any]], limit: int | None, work: Path
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Every variant through every test example, interleaved; the rows of score_variants."""

    teacher_run = Path(sweeps[0]["rows"][0]["run"])
    recipe = on_test_split(load(teacher_run / "resolved_recipe.yaml"))
    if not isinstance(recipe.model, HFModel | PackageModel):
        sys.exit(f"{teacher_run}: the teacher is not a Hugging Face checkpoint")
    folder = hf.model_folder(recipe.model)
    ctx = Context(recipe=recipe, run_dir=teacher_run)
    fused = final_onnx(teacher_run, folder)
    max_length = fused.usable_length(recipe.data.max_length)
    examples = ctx.examples("evaluation")[:limit]
    feeds, variants, _ = baseline_variants(ctx, folder, examples, max_length, work)
    variants[FUSED] = ort_variant(fused.file("model"), dict(fused.meta.get("session") or {}))
    for result in sweeps:
        for row in result["rows"][1:]:
            artifact = final_onnx(Path(row["run"]), folder)
            variants[_label(result, row)] = ort_variant(
                artifact.file("model"), dict(artifact.meta.get("session") or {})
            )
    run_interleaved(variants, feeds)
    scoring = task_scoring(ctx, fused, max_length)
    lengths = [int(f["attention_mask"].sum()) for f in feeds]
    info = {"task": ctx.task, "data": scoring.data_name, "examples": len(feeds), "tokens": lengths}
    return score_variants(variants, scoring), info


def _label(result: dict[str, Any], row: dict[str, Any]) -> str:
    return f"{result['name']}: {row['label']} ({row['structure']})"


Sweeps = tuple[list[dict[str, Any]], list[dict[str, Any]]]  # (the full stack's sweeps, the baselines' sweeps)


def render(
    rows: dict[str, dict[str, Any]], c: dict[str, Any], sweeps: Sweeps, speedup: float, max_drop: float
) -> list[str]:
    plain_p50 = rows[PLAIN]["latency"]["p50"]
    ref = rows[TORCH]["task"]["accuracy"]
    params = {_label(s, r): r.get("parameters") for s in (*sweeps[0], *sweeps[1]) for r in s["rows"][1:]}
    tokens = c["tokens"]
    lines = [
        f"## {c['data']}: {c['examples']} test examples, {sum(tokens) / len(tokens):.1f} tokens on average "
        f"(longest {max(tokens)})",
        "",
        "| variant | accuracy [95% CI] | points vs teacher | equal to teacher | p50 ms | p90 ms | × vs ORT fp32 plain "
        "| size MB | parameters |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, row in rows.items():
        task, lat = row["task"], row["latency"]
        lo, hi = task["accuracy_ci95"]
        p = params.get(label)
        lines.append(
            f"| {label} | {100 * task['accuracy']:.2f} [{100 * lo:.2f}, {100 * hi:.2f}] "
            f"| {100 * (task['accuracy'] - ref):+.2f} | {100 * row['agreement']['value']:.2f}% "
            f"| {lat['p50']:.2f} | {lat['p90']:.2f} | {plain_p50 / lat['p50']:.2f}× | {row['size_bytes'] / 1e6:.1f} "
            f"| {f'{p / 1e6:.1f}M' if p else ''} |"
        )
    return [*lines, "", *targets(rows, sweeps, speedup, max_drop), ""]


def targets(rows: dict[str, dict[str, Any]], sweeps: Sweeps, speedup: float, max_drop: float) -> list[str]:
    """The issue's target per level of the full stack's sweeps, and the full stack against each baseline level."""
    plain_p50, ref = rows[PLAIN]["latency"]["p50"], rows[TORCH]["task"]["accuracy"]

    def figures(label: str) -> tuple[float, float]:
        return plain_p50 / rows[label]["latency"]["p50"], 100 * (ref - rows[label]["task"]["accuracy"])

    lines = [
        f"### Targets: ≥ {speedup:g}× faster than ORT fp32 plain, at most {max_drop:g} points below the teacher",
        "",
    ]
    ours = [_label(s, r) for s in sweeps[0] for r in s["rows"][1:]]
    for label in ours:
        x, drop = figures(label)
        ok = x >= speedup and drop <= max_drop
        lines.append(f"- **{'pass' if ok else 'MISS'}**: {label}: {x:.2f}×, {-drop:+.2f} points")
    for base in sweeps[1]:
        for row in base["rows"][1:]:
            label = _label(base, row)
            x, drop = figures(label)
            faster = [o for o in ours if figures(o)[0] >= x]
            if not faster:
                lines.append(f"- {label} ({x:.2f}×): no level of the full stack is as fast")
                continue
            best = min(faster, key=lambda o: figures(o)[1])
            better = figures(best)[1] <= drop
            lines.append(
                f"- **{'full stack ahead' if better else 'full stack BEHIND'}** at equal or higher speed: {best} "
                f"({figures(best)[0]:.2f}×, {-figures(best)[1]:+.2f} points) against {label} ({x:.2f}×, "
                f"{-drop:+.2f} points)"
            )
    return lines


if __name__ == "__main__":
    main()
