"""The cost–quality frontier of one job: every method's cost beside its distance from the retrained model,
and which methods no other beats on both.

Read from a run's ``results.json`` (its ``summary``: means over the runs, one run or many). Costs:
``seconds`` (wall clock of the unlearning, repair rounds included), ``client_trainings`` (local trainings
the clients ran), ``client_computations`` (every message a client computed on), ``communication_rounds``
and ``storage_bytes`` (what training kept for the method). Quality, against the retrained model: the
signed test-accuracy gap, the KL divergence on the test set and on the deleted data, the attack success
rate on backdoor runs, the membership-inference AUC gap. ``original`` is the do-nothing point (cost 0)
and ``retrain`` the exact one (distance 0), so every method is read against both.

A method is on the frontier when no other row is at most as costly in ``seconds`` and at most as far
from retrain, and strictly better in one of the two; "as far" is the larger of the two KL divergences
(the table's verdict distance), and on backdoor runs the attack success rate as well (three objectives).
Single-run numbers are one seed: the table says how many runs each mean has.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedunlearn.summary import NOISE_FLOOR_ROW

COSTS = ("seconds", "client_trainings", "client_computations", "communication_rounds", "storage_bytes")
QUALITY = ("test_accuracy_gap", "kl_to_retrain", "forget_kl_to_retrain", "asr", "mia_auc_gap")


@dataclass(frozen=True)
class Point:
    name: str
    values: dict[str, float]
    runs: int

    @property
    def distance(self) -> float:
        kls = [self.values.get(metric) for metric in ("kl_to_retrain", "forget_kl_to_retrain")]
        finite = [value for value in kls if value is not None and math.isfinite(value)]
        return max(finite) if len(finite) == 2 else math.inf

    def objectives(self, with_asr: bool) -> tuple[float, ...]:
        cost = self.values.get("seconds", math.inf)
        objectives = (cost if math.isfinite(cost) else math.inf, self.distance)
        if with_asr:
            asr = self.values.get("asr")
            objectives += (asr if asr is not None and math.isfinite(asr) else math.inf,)
        return objectives


def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """``a`` is no worse than ``b`` in every objective (all minimised) and better in one."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto(points: dict[str, tuple[float, ...]]) -> set[str]:
    """The names no other point dominates."""
    return {name for name, mine in points.items() if not any(dominates(other, mine) for key, other in points.items() if key != name)}


def points_of(results: dict[str, Any]) -> list[Point]:
    """One point per row of the summary (the second retrain is the noise floor, not a method)."""
    methods = results.get("summary", {}).get("methods")
    if methods is None:
        raise ValueError("results.json has no summary (was it written by fedunlearn run?)")
    points = []
    for name, entry in methods.items():
        if name == NOISE_FLOOR_ROW or not entry.get("runs"):
            continue
        values = {metric: stats["mean"] for metric, stats in entry["metrics"].items()}
        if name == "original":
            values["seconds"] = 0.0  # doing nothing costs nothing; its metric is the training time
            for cost in COSTS[1:]:
                values[cost] = 0.0
        values.setdefault("storage_bytes", 0.0)
        points.append(Point(name, values, entry["runs"]))
    return points


def frontier_table(results: dict[str, Any]) -> str:
    """A markdown table of every method's costs and distances, frontier rows marked."""
    points = points_of(results)
    with_asr = any("asr" in point.values for point in points)
    on_frontier = pareto({point.name: point.objectives(with_asr) for point in points})
    runs = sorted({point.runs for point in points})
    columns = ["method", "seconds", "client trainings", "client computations", "comm. rounds", "storage MB",
               "Δtest (points)", "KL test", "KL forget"] + (["ASR %"] if with_asr else []) + ["ΔMIA AUC", "frontier"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for point in sorted(points, key=lambda p: (p.name != "original", p.name != "retrain", p.values.get("seconds", math.inf))):
        v = point.values
        cells = [
            point.name,
            _number(v.get("seconds"), "{:.3g}"),
            _number(v.get("client_trainings"), "{:.0f}"),
            _number(v.get("client_computations"), "{:.0f}"),
            _number(v.get("communication_rounds"), "{:.0f}"),
            _number(None if v.get("storage_bytes") is None else v["storage_bytes"] / 1e6, "{:.3g}"),
            _number(None if v.get("test_accuracy_gap") is None else 100 * v["test_accuracy_gap"], "{:+.1f}"),
            _number(v.get("kl_to_retrain"), "{:.2g}"),
            _number(v.get("forget_kl_to_retrain"), "{:.2g}"),
        ]
        if with_asr:
            cells.append(_number(None if v.get("asr") is None else 100 * v["asr"], "{:.1f}"))
        cells += [_number(v.get("mia_auc_gap"), "{:+.3f}"), "★" if point.name in on_frontier else ""]
        lines.append("| " + " | ".join(cells) + " |")
    objectives = "seconds, max(KL test, KL forget)" + (", ASR" if with_asr else "")
    if len(runs) > 1:
        runs_text = f"{runs[0]}–{runs[-1]} runs"
    else:
        runs_text = f"{runs[0]} runs" if runs[0] > 1 else "1 run (single seed)"
    lines.append("")
    lines.append(f"★ on the frontier of ({objectives}), all minimised; means over {runs_text}; "
                 "original = doing nothing (cost 0), retrain = the exact answer.")
    return "\n".join(lines) + "\n"


def _number(value: float | None, fmt: str) -> str:
    if value is None:
        return "–"
    if not math.isfinite(value):
        return "∞" if value > 0 else "−∞"
    return fmt.format(value)


def load_results(path: str | Path) -> dict[str, Any]:
    """``path``: a results.json or the run folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    return json.loads(path.read_text())
