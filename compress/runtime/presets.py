"""int8 settings per CPU target, and which one a recipe gets.

One int8 artifact is shipped to every target of a recipe, so the preset must be safe on the weakest:
- x86_64-vnni: uint8 activations, int8 weights, full 8-bit range. VNNI's vpdpbusd multiplies u8 by s8
  and accumulates in int32, nothing saturates.
- x86_64-avx2: the same types with 7-bit weights (reduce_range). Without VNNI, ONNX Runtime's u8s8 kernels
  use vpmaddubsw, whose pairwise int16 sums saturate when both products are large; ONNX Runtime's
  quantization guide gives reduce_range (or U8U8) as the fix. 7-bit weights keep every pair sum in int16.
- aarch64: uint8 activations, int8 weights, full range. ARM's integer dot products (sdot/udot, or
  widening multiplies without them) accumulate in 32 bits, so there is no saturation to avoid; the guide
  finds U8S8 as fast as or faster than U8U8 on ARM64 at the same accuracy.
Signed activations (S8S8) are not offered: on x86 they left the residual Adds in float and ran slower
(docs/notes/quantization-facts.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

PresetName = Literal["x86_64-vnni", "x86_64-avx2", "aarch64"]
# What a recipe may ask for: a preset by name, or auto (from the recipe's targets and this CPU).
PresetChoice = Literal["auto", "x86_64-vnni", "x86_64-avx2", "aarch64"]


@dataclass(frozen=True)
class Preset:
    name: PresetName
    activation_type: Literal["uint8", "int8"]
    weight_type: Literal["int8", "uint8"]
    reduce_range: bool
    why: str

    def settings(self) -> dict[str, Any]:
        return {
            "activation_type": self.activation_type,
            "weight_type": self.weight_type,
            "reduce_range": self.reduce_range,
        }


PRESETS: dict[str, Preset] = {
    "x86_64-vnni": Preset(
        "x86_64-vnni",
        "uint8",
        "int8",
        False,
        "AVX-512/AVX VNNI multiplies u8 by s8 into int32 accumulators: full-range int8 weights do not saturate",
    ),
    "x86_64-avx2": Preset(
        "x86_64-avx2",
        "uint8",
        "int8",
        True,
        "without VNNI the u8s8 kernels (vpmaddubsw) can saturate int16 pair sums: 7-bit weights (reduce_range) "
        "avoid it, as ONNX Runtime's quantization guide advises",
    ),
    "aarch64": Preset(
        "aarch64",
        "uint8",
        "int8",
        False,
        "ARM64 dot products accumulate in 32 bits (no saturation); ONNX Runtime's guide finds U8S8 at least as "
        "fast as U8U8 there",
    ),
}


def host_has_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True if this x86-64 CPU has AVX-512 VNNI or AVX-VNNI."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_vnni", "avx_vnni"})
    return False


class CpuTarget(Protocol):
    """What a preset choice reads of a validation target (compress.targets.Target has it)."""

    @property
    def name(self) -> str: ...
    @property
    def arch(self) -> str: ...
    @property
    def vnni(self) -> bool | None: ...


def choose(explicit: str, targets: Sequence[CpuTarget]) -> tuple[Preset, str]:
    """The preset for a recipe, and why it was chosen.

    `explicit` is the quantize stage's `preset` ("auto" or a name). With "auto" the targets' CPU features
    decide, and one artifact serves every target: all aarch64 -> aarch64; an x86-64 target without VNNI
    (vnni False) -> x86_64-avx2; otherwise VNNI (this CPU's, for the native target).
    """
    names = ", ".join(t.name for t in targets)
    if explicit != "auto":
        return PRESETS[explicit], "named by the recipe (quantize.preset)"
    if all(t.arch == "aarch64" for t in targets):
        return PRESETS["aarch64"], f"auto: every target is aarch64 ({names})"
    without = [t.name for t in targets if t.arch == "x86_64" and t.vnni is False]
    if without:
        why = f"auto: {without[0]} is x86-64 without VNNI, and one artifact serves every target"
        return PRESETS["x86_64-avx2"], why
    return PRESETS["x86_64-vnni"], f"auto: every x86-64 target has VNNI ({names})"
