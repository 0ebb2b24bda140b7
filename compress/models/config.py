"""The zoo's model configuration: one frozen object, validated on construction, stored as config.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from compress.errors import UserError

ZOO_FORMAT = "edge-compress-zoo"
ZOO_VERSION = 1
TASKS = ("classification", "lm")
AttentionKind = Literal["dense", "windowed", "block_sparse", "linformer", "kernelized", "lsh"]
KINDS: tuple[str, ...] = ("dense", "windowed", "block_sparse", "linformer", "kernelized", "lsh")


@dataclass(frozen=True)
class AttentionConfig:
    """One attention kind and its parameters; validated on construction (the error names the field)."""

    kind: str = "dense"
    causal: bool = False
    window: int = 0  # windowed: half-width w; query i sees keys i-w..i+w (i-w..i if causal)
    global_tokens: int = 0  # windowed / block_sparse: leading tokens (CLS...) that see and are seen by all
    block: int = 0  # block_sparse: block size b
    local_blocks: int = 1  # block_sparse: neighbour blocks on each side
    random_blocks: int = 0  # block_sparse: extra seeded random key blocks per query block
    proj_len: int = 0  # linformer: k, the projected sequence length
    max_len: int = 0  # linformer: longest sequence the projections cover
    features: int = 0  # kernelized: m random features
    chunk: int = 0  # lsh: positions per chunk of the sorted order; each chunk also sees the one before
    n_hashes: int = 0  # lsh: hashing rounds
    buckets: int = 0  # lsh: buckets per round (even: argmax over [xR, -xR])
    seed: int = 0  # block_sparse random blocks, kernelized features, lsh rotations

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"attention.kind: unknown kind {self.kind!r}; allowed: {', '.join(KINDS)}")
        if self.global_tokens < 0:
            raise ValueError(f"attention.global_tokens must be >= 0, got {self.global_tokens}")
        if self.kind == "windowed" and self.window <= 0:
            raise ValueError(f"attention.window must be > 0 for windowed attention, got {self.window}")
        if self.kind == "block_sparse":
            if self.block <= 0:
                raise ValueError(f"attention.block must be > 0 for block_sparse attention, got {self.block}")
            if self.local_blocks < 0 or self.random_blocks < 0:
                raise ValueError("attention.local_blocks and attention.random_blocks must be >= 0")
            if self.causal:
                raise ValueError("attention: block_sparse is bidirectional here; use windowed for causal models")
        if self.kind == "linformer":
            if self.proj_len <= 0 or self.max_len <= 0:
                raise ValueError("attention.proj_len and attention.max_len must be > 0 for linformer attention")
            if self.causal:
                raise ValueError("attention: linformer mixes all positions and cannot be causal (Wang et al. 2020)")
        if self.kind == "kernelized" and self.features <= 0:
            raise ValueError(f"attention.features must be > 0 for kernelized attention, got {self.features}")
        if self.kind == "lsh":
            self._check_lsh()

    def _check_lsh(self) -> None:
        if self.chunk <= 0 or self.n_hashes <= 0:
            raise ValueError("attention.chunk and attention.n_hashes must be > 0 for lsh attention")
        if self.buckets < 2 or self.buckets % 2:
            raise ValueError(f"attention.buckets must be even and >= 2 for lsh attention, got {self.buckets}")
        if self.global_tokens:
            raise ValueError("attention.global_tokens: lsh attention has no global tokens")


@dataclass(frozen=True)
class HourglassConfig:
    """Nawrot et al. 2021: `pre` full-length layers, shorten by `factor`, `inner` layers, upsample, `post`."""

    factor: int = 2
    pre: int = 1
    inner: int = 2
    post: int = 1
    downsample: str = "linear"  # linear: a learned projection of each group of `factor` tokens; avg: pooling

    def __post_init__(self) -> None:
        if self.factor < 2:
            raise ValueError(f"hourglass.factor must be >= 2, got {self.factor}")
        if min(self.pre, self.inner, self.post) < 0 or self.inner == 0:
            raise ValueError("hourglass.pre and hourglass.post must be >= 0 and hourglass.inner >= 1")
        if self.downsample not in ("linear", "avg"):
            raise ValueError(f"hourglass.downsample: {self.downsample!r}; allowed: linear, avg")


@dataclass(frozen=True)
class ZooConfig:
    """An encoder classifier or a causal LM built from any attention kind."""

    task: str = "classification"
    vocab_size: int = 259
    max_len: int = 1024
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2  # flat stack; with hourglass, its pre + inner + post layers are used instead
    d_ff: int = 256
    dropout: float = 0.0
    num_labels: int = 2
    pooling: str = "cls"
    reversible: bool = False
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    hourglass: HourglassConfig | None = None
    pad_id: int = 0
    # Width of one head; None: d_model / n_heads. Set by structured pruning, which removes heads but
    # keeps each remaining head's width (q/k/v then project d_model -> n_heads * head width).
    attention_head_dim: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task: {self.task!r}; allowed: {', '.join(TASKS)}")
        for name in ("vocab_size", "max_len", "d_model", "n_heads", "d_ff", "attention_head_dim"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.n_layers < 0 or (self.n_layers == 0 and self.hourglass is None):
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")
        if self.attention_head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling: {self.pooling!r}; allowed: cls, mean")
        if self.task == "lm" and not self.attention.causal:
            raise ValueError("a causal LM needs attention.causal: true")
        if self.task == "classification" and self.num_labels < 2:
            raise ValueError(f"num_labels must be >= 2, got {self.num_labels}")
        self._check_attention()
        if self.reversible and self.hourglass is not None:
            raise ValueError("reversible blocks and hourglass are separate choices here; pick one")

    def _check_attention(self) -> None:
        """The attention kind's parameters against the model's lengths."""
        if self.attention.kind == "block_sparse" and self.max_len % self.attention.block:
            raise ValueError(f"attention.block {self.attention.block} does not divide max_len {self.max_len}")
        if self.attention.kind == "linformer" and self.attention.max_len < self.max_len:
            raise ValueError("attention.max_len must be >= max_len for linformer attention")
        if self.attention.kind != "lsh":
            return
        if self.max_len % self.attention.chunk:
            raise ValueError(f"attention.chunk {self.attention.chunk} does not divide max_len {self.max_len}")
        if self.hourglass is not None:
            raise ValueError(
                "lsh attention inside an hourglass is not supported (its shortened lengths need whole chunks)"
            )

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.d_model // self.n_heads

    @property
    def attention_width(self) -> int:
        """Width of the concatenated heads: d_model unless heads were pruned."""
        return self.n_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return {"format": ZOO_FORMAT, "version": ZOO_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ZooConfig:
        """Parse config.json; unknown keys are errors (a newer format, or a typo)."""
        raw = dict(raw)
        if raw.pop("format", None) != ZOO_FORMAT:
            raise ValueError(f"not an edge-compress zoo config (format must be {ZOO_FORMAT!r})")
        version = raw.pop("version", None)
        if version != ZOO_VERSION:
            raise ValueError(f"zoo config version {version!r}; this edge-compress reads version {ZOO_VERSION}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; allowed: {sorted(known)}")
        attention = AttentionConfig(**raw.pop("attention", {}))
        hourglass = raw.pop("hourglass", None)
        return cls(attention=attention, hourglass=HourglassConfig(**hourglass) if hourglass else None, **raw)


def read_zoo_config(folder: Path) -> ZooConfig:
    """A zoo checkpoint's config.json, checked (no torch: preflight reads it before anything loads)."""
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"model.zoo: {folder} has no config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return ZooConfig.from_dict(raw)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg})") from None
    except (TypeError, ValueError) as exc:
        raise UserError(f"{path}: {exc}") from None
