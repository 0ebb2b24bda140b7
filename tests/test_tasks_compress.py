"""prune, distill and qat on Hugging Face task models (tiny random-init BERTs with a head): a classifier
of texts and a word tagger keep their head and its labels through each stage, export, and report the
task metric; structured pruning shrinks the exported graph, distillation's student has fewer layers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
import yaml

from compress import api
from compress.errors import UserError
from compress.models import hf
from compress.recipe import PruneStage, load_recipe
from compress.stages import DistillStage
from tests.test_tasks_hf import head_model, pair_rows, recipe, tagged_rows, topic_rows, write

TOPICS = ("money", "sport")
TAGS = ("ADP", "CONJ", "DET", "NOUN")
WORDS = {"words_field": "words", "tags_field": "tags"}
LABEL = {"label_field": "label"}
# The tiny BERT: 2 layers of 4 heads (size 8, hidden 32) and 64 FFN neurons.
STRUCTURED: dict[str, Any] = {
    "type": "prune",
    "method": "structured",
    "heads": 0.5,
    "ffn": 0.75,
}  # 2 heads, 16 neurons left
DISTILL: dict[str, Any] = {"type": "distill", "keep_every": 2, "epochs": 2, "batch_size": 8, "lr": 1e-3, "patience": 2}
VALIDATE: dict[str, Any] = {"type": "validate", "runs": 10, "warmup": 1, "sequence_length": 32}


def _topic_data(tmp_path: Path) -> dict[str, Any]:
    train = write(tmp_path / "tr.jsonl", topic_rows(48, 0))
    return {
        "train": {"path": str(train), **LABEL},
        "calibration": {"path": str(train)},
        "evaluation": {"path": str(write(tmp_path / "ev.jsonl", topic_rows(16, 1))), **LABEL},
    }


def _tagged_data(tmp_path: Path) -> dict[str, Any]:
    train = write(tmp_path / "tr.jsonl", tagged_rows(36))
    return {
        "train": {"path": str(train), **WORDS},
        "calibration": {"path": str(train), **WORDS},
        "evaluation": {"path": str(write(tmp_path / "ev.jsonl", tagged_rows(12))), **WORDS},
    }


def _assert_pruned_graph(path: Path, layers: int) -> None:
    """The exported graph has 2 heads per fused Attention node (query, key, value: 3 x 16 columns, not
    3 x 32) and FFN projections of 16 neurons (32 -> 16 -> 32, not 32 -> 64 -> 32)."""
    graph = onnx.load(str(path)).graph
    shapes = {tuple(t.dims) for t in graph.initializer}
    heads = [a.i for n in graph.node if n.op_type == "Attention" for a in n.attribute if a.name == "num_heads"]
    assert heads == [2] * layers and (32, 48) in shapes and (32, 96) not in shapes, (heads, shapes)
    assert (32, 16) in shapes and (16, 32) in shapes and (32, 64) not in shapes, shapes


def _head(folder: Path, head: str) -> dict[str, torch.Tensor]:
    model = hf.load_model(folder, head)
    return {k: v for k, v in model.state_dict().items() if k.startswith("classifier.")}


def _same_head(a: Path, b: Path, head: str) -> bool:
    x, y = _head(a, head), _head(b, head)
    return bool(x) and x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_classifier_prune_refit_distill_export_int8(tmp_path: Path, tiny_bert: Path) -> None:
    """The BBC recipe's shape on a tiny classifier: structured prune with the refit, then a 1-layer student
    distilled from the unpruned model (KL + CE + hidden MSE), export, int8, validate."""
    model = head_model(tiny_bert, tmp_path / "m", "sequence", TOPICS)
    prune = {**STRUCTURED, "reconstruct": {"data": "calibration", "texts": 40, "select": "error"}}
    distill = {**DISTILL, "losses": {"kl": 1.0, "ce": 1.0, "hidden_mse": 0.5, "temperature": 2.0}}
    stages = [prune, distill, {"type": "export"}, {"type": "quantize", "mode": "dynamic"}, VALIDATE]
    report = api.run(recipe(tmp_path, model, "classification", _topic_data(tmp_path), stages))
    pruned_metrics, distill_metrics = report.stages[0]["metrics"], report.stages[1]["metrics"]

    assert pruned_metrics["task"]["metric"] == "accuracy" and 0 <= pruned_metrics["task"]["after"] <= 1
    reconstruction = pruned_metrics["reconstruction"]
    assert reconstruction["held_out_texts"] == 4 and 0 <= reconstruction["held_out_agreement"] <= 1
    pruned = report.stage_artifact("prune").file("model")
    config = json.loads((pruned / "config.json").read_text())
    assert config["edge_compress_structure"] == {"heads": [2, 2], "intermediate": [16, 16]}
    assert config["id2label"] == {"0": "money", "1": "sport"}
    assert _same_head(model, pruned, "sequence")  # the head is loaded, never pruned, and saved

    assert distill_metrics["student_layers"] == 1 and distill_metrics["teacher_layers"] == 2
    assert distill_metrics["teacher"] == str(model)  # the recipe's input model by default
    assert distill_metrics["epochs_run"] == 2 and 0 <= distill_metrics["best_accuracy"] <= 1
    assert "teacher_accuracy" in distill_metrics and distill_metrics["labels"] == list(TOPICS)
    student: Any = hf.load_model(report.stage_artifact("distill").file("model"), "sequence")
    assert len(student.base_model.encoder.layer) == 1
    assert student.base_model.encoder.layer[0].intermediate.dense.out_features == 16  # still the pruned shape

    export = report.stage_artifact("export")
    assert export.meta["labels"] == list(TOPICS) and export.meta["outputs"] == ["logits"]
    _assert_pruned_graph(export.file("model"), layers=1)
    target = report.targets["x86_64"]
    assert 0 <= target["artifact"]["task"]["accuracy"] <= 1
    assert target["agreement"]["metric"] == "prediction agreement"


def test_tagger_prune_distill_export_qat(tmp_path: Path, tiny_bert: Path) -> None:
    """A tagger: structured prune (weight norm), a layer-dropped student learning per word, then qat; its
    labels stay per token at the words' first sub-tokens all the way to the int8 graph."""
    model = head_model(tiny_bert, tmp_path / "m", "token", TAGS)
    qat = {"type": "qat", "epochs": 1, "batch_size": 8, "lr": 1e-4}
    stages = [STRUCTURED, DISTILL, {"type": "export"}, qat, VALIDATE]
    report = api.run(recipe(tmp_path, model, "token-classification", _tagged_data(tmp_path), stages))
    pruned_metrics, distill_metrics = report.stages[0]["metrics"], report.stages[1]["metrics"]
    assert pruned_metrics["task"]["scores"]["words"] == sum(len(r["words"]) for r in tagged_rows(12))
    assert _same_head(model, report.stage_artifact("prune").file("model"), "token")

    assert distill_metrics["student_layers"] == 1 and distill_metrics["input_kind"] == "words"
    assert distill_metrics["train_examples"] == 36 and 0 <= distill_metrics["best_accuracy"] <= 1
    config = json.loads((report.stage_artifact("distill").file("model") / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["edge_compress_structure"]["heads"] == [2]
    assert list(config["id2label"].values()) == list(TAGS)

    _assert_pruned_graph(report.stage_artifact("export").file("model"), layers=1)

    qat_metrics = report.stages[3]["metrics"]
    assert qat_metrics["selection"] == "accuracy" and qat_metrics["kernels"]["int8_total"] >= 4
    task = qat_metrics["task"]
    assert task["agreement"]["metric"] == "word prediction agreement" and task["agreement"]["value"] >= 0.8
    assert task["int8"]["words"] == task["fp32"]["words"] > 0
    assert report.stage_artifact("qat").meta["labels"] == list(TAGS)
    assert report.targets["x86_64"]["agreement"]["metric"] == "word prediction agreement"


def test_classifier_qat_learns_and_keeps_its_head(tmp_path: Path, tiny_bert: Path) -> None:
    """qat of a classifier that learnt its topic (fine-tuned in the recipe): the int8 graph stays accurate."""
    model = head_model(tiny_bert, tmp_path / "m", "sequence", TOPICS)
    train = {"type": "train", "epochs": 4, "batch_size": 8, "lr": 3e-3, "patience": 4, "seed": 0}
    qat = {"type": "qat", "epochs": 1, "batch_size": 8, "lr": 1e-4}
    report = api.run(recipe(tmp_path, model, "classification", _topic_data(tmp_path), [train, {"type": "export"}, qat]))
    metrics = report.stages[2]["metrics"]
    assert metrics["selection"] == "accuracy" and metrics["best"] >= 0.9
    task = metrics["task"]
    assert task["metric"] == "accuracy" and task["examples"] == 16
    assert task["int8"]["accuracy"] >= 0.9 and task["agreement"]["value"] >= 0.9
    assert task["drop"] == pytest.approx(task["fp32"]["accuracy"] - task["int8"]["accuracy"])
    artifact = report.stage_artifact("qat")
    assert artifact.meta["labels"] == list(TOPICS) and artifact.meta["precision"] == "int8"
    graph = onnx.load(str(artifact.file("model"))).graph
    assert [o.name for o in graph.output] == ["logits"]


def test_tagger_masks_never_touch_the_head(tmp_path: Path, tiny_bert: Path) -> None:
    """Unstructured masks with nothing excluded, and recovery on the labels alone (cross-entropy): the
    encoder's Linear layers are half zeros, the head has none and its labels are kept."""
    model = head_model(tiny_bert, tmp_path / "m", "token", TAGS)
    recovery = {"epochs": 1, "batch_size": 8, "lr": 1e-3, "distill": False}
    prune = {"type": "prune", "method": "unstructured", "sparsity": 0.5, "exclude": [], "recovery": recovery}
    report = api.run(recipe(tmp_path, model, "token-classification", _tagged_data(tmp_path), [prune]))
    metrics = report.stages[0]["metrics"]
    names = [row["name"] for row in metrics["layers"]]
    assert names and not any(n.startswith("classifier") for n in names)
    assert all(row["sparsity"] == pytest.approx(0.5, abs=0.01) for row in metrics["layers"])
    assert metrics["recovery"]["losses"]["ce"] == 1.0 and metrics["recovery"]["losses"]["kl"] == 0.0
    folder = report.stage_artifact("prune").file("model")
    head = _head(folder, "token")
    assert head and all(int((w == 0).sum()) == 0 for w in head.values())
    assert hf.model_labels(folder) == TAGS
    assert "accuracy" in metrics["task"]["scores"]


def test_pair_classifier_refit_reads_pairs(tmp_path: Path, tiny_bert: Path) -> None:
    """The refit of a classifier of text pairs reads pairs (both texts, token types 0 then 1), and its
    student learns from them."""
    model = head_model(tiny_bert, tmp_path / "m", "sequence", ("no", "yes"))
    pairs = {"label_field": "label", "text_field": "premise", "text_pair_field": "hypothesis"}
    data = {
        "train": {"path": str(write(tmp_path / "tr.jsonl", pair_rows(40))), **pairs},
        "evaluation": {"path": str(write(tmp_path / "ev.jsonl", pair_rows(12))), **pairs},
    }
    prune = {**STRUCTURED, "reconstruct": {"data": "train", "select": "magnitude"}}
    report = api.run(recipe(tmp_path, model, "classification", data, [prune, {**DISTILL, "epochs": 1}]))
    reconstruction = report.stages[0]["metrics"]["reconstruction"]
    assert reconstruction["texts"] == 36 and reconstruction["held_out_texts"] == 4
    assert report.stages[1]["metrics"]["input_kind"] == "pair"
    assert hf.model_labels(report.stage_artifact("distill").file("model")) == ("no", "yes")


def test_a_teacher_with_other_labels_is_refused(tmp_path: Path, tiny_bert: Path) -> None:
    model = head_model(tiny_bert, tmp_path / "m", "sequence", TOPICS)
    other = head_model(tiny_bert, tmp_path / "other", "sequence", ("sport", "money"))
    stages = [{**DISTILL, "teacher": str(other)}]
    with pytest.raises(UserError, match=r"stages\[0\].teacher: .* same labels in the same order"):
        api.run(recipe(tmp_path, model, "classification", _topic_data(tmp_path), stages))
    assert not list((tmp_path / "runs").glob("*/01_*"))  # refused before any stage


TRAIN: dict[str, Any] = {"type": "train", "epochs": 1}
RECOVERY = {"epochs": 1}


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{**DISTILL, "select": "fidelity"}], "fidelity is for the embedding task"),
        ([{**DISTILL, "keep_every": None, "student": {"d_model": 16}}], "distill.student"),
        ([{**DISTILL, "losses": {"kl": 1.0, "attention": 1.0}}], "attention do not apply"),
        ([TRAIN, DISTILL], "distill: the default teacher is the recipe's model"),
        ([TRAIN, {"type": "prune", "method": "unstructured", "recovery": RECOVERY}], "prune: the default teacher"),
    ],
)
def test_settings_that_do_not_fit_a_task_model(
    tmp_path: Path, tiny_bert: Path, stages: list[dict[str, Any]], message: str
) -> None:
    stages = [{k: v for k, v in stage.items() if v is not None} for stage in stages]
    path = recipe(tmp_path, tiny_bert, "classification", _topic_data(tmp_path), stages)
    with pytest.raises(UserError, match=message):
        load_recipe(path)


def test_after_a_train_stage_a_named_teacher_or_labels_alone_are_accepted(tmp_path: Path, tiny_bert: Path) -> None:
    teacher = head_model(tiny_bert, tmp_path / "teacher", "sequence", TOPICS)
    labels_only = {"type": "prune", "method": "unstructured", "recovery": {**RECOVERY, "distill": False}}
    stages = [TRAIN, labels_only, {**DISTILL, "teacher": str(teacher)}]
    assert load_recipe(recipe(tmp_path, tiny_bert, "classification", _topic_data(tmp_path), stages))


def test_the_bbc_recipe_checks() -> None:
    """The reference recipe parses; its stages run in the documented order with the refit and the teacher."""
    path = Path(__file__).parent.parent / "recipes" / "bbc-news-prune-distill-int8.yaml"
    parsed = load_recipe(path)
    assert [s.type for s in parsed.stages] == ["prune", "distill", "export", "quantize", "validate"]
    assert yaml.safe_load(path.read_text())["model"] == {"hf": "runs/bbc-news/01_train/model"}
    prune, distill = parsed.stages[0], parsed.stages[1]
    assert isinstance(prune, PruneStage) and isinstance(distill, DistillStage)
    assert prune.method == "structured" and prune.heads > 0 and prune.ffn > 0 and prune.reconstruct is not None
    assert distill.teacher is None  # the recipe's model: the fine-tuned classifier
