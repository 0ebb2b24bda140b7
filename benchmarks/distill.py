"""Benchmark (issue 5): the 3-layer distilled MiniLM student against its 6-layer teacher, in one run.

.venv/bin/python benchmarks/distill.py [--runs N]      -> benchmarks/results/distill.md
"""

from __future__ import annotations

from teacher_student import compare

if __name__ == "__main__":
    compare(
        "recipes/minilm-distill-int8.yaml",
        "distilled MiniLM student (3 layers) vs teacher (6 layers)",
        "distill.md",
        [
            ("student Lee Spearman >= 0.49", "spearman", 0.49),
            ("student ORT fp32 >= 1.8x faster than the teacher", "speedup_fp32", 1.8),
        ],
    )
