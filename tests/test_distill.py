"""Distillation: each loss against a hand computation, layer dropping, a frozen teacher, the stage end to end."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file, save_file

from compress.context import Context
from compress.errors import UserError
from compress.models import hf
from compress.pipeline import run
from compress.recipe import load_recipe
from compress.training.losses import (
    attention_kl,
    check_map,
    drop_layers,
    embedding_cosine,
    hidden_mse,
    hidden_relative,
    soft_kl,
    uniform_map,
)


def test_embedding_cosine_by_hand() -> None:
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    assert embedding_cosine(s, t).item() == pytest.approx((1 - 0 + 1 - 1) / 2)


def test_soft_kl_by_hand() -> None:
    s, t, temp = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]), 2.0
    p = torch.softmax(t / temp, -1)[0]  # teacher at T=2: sqrt(3) : 1
    expected = sum(float(pi) * math.log(float(pi) / 0.5) for pi in p) * temp**2
    assert soft_kl(s, t, temp).item() == pytest.approx(expected, rel=1e-6)
    assert soft_kl(t, t, temp).item() == pytest.approx(0.0, abs=1e-6)


def test_attention_kl_and_hidden_mse_by_hand() -> None:
    teacher = torch.tensor([[[[0.5, 0.5], [1.0, 0.0]]]])  # (B=1, H=1, S=2, S=2)
    student = torch.tensor([[[[0.25, 0.75], [0.5, 0.5]]]])
    mask = torch.tensor([[1, 0]])  # only query row 0 counts
    row0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert attention_kl(student, teacher, mask).item() == pytest.approx(row0, rel=1e-5)
    hs, ht = torch.zeros(1, 2, 2), torch.tensor([[[1.0, 3.0], [9.0, 9.0]]])
    assert hidden_mse(hs, ht, mask).item() == pytest.approx((1 + 9) / 2)
    # relative: the masked error over the teacher's masked energy, so scaling both changes nothing
    student = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert hidden_relative(student, ht, mask).item() == pytest.approx((0 + 4) / (1 + 9))
    assert hidden_relative(100 * student, 100 * ht, mask).item() == pytest.approx(0.4)


def test_uniform_layer_map_and_its_checks() -> None:
    assert uniform_map(3, 6) == (1, 3, 5)
    assert uniform_map(2, 2) == (0, 1)
    with pytest.raises(UserError, match=r"teacher layer 6 is out of range 0\.\.5"):
        check_map((1, 6), 2, 6)
    with pytest.raises(UserError, match="has 1 entries for a 2-layer student"):
        check_map((1,), 2, 6)


def test_layer_dropping_copies_the_right_weights(tiny_bert: Path) -> None:
    teacher = hf.load_model(tiny_bert)
    student = drop_layers(teacher, (1,))
    assert len(student.encoder.layer) == 1 and student.config.num_hidden_layers == 1
    s_q, t_q = (
        student.encoder.layer[0].attention.self.query.weight,
        teacher.encoder.layer[1].attention.self.query.weight,
    )
    assert torch.equal(s_q, t_q) and s_q.data_ptr() != t_q.data_ptr()  # a copy, not shared
    assert len(teacher.encoder.layer) == 2  # the teacher is untouched
    with pytest.raises(UserError, match="cannot keep layers"):
        drop_layers(teacher, (2,))


@pytest.fixture
def distill_recipe(recipe_for: Callable[..., Path], data_files: dict[str, Path]) -> Callable[..., Path]:
    def write(**distill: Any) -> Path:
        path = recipe_for(stages=[{"type": "distill", "epochs": 2, "batch_size": 4, **distill}, {"type": "export"}])
        spec = yaml.safe_load(path.read_text())
        spec["data"]["train"] = {"path": str(data_files["calibration"])}
        path.write_text(yaml.safe_dump(spec))
        return path

    return write


def _run(path: Path) -> Path:
    recipe = load_recipe(path)
    return run(recipe, Context(recipe=recipe, run_dir=recipe.output.dir / recipe.name, console=Console(quiet=True)))


def test_distill_layer_dropped_student_end_to_end(distill_recipe: Callable[..., Path], tiny_bert: Path) -> None:
    losses = {"embedding_cosine": 1.0, "hidden_mse": 0.5, "attention": 0.5}
    run_dir = _run(distill_recipe(keep_every=2, losses=losses))
    m = json.loads((run_dir / "01_distill" / "metrics.json").read_text())
    assert m["student_layers"] == 1 and m["teacher_layers"] == 2 and m["layer_map"] == [1]
    assert m["parameters"] < m["teacher_parameters"] and m["epochs_run"] == 2
    assert m["history"][-1]["train_loss"] < m["history"][0]["train_loss"]
    student = hf.load_model(run_dir / "01_distill" / "model")
    assert len(student.encoder.layer) == 1
    export = json.loads((run_dir / "02_export" / "metrics.json").read_text())
    assert export["max_abs_diff"] <= 1e-4


def test_hidden_relative_distillation_moves_every_layer_towards_the_teacher(
    distill_recipe: Callable[..., Path], tiny_bert: Path, tmp_path: Path
) -> None:
    """A student perturbed away from its teacher, taught by hidden_relative alone: the relative error of the
    hidden states falls at every layer, not only at the top."""
    perturbed = tmp_path / "perturbed"
    shutil.copytree(tiny_bert, perturbed)
    weights = load_file(perturbed / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    noisy = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.ndim == 2 else v for k, v in weights.items()}
    save_file(noisy, perturbed / "model.safetensors")
    path = distill_recipe(teacher=str(tiny_bert), epochs=4, lr=3e-3, losses={"hidden_relative": 1.0})
    spec = yaml.safe_load(path.read_text())
    spec["model"]["hf"] = str(perturbed)
    path.write_text(yaml.safe_dump(spec))
    run_dir = _run(path)
    teacher, start = hf.load_model(tiny_bert), hf.load_model(perturbed)
    student = hf.load_model(run_dir / "01_distill" / "model")
    tokenizer = hf.load_tokenizer(tiny_bert)
    names = hf.input_names(tokenizer, hf.read_config(tiny_bert))
    ids = {k: torch.from_numpy(v) for k, v in hf.encode(tokenizer, ["a b c d", "e f"], 16, names).items()}

    def errors(model: Any) -> list[float]:
        with torch.no_grad():
            got = model(**ids, output_hidden_states=True).hidden_states
            want = teacher(**ids, output_hidden_states=True).hidden_states
        return [float(hidden_relative(g, w, ids["attention_mask"])) for g, w in zip(got[1:], want[1:], strict=True)]

    before, after = errors(start), errors(student)
    assert all(a < 0.7 * b for a, b in zip(after, before, strict=True)), (before, after)
    # Each epoch reports the cosine to the teacher on the evaluation texts; here it rises as the student learns.
    history = json.loads((run_dir / "01_distill" / "metrics.json").read_text())["history"]
    cosine = [h["evaluation_cosine"] for h in history]
    assert len(cosine) >= 2 and all(-1.0 <= c <= 1.0 for c in cosine) and cosine[-1] > cosine[0], cosine


def test_hidden_relative_refuses_a_teacher_of_another_width(
    distill_recipe: Callable[..., Path], tiny_bert: Path, tmp_path: Path
) -> None:
    from transformers import BertConfig, BertModel

    narrow = tmp_path / "narrow"
    shutil.copytree(tiny_bert, narrow)
    config = BertConfig.from_pretrained(narrow)
    config.hidden_size, config.intermediate_size = 16, 32
    BertModel(config).save_pretrained(narrow, safe_serialization=True)
    path = distill_recipe(teacher=str(narrow), losses={"hidden_relative": 1.0})
    with pytest.raises(UserError, match="hidden_relative needs student and teacher of one width, not 32 and 16"):
        _run(path)


def test_select_fidelity_holds_out_training_texts(distill_recipe: Callable[..., Path]) -> None:
    """select: fidelity keeps the epoch closest to the teacher on held-out training texts, not on Lee."""
    path = distill_recipe(keep_every=2, epochs=3, select="fidelity")
    with pytest.raises(UserError, match="holds out 16 of the 12 training texts"):
        _run(path)  # too few texts to hold any out
    spec = yaml.safe_load(path.read_text())
    train = Path(spec["data"]["train"]["path"])
    texts = [json.loads(line)["text"] for line in train.read_text().splitlines()]
    many = [f"{a} {b}" for a in texts for b in texts[:5]]  # 60 texts
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in many))
    run_dir = _run(path)
    m = json.loads((run_dir / "01_distill" / "metrics.json").read_text())
    fidelity = [h["fidelity"] for h in m["history"]]
    assert m["held_out_texts"] >= 16 and m["select"] == "fidelity"
    assert all(-1.0 <= f <= 1.0 for f in fidelity) and all("spearman" in h for h in m["history"])
    assert m["best_fidelity"] == max(fidelity)
    assert m["best_epoch"] == fidelity.index(max(fidelity)) + 1  # chosen by fidelity, whatever Spearman says


def test_teacher_receives_no_gradient(tiny_bert: Path) -> None:
    from compress.recipe import HFModel
    from compress.tasks import embedding

    names = ("input_ids", "attention_mask", "token_type_ids")
    teacher = embedding.build_module(hf.load_model(tiny_bert), HFModel(hf=tiny_bert), names).requires_grad_(False)
    student = embedding.build_module(drop_layers(teacher.encoder, (0,)), HFModel(hf=tiny_bert), names)
    ids = torch.randint(5, 40, (2, 7))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    with torch.no_grad():
        target = teacher(**inputs)
    embedding_cosine(student(**inputs), target).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())


def test_layer_map_out_of_range_is_a_user_error(distill_recipe: Callable[..., Path]) -> None:
    with pytest.raises(UserError, match="teacher layer 5 is out of range"):
        _run(distill_recipe(keep_every=2, layer_map=[5], losses={"hidden_mse": 1.0}))


def test_temperature_must_be_positive(distill_recipe: Callable[..., Path]) -> None:
    with pytest.raises(UserError, match="temperature: Input should be greater than 0"):
        load_recipe(distill_recipe(losses={"kl": 1.0, "temperature": 0}))


def test_incompatible_vocabularies(distill_recipe: Callable[..., Path], tiny_bert: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-teacher"
    other.mkdir()
    for item in tiny_bert.iterdir():
        (other / item.name).write_bytes(item.read_bytes())
    words = (other / "vocab.txt").read_text().splitlines()
    (other / "vocab.txt").write_text("\n".join([*words[:-1], "zebra"]) + "\n")
    (other / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="has another vocabulary than the model"):  # before any stage runs
        _run(distill_recipe(teacher=str(other)))
