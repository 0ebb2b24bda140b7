"""benchmarks/tasks.py (not run by `make test`: the lead runs it on a quiet machine) builds its variant table on
tiny random-init task models: a classifier and a tagger, each through its own int8 run, without Optimum."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import tasks
from compress import api
from tests.test_tasks_hf import head_model, recipe, tagged_rows, topic_rows, write

CASES = {
    "classification": ("sequence", ("money", "sport"), topic_rows(10, 1), {"label_field": "label"}),
    "token-classification": (
        "token",
        ("ADP", "CONJ", "DET", "NOUN"),
        tagged_rows(10),
        {"words_field": "words", "tags_field": "tags"},
    ),
}


@pytest.mark.parametrize("task", list(CASES))
def test_variant_table_and_targets(tmp_path: Path, tiny_bert: Path, task: str) -> None:
    head, labels, rows, fields = CASES[task]
    model = head_model(tiny_bert, tmp_path / "m", head, labels)
    data = {"evaluation": {"path": str(write(tmp_path / "ev.jsonl", rows)), **fields}}
    stages = [{"type": "export"}, {"type": "quantize", "mode": "dynamic"}]
    report = api.run(recipe(tmp_path, model, task, data, stages))

    c = tasks.compare(report.run_dir, 8, tmp_path / "bench", quantizer=None)
    assert c.examples == 8 and c.missing == {tasks.OPTIMUM: "left out (--no-optimum)"}
    assert set(c.rows) == {tasks.TORCH, tasks.PLAIN, tasks.FUSED, tasks.DYNAMIC, tasks.OURS}
    for label in (tasks.TORCH, tasks.PLAIN, tasks.FUSED):  # fp32 graphs predict what PyTorch predicts
        assert c.rows[label]["agreement"]["value"] == 1.0, label
        assert c.rows[label]["task"] == c.rows[tasks.TORCH]["task"], label
    assert c.rows[tasks.OURS]["latency"]["runs"] == 8
    assert c.rows[tasks.OURS]["kernels"]["int8_total"] > 0
    if task == "token-classification":
        assert c.rows[tasks.TORCH]["task"]["words"] == sum(len(r["words"]) for r in rows[:8])

    text = "\n".join(tasks.render(c))
    assert text.count("| ") > 6 and "left out (--no-optimum)" in text
    assert len([line for line in text.splitlines() if line.startswith(("- **pass**", "- **MISS**"))]) == 4


def test_benchmark_scores_the_test_split(tiny_bert: Path) -> None:
    base = {"name": "n", "model": {"hf": str(tiny_bert)}, "task": "classification", "stages": [{"type": "export"}]}
    on_validation = api.load(
        {**base, "data": {"evaluation": {"reference": "snli", "split": "validation", "limit": 50}}}
    )
    moved = tasks.on_test_split(on_validation).data.evaluation
    assert moved.split == "test" and moved.limit is None and moved.reference == "snli"  # the whole test set
    named = {
        "evaluation": {"reference": "bbc-news", "split": "validation"},
        "test": {"reference": "snli", "split": "test"},
    }
    assert tasks.on_test_split(api.load({**base, "data": named})).data.evaluation.reference == "snli"
