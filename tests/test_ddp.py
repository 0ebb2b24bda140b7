"""Data-parallel training under torchrun (2 processes, gloo on CPU) matches a single process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file


def _train(path: Path, out: Path, processes: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    spec = yaml.safe_load(path.read_text())
    spec["output"]["dir"] = str(out)
    recipe = out.parent / f"{out.name}.yaml"
    recipe.write_text(yaml.safe_dump(spec))
    if processes == 1:
        cmd = [sys.executable, "-m", "compress.cli", "train", str(recipe)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            "compress.cli",
            "train",
            str(recipe),
        ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stage = out / spec["name"] / "01_train"
    metrics = json.loads((stage / "metrics.json").read_text())
    return metrics, load_file(str(stage / "model" / "model.safetensors"))


def test_two_processes_match_one(zoo_recipe: Callable[..., Path], tmp_path: Path) -> None:
    path = zoo_recipe(train={"epochs": 2, "batch_size": 8, "threads": 2})
    one, w1 = _train(path, tmp_path / "one", 1)
    two, w2 = _train(path, tmp_path / "two", 2)
    assert one["steps"] == two["steps"]  # the same optimizer steps: each global batch was split, not doubled
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["accuracy"] == b["accuracy"]
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    # Gradients summed in another order drift apart over two epochs: 1.4e-3 on a Zen 3 (AVX2), under 1e-3
    # on a Zen 4 (AVX-512). The step count and per-epoch losses above are the checks on how batches split.
    assert worst < 5e-3, worst
    # rank 0 alone wrote the run directory: no second copy of any stage
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [yaml.safe_load(path.read_text())["name"]]
