"""The distill stage on zoo models: soft targets, hard labels, hidden states with projections, students."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from rich.console import Console

from compress.context import Context
from compress.errors import UserError
from compress.models.zoo import load_zoo
from compress.pipeline import run
from compress.recipe import load_recipe
from compress.training.distill_zoo import Pupil, _load_pupil, _save_pupil


def _run(path: Path) -> Path:
    recipe = load_recipe(path)
    return run(recipe, Context(recipe=recipe, run_dir=recipe.output.dir / recipe.name, console=Console(quiet=True)))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained tiny classifier and a trained tiny byte LM (the train stage on toy spam/ham text)."""
    from conftest import spam_rows

    root = tmp_path_factory.mktemp("teachers")
    for name, n, seed in (("train", 96, 0), ("valid", 32, 1), ("test", 32, 2)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in spam_rows(n, seed)))
    found = {"root": root}
    for task in ("classification", "lm"):
        path = root / f"{task}.yaml"
        path.write_text(yaml.safe_dump(_recipe(root, task, [{"type": "train", "epochs": 2, "lr": 3e-3}], None)))
        found[task] = _run(path) / "01_train" / "model"
    return found


def _recipe(root: Path, task: str, stages: list[dict[str, Any]], model: Path | None) -> dict[str, Any]:
    source = {"label_field": "label"} if task == "classification" else {}
    architecture = {
        "task": task,
        "vocab_size": 259,
        "max_len": 128,
        "d_model": 32,
        "n_heads": 2,
        "n_layers": 2,
        "d_ff": 64,
        "attention": {"kind": "windowed", "window": 8, "causal": task == "lm"},
    }
    return {
        "name": f"{task}-{stages[0]['type']}",
        "model": {"zoo": str(model)} if model else {"architecture": architecture},
        "task": task,
        "data": {
            "train": {"path": str(root / "train.jsonl"), **source},
            "evaluation": {"path": str(root / "valid.jsonl"), **source},
            "test": {"path": str(root / "test.jsonl"), **source},
            "tokenizer": "bytes",
            "max_length": 128,
            "batch_size": 16,
        },
        "stages": [s if s["type"] == "prune" else {"batch_size": 8, "seed": 0, **s} for s in stages],
        "output": {"dir": str(root / "runs")},
    }


@pytest.fixture
def distill(teachers: dict[str, Path], tmp_path: Path) -> Callable[..., dict[str, Any]]:
    def go(task: str = "classification", stages: list[dict[str, Any]] | None = None, **settings: Any) -> dict[str, Any]:
        root = teachers["root"]
        recipe = _recipe(
            root, task, stages or [{"type": "distill", "epochs": 1, "lr": 3e-3, **settings}], teachers[task]
        )
        recipe["output"]["dir"] = str(tmp_path / "runs")
        path = tmp_path / "distill.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        run_dir = _run(path)
        stage = sorted(run_dir.glob("*_distill"))[0]
        return {"dir": stage, **json.loads((stage / "metrics.json").read_text())}

    return go


def test_half_width_student_learns_from_the_teacher(
    distill: Callable[..., dict[str, Any]], teachers: dict[str, Path]
) -> None:
    before = (teachers["classification"] / "model.safetensors").read_bytes()
    m = distill(student={"d_model": 16, "d_ff": 32}, epochs=3, losses={"kl": 1.0, "ce": 1.0, "hidden_mse": 1.0})
    assert m["student"]["d_model"] == 16 and m["teacher_architecture"]["d_model"] == 32
    assert m["parameters"] < m["teacher_parameters"] / 2
    assert m["test"]["accuracy"] >= 0.9  # the toy task is separable: a taught student must get it
    assert (teachers["classification"] / "model.safetensors").read_bytes() == before  # the teacher is untouched
    student = load_zoo(m["dir"] / "model")
    assert student.cfg.d_model == 16 and not (m["dir"] / "model" / "distill_projections.safetensors").exists()


def test_default_losses_by_task(distill: Callable[..., dict[str, Any]]) -> None:
    m = distill()
    assert m["losses"]["kl"] == 1.0 and m["losses"]["ce"] == 1.0 and m["losses"]["embedding_cosine"] == 0.0


def test_layer_dropped_student_keeps_the_right_blocks(
    distill: Callable[..., dict[str, Any]], teachers: dict[str, Path]
) -> None:
    m = distill(keep_layers=[1], max_steps_per_epoch=1, lr=1e-9, losses={"kl": 1.0})
    assert m["student"]["n_layers"] == 1 and m["layer_map"] == [1]
    teacher = load_zoo(teachers["classification"])
    student = load_zoo(m["dir"] / "model")
    kept = teacher.backbone.body.blocks[1].g.up.weight  # type: ignore[union-attr, index]
    # lr 1e-9 for one step: the copied block is (numerically) the teacher's layer 1
    assert torch.allclose(student.backbone.body.blocks[0].g.up.weight, kept, atol=1e-6)  # type: ignore[union-attr, index]


def test_lm_soft_targets(distill: Callable[..., dict[str, Any]]) -> None:
    m = distill(task="lm", student={"n_layers": 1}, epochs=1, losses={"kl": 1.0, "temperature": 1.0})
    assert 0 < m["test"]["bits_per_token"] < 8.5 and m["teacher_test"]["bits_per_token"] < 8.5


def test_pupil_round_trips_with_projections(tmp_path: Path, teachers: dict[str, Path]) -> None:
    student = load_zoo(teachers["classification"])
    pupil = Pupil(student, torch.nn.ModuleList([torch.nn.Linear(32, 48), torch.nn.Identity()]))
    _save_pupil(pupil, tmp_path / "ckpt")
    back = _load_pupil(tmp_path / "ckpt")
    for (name, a), (_, b) in zip(pupil.named_parameters(), back.named_parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"layer_map": [0, 7]}, "teacher layer 7 is out of range"),
        ({"student": {"vocab_size": 300}}, "must share a tokenizer"),
        ({"student": {"d_model": 33}}, "not divisible by n_heads"),
        ({"keep_layers": [0, 5]}, "cannot keep layers"),
        ({"losses": {"kl": 1.0, "hidden_relative": 1.0}}, "hidden_relative is for Hugging Face models"),
    ],
)
def test_bad_zoo_distill_settings(
    distill: Callable[..., dict[str, Any]], settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(UserError, match=message):
        distill(**{"losses": {"kl": 1.0, "hidden_mse": 1.0}, **settings})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"losses": {"embedding_cosine": 1.0}}, "embedding_cosine do not apply to task classification"),
        ({"student": {"d_model": 16}, "keep_every": 2}, "alternative ways to make the student"),
    ],
)
def test_bad_zoo_distill_recipes(
    distill: Callable[..., dict[str, Any]], settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(UserError, match=message):
        distill(**settings)


@pytest.mark.parametrize(
    "stage",
    [
        {
            "type": "distill",
            "student": {"d_model": 16, "d_ff": 32},
            "losses": {"kl": 1.0, "ce": 1.0, "hidden_mse": 1.0},
        },
        {
            "type": "prune",
            "method": "unstructured",
            "sparsity": 0.7,
            "schedule": "gradual",
            "ramp_epochs": 2,
            "frequency": 3,
            "recovery": {"epochs": 3, "batch_size": 8, "lr": 3e-3, "threads": 1, "losses": {"kl": 1.0, "ce": 1.0}},
        },
    ],
    ids=["distill-with-projections", "gradual-prune-recovery"],
)
def test_killed_run_resumes_to_the_same_result(
    teachers: dict[str, Path], tmp_path: Path, stage: dict[str, Any]
) -> None:
    """SIGKILL after the first epoch's checkpoint; the rerun continues and ends with identical weights."""
    import os
    import signal
    import subprocess
    import sys
    import time

    settings = {"epochs": 3, "lr": 3e-3, "threads": 1} if stage["type"] == "distill" else {}
    outputs = {}
    for name in ("straight", "killed"):
        spec = _recipe(teachers["root"], "classification", [{**stage, **settings}], teachers["classification"])
        spec["output"]["dir"] = str(tmp_path / name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        run_dir = tmp_path / name / spec["name"]
        if name == "killed":
            work = run_dir / f".01_{stage['type']}.work"
            proc = subprocess.Popen([sys.executable, "-m", "compress.cli", "run", str(path)], stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 120
            while (
                not (work / "epoch-001" / "state.json").exists() and proc.poll() is None and time.monotonic() < deadline
            ):
                time.sleep(0.02)
            assert proc.poll() is None, "finished before it could be killed"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        _run(path)
        stage_dir = run_dir / f"01_{stage['type']}"
        metrics = json.loads((stage_dir / "metrics.json").read_text())
        outputs[name] = (metrics.get("recovery", metrics)["history"], load_zoo(stage_dir / "model").state_dict())
    (h1, w1), (h2, w2) = outputs["straight"], outputs["killed"]
    assert h1 == h2
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_structured_prune_then_distill_from_the_unpruned_model(distill: Callable[..., dict[str, Any]]) -> None:
    stages = [
        {"type": "prune", "method": "structured", "heads": 0.5, "ffn": 0.5},
        {"type": "distill", "epochs": 2, "lr": 3e-3, "losses": {"kl": 1.0, "ce": 1.0, "hidden_mse": 1.0}},
    ]
    m = distill(stages=stages)
    assert m["student"]["n_heads"] == 1 and m["student"]["d_ff"] == 32 and m["student"]["head_dim"] == 16
    assert m["teacher_architecture"]["n_heads"] == 2
    assert m["test"]["accuracy"] >= m["teacher_test"]["accuracy"] - 0.1
