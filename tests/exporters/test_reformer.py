"""Reformer is refused with its reason, and the first part of the reason is checked against transformers:
without hash_seed, two forward passes of the same model on the same input differ (fresh rotations)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import ReformerConfig, ReformerModel

import compress
from compress.models.architectures import REFORMER, check_supported


def _config() -> ReformerConfig:
    return ReformerConfig(
        vocab_size=64,
        hidden_size=32,
        num_attention_heads=2,
        attention_head_size=16,
        feed_forward_size=32,
        attn_layers=["lsh", "lsh"],
        lsh_attn_chunk_length=8,
        local_attn_chunk_length=8,
        num_buckets=4,
        num_hashes=2,
        axial_pos_embds=False,
        max_position_embeddings=64,
        is_decoder=False,
    )


def test_transformers_reformer_hashes_differently_on_every_call() -> None:
    torch.manual_seed(0)
    model = ReformerModel(_config()).eval()
    ids = torch.randint(0, 64, (1, 32))
    with torch.no_grad():
        first, second = (model(ids).last_hidden_state for _ in range(2))
    assert not torch.allclose(first, second)  # no fixed graph can match this


def test_reformer_is_refused_with_the_reason() -> None:
    with pytest.raises(compress.UserError) as info:
        check_supported(_config().to_dict(), where="model.hf")
    assert REFORMER in str(info.value)


def test_cli_refuses_a_reformer_folder(tmp_path: Path) -> None:
    folder = tmp_path / "reformer"
    ReformerModel(_config()).save_pretrained(folder)  # safetensors, as a user's folder would hold
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: r\nmodel: {{hf: {folder}}}\ntask: embedding\n"
        "data: {evaluation: {reference: lee}}\nstages: [{type: export}]\n"
        f"output: {{dir: {tmp_path / 'runs'}}}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "compress.cli", "check", str(recipe)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert "Reformer is not mapped onto our LSHAttention op" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()
