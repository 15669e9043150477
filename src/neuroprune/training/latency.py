"""Measured forward-pass latency of models side by side: what a compacted model buys is only
known from the clock, and two timings taken minutes apart on a shared machine compare loads, not
models. So the models are timed alternately in one process, on one batch, and compared by
medians."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


@torch.no_grad()
def interleaved(models: dict[str, Any], batch: dict[str, torch.Tensor], repeats: int) -> dict[str, Any]:
    """Seconds per forward of each model, timed in turn `repeats` times (the order rotates every
    round, so none is always first after the others warmed the caches), after one warm-up each.
    Returns each model's times and median, and the torch thread count they ran with."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: time each model at least once.")
    for model in models.values():
        model.eval()
        model(**batch)
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            models[name](**batch)
            times[name].append(time.perf_counter() - start)
    return {"times_s": times, "median_s": {n: statistics.median(t) for n, t in times.items()},
            "threads": torch.get_num_threads(), "repeats": repeats,
            "batch_shape": list(next(iter(batch.values())).shape)}


def speedup(timing: dict[str, Any], baseline: str, model: str) -> float:
    """How many times faster `model` ran than `baseline`: the ratio of their median times."""
    return timing["median_s"][baseline] / timing["median_s"][model]


def round_speedup(timing: dict[str, Any], baseline: str, model: str) -> float:
    """The median over rounds of `baseline`'s time over `model`'s in the same round: robust to a
    load that changes during the measurement (the ratio of medians is not, when the load moves)."""
    pairs = zip(timing["times_s"][baseline], timing["times_s"][model])
    return statistics.median(b / m for b, m in pairs)
