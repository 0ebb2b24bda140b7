"""Latency and memory, measured so that variants can be compared on a noisy shared machine.

Variants are timed interleaved (one run of each in turn, many rounds), so drift in the machine's
load hits all of them alike; we report percentiles and ratios of medians.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np


def interleaved(
    runners: dict[str, Callable[[], object]],
    warmup: int,
    runs: int,
    items_per_run: int = 1,
    on_round: Callable[[], object] | None = None,
) -> dict[str, dict[str, float]]:
    """Time each runner `runs` times, interleaved round by round, after `warmup` untimed calls each.

    on_round is called after each round (a progress bar's advance).
    """
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(runs):
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1000.0)
        if on_round is not None:
            on_round()
    return {name: summarize(values, items_per_run) for name, values in samples.items()}


def summarize(ms: list[float], items_per_run: int = 1) -> dict[str, float]:
    """Percentiles, spread (std, interquartile range, min, max) and throughput of timed runs in ms."""
    arr = np.asarray(ms)
    if arr.size == 0:
        return {"runs": 0}
    q25, q75 = np.percentile(arr, [25, 75])
    return {
        "p50": float(np.percentile(arr, 50)),
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
        "mean": float(arr.mean()),
        "std": float(arr.std()),
        "iqr": float(q75 - q25),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "runs": len(ms),
        "throughput_per_s": float(items_per_run * 1000.0 / arr.mean()),
    }


def round_robin(
    calls: dict[str, Callable[[Any], Any]],
    feeds: dict[str, list[Any]],
    warmup: int,
    on_example: Callable[[int], object] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[Any]]]:
    """Each example through every call in turn, the starting call rotating per example, each call timed.

    feeds[name][i] is example i as call `name` takes it. Returns (ms per call, outputs per call), in example
    order. The first `warmup` examples go through every call untimed first; on_example(i) after example i."""
    names = list(calls)
    count = len(feeds[names[0]])
    for name in names:
        for i in range(min(warmup, count)):
            calls[name](feeds[name][i])
    ms: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, list[Any]] = {name: [] for name in names}
    for i in range(count):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            out = calls[name](feeds[name][i])
            ms[name].append((time.perf_counter() - start) * 1000.0)
            outputs[name].append(out)
        if on_example is not None:
            on_example(i)
    return ms, outputs
