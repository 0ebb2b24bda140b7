"""Streaming calibration: activation ranges from any number of batches in bounded memory.

ONNX Runtime's calibrators keep every batch's intermediate outputs until the end (HistogramCalibrater
holds all activations of all batches: gigabytes for 2048 MiniLM sequences). Its own bound,
CalibMaxIntermediateOutputs, is not a fix: in onnxruntime 1.32 MinMaxCalibrater.collect_data *drops*
the collected outputs when the bound is reached without merging their ranges, so only the last partial
chunk counts, and the histogram calibrators ignore it. Here the batches go to the calibrator in chunks:
after each chunk MinMax merges its ranges and the histogram collector merges its histograms, and the
chunk's activations are freed. The ranges are written as ONNX Runtime's calibration cache, so the
quantizer (and every trial of the accuracy-aware search) reuses them without calibrating again.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class CalibrationResult:
    cache: Path  # ONNX Runtime calibration cache (JSON): quantize_static(calibration_cache_path=...)
    method: str
    batches: int
    sequences: int
    chunks: int
    seconds: float
    tensors: int


class BatchReader:
    """ONNX Runtime's CalibrationDataReader protocol over any iterable of batches."""

    def __init__(self, batches: Iterable[Batch]) -> None:
        self._it = iter(batches)

    def get_next(self) -> Batch | None:
        return next(self._it, None)


def method_enum(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[name]


def calibrate(
    model: Path,
    batches: Iterable[Batch],
    *,
    method: str,
    op_types: list[str] | None,
    chunk_batches: int,
    work_dir: Path,
    percentile: float = 99.999,
) -> CalibrationResult:
    """Run `batches` through `model` `chunk_batches` at a time; write the ranges as a calibration cache."""
    from onnxruntime.quantization import create_calibrator, save_tensors_data

    if chunk_batches < 1:
        raise ValueError("chunk_batches must be >= 1")
    work_dir.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {}
    if method == "percentile":
        options = {"percentile": percentile}
    started = time.perf_counter()
    calibrator = create_calibrator(
        model,
        op_types,
        augmented_model_path=str(work_dir / "augmented.onnx"),
        calibrate_method=method_enum(method),
        extra_options=options,
    )
    n_batches = n_seqs = n_chunks = 0
    source: Iterator[Batch] = iter(batches)
    while chunk := list(itertools.islice(source, chunk_batches)):
        # The histogram collector prints a line per call; the stage reports progress itself.
        with contextlib.redirect_stdout(io.StringIO()):
            calibrator.collect_data(BatchReader(chunk))
        n_chunks += 1
        n_batches += len(chunk)
        n_seqs += sum(len(next(iter(b.values()))) for b in chunk)
        del chunk
    if n_batches == 0:
        raise ValueError("no calibration batch")
    with contextlib.redirect_stdout(io.StringIO()):
        ranges = calibrator.compute_data()
    cache = work_dir / "calibration.json"
    save_tensors_data(ranges, cache)
    del calibrator
    (work_dir / "augmented.onnx").unlink(missing_ok=True)
    return CalibrationResult(
        cache=cache,
        method=method,
        batches=n_batches,
        sequences=n_seqs,
        chunks=n_chunks,
        seconds=time.perf_counter() - started,
        tensors=len(ranges.data),
    )
