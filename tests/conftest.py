"""Shared fixtures: a tiny random-init BERT folder (real Hugging Face format) and small data files."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

# The files that take longest, first: `make test` runs two workers with each file on one, and a long file
# handed out last leaves the other worker idle at the end (the Docker file alone is about 4 minutes).
LONGEST_FIRST = ("tests/test_docker.py", "tests/test_integration.py", "tests/test_api.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep order


TEXTS = [
    "the cat sat on the mat and looked at the garden",
    "a dog ran across the park chasing a red ball",
    "stock markets fell sharply after the bank raised interest rates",
    "the government announced new rules for the national election",
    "heavy rain flooded the town and closed the main road",
    "scientists found water on a distant moon of the planet",
    "the team won the final match after a long season",
    "fire crews fought a large bushfire near the city overnight",
    "the minister said the budget would cut taxes for families",
    "a new phone was released with a faster chip and a bigger screen",
    "police arrested two men after a robbery at the bank",
    "the film festival opened with a comedy about a small village",
]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 BERT with a WordPiece tokenizer over the test texts, saved as safetensors."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    words = sorted({w for t in TEXTS for w in re.findall(r"[a-z]+", t)})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # The vocabulary itself, not vocab_file: transformers 5 ignores vocab_file here and every word became [UNK].
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def data_files(tmp_path: Path) -> dict[str, Path]:
    """A calibration JSONL of texts and an evaluation CSV of scored pairs over them."""
    cal = tmp_path / "calibration.jsonl"
    cal.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    ev = tmp_path / "pairs.csv"
    rows = ["a,b,score"]
    for i in range(len(TEXTS)):
        for j in (i + 1, i + 3):
            if j < len(TEXTS):
                rows.append(f"{TEXTS[i]},{TEXTS[j]},{(i * 7 + j * 3) % 5}")
    ev.write_text("\n".join(rows) + "\n")
    return {"calibration": cal, "evaluation": ev}


@pytest.fixture
def recipe_for(tmp_path: Path, tiny_bert: Path, data_files: dict[str, Path]) -> Callable[..., Path]:
    """Write a recipe for the tiny model; keyword arguments replace top-level sections."""

    def write(name: str = "tiny", stages: list[dict[str, Any]] | None = None, **sections: Any) -> Path:
        recipe: dict[str, Any] = {
            "name": name,
            "model": {"hf": str(tiny_bert)},
            "task": "embedding",
            "data": {
                "calibration": {"path": str(data_files["calibration"])},
                "evaluation": {
                    "path": str(data_files["evaluation"]),
                    "pair_fields": ["a", "b"],
                    "score_field": "score",
                },
                "max_length": 32,
                "batch_size": 4,
            },
            "stages": stages
            or [
                {"type": "export"},
                {"type": "quantize", "mode": "dynamic"},
                {"type": "validate", "runs": 10, "warmup": 2, "sequence_length": 32},
            ],
            "output": {"dir": str(tmp_path / "runs")},
        }
        recipe.update(sections)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write


SPAM = ["win cash now", "cheap pills online", "you won a prize", "click here to claim money", "free offer today"]
HAM = ["meeting moved to friday", "notes from the project call", "lunch at noon?", "the report is attached", "see you"]


def spam_rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = SPAM if label else HAM
        text = " ".join(words[j] for j in rng.integers(0, len(words), size=3))
        rows.append({"text": text, "label": "spam" if label else "ham"})
    return rows


@pytest.fixture
def zoo_recipe(tmp_path: Path) -> Callable[..., Path]:
    for name, n, seed in (("train", 96, 0), ("valid", 32, 1), ("test", 32, 2)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in spam_rows(n, seed)))

    def write(task: str = "classification", train: dict[str, Any] | None = None, **arch: Any) -> Path:
        architecture = {
            "task": task,
            "vocab_size": 259,
            "max_len": 128,
            "d_model": 32,
            "n_heads": 2,
            "n_layers": 1,
            "d_ff": 64,
            "attention": {"kind": "windowed", "window": 8, "global_tokens": 1, "causal": task == "lm"},
            **arch,
        }
        source = {"label_field": "label"} if task == "classification" else {}
        recipe = {
            "name": f"zoo-{task}",
            "model": {"architecture": architecture},
            "task": task,
            "data": {
                "train": {"path": str(tmp_path / "train.jsonl"), **source},
                "evaluation": {"path": str(tmp_path / "valid.jsonl"), **source},
                "test": {"path": str(tmp_path / "test.jsonl"), **source},
                "tokenizer": "bytes",
                "max_length": 128,
                "batch_size": 16,
            },
            "stages": [{"type": "train", "epochs": 3, "batch_size": 8, "lr": 3e-3, "seed": 0, **(train or {})}],
            "output": {"dir": str(tmp_path / "runs")},
        }
        path = tmp_path / f"{task}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write


def two_matmuls(path: Path, x_shape: tuple[str | int, ...] = ("B", 8), mask: bool = False) -> None:
    """x -> MatMul w1 (8 x 16) -> Relu -> MatMul w2 (16 x 4) -> y, seeded weights; mask adds an unused
    attention_mask input (B, T) as a text model's feeds have."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(8, 16)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(16, 4)).astype(np.float32), "w2")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    if mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, list(x_shape[:2])))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
        ],
        "two",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*x_shape[:-1], 4])],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
