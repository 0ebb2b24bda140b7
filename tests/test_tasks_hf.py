"""Hugging Face task models end to end on tiny random-init BERTs: a classifier of texts and of text pairs,
and a word tagger, through train (fine-tuning), export, int8 and validate; and the bad input of each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from compress import api
from tests.conftest import TEXTS
from tests.test_cli import assert_user_error, cli

SPORT = ["team", "won", "final", "match", "season", "ball", "park", "chasing"]
MONEY = ["stock", "markets", "bank", "interest", "rates", "budget", "taxes", "cut"]
TAGS = {"the": "DET", "a": "DET", "on": "ADP", "at": "ADP", "after": "ADP", "of": "ADP", "and": "CONJ"}
STAGES = [
    {"type": "export"},
    {"type": "quantize", "mode": "dynamic"},
    {"type": "validate", "runs": 10, "warmup": 2, "sequence_length": 32},
]


def head_model(tiny_bert: Path, folder: Path, head: str, labels: tuple[str, ...]) -> Path:
    """The tiny BERT's encoder with a random-init sequence or token classification head for `labels`."""
    import shutil

    import torch
    from transformers import AutoConfig, BertForSequenceClassification, BertForTokenClassification

    config = AutoConfig.from_pretrained(
        tiny_bert, id2label=dict(enumerate(labels)), label2id={v: i for i, v in enumerate(labels)}
    )
    cls = BertForSequenceClassification if head == "sequence" else BertForTokenClassification
    torch.manual_seed(0)
    cls(config).save_pretrained(folder, safe_serialization=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_bert / name).is_file():
            shutil.copy2(tiny_bert / name, folder / name)
    return folder


def topic_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Texts of sport or money words (a topic a tiny model learns in a few epochs)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = ("money", "sport")[i % 2]
        words = SPORT if label == "sport" else MONEY
        rows.append({"text": " ".join(rng.choice(words, size=4)), "label": label})
    return rows


def pair_rows(n: int) -> list[dict[str, Any]]:
    return [
        {"premise": TEXTS[i % 12], "hypothesis": TEXTS[(i * 5 + 1) % 12], "label": ("no", "yes")[i % 2]}
        for i in range(n)
    ]


def tagged_rows(n: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        words = TEXTS[i % len(TEXTS)].split()
        rows.append({"words": words, "tags": [TAGS.get(w, "NOUN") for w in words]})
    return rows


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(  # noqa: PLR0917
    tmp_path: Path, model: Path, task: str, data: dict[str, Any], stages: list[dict[str, Any]], name: str = "t"
) -> Path:
    body = {
        "name": name,
        "model": {"hf": str(model)},
        "task": task,
        "data": {**data, "max_length": 32, "batch_size": 8},
        "stages": stages,
        "targets": ["x86_64"],
        "output": {"dir": str(tmp_path / "runs")},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def test_classifier_labels_are_matched_by_name(tmp_path: Path, tiny_bert: Path) -> None:
    """The checkpoint numbers its labels (sport, money); the data's sorted names are (money, sport): the
    scores are computed by name, equal to a hand count on the ONNX outputs."""
    import onnxruntime as ort

    model = head_model(tiny_bert, tmp_path / "m", "sequence", ("sport", "money"))
    rows = topic_rows(24, 1)
    data = {"evaluation": {"path": str(write(tmp_path / "ev.jsonl", rows)), "label_field": "label"}}
    report = api.run(recipe(tmp_path, model, "classification", data, STAGES))
    target = report.targets["x86_64"]
    ref = target["reference_task"]
    assert {"accuracy", "accuracy_ci95", "f1_macro", "f1_macro_ci95"} <= set(ref)
    assert ref["accuracy_ci95"][0] <= ref["accuracy"] <= ref["accuracy_ci95"][1]
    assert target["agreement"]["metric"] == "prediction agreement"

    onnx = report.stage_artifact("export")
    sess = ort.InferenceSession(str(onnx.file("model")), providers=["CPUExecutionProvider"])
    from compress.runtime.feeds import encoder

    feeds = encoder(onnx)([r["text"] for r in rows], 32, None)
    pred = sess.run(None, feeds)[0].argmax(-1)
    by_hand = np.mean([("sport", "money")[p] == r["label"] for p, r in zip(pred, rows, strict=True)])
    assert ref["accuracy"] == pytest.approx(by_hand)
    assert onnx.meta["labels"] == ["sport", "money"]


def test_fine_tuned_classifier_learns_and_goes_to_int8(tmp_path: Path, tiny_bert: Path) -> None:
    """A bare encoder + a new head, fine-tuned in the recipe; the int8 model keeps its predictions."""
    data = {
        "train": {"path": str(write(tmp_path / "tr.jsonl", topic_rows(64, 0))), "label_field": "label"},
        "evaluation": {"path": str(write(tmp_path / "ev.jsonl", topic_rows(24, 1))), "label_field": "label"},
        "test": {"path": str(write(tmp_path / "te.jsonl", topic_rows(24, 2))), "label_field": "label"},
    }
    train = {"type": "train", "epochs": 6, "batch_size": 8, "lr": 3e-3, "patience": 6, "seed": 0}
    report = api.run(recipe(tmp_path, tiny_bert, "classification", data, [train, *STAGES]))
    metrics = report.stages[0]["metrics"]
    assert metrics["new_head"] is True and metrics["labels"] == ["money", "sport"]
    assert metrics["best_accuracy"] >= 0.9, metrics["history"]
    assert metrics["test"]["accuracy"] >= 0.9
    config = json.loads((report.stage_artifact("train").file("model") / "config.json").read_text())
    assert config["id2label"] == {"0": "money", "1": "sport"}
    assert config["edge_compress_input_kind"] == "text"
    target = report.targets["x86_64"]
    assert target["artifact"]["task"]["accuracy"] >= 0.9
    assert target["agreement"]["value"] >= 0.95


def test_pair_classifier_reads_both_texts(tmp_path: Path, tiny_bert: Path) -> None:
    """Pairs are one sequence with token types 0 then 1; the export matches PyTorch on them."""
    model = head_model(tiny_bert, tmp_path / "m", "sequence", ("no", "yes"))
    pairs = {"label_field": "label", "text_field": "premise", "text_pair_field": "hypothesis"}
    data = {"evaluation": {"path": str(write(tmp_path / "ev.jsonl", pair_rows(16))), **pairs}}
    report = api.run(recipe(tmp_path, model, "classification", data, STAGES))
    onnx = report.stage_artifact("export")
    assert onnx.meta["input_kind"] == "pair"
    from compress.runtime.feeds import encoder

    feeds = encoder(onnx)([("a cat sat", "the dog ran")], 32, None)
    types = feeds["token_type_ids"][0]
    assert types[0] == 0 and types.max() == 1  # the second text is segment 1
    assert report.targets["x86_64"]["reference_task"]["examples"] == 16


def test_tagger_scores_words_at_their_first_sub_token(tmp_path: Path, tiny_bert: Path) -> None:
    tags = ("ADP", "CONJ", "DET", "NOUN")
    model = head_model(tiny_bert, tmp_path / "m", "token", tags)
    words = {"words_field": "words", "tags_field": "tags"}
    data = {
        "train": {"path": str(write(tmp_path / "tr.jsonl", tagged_rows(48))), **words},
        "evaluation": {"path": str(write(tmp_path / "ev.jsonl", tagged_rows(12))), **words},
    }
    train = {"type": "train", "epochs": 6, "batch_size": 8, "lr": 3e-3, "patience": 6, "seed": 0}
    report = api.run(recipe(tmp_path, model, "token-classification", data, [train, *STAGES]))
    assert report.stages[0]["metrics"]["new_head"] is False  # the folder's own head had exactly these labels
    target = report.targets["x86_64"]
    task = target["artifact"]["task"]
    assert task["words"] == sum(len(r["words"]) for r in tagged_rows(12)) and task["words_cut"] == 0
    assert task["accuracy"] >= 0.9  # DET/ADP/CONJ/NOUN by word identity: learnt in a few epochs
    assert target["agreement"]["metric"] == "word prediction agreement"
    assert target["agreement"]["value"] >= 0.95


# ------------------------------------------------------------------------------------------ bad input


def test_labels_the_model_does_not_know(tmp_path: Path, tiny_bert: Path) -> None:
    model = head_model(tiny_bert, tmp_path / "m", "sequence", ("neg", "pos"))
    data = {"evaluation": {"path": str(write(tmp_path / "ev.jsonl", topic_rows(8, 0))), "label_field": "label"}}
    path = recipe(tmp_path, model, "classification", data, STAGES)
    assert_user_error(cli("run", str(path)), "label 'money'", "not a label of the model")
    assert not (tmp_path / "runs").exists()  # refused before any work


def test_pair_task_given_single_texts(tmp_path: Path, tiny_bert: Path) -> None:
    model = head_model(tiny_bert, tmp_path / "m", "sequence", ("no", "yes"))
    pairs = {"label_field": "label", "text_field": "premise", "text_pair_field": "hypothesis"}
    rows = [{"premise": r["premise"], "label": r["label"]} for r in pair_rows(8)]
    data = {
        "train": {"path": str(write(tmp_path / "tr.jsonl", rows)), "text_field": "premise", "label_field": "label"},
        "evaluation": {"path": str(write(tmp_path / "ev.jsonl", pair_rows(8))), **pairs},
    }
    train = {"type": "train", "epochs": 1}
    assert_user_error(
        cli("run", str(recipe(tmp_path, model, "classification", data, [train, *STAGES]))), "single texts"
    )
    assert not (tmp_path / "runs").exists()


def test_token_task_without_word_labels(tmp_path: Path, tiny_bert: Path) -> None:
    model = head_model(tiny_bert, tmp_path / "m", "token", ("DET", "NOUN"))
    data = {"evaluation": {"path": str(write(tmp_path / "ev.jsonl", topic_rows(8, 0))), "label_field": "label"}}
    path = recipe(tmp_path, model, "token-classification", data, STAGES)
    assert_user_error(cli("run", str(path)), "words_field and tags_field")


def test_label_column_missing(tmp_path: Path, tiny_bert: Path) -> None:
    model = head_model(tiny_bert, tmp_path / "m", "sequence", ("money", "sport"))
    rows = [{"text": r["text"]} for r in topic_rows(8, 0)]
    data = {"evaluation": {"path": str(write(tmp_path / "ev.jsonl", rows)), "label_field": "label"}}
    assert_user_error(cli("check", str(recipe(tmp_path, model, "classification", data, STAGES))), "label")


def test_a_bare_encoder_needs_a_train_stage(tmp_path: Path, tiny_bert: Path) -> None:
    data = {"evaluation": {"path": str(write(tmp_path / "ev.jsonl", topic_rows(8, 0))), "label_field": "label"}}
    path = recipe(tmp_path, tiny_bert, "classification", data, STAGES)
    assert_user_error(cli("run", str(path)), "no classification head", "train stage")


def test_structured_pruning_of_another_layout_is_refused(tmp_path: Path) -> None:
    """DistilBERT's layers are not BERT's: structured pruning and distillation say so before any work."""
    from tests.hf_archs import build

    model = build("distilbert", tmp_path / "m", head="sequence", labels=("money", "sport"))
    data = {"evaluation": {"path": str(write(tmp_path / "ev.jsonl", topic_rows(8, 0))), "label_field": "label"}}
    prune = {"type": "prune", "method": "structured", "heads": 0.25}
    path = recipe(tmp_path, model, "classification", data, [prune, *STAGES])
    assert_user_error(cli("check", str(path)), "stages[0] (prune)", "not distilbert")


def test_quantize_goal_on_agreement_with_fp32(tmp_path: Path, tiny_bert: Path) -> None:
    """goal.min_agreement searches on what the validate gate checks: predictions equal to fp32's."""
    model = head_model(tiny_bert, tmp_path / "m", "sequence", ("sport", "money"))
    evaluation = {"path": str(write(tmp_path / "ev.jsonl", topic_rows(24, 1))), "label_field": "label"}
    data = {"evaluation": evaluation, "calibration": evaluation}
    goal = {"type": "quantize", "mode": "static", "goal": {"min_agreement": 1.0}}
    report = api.run(recipe(tmp_path, model, "classification", data, [{"type": "export"}, goal]))
    search = report.stages[1]["metrics"]["accuracy_aware"]
    assert search["metric_name"] == "agreement with fp32" and search["fp32"] == 1.0
    assert search["allowed_drop"] == 0.0
    chosen = search["trials"][search["chosen"]]
    assert chosen["met"] and chosen["metric"] == 1.0  # every prediction as fp32's
    # the all-int8 trial is scored the same way: a fraction of the 24 texts
    assert round(search["trials"][0]["metric"] * 24) == pytest.approx(search["trials"][0]["metric"] * 24)
