"""A compressed MiniLM (the student) against the original (the teacher), side by side in one run.

Used by benchmarks/distill.py and benchmarks/pruning.py. Runs recipes/minilm-int8.yaml (the teacher's
fused fp32 and int8) and the student's recipe, reusing finished stages; then times teacher fp32, student
fp32, teacher int8 and student int8 interleaved in one loop (batch 1, 128 tokens, 2 threads, threads
spinning during runs only), scores each on Lee and measures each one's cosine to the teacher's fp32 embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


Target = tuple[str, str, float]  # (name, metric key, threshold): met when the measured value >= threshold


def compare(student_recipe: str, title: str, result: str, targets: list[Target], command: str = "") -> None:
    parser = argparse.ArgumentParser(description=title)
    parser.add_argument("--runs", type=int, default=300, help="timed runs per variant")
    args = parser.parse_args()
    os.chdir(ROOT)

    from compress.artifact import Artifact
    from compress.data import load_evaluation
    from compress.data.cache import write_atomic
    from compress.models import hf
    from compress.pipeline import run
    from compress.recipe import load_recipe
    from compress.runtime.latency import interleaved
    from compress.runtime.session import session
    from compress.tasks import embedding
    from compress.tasks.metrics import cosine_fidelity

    files: dict[str, tuple[Path, dict[str, Any]]] = {}
    for recipe_path, who in (("recipes/minilm-int8.yaml", "teacher"), (student_recipe, "student")):
        recipe = load_recipe(recipe_path)
        run_dir = run(recipe)
        stages = {s.type: run_dir / f"{i:02d}_{s.type}" for i, s in enumerate(recipe.stages, 1)}
        fp32 = Artifact.from_json((stages["export"] / "artifact.json").read_text(), run_dir)
        int8 = Artifact.from_json((stages["quantize"] / "artifact.json").read_text(), run_dir)
        files[f"{who} fp32"] = (fp32.file("model"), {})
        files[f"{who} int8"] = (int8.file("model"), int8.meta.get("session", {}))
        tok_dir = fp32.file("tokenizer")
    recipe = load_recipe("recipes/minilm-int8.yaml")
    tokenizer = hf.load_tokenizer(tok_dir)
    names = ("input_ids", "attention_mask", "token_type_ids")
    lee = load_evaluation(recipe.data.evaluation)
    sessions = {k: session(path, 2, settings, idle_spinning=False) for k, (path, settings) in files.items()}
    timing = hf.encode(tokenizer, lee.texts[:1], 128, names, pad_to=128)
    scores, embeddings = {}, {}
    for key, sess in sessions.items():
        embeddings[key] = np.concatenate(
            [sess.run(None, hf.encode(tokenizer, lee.texts[i : i + 16], 256, names))[0] for i in range(0, 50, 16)]
        )
        scores[key] = embedding.score(embeddings[key], lee)
    fidelity = {k: cosine_fidelity(e, embeddings["teacher fp32"]) for k, e in embeddings.items()}
    lat = interleaved({k: _call(s, timing) for k, s in sessions.items()}, warmup=10, runs=args.runs)
    base = lat["teacher fp32"]["p50"]
    rows = [
        f"# Benchmark: {title}",
        "",
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; student recipe `{student_recipe}`; "
        f"command: `.venv/bin/python {command or ' '.join(sys.argv)}`",
        f"- ONNX Runtime, batch 1, 128 tokens, 2 threads, spinning during runs only; {args.runs} interleaved runs "
        "each; "
        "Lee (50 documents, 1225 rated pairs) at max_length 256.",
        "",
        "| model | median ms | x vs teacher fp32 | size MB | cosine to teacher fp32 (mean / min) "
        "| Lee Spearman [95% CI] |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, (path, _) in files.items():
        s = scores[key]
        lo, hi = s["spearman_ci95"]
        rows.append(
            f"| {key} | {lat[key]['p50']:.2f} | {base / lat[key]['p50']:.2f}x | {path.stat().st_size / 1e6:.1f} | "
            f"{fidelity[key]['cosine_mean']:.4f} / {fidelity[key]['cosine_min']:.4f} | "
            f"{s['spearman']:.4f} [{lo:.3f}, {hi:.3f}] |"
        )
    measured = {
        "speedup_fp32": base / lat["student fp32"]["p50"],
        "spearman": scores["student fp32"]["spearman"],
        "spearman_gap": scores["student fp32"]["spearman"] - scores["teacher fp32"]["spearman"],
        "cosine": fidelity["student fp32"]["cosine_mean"],
    }
    rows.append("")
    for name, key, threshold in targets:
        ok = measured[key] >= threshold
        rows.append(f"- **{'met' if ok else 'NOT met'}**: {name} (measured {measured[key]:.4f})")
    rows.append("")
    text = "\n".join(rows)
    write_atomic(ROOT / "benchmarks" / "results" / result, text.encode())
    print(text)
    print(json.dumps({"written": f"benchmarks/results/{result}"}), file=sys.stderr)


def _call(sess: Any, feeds: dict[str, np.ndarray]) -> Any:
    return lambda: sess.run(None, feeds)
