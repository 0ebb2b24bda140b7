"""Benchmark (issue 4): MiniLM with 25% of heads and 50% of FFN neurons removed, recovered by distillation.

.venv/bin/python benchmarks/pruning.py [--runs N]      -> benchmarks/results/pruning.md
"""

from __future__ import annotations

from teacher_student import compare

if __name__ == "__main__":
    compare(
        "recipes/minilm-prune-int8.yaml",
        "structurally pruned MiniLM (heads -25%, FFN -50%, distilled) vs the original",
        "pruning.md",
        [
            ("cosine to the original fp32 >= 0.97", "cosine", 0.97),
            ("Lee Spearman within 0.02 of fp32", "spearman_gap", -0.02),
            ("ORT fp32 >= 1.5x faster than the unpruned fp32 ONNX", "speedup_fp32", 1.5),
        ],
    )
