"""Wall-clock timing of unlearning and the speedup over retraining."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """``with stopwatch() as timer: ...`` then ``timer["seconds"]`` (wall clock, perf_counter)."""
    timer = {"seconds": math.nan}
    start = time.perf_counter()
    try:
        yield timer
    finally:
        timer["seconds"] = time.perf_counter() - start


def speedup(retrain_seconds: float, unlearn_seconds: float) -> float:
    """retrain_seconds / unlearn_seconds; NaN (null in JSON) when unlearning took no measurable time."""
    if retrain_seconds < 0 or unlearn_seconds < 0:
        raise ValueError(f"seconds cannot be negative (retrain {retrain_seconds!r}, unlearn {unlearn_seconds!r})")
    if unlearn_seconds == 0 or not math.isfinite(unlearn_seconds) or not math.isfinite(retrain_seconds):
        return math.nan
    return retrain_seconds / unlearn_seconds
