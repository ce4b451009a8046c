"""Several runs of one job (seeds, or each client deleted in turn) and what they say together.

``plan_runs`` lists the runs a config asks for; each run is a complete job (its own partitions,
initialisation, sampling, deletion, retrain) written to its own folder. ``summarize`` reports every
numeric metric of every method as the mean over the runs ± the half-width of the two-sided 95 %
Student-t interval (n − 1 degrees of freedom; undefined for one run), keeping each run's value, and
reads each method's distances to the retrained model against the **noise floor**: the same distance
between two retrains that differ only in their training randomness (docs/metrics.md).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scipy import stats

from fedunlearn.config import seed_list
from fedunlearn.errors import ConfigError
from fedunlearn.files import atomic_write_text, json_ready
from fedunlearn.results import RunRecord, csv_columns, csv_text, library_versions, method_rows

# Distances to the retrained model, each read against the same distance between the two retrains.
# Accuracy and MIA gaps are signed in results.json; as distances they count by their size.
FLOOR_METRICS = (
    "kl_to_retrain", "forget_kl_to_retrain", "retain_kl_to_retrain",
    "logit_mse_to_retrain", "forget_logit_mse_to_retrain", "retain_logit_mse_to_retrain",
    "disagreement_with_retrain", "forget_disagreement_with_retrain", "retain_disagreement_with_retrain",
    "test_accuracy_gap", "forget_accuracy_gap", "retain_accuracy_gap",
    "param_gap", "mia_auc_gap", "ulira_auc_gap",
)
# The table's verdict: the larger of these two ratios (the output distance on unseen and on deleted data).
VERDICT_METRICS = ("kl_to_retrain", "forget_kl_to_retrain")
NOISE_FLOOR_ROW = "retrain-2"


@dataclass(frozen=True)
class RunSpec:
    seed: int
    forget_clients: str
    out_dir: Path

    @property
    def overrides(self) -> dict[str, Any]:
        return {"seed": self.seed, "forget-clients": self.forget_clients}


def plan_runs(config: dict[str, Any]) -> list[RunSpec]:
    """Every (seed, deleted clients) pair the config asks for; one run writes into ``out-dir`` itself."""
    seeds = seed_list(config)
    if config["forget-each-client"]:
        for key, off in (("forget-share", 0.0), ("exclusive-class", -1), ("deletion-requests", "")):
            if config[key] != off:
                raise ConfigError(key, config[key], f"{off!r} when forget-each-client = true (each run deletes another client)")
        forget_sets = [str(client) for client in range(config["num-clients"])]
    else:
        forget_sets = [str(config["forget-clients"])]
    out = Path(config["out-dir"])
    if len(seeds) * len(forget_sets) == 1:
        return [RunSpec(seeds[0], forget_sets[0], out)]
    return [
        RunSpec(seed, forget, out / (f"seed-{seed}" + (f"-client-{forget}" if config["forget-each-client"] else "")))
        for seed in seeds
        for forget in forget_sets
    ]


def t_interval(values: list[float]) -> tuple[float, float | None]:
    """(mean, half-width of the two-sided 95 % Student-t interval); the half-width is None for n < 2."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    variance = math.fsum((value - mean) ** 2 for value in values) / (n - 1)
    return mean, float(stats.t.ppf(0.975, n - 1)) * math.sqrt(variance / n)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def distances(entry: dict[str, Any]) -> dict[str, float]:
    """The :data:`FLOOR_METRICS` of one model's scores, as non-negative distances."""
    values = dict(entry)
    if _finite(values.get("ulira_auc")):
        # U-LiRA already compares the model with the retrained one: 0.5 = indistinguishable.
        values["ulira_auc_gap"] = values["ulira_auc"] - 0.5
    for prefix in ("", "forget_", "retain_"):
        agreement = values.get(f"{prefix}agreement_with_retrain")
        if _finite(agreement):
            values[f"{prefix}disagreement_with_retrain"] = 1.0 - agreement
    return {metric: abs(values[metric]) for metric in FLOOR_METRICS if _finite(values.get(metric))}


def _statistics(values: list[float]) -> dict[str, Any]:
    mean, ci = t_interval(values)
    return {"mean": mean, "ci95": ci, "n": len(values), "values": values}


def summarize(tables: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """``tables[r]`` = run r's ``methods`` (name -> scores). Every numeric metric as mean ± CI over
    the runs; the noise floor from each run's :data:`NOISE_FLOOR_ROW`; each method's ratio to it."""
    floor_runs = [distances(table[NOISE_FLOOR_ROW]) for table in tables if NOISE_FLOOR_ROW in table]
    floor = {
        metric: _statistics([run[metric] for run in floor_runs if metric in run])
        for metric in FLOOR_METRICS
        if any(metric in run for run in floor_runs)
    }
    methods: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(name for table in tables for name in table):
        entries = [table[name] for table in tables if name in table and "failed" not in table[name]]
        metrics = {}
        for metric in dict.fromkeys(key for entry in entries for key, value in entry.items() if _finite(value)):
            values = [entry[metric] for entry in entries if _finite(entry.get(metric))]
            metrics[metric] = _statistics(values)
        method_distances = [distances(entry) for entry in entries]
        ratios: dict[str, float | None] = {}
        for metric, floor_statistics in floor.items():
            values = [d[metric] for d in method_distances if metric in d]
            if not values:
                continue
            mean_distance = math.fsum(values) / len(values)
            if floor_statistics["mean"] > 0:
                ratios[metric] = mean_distance / floor_statistics["mean"]
            else:
                ratios[metric] = 0.0 if mean_distance == 0 else None  # a floor of 0: any distance is infinitely many
        verdict_ratios = [ratios.get(metric) for metric in VERDICT_METRICS if metric in ratios]
        methods[name] = {
            "runs": len(entries),
            "failed_runs": sum(1 for table in tables if "failed" in table.get(name, {})),
            "metrics": metrics,
            "floors": ratios,
            "verdict": _verdict(verdict_ratios),
        }
    return {"runs": len(tables), "methods": methods, "noise_floor": floor}


def _verdict(ratios: list[float | None]) -> str | None:
    if not ratios:
        return None
    if any(ratio is None for ratio in ratios):
        return "above a zero floor"
    worst = max(ratios)
    return "within the floor" if worst <= 1.0 else f"{worst:.1f}x the floor"


@dataclass
class StudyRecord:
    """All runs of one job and their summary; a single run keeps its own layout in ``out-dir``."""

    config: dict[str, Any]
    runs: list[tuple[RunSpec, RunRecord]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def summary(self) -> dict[str, Any]:
        return summarize([record.methods for _, record in self.runs])

    def write(self) -> Path:
        out = Path(self.config["out-dir"])
        summary = self.summary
        if len(self.runs) == 1:
            spec, _ = self.runs[0]
            path = spec.out_dir / "results.json"  # the run wrote it; the summary joins it
            document = json.loads(path.read_text())
            document["summary"] = json_ready(summary)
            atomic_write_text(path, json.dumps(document, indent=2, allow_nan=False) + "\n")
            return path
        document = {
            "config": self.config,
            "runs": [
                {"seed": spec.seed, "forget_clients": spec.forget_clients, "dir": spec.out_dir.name,
                 "methods": {name: {k: v for k, v in values.items() if not isinstance(v, (dict, list))}
                             for name, values in record.methods.items()},
                 "noise_floor": record.noise_floor}
                for spec, record in self.runs
            ],
            "summary": summary,
            "wall_seconds": round(self.elapsed(), 3),
            "versions": library_versions(),
        }
        atomic_write_text(out / "results.json", json.dumps(json_ready(document), indent=2, allow_nan=False) + "\n")
        rows = [row for _, record in self.runs for row in method_rows(record.config, record.methods)]
        summary_config = dict(self.config, seed="all", **{"forget-clients": "each" if self.config["forget-each-client"] else self.config["forget-clients"]})
        for name, entry in summary["methods"].items():
            row = {f"{metric}": stats_["mean"] for metric, stats_ in entry["metrics"].items()}
            row.update({f"{metric}_ci95": stats_["ci95"] for metric, stats_ in entry["metrics"].items()})
            row.update(runs=entry["runs"], verdict=entry["verdict"])
            rows += method_rows(summary_config, {name: row})
        atomic_write_text(out / "results.csv", csv_text(csv_columns(rows), json_ready(rows)))
        return out / "results.json"
