"""export, for Hugging Face encoders with windowed attention (Longformer, ModernBERT): which kind a
config.json asks for, the export with our WindowedAttention op, the lengths that catch window bugs, and
the checks again with the native kernels. Any other attention that is not dense is refused: an exporter
of dense graphs would silently lose it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.context import Context
from compress.errors import UserError
from compress.models import hf
from compress.stages.export.config import ExportStage
from exporters import native, onnx_export
from exporters.hf_attention import check_modernbert, modernbert_window, sparse_attention_kind
from exporters.longformer import export_longformer
from exporters.modernbert import export_modernbert

LONGFORMER_WINDOW = 512  # LongformerConfig's default attention_window (two-sided)
PAIR_SHORTEST = 8  # the shortest pair length a window check uses


def announce(kind: str | None, config: dict[str, Any], cfg: ExportStage, ctx: Context) -> None:
    """Say how the model's windowed attention is exported (loudly when it is made dense)."""
    if kind == "modernbert":
        local, window = check_modernbert(config)
        ctx.log(f"ModernBERT: {local} local layers (window {window}) as ai.edgecompress::WindowedAttention")
    elif cfg.dense_attention and sparse_attention_kind(config) == "modernbert":
        ctx.warn(
            "export: dense_attention: true: ModernBERT's local layers are exported as dense scores under a band "
            "mask (standard ops only, quadratic in the length); the report says so"
        )


def export_windowed(kind: str, module: Any, example: dict[str, Any], path: Path, outputs: tuple[str, ...]) -> list[int]:
    """Export with the windowed layers as our op; the windows of those layers."""
    exporter = export_longformer if kind == "longformer" else export_modernbert
    try:
        return exporter(module, path, example=example, output_names=outputs)
    except ValueError as exc:  # a model the exporter cannot map exactly (would come out dense)
        raise UserError(str(exc)) from None


def window_checks(  # noqa: PLR0917
    kind: str,
    tokenizer: Any,
    texts: list[Any],
    config: dict[str, Any],
    max_length: int,
    names: tuple[str, ...],
    input_kind: str,
) -> list[dict[str, Any]]:
    """Batches at lengths below, at, at multiples of and above the one-sided window, padded and not (a
    Longformer's HF code pads to a multiple of the two-sided window), and for a Longformer a batch whose
    first tokens are global (attention_mask 2)."""
    if kind == "longformer":
        windows = config.get("attention_window", LONGFORMER_WINDOW)
        one_side = min(windows if isinstance(windows, list) else [windows]) // 2
    else:
        one_side = modernbert_window(config)
    checks = []
    # A pair needs room for both texts and three special tokens: shorter checks are not pairs any more.
    shortest = PAIR_SHORTEST if input_kind == "pair" else 2
    for length in (n for n in check_lengths(one_side, max_length) if n >= shortest):
        checks.append(hf.encode(tokenizer, texts[:2], length, names, pad_to=length, kind=input_kind))
        checks.append(hf.encode(tokenizer, texts[:3], length, names, kind=input_kind))
    if kind == "longformer":
        glob = hf.encode(tokenizer, texts[:3], max_length, names, kind=input_kind)
        glob["attention_mask"][:, 0] *= 2  # real first tokens become global
        checks.append(glob)
    return checks


def custom_op_checks(
    module: Any, path: Path, checks: list[dict[str, Any]], agreement: Any, *, cfg: ExportStage, ctx: Context
) -> tuple[Any, dict[str, Any]]:
    """The checks again with our ops' native kernels, when built (validation times the model with
    them); the metrics the report shows for a graph with our ops."""
    ops = onnx_export.custom_ops(path)
    kernel = "function body"
    if native.available():
        fast = onnx_export.check_against_torch(module, path, checks, cfg.tolerance, native=True)
        ctx.log(f"ONNX Runtime (native kernels) matches PyTorch: max |diff| {fast.max_abs_diff:.2e}")
        agreement, kernel = max(agreement, fast, key=lambda a: a.max_abs_diff), "native"
    else:
        ctx.warn(
            "export: no native kernel library for this machine; ONNX Runtime runs the attention ops' "
            "function bodies (portable, slower): run `edge-compress build-ops`"
        )
    attention = ["windowed"] * ops.get("WindowedAttention", 0)
    extra: dict[str, Any] = {"attention": attention, "custom_ops": ops, "custom_op_kernel": kernel}
    full = onnx_export.count_ops(path, "com.microsoft", "MultiHeadAttention")
    if full:  # ModernBERT's global layers
        attention += ["global"] * full
        extra["global_attention"] = (
            f"com.microsoft::MultiHeadAttention x{full}, no mask input (ONNX Runtime's O(S) kernel)"
        )
    return agreement, extra


def check_lengths(window: int, max_length: int) -> list[int]:
    """Sequence lengths that catch windowed/blocked export bugs: below, equal to, a multiple of and
    above the window (block), odd lengths (an Hourglass pads to its shortening factor), and the longest;
    those <= max_length, no repeats."""
    w = max(window, 1)
    wanted = [max(2, w // 2), w, w + 3, 2 * w, 3 * w + 5, max_length]
    return sorted({n for n in wanted if 2 <= n <= max_length})
