"""Hugging Face Optimum's ONNX Runtime quantizer, as its documentation shows it: one CPU preset, dynamic.

Runs in Optimum's own virtual environment (benchmarks/tasks.py creates it: Optimum's pins clash with ours),
so it imports nothing of edge-compress. It quantizes one ONNX file and prints one JSON line: the written
model, the preset's settings and the versions that made it.

    python optimum_quantize.py MODEL.onnx OUT_DIR avx512_vnni
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

PRESETS = ("avx512_vnni", "avx512", "avx2", "arm64")


def main() -> None:
    if len(sys.argv) != 4 or sys.argv[3] not in PRESETS:
        sys.exit(f"usage: optimum_quantize.py MODEL.onnx OUT_DIR {{{','.join(PRESETS)}}}")
    model, out_dir, preset = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    # Optimum is installed only in its own environment, never in ours (where mypy runs).
    from optimum.onnxruntime import ORTQuantizer  # type: ignore[import-not-found]
    from optimum.onnxruntime.configuration import AutoQuantizationConfig  # type: ignore[import-not-found]

    # The preset's own defaults (per-channel, symmetric weights, its operator list); dynamic: no calibration.
    config = getattr(AutoQuantizationConfig, preset)(is_static=False)
    quantizer = ORTQuantizer.from_pretrained(model.parent, file_name=model.name)
    quantizer.quantize(quantization_config=config, save_dir=out_dir)
    written = out_dir / f"{model.stem}_quantized.onnx"
    if not written.is_file():
        sys.exit(f"Optimum wrote no {written}")
    print(
        json.dumps(
            {
                "model": str(written),
                "preset": preset,
                "config": str(config),
                "per_channel": config.per_channel,
                "reduce_range": config.reduce_range,
                "operators": [getattr(op, "value", op) for op in config.operators_to_quantize],
                "versions": {
                    name: version(name) for name in ("optimum", "optimum-onnx", "onnxruntime", "transformers")
                },
            }
        )
    )


if __name__ == "__main__":
    main()
