"""The sweep: one recipe at several structure levels on a tiny random-init BERT classifier, each level a run
of its own, every final artifact scored and timed beside the teacher's fp32 export, and the goal's choice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from compress.errors import UserError
from compress.models import hf
from compress.recipe import load_recipe, recipe_from_dict
from compress.sweep.levels import spaced_layers
from compress.sweep.run import summarize
from tests.test_cli import assert_user_error, cli
from tests.test_tasks_compress import _topic_data
from tests.test_tasks_hf import head_model, recipe

TOPICS = ("money", "sport")
PRUNE: dict[str, Any] = {"type": "prune", "method": "structured", "heads": 0.25, "ffn": 0.5}
DISTILL: dict[str, Any] = {"type": "distill", "epochs": 1, "batch_size": 8, "lr": 1e-3}
STAGES = [
    PRUNE,
    DISTILL,
    {"type": "export"},
    {"type": "quantize", "mode": "dynamic"},
    {"type": "validate", "runs": 10, "warmup": 1, "sequence_length": 32},
]
LEVELS = [{"heads": 0.25, "ffn": 0.5}, {"name": "small", "heads": 0.5, "ffn": 0.75, "layers": 1}]


def _sweep_recipe(tmp_path: Path, model: Path, sweep: dict[str, Any], stages: list[Any] = STAGES) -> Path:
    path = recipe(tmp_path, model, "classification", _topic_data(tmp_path), stages, name="sw")
    body = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**body, "sweep": sweep}, sort_keys=False))
    return path


def test_a_sweep_runs_each_level_measures_the_front_and_chooses(tmp_path: Path, tiny_bert: Path) -> None:
    model = head_model(tiny_bert, tmp_path / "m", "sequence", TOPICS)
    mid = {"name": "mid", "heads": 0.25, "ffn": 0.5, "layers": 1}  # level1's pruning, one layer kept
    path = _sweep_recipe(tmp_path, model, {"levels": [LEVELS[0], mid, LEVELS[1]], "goal": {"max_drop": 1.0}})
    done = cli("sweep", str(path))
    assert done.returncode == 0, done.stderr
    runs = tmp_path / "runs"
    result = json.loads((runs / "sw" / "sweep.json").read_text())
    rows = {r["label"]: r for r in result["rows"]}
    assert list(rows) == ["fp32", "level1", "mid", "small"]
    assert rows["fp32"]["drop"] == 0 and rows["fp32"]["speedup"] == 1 and rows["fp32"]["precision"] != "int8"
    for name in ("level1", "mid", "small"):
        row = rows[name]
        assert row["metric"] == "accuracy" and 0 <= row["value"] <= 1 and row["status"] == "passed"
        assert row["latency_ms"]["runs"] == 16 and row["task"]["examples"] == 16  # every evaluation example
        assert Path(row["model"]).is_file() and row["run"] == str(runs / f"sw-{name}")
    # Each level's structure: the tiny BERT has 2 layers of 4 heads and 64 FFN neurons.
    level1 = json.loads((runs / "sw-level1" / "01_prune" / "model" / "config.json").read_text())
    assert level1["edge_compress_structure"] == {"heads": [3, 3], "intermediate": [32, 32]}
    small = json.loads((runs / "sw-small" / "02_distill" / "metrics.json").read_text())
    assert small["student_layers"] == 1 and small["teacher_layers"] == 2
    assert rows["small"]["parameters"] < rows["level1"]["parameters"]
    # max_drop 1.0 admits every level: the fastest is chosen, and the command says how to package it.
    # mid's prune stage is level1's, linked (same file), and its run reused it: its fingerprint matched.
    shared = [runs / name / "01_prune" / "model" / "model.safetensors" for name in ("sw-level1", "sw-mid")]
    assert shared[0].stat().st_ino == shared[1].stat().st_ino and "mid: reusing 01_prune of" in done.stderr
    assert json.loads((runs / "sw-mid" / "report.json").read_text())["stages"][0]["reused"]
    assert not json.loads((runs / "sw-small" / "report.json").read_text())["stages"][0]["reused"]
    fastest = min(("level1", "mid", "small"), key=lambda n: rows[n]["latency_ms"]["p50"])
    assert result["chosen"] == fastest and f"edge-compress package {runs / f'sw-{fastest}'}" in result["verdict"]
    assert "| fp32 |" in done.stdout and f"{fastest} (chosen)" in done.stdout
    packaged = cli("package", str(runs / "sw"))  # a sweep's folder packages the level it chose
    assert packaged.returncode == 0 and f"packaging {runs / f'sw-{fastest}'}" in packaged.stdout, packaged.stderr
    assert (runs / f"sw-{fastest}" / "package" / "metadata.json").is_file()
    (runs / "sw" / "sweep.md").unlink()
    rendered = cli("report", str(runs / "sw"))  # re-rendered from sweep.json
    assert (
        rendered.returncode == 0 and f"{fastest} (chosen)" in rendered.stdout and (runs / "sw" / "sweep.md").is_file()
    )
    page = (runs / "sw" / "report.html").read_text()
    assert "data:image/png;base64," in page and "sw-small" in page
    # benchmarks/full_stack.py reads the sweep: every variant on the same examples, targets per level.
    from benchmarks import full_stack

    sweep_result = json.loads((runs / "sw" / "sweep.json").read_text())
    rows_b, info = full_stack.compare([sweep_result, sweep_result], None, tmp_path / "bench")
    assert info["examples"] == 16 and len(rows_b) == 7  # PyTorch, plain, fused, dynamic, 3 levels (once)
    assert all(r["latency"]["runs"] == 16 and 0 <= r["task"]["accuracy"] <= 1 for r in rows_b.values())
    lines = full_stack.render(rows_b, info, ([sweep_result], [sweep_result]), 5.0, 1.0)
    assert sum(line.startswith("- **pass**") or line.startswith("- **MISS**") for line in lines) == 3
    assert any("at equal or higher speed" in line for line in lines)
    # Every level's run resumes: a second sweep reuses each stage and measures again.
    again = cli("sweep", str(path))
    assert again.returncode == 0, again.stderr
    report = json.loads((runs / "sw-small" / "report.json").read_text())
    assert all(stage["reused"] for stage in report["stages"])


def _row(label: str, value: float, ms: float) -> dict[str, Any]:
    return {"label": label, "metric": "accuracy", "value": value, "latency_ms": {"p50": ms}, "examples": 9, "run": ""}


def test_the_goal_keeps_the_fastest_level_within_it_or_names_the_most_accurate(tmp_path: Path) -> None:
    body = {
        "name": "g",
        "model": {"hf": str(tmp_path)},
        "task": "classification",
        "data": {"train": {"reference": "bbc-news", "split": "train"}, "evaluation": {"path": "e.jsonl"}},
        "stages": [PRUNE, DISTILL, {"type": "export"}],
        "sweep": {"levels": [*LEVELS, {"heads": 0.5, "ffn": 0.9, "layers": 1}], "goal": {"max_drop": 0.01}},
    }
    parsed = recipe_from_dict(body)
    status = {"level1": "passed", "small": "passed", "level3": "passed"}
    fits = summarize(
        parsed,
        [_row("fp32", 0.90, 10), _row("level1", 0.895, 6), _row("small", 0.891, 3), _row("level3", 0.85, 2)],
        status,
    )
    assert fits["chosen"] == "small" and [r["speedup"] for r in fits["rows"]][2] == pytest.approx(10 / 3)
    gated = summarize(
        parsed,
        [_row("fp32", 0.90, 10), _row("level1", 0.895, 6), _row("small", 0.891, 3), _row("level3", 0.85, 2)],
        {**status, "small": "gate failed: agreement 0.9"},
    )
    assert gated["chosen"] == "level1"  # a level that failed its own gate is never chosen
    none = summarize(
        parsed,
        [_row("fp32", 0.90, 10), _row("level1", 0.87, 6), _row("small", 0.88, 3), _row("level3", 0.85, 2)],
        status,
    )
    assert none["chosen"] is None
    assert "the most accurate is small (0.8800, drop +0.0200" in none["verdict"]


def test_a_goal_no_level_meets_fails_with_exit_1_after_writing_the_front(tmp_path: Path, tiny_bert: Path) -> None:
    """A goal of no drop at all, with the evaluation set relabelled by the teacher's own predictions (so the
    teacher is right on it): a level that disagrees with the teacher anywhere cannot meet it."""
    model = head_model(tiny_bert, tmp_path / "m", "sequence", TOPICS)
    path = _sweep_recipe(tmp_path, model, {"levels": LEVELS, "goal": {"max_drop": 0.0}})
    evaluation = Path(yaml.safe_load(path.read_text())["data"]["evaluation"]["path"])
    data = {"evaluation": {"path": str(evaluation), "label_field": "label"}}
    teacher = recipe(tmp_path, model, "classification", data, [{"type": "export"}])
    assert cli("run", str(teacher)).returncode == 0
    # Relabel the evaluation file with the teacher's own fp32 predictions: it is right on every example.
    import numpy as np
    import onnxruntime as ort

    rows = [json.loads(line) for line in evaluation.read_text().splitlines()]
    tokenizer = hf.load_tokenizer(model)
    session = ort.InferenceSession(str(tmp_path / "runs" / "t" / "01_export" / "model.onnx"))
    names = tuple(i.name for i in session.get_inputs())
    for row in rows:
        row["label"] = TOPICS[int(np.argmax(session.run(None, hf.encode(tokenizer, [row["text"]], 32, names))[0][0]))]
    if len({r["label"] for r in rows}) < 2:  # both labels must appear: then the teacher is right on 15 of 16
        rows[0]["label"] = TOPICS[0] if rows[0]["label"] == TOPICS[1] else TOPICS[1]
    evaluation.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = cli("sweep", str(path))
    result = json.loads((tmp_path / "runs" / "sw" / "sweep.json").read_text())
    if all(r["drop"] > 0 for r in result["rows"][1:]):
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert "no level that passed its gate is within 0 accuracy of the teacher's fp32" in done.stderr
        assert result["chosen"] is None and (tmp_path / "runs" / "sw" / "report.html").is_file()
        assert_user_error(cli("package", str(tmp_path / "runs" / "sw")), "a sweep whose goal chose no level")
    else:  # a level as accurate as a perfect teacher: then it is chosen
        assert done.returncode == 0 and result["chosen"] is not None


@pytest.mark.parametrize(
    ("sweep", "stages", "message"),
    [
        (
            {"levels": [{"heads": 0.5, "ffn": 0.5}, {"heads": 0.25, "ffn": 0.75}]},
            STAGES,
            r"sweep.levels must increase: level 2 \(heads 0.25, ffn 0.75\) must remove at least as much as level 1",
        ),
        ({"levels": [{"heads": 0.5}, {"heads": 0.5}]}, STAGES, "must increase"),
        ({"levels": [{"layers": 2}, {"layers": 3}]}, STAGES, "must increase"),
        ({"levels": [{"heads": 0.5}]}, STAGES, "at least 2"),
        ({"levels": LEVELS}, [PRUNE, {"type": "export"}], "levels that drop layers need a distill stage"),
        ({"levels": LEVELS}, [PRUNE, {**DISTILL, "keep_every": 2}, {"type": "export"}], "remove distill.keep_every"),
        ({"levels": LEVELS}, [DISTILL, {"type": "export"}], "need a prune stage with method: structured"),
        ({"levels": LEVELS}, [PRUNE, DISTILL], "add an export stage"),
        ({"levels": LEVELS, "goal": {"max_drop": -0.1}}, STAGES, "greater than or equal to 0"),
    ],
)
def test_a_sweep_that_cannot_run_is_refused_in_one_line(
    tmp_path: Path, tiny_bert: Path, sweep: dict[str, Any], stages: list[Any], message: str
) -> None:
    path = _sweep_recipe(tmp_path, tiny_bert, sweep, stages)
    with pytest.raises(UserError, match=message):
        load_recipe(path)


def test_the_sweep_command_needs_a_sweep_and_a_level_needs_the_layers_it_keeps(tmp_path: Path, tiny_bert: Path) -> None:
    model = head_model(tiny_bert, tmp_path / "m", "sequence", TOPICS)
    plain = recipe(tmp_path, model, "classification", _topic_data(tmp_path), STAGES, name="plain")
    assert_user_error(cli("sweep", str(plain)), "has no sweep: block")
    deep = _sweep_recipe(tmp_path, model, {"levels": [{"layers": 2}, {"layers": 3}][::-1]})
    assert_user_error(cli("sweep", str(deep)), "a level keeps 3 layers of a 2-layer model")
    assert_user_error(cli("check", str(deep)), "a level keeps 3 layers of a 2-layer model")
    fine = _sweep_recipe(tmp_path, model, {"levels": LEVELS})
    checked = cli("check", str(fine))
    assert checked.returncode == 0 and "sweep of 2 levels: sw-level1, sw-small" in checked.stdout, checked.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*/01_*"))


def test_layers_kept_are_evenly_spaced_with_the_top_one() -> None:
    assert spaced_layers(6, 3) == (1, 3, 5)
    assert spaced_layers(6, 2) == (2, 5)
    assert spaced_layers(12, 4) == (2, 5, 8, 11)
    assert spaced_layers(6, 6) == tuple(range(6)) and spaced_layers(6, 1) == (5,)


def test_a_teacher_of_another_vocabulary_or_task_is_refused_before_any_stage(tmp_path: Path, tiny_bert: Path) -> None:
    """A teacher with another vocabulary (it would read the student's token ids as other words) or without
    the classifier's head (a model of another task): one line, exit 2, nothing run."""
    import shutil

    from transformers import BertTokenizerFast

    model = head_model(tiny_bert, tmp_path / "m", "sequence", TOPICS)
    other_vocab = tmp_path / "other-vocab"
    shutil.copytree(model, other_vocab)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (other_vocab / name).unlink(missing_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "zebra", "yak"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(other_vocab)
    for teacher, message in (
        (other_vocab, "has another vocabulary than the model"),
        (tiny_bert, "predicts labels [], the model"),
    ):
        stages = [PRUNE, {**DISTILL, "teacher": str(teacher)}, {"type": "export"}]
        path = _sweep_recipe(tmp_path, model, {"levels": LEVELS}, stages)
        assert_user_error(cli("sweep", str(path)), message)
        assert not list((tmp_path / "runs").glob("*/01_*"))


def test_an_embedding_sweep_scores_spearman(tmp_path: Path, recipe_for: Any, data_files: dict[str, Path]) -> None:
    """The embedder's sweep: the front's metric is Spearman on the scored pairs, the teacher's export first."""
    data = yaml.safe_load(recipe_for().read_text())["data"]
    data["train"] = {"path": str(data_files["calibration"])}  # unlabeled text the teacher embeds
    stages = [PRUNE, {**DISTILL, "losses": {"embedding_cosine": 1.0}}, {"type": "export"}]
    path = recipe_for(name="emb", stages=stages, data=data, sweep={"levels": LEVELS, "goal": {"max_drop": 2.0}})
    done = cli("sweep", str(path))
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "runs" / "emb" / "sweep.json").read_text())
    assert [r["metric"] for r in result["rows"]] == ["spearman"] * 3
    count = result["examples"]  # the scored pairs' distinct texts
    assert count == result["rows"][1]["examples"] > 3 and f"every one of {count} data.evaluation" in done.stdout
    assert all(-1 <= r["value"] <= 1 and len(r["ci95"]) == 2 for r in result["rows"])
    assert result["chosen"] in ("level1", "small") and result["rows"][0]["precision"] != "int8"


def test_a_sweep_under_torchrun_trains_on_both_ranks_and_writes_one_front(tmp_path: Path, tiny_bert: Path) -> None:
    """2 processes (gloo): every level's stages run once in the run folders (rank 0 writes them), and rank 0
    alone measures and writes the front."""
    import subprocess
    import sys

    model = head_model(tiny_bert, tmp_path / "m", "sequence", TOPICS)
    path = _sweep_recipe(tmp_path, model, {"levels": LEVELS, "goal": {"max_drop": 1.0}})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = [*cmd, "-m", "compress.cli", "sweep", str(path)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("| fp32 |") == 1  # one front printed
    result = json.loads((tmp_path / "runs" / "sw" / "sweep.json").read_text())
    assert [r["label"] for r in result["rows"]] == ["fp32", "level1", "small"] and result["chosen"] is not None
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["sw", "sw-fp32", "sw-level1", "sw-small"]
    small = json.loads((tmp_path / "runs" / "sw-small" / "02_distill" / "metrics.json").read_text())
    assert small["student_layers"] == 1


def test_a_sweep_with_unlabelled_text_checks_and_exports_its_teacher_without_it(
    tmp_path: Path, tiny_bert: Path
) -> None:
    """data.transfer is read by distillation only: the teacher's export run leaves it out (with it, that
    export-only recipe would be refused as teaching nothing), and check builds that run too."""
    from compress.sweep.levels import level_recipes, teacher_recipe

    model = head_model(tiny_bert, tmp_path / "m", "sequence", TOPICS)
    path = _sweep_recipe(tmp_path, model, {"levels": LEVELS})
    body = yaml.safe_load(path.read_text())
    body["data"]["transfer"] = [{"reference": "pang-lee"}]
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    parsed = load_recipe(path)
    assert teacher_recipe(parsed).data.transfer == () and [s.type for s in teacher_recipe(parsed).stages] == ["export"]
    assert all(level.data.transfer for _, level in level_recipes(parsed))
    checked = cli("check", str(path))
    assert checked.returncode == 0 and "sweep of 2 levels" in checked.stdout, checked.stderr


def test_sharing_replaces_a_stale_stage_and_keeps_a_current_one(tmp_path: Path, tiny_bert: Path) -> None:
    """share_stages on finished runs: a level whose own prune stage is stale (another fingerprint) gets the
    other level's current one, linked; its own current stage is left alone; a mismatching run gives nothing."""
    from compress.pipeline import fingerprints
    from compress.pipeline.preflight import preflight
    from compress.sweep.levels import level_recipes
    from compress.sweep.run import share_stages

    model = head_model(tiny_bert, tmp_path / "m", "sequence", TOPICS)
    stages = [PRUNE, {"type": "export"}]
    path = _sweep_recipe(tmp_path, model, {"levels": [LEVELS[0], {**LEVELS[0], "name": "twin", "ffn": 0.6}]}, stages)
    (_, first), (_, twin) = level_recipes(load_recipe(path))
    from compress import api

    api.run(first)
    same = first.model_copy(update={"name": "copy"})  # the same stages under another run name
    expected = fingerprints(same, preflight(same))
    assert share_stages(same, expected, [first]).startswith("01_prune, 02_export of")
    copied = tmp_path / "runs" / "copy" / "01_prune" / "model" / "model.safetensors"
    origin = tmp_path / "runs" / first.name / "01_prune" / "model" / "model.safetensors"
    assert copied.stat().st_ino == origin.stat().st_ino
    assert share_stages(same, expected, [first]) == ""  # its own stages are current now: nothing to link
    stale = tmp_path / "runs" / "copy" / "01_prune" / "done"
    stale.unlink()  # a new file, as the pipeline writes one (write_atomic): the linked original stays as it is
    stale.write_text("stale\n")
    assert share_stages(same, expected, [first]) == f"01_prune of {tmp_path / 'runs' / first.name}"
    assert share_stages(twin, fingerprints(twin, preflight(twin)), [first]) == ""  # other settings: other prints
