"""Least-squares reconstruction after structured pruning: targets, solve, and the recipe wiring."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from rich.console import Console

from compress.context import Context
from compress.errors import UserError
from compress.models import hf
from compress.pipeline import run
from compress.recipe import load_recipe
from compress.stages.prune.reconstruct import _least_error_groups, _Normal, reconstruct_bert
from compress.stages.prune.structured import prune_bert
from tests.conftest import TEXTS


def _batches(n: int, seed: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    """Random token batches with ragged padding (the padding must not enter the fit)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (4, 16), generator=g)
        mask = torch.ones_like(ids)
        for row, length in enumerate((16, 11, 7, 13)):
            mask[row, length:] = 0
            ids[row, length:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    return out


def _hidden(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**b).last_hidden_state[b["attention_mask"].bool()] for b in batches])


def test_an_unpruned_copy_is_already_exact(tiny_bert: Path) -> None:
    """Targets are the original's pre-LayerNorm sums: an identical copy fits them with zero error, and the
    refitted copy computes what the original does."""
    original = hf.load_model(tiny_bert)
    twin = copy.deepcopy(original)
    vocab = original.config.vocab_size
    report = reconstruct_bert(original, twin, _batches(12, 0, vocab), ridge=0.0)
    for row in report:
        for part in ("attention_output", "ffn_output"):
            assert row[part]["error_before"] < 1e-5  # normal-equation arithmetic, float32 inputs
            assert row[part]["error_after"] < 1e-5
    held_out = _batches(2, 5, vocab)
    assert torch.allclose(_hidden(original, held_out), _hidden(twin, held_out), atol=1e-4)


def test_reconstruction_brings_the_pruned_model_back_towards_the_original(tiny_bert: Path) -> None:
    original = hf.load_model(tiny_bert)
    pruned = copy.deepcopy(original)
    prune_bert(pruned, heads=0.25, ffn=0.5, p=2)
    vocab = original.config.vocab_size
    held_out = _batches(4, 99, vocab)
    target = _hidden(original, held_out)
    before = (_hidden(pruned, held_out) - target).pow(2).mean()
    report = reconstruct_bert(original, pruned, _batches(24, 0, vocab), ridge=0.01)
    after = (_hidden(pruned, held_out) - target).pow(2).mean()
    assert len(report) == 2
    for row in report:
        for part in ("attention_output", "ffn_output"):
            assert row[part]["error_after"] < row[part]["error_before"]
    assert after < 0.5 * before  # on inputs the fit never saw
    # the shapes are the pruned ones: only values changed
    assert pruned.encoder.layer[0].output.dense.weight.shape == (32, 32)


def test_padding_does_not_enter_the_fit(tiny_bert: Path) -> None:
    """Same real tokens, different pad token ids: the same refit."""
    original = hf.load_model(tiny_bert)
    fits = []
    for pad in (0, 7):
        batches = _batches(6, 0, original.config.vocab_size)
        for b in batches:
            b["input_ids"][b["attention_mask"] == 0] = pad
        pruned = copy.deepcopy(original)
        prune_bert(pruned, heads=0.25, ffn=0.5, p=2)
        reconstruct_bert(original, pruned, batches, ridge=0.01)
        fits.append(pruned.encoder.layer[1].output.dense.weight.clone())
    assert torch.allclose(fits[0], fits[1], atol=1e-4)


@pytest.mark.parametrize("size", [1, 2])
def test_least_error_selection_drops_the_redundant_groups(size: int) -> None:
    """Groups 3-5 copy groups 0-2 (column for column) and group 6 is new: keeping 4 of 7 must keep group 6
    and one of each copy, at zero error, whatever the weights say about magnitude."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(500, 3 * size, generator=g)
    z = torch.cat([base, base, torch.randn(500, size, generator=g)], 1)
    y = z @ torch.randn(7 * size, 5, generator=g) + 0.3
    normal = _Normal()
    normal.add(z, y)
    kept = _least_error_groups(normal, 1e-9, torch.arange(7 * size).reshape(7, size), keep=4).tolist()
    assert 6 in kept and all((i in kept) != (i + 3 in kept) for i in range(3))
    columns = torch.arange(7 * size).reshape(7, size)[kept].flatten()
    restricted = normal.restricted(columns)
    assert restricted.error(restricted.solve(1e-9)) < 1e-6


def _greedy_obs_on_the_full_matrix(normal: _Normal, ridge: float, groups: torch.Tensor, keep: int) -> list[int]:
    """The selection written plainly: a solve per group and a full update of H^-1 at every step."""
    hinv = torch.linalg.inv(normal.regularised(ridge))
    w = hinv @ normal.zy
    alive = torch.ones(len(groups), dtype=torch.bool)
    for _ in range(len(groups) - keep):
        live = groups[alive]
        wg = w[live]
        cost = (wg * torch.linalg.solve(hinv[live[:, :, None], live[:, None, :]], wg)).sum((1, 2))
        cols = groups[int(torch.nonzero(alive)[int(cost.argmin())])]
        inv_block = torch.linalg.inv(hinv[cols][:, cols])
        w, hinv = w - hinv[:, cols] @ inv_block @ w[cols], hinv - hinv[:, cols] @ inv_block @ hinv[cols]
        alive[torch.nonzero((groups == cols).all(1))[0]] = False
    return torch.nonzero(alive).flatten().tolist()


@pytest.mark.parametrize(("size", "n_groups", "keep"), [(1, 300, 100), (1, 64, 60), (4, 40, 9)])
def test_the_fast_selection_chooses_what_the_plain_one_does(size: int, n_groups: int, keep: int) -> None:
    """Diagonal costs, in-place rank-1 updates and dropping dead rows change the speed, not the choice."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2000, n_groups * size, generator=g) * torch.linspace(0.2, 3.0, n_groups * size)
    y = z @ torch.randn(n_groups * size, 16, generator=g) + torch.randn(2000, 16, generator=g)
    normal = _Normal()
    normal.add(z, y)
    groups = torch.arange(n_groups * size).reshape(n_groups, size)
    fast = _least_error_groups(normal, 1e-3, groups, keep).tolist()
    assert fast == _greedy_obs_on_the_full_matrix(normal, 1e-3, groups, keep)


@pytest.mark.parametrize("select", ["magnitude", "error"])
def test_recipe_stage_refits_and_reports(
    recipe_for: Callable[..., Path], data_files: dict[str, Path], tmp_path: Path, select: str
) -> None:
    rec = {"ridge": 0.01, "select": select, "data": "train"}
    prune = {"type": "prune", "method": "structured", "heads": 0.25, "ffn": 0.5, "reconstruct": rec}
    train = tmp_path / "train.jsonl"  # 24 texts: every 10th (2) is held out of the fit
    train.write_text(
        "".join(
            json.dumps({"text": f"{a} and {b}"}) + "\n"
            for a, b in zip(TEXTS * 2, (TEXTS[3:] + TEXTS * 2)[:24], strict=True)
        )
    )
    data = {
        "train": {"path": str(train)},
        "evaluation": {"path": str(data_files["evaluation"]), "pair_fields": ["a", "b"], "score_field": "score"},
        "max_length": 32,
        "batch_size": 4,
    }
    recipe = load_recipe(recipe_for(stages=[prune, {"type": "export"}], data=data))
    run_dir = run(recipe, Context(recipe=recipe, run_dir=recipe.output.dir / recipe.name, console=Console(quiet=True)))
    metrics = json.loads((run_dir / "01_prune" / "metrics.json").read_text())
    rec = metrics["reconstruction"]
    assert rec["data"] == "train" and rec["texts"] == 22 and rec["held_out_texts"] == 2 and rec["tokens"] > 22
    assert 0 < rec["held_out_cosine_magnitude_only"] <= 1 + 1e-6 and 0 < rec["held_out_cosine"] <= 1 + 1e-6
    assert [row["layer"] for row in rec["layers"]] == [0, 1] and rec["select"] == select
    assert [(row["attention_output"]["kept"], row["ffn_output"]["kept"]) for row in rec["layers"]] == [(3, 32)] * 2
    folder = run_dir / "01_prune" / "model"
    config = json.loads((folder / "config.json").read_text())
    assert config["edge_compress_structure"] == {"heads": [3, 3], "intermediate": [32, 32]}
    assert hf.load_model(folder).encoder.layer[1].intermediate.dense.out_features == 32
    assert all(row["ffn_output"]["error_after"] <= row["ffn_output"]["error_before"] for row in rec["layers"])
    assert json.loads((run_dir / "02_export" / "metrics.json").read_text())["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize(
    ("prune", "data", "message"),
    [
        ({"method": "unstructured", "reconstruct": {}}, None, "reconstruct refits what structured pruning removed"),
        ({"method": "structured", "ffn": 0.5, "reconstruct": {"data": "train"}}, None, "reads data.train: give it"),
        ({"method": "structured", "ffn": 0.5, "reconstruct": {"ridge": -1}}, None, "greater than or equal to 0"),
        ({"method": "structured", "ffn": 0.5, "reconstruct": {"texts": 0}}, None, "greater than or equal to 1"),
    ],
)
def test_bad_reconstruct_settings(
    recipe_for: Callable[..., Path], prune: dict[str, object], data: object, message: str
) -> None:
    with pytest.raises(UserError, match=message):
        load_recipe(recipe_for(stages=[{"type": "prune", **prune}]))
