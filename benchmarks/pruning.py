"""Benchmark (issue 4): pruning, side by side with the unpruned model, in one run per part.

.venv/bin/python benchmarks/pruning.py [--part minilm|windowed|all] [--runs N]

minilm    MiniLM with 25% of heads and 50% of FFN neurons removed, recovered by distillation, vs the
          original (ONNX Runtime fp32 and int8)                        -> benchmarks/results/pruning.md
windowed  the windowed SpamAssassin classifier with 50% of heads and FFN neurons removed, recovered by
          distillation (recipes/windowed-prune.yaml), vs the reference (PyTorch)
                                                                      -> benchmarks/results/pruning_windowed.md
unstructured  the windowed classifier at 80% unstructured sparsity (gradual, recovered by distillation;
          recipes/windowed-unstructured.yaml): accuracy, zipped size, and speed as measured
                                                                  -> benchmarks/results/pruning_unstructured.md
"""

from __future__ import annotations

import argparse
import sys

from teacher_student import compare
from zoo_student import compare as compare_zoo

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("minilm", "windowed", "unstructured", "all"), default="all")
    parser.add_argument("--runs", type=int, default=300, help="timed runs per variant")
    args = parser.parse_args()
    command = " ".join(sys.argv)
    sys.argv = [sys.argv[0], f"--runs={args.runs}"]  # teacher_student parses --runs itself
    if args.part in ("minilm", "all"):
        compare(
            "recipes/minilm-prune-int8.yaml",
            "structurally pruned MiniLM (heads -25%, FFN -50%, distilled) vs the original",
            "pruning.md",
            [
                ("cosine to the original fp32 >= 0.97", "cosine", 0.97),
                ("Lee Spearman within 0.02 of fp32", "spearman_gap", -0.02),
                ("ORT fp32 >= 1.5x faster than the unpruned fp32 ONNX", "speedup_fp32", 1.5),
            ],
            command=command,
        )
    if args.part in ("windowed", "all"):
        compare_zoo(
            "recipes/windowed-prune.yaml",
            "windowed classifier, 50% of heads and FFN neurons removed and distilled, vs the reference",
            "pruning_windowed.md",
            max_drop_points=0.5,
            runs=min(args.runs, 50),
            command=command,
        )
    if args.part in ("unstructured", "all"):
        compare_zoo(
            "recipes/windowed-unstructured.yaml",
            "windowed classifier at 80% unstructured sparsity (gradual, distilled) vs the reference",
            "pruning_unstructured.md",
            max_drop_points=0.5,
            runs=min(args.runs, 50),
            command=command,
        )
