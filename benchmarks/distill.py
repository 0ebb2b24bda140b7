"""Benchmark (issue 5): distilled students against their teachers, in one run per part.

.venv/bin/python benchmarks/distill.py [--part minilm|windowed|ddp|all] [--runs N]

minilm    the 3-layer MiniLM student (layer dropping + embedding distillation) vs the 6-layer teacher
          (ONNX Runtime fp32 and int8)                                   -> benchmarks/results/distill.md
windowed  a half-width student of the windowed SpamAssassin classifier (recipes/windowed-distill.yaml)
          vs the reference (PyTorch)                            -> benchmarks/results/distill_windowed.md
ddp       recipes/windowed-distill.yaml with 1 process and with 2 under torchrun (DDP over gloo)
                                                                      -> benchmarks/results/distill_ddp.md
"""

from __future__ import annotations

import argparse
import sys

from teacher_student import compare
from zoo_student import compare as compare_zoo
from zoo_student import torchrun_pair

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("minilm", "windowed", "ddp", "all"), default="all")
    parser.add_argument("--runs", type=int, default=300, help="timed runs per variant")
    args = parser.parse_args()
    command = " ".join(sys.argv)
    sys.argv = [sys.argv[0], f"--runs={args.runs}"]  # teacher_student parses --runs itself
    if args.part in ("minilm", "all"):
        compare(
            "recipes/minilm-distill-int8.yaml",
            "distilled MiniLM student (3 layers) vs teacher (6 layers)",
            "distill.md",
            [
                ("student Lee Spearman >= 0.49", "spearman", 0.49),
                ("student ORT fp32 >= 1.8x faster than the teacher", "speedup_fp32", 1.8),
            ],
            command=command,
        )
    if args.part in ("windowed", "all"):
        compare_zoo(
            "recipes/windowed-distill.yaml",
            "half-width distilled student of the windowed classifier vs the reference",
            "distill_windowed.md",
            max_drop_points=0.5,
            runs=min(args.runs, 50),
            command=command,
        )
    if args.part in ("ddp", "all"):
        torchrun_pair("recipes/windowed-distill.yaml", "distill_ddp.md", command=command)
