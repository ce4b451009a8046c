"""What a run writes: ``results.json`` (everything) and ``results.csv`` / ``rounds.csv`` (tables).

Files are written atomically (:mod:`fedunlearn.files`), so a crash never leaves half a results file
and never destroys the previous one.
"""

from __future__ import annotations

import csv
import io
import json
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from fedunlearn.files import atomic_write_text, json_ready

ROUND_COLUMNS = ("round", "train_loss", "test_loss", "test_accuracy", "local_accuracy", "seconds")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("fedunlearn", "flwr", "flwr-datasets", "torch", "torchvision", "numpy", "scikit-learn", "ray"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def csv_text(columns: tuple[str, ...] | list[str], rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


@dataclass
class RunRecord:
    """Accumulates one run's numbers as they happen."""

    config: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    partitions: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    communication: dict[str, Any] = field(default_factory=dict)
    # Distances between two retrains that differ only in training randomness (None: not measured).
    noise_floor: dict[str, Any] | None = None
    # The U-LiRA shadow federations (count, clients in each, seconds, cache hits); None without them.
    lira: dict[str, Any] | None = None
    # Deletion requests the run refused (already applied by an earlier run into the same out-dir, unknown
    # client, unsupported grain), each with its clients and the reason.
    refused_requests: list[dict[str, Any]] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def round_entry(self, server_round: int) -> dict[str, Any]:
        for entry in self.rounds:
            if entry["round"] == server_round:
                return entry
        entry = {"round": server_round}
        self.rounds.append(entry)
        self.rounds.sort(key=lambda item: item["round"])
        return entry

    def as_dict(self) -> dict[str, Any]:
        final = dict(self.rounds[-1]) if self.rounds else {}
        final.pop("seconds", None)
        return {
            "config": self.config,
            "rounds": self.rounds,
            "final": final,
            "partitions": self.partitions,
            "methods": self.methods,
            "communication": self.communication,
            "noise_floor": self.noise_floor,
            "lira": self.lira,
            "refused_requests": self.refused_requests,
            "wall_seconds": round(self.elapsed(), 3),
            "versions": library_versions(),
        }

    def write(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        document = self.as_dict()
        # Strict JSON: an undefined number (CF with a zero denominator, a speedup over 0 s) is null.
        atomic_write_text(out / "results.json", json.dumps(json_ready(document), indent=2, allow_nan=False) + "\n")
        atomic_write_text(out / "rounds.csv", csv_text(ROUND_COLUMNS, self.rounds))
        rows = method_rows(self.config, self.methods)
        atomic_write_text(out / "results.csv", csv_text(csv_columns(rows), rows))
        return out / "results.json"


# Every row of results.csv names its run, so CSVs of many runs concatenate into one table.
RUN_COLUMNS = ("dataset", "model", "num-clients", "partition", "dirichlet-alpha", "seed", "forget-clients")


def method_rows(config: dict[str, Any], methods: dict[str, dict[str, Any]], **extra: Any) -> list[dict[str, Any]]:
    """One row per method: the run's identity, then its scalar fields (nested diagnostics stay in results.json)."""
    identity = {key.replace("-", "_"): config[key] for key in RUN_COLUMNS}
    return [
        {"method": name, **identity, **extra, **{k: v for k, v in values.items() if not isinstance(v, (dict, list))}}
        for name, values in methods.items()
    ]


def csv_columns(rows: list[dict[str, Any]]) -> list[str]:
    leading = ["method"] + [key.replace("-", "_") for key in RUN_COLUMNS]
    present = {key for row in rows for key in row}
    return [key for key in leading if key in present] + sorted(present - set(leading))
