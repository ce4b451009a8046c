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


def _csv_text(columns: tuple[str, ...] | list[str], rows: list[dict[str, Any]]) -> str:
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
            "wall_seconds": round(self.elapsed(), 3),
            "versions": library_versions(),
        }

    def write(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        document = self.as_dict()
        # Strict JSON: an undefined number (CF with a zero denominator, a speedup over 0 s) is null.
        atomic_write_text(out / "results.json", json.dumps(json_ready(document), indent=2, allow_nan=False) + "\n")
        atomic_write_text(out / "rounds.csv", _csv_text(ROUND_COLUMNS, self.rounds))
        # One row per method; nested diagnostics stay in results.json.
        method_rows = [
            {"method": name, **{k: v for k, v in values.items() if not isinstance(v, (dict, list))}}
            for name, values in self.methods.items()
        ]
        columns = ["method"] + sorted({key for row in method_rows for key in row if key != "method"})
        atomic_write_text(out / "results.csv", _csv_text(columns, method_rows))
        return out / "results.json"
