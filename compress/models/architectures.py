"""The Hugging Face encoder architectures edge-compress takes, keyed by config.json's `model_type`.

One table says, per architecture, which transformers Auto class loads each head, whether the model
takes token_type_ids, which model family ONNX Runtime's transformers optimizer is told (None: it has
no attention fusion for the architecture, and the export is left unfused, saying why), which exporter
its graph is made with, and what else export needs. `check_supported` refuses anything else, in one
line, before any work.

Measured with transformers 5.23, torch 2.13 and onnxruntime 1.32 on 2-layer random-init models
(tests/test_encoders.py): the torchscript export of every entry matches PyTorch within 2e-7, fused or
not. The dynamo export matches too, but ONNX Runtime's Attention fusion finds none of its patterns in
the dynamo graph (BERT: 0 Attention nodes against 2 with torchscript), so torchscript is the default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from compress.errors import UserError

Head = Literal["sequence", "token"] | None
Exporter = Literal["torchscript", "dynamo"]

# The transformers Auto class that loads each head: None is the bare encoder (last_hidden_state).
AUTO_CLASSES: Mapping[str | None, str] = MappingProxyType(
    {
        None: "AutoModel",
        "sequence": "AutoModelForSequenceClassification",
        "token": "AutoModelForTokenClassification",
    }
)

# The key of config.json under which a structurally pruned checkpoint records its per-layer sizes
# (compress.models.structure does the surgery and the rebuild).
STRUCTURE_KEY = "edge_compress_structure"
# Architectures whose layers that surgery (and layer dropping) knows: encoder.layer[i].attention.self/output,
# intermediate.dense, output.dense. Others are refused before a run (compress.pipeline.preflight).
BERT_LAYOUT = frozenset({"bert", "roberta", "xlm-roberta", "electra"})


@dataclass(frozen=True)
class Architecture:
    """What loading, exporting and fusing one encoder architecture needs."""

    model_type: str
    token_type_ids: bool  # has a token-type embedding: the tokenizer's token_type_ids are a graph input
    ort_model_type: str | None  # onnxruntime.transformers.optimizer's model_type; None: left unfused
    unfused_because: str = ""  # why ort_model_type is None (the export's warning says it)
    exporter: Exporter = "torchscript"
    # Local attention: "custom_op" exports it as our WindowedAttention op (ModernBERT's band mask on
    # dense scores only when the export stage says `dense_attention: true`).
    window: Literal["custom_op"] | None = None
    # The config.json keys of the head count and width (ONNX Runtime's Attention fusion is told them).
    heads_key: str = "num_attention_heads"
    hidden_key: str = "hidden_size"
    # RoBERTa-style position ids start after padding_idx: max_position_embeddings - 2 tokens fit.
    position_offset: int = 0
    auto_classes: Mapping[str | None, str] = field(default_factory=lambda: AUTO_CLASSES)


ROBERTA_POSITIONS = 2  # padding_idx + 1 (transformers' create_position_ids_from_input_ids)

ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType(
    {
        a.model_type: a
        for a in (
            Architecture("bert", token_type_ids=True, ort_model_type="bert"),
            Architecture(
                "distilbert", token_type_ids=False, ort_model_type="bert", heads_key="n_heads", hidden_key="dim"
            ),
            # Attention fuses; EmbedLayerNormalization does not (position ids come from a cumulative sum
            # over the padding mask, a pattern the embedding fusion does not know).
            Architecture("roberta", token_type_ids=False, ort_model_type="bert", position_offset=ROBERTA_POSITIONS),
            Architecture("xlm-roberta", token_type_ids=False, ort_model_type="bert", position_offset=ROBERTA_POSITIONS),
            Architecture(
                "mpnet",
                token_type_ids=False,
                ort_model_type=None,
                unfused_because=(
                    "MPNet adds a relative position bias to the attention scores, a pattern ONNX Runtime's "
                    "attention fusion does not match"
                ),
                position_offset=ROBERTA_POSITIONS,
            ),
            Architecture("electra", token_type_ids=True, ort_model_type="bert"),
            Architecture(
                "deberta-v2",
                token_type_ids=False,  # DeBERTa-v3 has type_vocab_size 0: its tokenizer's types are not fed
                ort_model_type=None,
                unfused_because="ONNX Runtime has no fusion for DeBERTa's disentangled (content/position) attention",
            ),
            Architecture(
                "modernbert",
                token_type_ids=False,
                ort_model_type=None,
                unfused_because=(
                    "ONNX Runtime's encoder attention fusion does not match ModernBERT's rotary position "
                    "embeddings and fused, bias-free QKV projection"
                ),
                exporter="dynamo",
                window="custom_op",
            ),
            Architecture(
                "longformer",
                token_type_ids=False,
                ort_model_type=None,
                unfused_because="ONNX Runtime's fusions do not know the ai.edgecompress attention op",
                exporter="dynamo",
                window="custom_op",
                position_offset=ROBERTA_POSITIONS,
            ),
        )
    }
)


# Encoders with efficient attention that we refuse, and why (tests/exporters/test_bigbird.py checks
# the BigBird reason against transformers).
BIGBIRD_SPARSE = (
    "BigBird's block_sparse attention cannot be exported exactly: in eval, transformers 5.23 replaces its "
    "random blocks with block 0, so block 0's keys count 1 + num_random_blocks times in the softmax of every "
    "query block but the first and last, a weighting our BlockSparseAttention op's boolean layout cannot express"
)
BIGBIRD_FULL = "BigBird with original_full attention is a dense encoder not yet in the table"
REFORMER = (
    "Reformer is not mapped onto our LSHAttention op: unless config.hash_seed is set, transformers draws new "
    "random rotations at every forward pass (its outputs change from call to call, which no fixed graph "
    "matches); its rotations differ per head, its chunks look back cyclically across hashing rounds, and its "
    "'local' layers are chunked attention of another kind. Train a zoo model with attention.kind: lsh instead"
)


def refused_because(config: Mapping[str, Any]) -> str | None:
    """Why an encoder with efficient attention that transformers knows is refused (None: not one of them)."""
    kind = config.get("model_type")
    if kind == "big_bird":
        return BIGBIRD_SPARSE if config.get("attention_type", "block_sparse") == "block_sparse" else BIGBIRD_FULL
    if kind == "reformer":
        return REFORMER
    return None


def check_supported(config: Mapping[str, Any], where: str = "model") -> None:
    """Refuse, in one line, a config.json whose model_type is not in the table."""
    kind = config.get("model_type")
    reason = refused_because(config)
    if reason is not None:
        raise UserError(f"{where}: model_type {kind!r}: {reason}")
    if not isinstance(kind, str) or kind not in ARCHITECTURES:
        raise UserError(
            f"{where}: model_type {str(kind)[:60]!r} is not a supported encoder architecture "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )


def architecture(config: Mapping[str, Any]) -> Architecture:
    """The table's entry for a config.json (a one-line UserError if there is none)."""
    check_supported(config)
    return ARCHITECTURES[str(config["model_type"])]


def auto_class_name(config: Mapping[str, Any], head: Head = None) -> str:
    """The name of the transformers Auto class that loads this config's model with `head`."""
    return architecture(config).auto_classes[head]


def attention_shape(config: Mapping[str, Any]) -> tuple[int, int]:
    """(heads, hidden width) as the config names them (0 where it does not say)."""
    arch = ARCHITECTURES.get(str(config.get("model_type")), ARCHITECTURES["bert"])
    heads, hidden = config.get(arch.heads_key, 0), config.get(arch.hidden_key, 0)
    return (heads if isinstance(heads, int) else 0), (hidden if isinstance(hidden, int) else 0)


def usable_positions(config: Mapping[str, Any]) -> int | None:
    """How many tokens fit the model's position embeddings (None: the config does not say)."""
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int):
        return None
    arch = ARCHITECTURES.get(str(config.get("model_type")))
    return positions - (arch.position_offset if arch else 0)
