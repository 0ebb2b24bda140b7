"""Zoo checkpoints: config.json + model.safetensors, loadable by recipes as `model: {zoo: PATH}`."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from compress.data.cache import write_atomic
from compress.errors import UserError
from compress.models.config import read_zoo_config
from compress.models.encoder import ZooCausalLM, ZooClassifier, build_model

ZooModel = ZooClassifier | ZooCausalLM


def save_zoo(model: ZooModel, folder: Path) -> None:
    """Write config.json and model.safetensors (each atomically) into `folder`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".model.safetensors.tmp"
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(folder / "model.safetensors")
    write_atomic(folder / "config.json", (json.dumps(model.cfg.to_dict(), indent=2) + "\n").encode())


def load_zoo(folder: Path) -> ZooModel:
    """The model in `folder`, in eval mode; every tensor must be present and of the right shape."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not folder.is_dir():
        raise UserError(f"model.zoo: {folder} is not a folder")
    cfg = read_zoo_config(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"model.zoo: {folder} holds no model.safetensors")
    model = build_model(cfg)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{weights}: unreadable safetensors file ({exc})") from None
    _check_state(model, state, weights)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _check_state(model: nn.Module, state: dict, where: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"{where}: missing tensors {', '.join(missing[:3])}{more} for this config")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise UserError(f"{where}: tensors the config does not have: {', '.join(unexpected[:3])}")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise UserError(
                f"{where}: tensor {name} has shape {tuple(state[name].shape)}, the config needs {tuple(tensor.shape)}"
            )
