"""What attention a Hugging Face config.json asks for, read before any weights are loaded: which kinds
our ops keep efficient (Longformer's and ModernBERT's sliding windows) and which an exporter of dense
graphs would silently turn dense (refused by the export stage)."""

from __future__ import annotations

from typing import Any

LOCAL, GLOBAL = "sliding_attention", "full_attention"
MODERNBERT_EVERY = 3  # ModernBertConfig's default global_attn_every_n_layers
MODERNBERT_LOCAL = 128  # ModernBertConfig's default local_attention (two-sided)


def modernbert_layer_types(config: dict[str, Any]) -> list[str]:
    """Each layer's attention kind, as ModernBertConfig derives it when config.json does not list them:
    layer i is global iff i % global_attn_every_n_layers == 0."""
    listed = config.get("layer_types")
    if isinstance(listed, list):
        return [str(t) for t in listed]
    every = config.get("global_attn_every_n_layers", MODERNBERT_EVERY)
    layers = config.get("num_hidden_layers", 0)
    if not isinstance(every, int) or every < 1 or not isinstance(layers, int):
        raise ValueError(f"model: ModernBERT global_attn_every_n_layers {every!r} is not a positive int")
    return [GLOBAL if i % every == 0 else LOCAL for i in range(layers)]


def modernbert_window(config: dict[str, Any]) -> int:
    """The one-sided window of ModernBERT's local layers: local_attention // 2 (transformers' sliding_window:
    query i sees key j iff |i - j| <= it). ValueError for a window the op cannot take."""
    local = config.get("local_attention", MODERNBERT_LOCAL)
    if not isinstance(local, int) or isinstance(local, bool) or local < 2:
        raise ValueError(f"model: ModernBERT local_attention {local!r}: the local layers need a window of >= 2 tokens")
    return local // 2


def check_modernbert(config: dict[str, Any]) -> tuple[int, int]:
    """(local layers, their window) of a ModernBERT config.json, or a ValueError (one line) for what our
    export cannot keep efficient: an unknown layer kind, a bad window, or a window that spans every
    position (the banded op would be dense attention in disguise)."""
    kinds = modernbert_layer_types(config)
    unknown = sorted(set(kinds) - {LOCAL, GLOBAL})
    if unknown:
        raise ValueError(f"model: ModernBERT layer_types {unknown} are not {LOCAL} or {GLOBAL}")
    window = modernbert_window(config)
    positions = config.get("max_position_embeddings")
    if LOCAL in kinds and isinstance(positions, int) and 2 * window + 1 >= positions:
        raise ValueError(
            f"model: ModernBERT local_attention {config.get('local_attention')} covers all {positions} positions: "
            "its local layers are dense; set `dense_attention: true` in the export stage to export them as such"
        )
    return kinds.count(LOCAL), window


def sparse_attention_kind(config: dict[str, Any]) -> str | None:
    """What kind of non-dense attention a Hugging Face config.json asks for; None if it is dense.

    "longformer" and "modernbert" (with at least one local layer) are the kinds our exporters map to the
    WindowedAttention op; any other answer names what an exporter of dense graphs would silently lose
    (the export stage refuses those)."""
    model_type = str(config.get("model_type", ""))
    layer_types = config.get("layer_types") or []
    kind = None
    if model_type == "modernbert":
        kind = "modernbert" if LOCAL in modernbert_layer_types(config) else None
    elif model_type == "longformer":
        kind = "longformer"
    elif config.get("attention_window") is not None:  # LED and other Longformer-style encoders
        kind = f"{model_type} sliding window (attention_window={config['attention_window']})"
    elif config.get("attention_type") == "block_sparse":  # BigBird, BigBird-Pegasus
        kind = f"{model_type} block_sparse attention"
    # Qwen2-style configs keep a sliding_window value that is off unless use_sliding_window is set.
    elif config.get("sliding_window") is not None and config.get("use_sliding_window") is not False:
        kind = f"{model_type} sliding window (sliding_window={config['sliding_window']})"
    elif any(t != GLOBAL for t in layer_types):  # Gemma-style local/global layers
        kind = f"{model_type} layer_types {sorted(set(layer_types))}"
    elif "local" in (config.get("attention_layers") or []):  # GPT-Neo local attention
        kind = f"{model_type} local attention (window_size={config.get('window_size')})"
    elif model_type == "reformer":
        kind = "reformer LSH/local attention"
    return kind
