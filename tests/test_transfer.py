"""data.transfer: unlabelled examples the teacher labels for the distillation of task models (texts, pairs,
sentences of words), beside data.train; they count in the soft-target and state losses, never in the
cross-entropy on labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from compress import api
from compress.errors import UserError
from compress.recipe import load_recipe
from compress.training.distill_task import logit_loss
from compress.training.finetune_hf import IGNORE, UNLABELED
from compress.training.settings import DistillLosses
from tests.test_tasks_compress import TAGS, TOPICS, _tagged_data, _topic_data
from tests.test_tasks_hf import TEXTS, head_model, pair_rows, recipe, write

DISTILL: dict[str, Any] = {"type": "distill", "epochs": 1, "batch_size": 8, "lr": 1e-3, "keep_every": 2}


def _texts(tmp_path: Path, n: int) -> Path:
    return write(tmp_path / "unlabelled.jsonl", [{"text": TEXTS[i % len(TEXTS)] + f" {i}"} for i in range(n)])


def test_unlabelled_texts_extend_a_classifiers_distillation(tmp_path: Path, tiny_bert: Path) -> None:
    model = head_model(tiny_bert, tmp_path / "m", "sequence", TOPICS)
    data = {**_topic_data(tmp_path), "transfer": [{"path": str(_texts(tmp_path, 30))}, {"reference": "pang-lee"}]}
    report = api.run(recipe(tmp_path, model, "classification", data, [DISTILL]))
    metrics = report.stages[0]["metrics"]
    assert metrics["train_examples"] == 48 and metrics["transfer_examples"] == 30 + 200
    assert metrics["steps"] == -(-(48 + 230) // 8)  # one epoch over both: the transfer set is trained on


def test_a_tagger_learns_per_word_from_plain_text(tmp_path: Path, tiny_bert: Path) -> None:
    model = head_model(tiny_bert, tmp_path / "m", "token", TAGS)
    data = {**_tagged_data(tmp_path), "transfer": [{"path": str(_texts(tmp_path, 20))}]}
    report = api.run(recipe(tmp_path, model, "token-classification", data, [DISTILL]))
    metrics = report.stages[0]["metrics"]
    assert metrics["train_examples"] == 36 and metrics["transfer_examples"] == 20


def test_unlabelled_rows_count_in_the_kl_and_not_in_the_cross_entropy() -> None:
    torch.manual_seed(0)
    logits, teacher = torch.randn(4, 3), torch.randn(4, 3)
    labels = torch.tensor([0, UNLABELED, 2, UNLABELED])
    ce = logit_loss(logits, None, labels, DistillLosses(ce=1.0))
    assert torch.allclose(ce, F.cross_entropy(logits[[0, 2]], labels[[0, 2]]))
    kl = logit_loss(logits, teacher, labels, DistillLosses(kl=1.0))
    assert torch.allclose(kl, logit_loss(logits, teacher, torch.tensor([0, 1, 2, 0]), DistillLosses(kl=1.0)))
    alone = logit_loss(logits, None, torch.full((4,), UNLABELED), DistillLosses(ce=1.0))
    assert float(alone) == 0.0
    # A tagger: the words' first sub-tokens, labelled or not, enter the KL; only labelled ones the CE.
    per_token = torch.randn(1, 4, 3)
    tags = torch.tensor([[IGNORE, 1, UNLABELED, IGNORE]])
    ce_tokens = logit_loss(per_token, None, tags, DistillLosses(ce=1.0))
    assert torch.allclose(ce_tokens, F.cross_entropy(per_token[0, [1]], torch.tensor([1])))


def test_a_pair_classifier_refuses_single_texts_in_one_line(tmp_path: Path, tiny_bert: Path) -> None:
    model = head_model(tiny_bert, tmp_path / "m", "sequence", ("no", "yes"))
    pairs = {"label_field": "label", "text_field": "premise", "text_pair_field": "hypothesis"}
    data = {
        "train": {"path": str(write(tmp_path / "tr.jsonl", pair_rows(16))), **pairs},
        "evaluation": {"path": str(write(tmp_path / "ev.jsonl", pair_rows(8))), **pairs},
        "transfer": [{"path": str(_texts(tmp_path, 10))}],
    }
    with pytest.raises(UserError, match="holds single texts; a classifier of text pairs learns from pairs"):
        api.run(recipe(tmp_path, model, "classification", data, [DISTILL]))
    assert not list((tmp_path / "runs").glob("*/01_*"))  # refused before any stage
    unlabelled_pairs = write(
        tmp_path / "pairs.jsonl", [{k: r[k] for k in ("premise", "hypothesis")} for r in pair_rows(6)]
    )
    data["transfer"] = [{"path": str(unlabelled_pairs), "text_field": "premise", "text_pair_field": "hypothesis"}]
    report = api.run(recipe(tmp_path, model, "classification", data, [DISTILL]))
    assert report.stages[0]["metrics"]["transfer_examples"] == 6 and report.stages[0]["metrics"]["input_kind"] == "pair"


@pytest.mark.parametrize(
    ("task", "stages", "message"),
    [
        ("classification", [{**DISTILL, "losses": {"ce": 1.0}}], "no distillation reads the teacher's outputs"),
        ("classification", [{"type": "export"}], "no distillation reads the teacher's outputs"),
        ("embedding", [{"type": "export"}], "data.transfer is for distilling Hugging Face classifiers and taggers"),
    ],
)
def test_transfer_that_would_teach_nothing_is_refused(
    tmp_path: Path, tiny_bert: Path, task: str, stages: list[Any], message: str
) -> None:
    data: dict[str, Any] = {**_topic_data(tmp_path), "transfer": [{"path": str(_texts(tmp_path, 4))}]}
    if task == "embedding":
        data = {"evaluation": {"reference": "lee"}, "transfer": data["transfer"]}
    with pytest.raises(UserError, match=message):
        load_recipe(recipe(tmp_path, tiny_bert, task, data, stages))
