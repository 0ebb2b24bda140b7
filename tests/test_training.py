"""The train stage and its loop: schedule, bucketing, learning, early stopping, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from rich.console import Console

from compress.context import Context
from compress.errors import UserError
from compress.models.zoo import load_zoo
from compress.pipeline import run
from compress.recipe import load_recipe
from compress.training.feeds import bucketed
from compress.training.loop import lr_factor


def _run(path: Path) -> dict[str, Any]:
    recipe = load_recipe(path)
    run_dir = run(recipe, Context(recipe=recipe, run_dir=recipe.output.dir / recipe.name, console=Console(quiet=True)))
    return json.loads((run_dir / "01_train" / "metrics.json").read_text())


def test_lr_schedule() -> None:
    assert lr_factor(0, 100, 10, "linear") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "linear") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)


def test_bucketed_batches_cover_every_row_once_and_group_lengths() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 1000, size=1000)
    order = rng.permutation(1000)
    batches = bucketed(order, lengths, 8, seed=0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    assert spread < 100  # random batches of 8 would spread over ~750
    assert all(np.array_equal(a, b) for a, b in zip(batches, bucketed(order, lengths, 8, seed=0), strict=True))


def test_classifier_learns_and_writes_a_reloadable_checkpoint(zoo_recipe: Callable[..., Path]) -> None:
    metrics = _run(zoo_recipe())
    assert metrics["history"][-1]["accuracy"] >= 0.9
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
    assert metrics["test"]["accuracy"] >= 0.9 and metrics["test"]["examples"] == 32
    recipe = load_recipe(zoo_recipe())
    folder = recipe.output.dir / recipe.name / "01_train" / "model"
    assert load_zoo(folder).cfg.attention.kind == "windowed"
    assert not (recipe.output.dir / recipe.name / ".01_train.work").exists()


def test_language_model_bits_per_byte_fall(zoo_recipe: Callable[..., Path]) -> None:
    metrics = _run(zoo_recipe(task="lm", hourglass={"factor": 2, "pre": 1, "inner": 1, "post": 1}, n_layers=0))
    bpb = [h["bits_per_token"] for h in metrics["history"]]
    assert bpb[-1] < bpb[0] < 8.5  # uniform over 256 bytes would be 8 bits
    assert metrics["test"]["bits_per_token"] < bpb[0]


def test_early_stopping(zoo_recipe: Callable[..., Path]) -> None:
    metrics = _run(zoo_recipe(train={"epochs": 8, "lr": 1e-9, "patience": 1, "warmup_ratio": 0}))
    assert metrics["epochs_run"] == 2 and metrics["best_epoch"] == 1


def test_killed_training_resumes_to_the_same_result(zoo_recipe: Callable[..., Path], tmp_path: Path) -> None:
    """SIGKILL after the first epoch's checkpoint; the rerun continues and ends with identical weights."""
    train = {"epochs": 3, "threads": 1}
    straight = zoo_recipe(train=train, dropout=0.1)
    reference = _run(straight)
    recipe = load_recipe(straight)
    run_dir = recipe.output.dir / recipe.name
    expected = load_zoo(run_dir / "01_train" / "model").state_dict()

    spec = yaml.safe_load(straight.read_text())
    spec["output"]["dir"] = str(tmp_path / "killed")
    spec["stages"][0]["epochs"] = 3
    killed = tmp_path / "killed.yaml"
    killed.write_text(yaml.safe_dump(spec))
    work = tmp_path / "killed" / recipe.name / ".01_train.work"
    proc = subprocess.Popen([sys.executable, "-m", "compress.cli", "train", str(killed)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (work / "epoch-001" / "state.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = _run(killed)
    assert resumed["history"] == reference["history"]
    got = load_zoo(tmp_path / "killed" / recipe.name / "01_train" / "model").state_dict()
    assert all(np.array_equal(got[k].numpy(), v.numpy()) for k, v in expected.items())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task": "embedding"}, "task embedding goes with Hugging Face models"),
        ({"stages": [{"type": "export"}]}, "the first stage must be train"),
        ({"data.tokenizer": "model"}, "zoo models need data.tokenizer: bytes or wordpiece"),
        ({"architecture.attention": {"kind": "windowed", "window": 0}}, "attention.window must be > 0"),
        ({"architecture.attention": {"kind": "flash"}}, "unknown kind 'flash'"),
    ],
)
def test_bad_zoo_recipes(zoo_recipe: Callable[..., Path], change: dict[str, Any], message: str) -> None:
    path = zoo_recipe()
    spec = yaml.safe_load(path.read_text())
    for key, value in change.items():
        if key.startswith("architecture."):
            spec["model"]["architecture"][key.split(".", 1)[1]] = value
        elif key.startswith("data."):
            spec["data"][key.split(".", 1)[1]] = value
        else:
            spec[key] = value
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match=message):
        load_recipe(path)


def test_wordpiece_tokenizer_trains_a_zoo_model(zoo_recipe: Callable[..., Path]) -> None:
    """The MiniLM WordPiece vocabulary works for zoo models as well as bytes."""
    path = zoo_recipe(vocab_size=30522, train={"epochs": 1})
    spec = yaml.safe_load(path.read_text())
    spec["data"]["tokenizer"] = "wordpiece"
    path.write_text(yaml.safe_dump(spec))
    metrics = _run(path)
    assert metrics["tokenizer"] == "wordpiece" and metrics["epochs_run"] == 1


def test_vocabulary_smaller_than_the_tokenizer_is_refused(zoo_recipe: Callable[..., Path]) -> None:
    with pytest.raises(UserError, match="vocab_size 100 is smaller than the bytes tokenizer's 259"):
        _run(zoo_recipe(vocab_size=100))
