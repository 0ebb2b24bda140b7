"""Zoo models: reversible gradients, Hourglass shapes and causality, checkpoints that reload exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compress.errors import UserError
from compress.models.attention import AttentionConfig
from compress.models.blocks import Block
from compress.models.config import HourglassConfig, ZooConfig
from compress.models.encoder import ZooCausalLM, ZooClassifier, build_model
from compress.models.reversible import reversible_stack
from compress.models.zoo import load_zoo, save_zoo

ATTENTIONS = {
    "dense": AttentionConfig("dense"),
    "windowed": AttentionConfig("windowed", window=4, global_tokens=1),
    "block_sparse": AttentionConfig("block_sparse", block=8, random_blocks=1),
    "linformer": AttentionConfig("linformer", proj_len=8, max_len=64),
    "kernelized": AttentionConfig("kernelized", features=16),
}


def tiny(**kw: object) -> ZooConfig:
    base: dict = {"vocab_size": 40, "max_len": 64, "d_model": 16, "n_heads": 2, "n_layers": 2, "d_ff": 32}
    base.update(kw)
    return ZooConfig(**base)


def batch(b: int, s: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 40, (b, s), generator=gen)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[-1, s - s // 3 :] = 0
    return ids, mask


@pytest.mark.parametrize("kind", list(ATTENTIONS))
@pytest.mark.parametrize("s", [13, 64])
def test_classifier_runs_with_every_attention(kind: str, s: int) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(attention=ATTENTIONS[kind]))
    ids, mask = batch(3, s)
    logits = model(ids, mask)
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()
    loss = model.loss({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1])})
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_reversible_backward_reproduces_plain_autograd(dropout: float) -> None:
    """Recomputing activations in backward gives the gradients autograd gets by storing them."""
    torch.manual_seed(0)
    cfg = tiny(dropout=dropout, attention=AttentionConfig("windowed", window=3))
    blocks = torch.nn.ModuleList(Block(cfg) for _ in range(3)).train()
    x = torch.randn(2, 11, 16, requires_grad=True)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 8:] = False

    torch.manual_seed(1)
    y = reversible_stack(blocks, x, mask)
    (y * torch.linspace(-1, 1, 16)).sum().backward()
    rev = [x.grad.clone()] + [p.grad.clone() for p in blocks.parameters()]  # type: ignore[union-attr]
    x.grad = None
    blocks.zero_grad()

    torch.manual_seed(1)
    x1 = x2 = x
    for block in blocks:
        x1 = x1 + block.f(x2, mask)  # type: ignore[operator]
        x2 = x2 + block.g(x1)  # type: ignore[operator]
    ((x1 + x2) / 2 * torch.linspace(-1, 1, 16)).sum().backward()
    plain = [x.grad] + [p.grad for p in blocks.parameters()]
    for a, b in zip(rev, plain, strict=True):
        assert b is not None and torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_reversible_model_trains() -> None:
    torch.manual_seed(0)
    model = build_model(tiny(reversible=True, n_layers=3)).train()
    ids, mask = batch(4, 20)
    labels = torch.tensor([0, 1, 0, 1])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = model.loss({"input_ids": ids, "attention_mask": mask, "labels": labels})
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first * 0.5


@pytest.mark.parametrize("s", [1, 5, 6, 7, 33])
@pytest.mark.parametrize("causal", [False, True])
def test_hourglass_shapes_for_any_length(s: int, causal: bool) -> None:
    torch.manual_seed(0)
    hg = HourglassConfig(factor=3, pre=1, inner=1, post=1)
    cfg = tiny(task="lm" if causal else "classification", hourglass=hg, attention=AttentionConfig(causal=causal))
    ids, mask = batch(2, s)
    out = build_model(cfg)(ids, mask)
    assert out.shape == ((2, s, 40) if causal else (2, 2))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "attention",
    [AttentionConfig("dense", causal=True), AttentionConfig("windowed", window=5, causal=True)],
)
@pytest.mark.parametrize("downsample", ["linear", "avg"])
def test_hourglass_lm_never_sees_the_future(attention: AttentionConfig, downsample: str) -> None:
    torch.manual_seed(0)
    hg = HourglassConfig(factor=4, pre=1, inner=2, post=1, downsample=downsample)
    model = build_model(tiny(task="lm", hourglass=hg, attention=attention))
    ids, _ = batch(1, 30)
    mask = torch.ones_like(ids)
    base = model(ids, mask)
    for cut in (1, 4, 9, 17, 29):
        changed = ids.clone()
        changed[:, cut:] = (changed[:, cut:] + 7) % 40
        out = model(changed, mask)
        assert torch.allclose(out[:, :cut], base[:, :cut], atol=1e-5), f"position < {cut} saw the future"
        assert not torch.allclose(out[:, cut:], base[:, cut:])


def test_lm_loss_ignores_padding() -> None:
    torch.manual_seed(0)
    model = build_model(tiny(task="lm", attention=AttentionConfig("windowed", window=4, causal=True)))
    assert isinstance(model, ZooCausalLM)
    ids, _ = batch(1, 12)
    short = model.loss({"input_ids": ids[:, :8], "attention_mask": torch.ones(1, 8, dtype=torch.long)})
    padded_ids = torch.cat([ids[:, :8], torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 8 + [0] * 4])
    assert torch.allclose(model.loss({"input_ids": padded_ids, "attention_mask": mask}), short, atol=1e-6)


@pytest.mark.parametrize("kind", list(ATTENTIONS))
def test_checkpoint_round_trip(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(attention=ATTENTIONS[kind], reversible=kind == "dense"))
    save_zoo(model, tmp_path / "m")
    again = load_zoo(tmp_path / "m")
    assert isinstance(again, ZooClassifier) and again.cfg == model.cfg
    ids, mask = batch(2, 24)
    assert torch.equal(again(ids, mask), model(ids, mask))


def test_checkpoint_with_missing_tensors_is_a_clear_error(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_zoo(build_model(tiny()), tmp_path / "m")
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    del state["head.weight"]
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(UserError, match=r"missing tensors head\.weight for this config"):
        load_zoo(tmp_path / "m")


def test_checkpoint_config_errors(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    save_zoo(build_model(tiny()), folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["attention"]["kind"] = "sparse"
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="unknown kind 'sparse'"):
        load_zoo(folder)
    raw["attention"]["kind"] = "dense"
    raw["colour"] = "blue"
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"unknown config keys \[.colour.\]"):
        load_zoo(folder)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"attention": AttentionConfig("block_sparse", block=24)}, "does not divide max_len 64"),
        ({"task": "lm"}, "a causal LM needs attention.causal: true"),
        ({"d_model": 15}, "not divisible by n_heads"),
        ({"attention": AttentionConfig("linformer", proj_len=4, max_len=32)}, "attention.max_len must be >= max_len"),
    ],
)
def test_bad_model_configs(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(**kw)
