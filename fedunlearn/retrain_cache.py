"""Cache of retrained oracle models, keyed by a hash of everything that determines them.

Retraining is the expensive reference every evaluation needs; the same configuration (data,
partition, model, training settings, seed, deleted clients, library versions) always gives the same
model, so a repeated run loads it instead of paying again. The cached entry keeps the seconds the
original retraining took, so speedups stay honest.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fedunlearn.files import atomic_torch_save, atomic_write_text

# Keys that change the retrained model; out-dir, methods, solver settings and the like do not.
TRAINING_KEYS = (
    "dataset", "data-dir", "mnist1d-samples", "model", "num-clients", "partition", "dirichlet-alpha", "min-partition-size",
    "local-epochs", "batch-size", "lr", "momentum", "seed", "fraction-train",
    "backdoor-client", "poison-fraction", "target-class", "trigger-size", "trigger-position",
)


def retrain_key(config: dict[str, Any], forget_clients: list[int], rounds: int) -> str:
    identity = {
        "config": {key: config[key] for key in TRAINING_KEYS},
        "rounds": rounds,
        "forget_clients": sorted(forget_clients),
        "versions": {name: metadata.version(name) for name in ("fedunlearn", "torch", "flwr", "flwr-datasets")},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def _paths(key: str) -> tuple[Path, Path] | None:
    cache = os.environ.get("FEDUNLEARN_CACHE")
    if not cache:
        return None
    folder = Path(cache) / "retrain"
    return folder / f"{key}.pt", folder / f"{key}.json"


def load(key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    paths = _paths(key)
    if paths is None or not (paths[0].exists() and paths[1].exists()):
        return None
    return torch.load(paths[0], weights_only=True), json.loads(paths[1].read_text())


def store(key: str, state: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    paths = _paths(key)
    if paths is None:
        return
    # The model first: load() needs both files, so a crash between the two leaves no half entry.
    atomic_torch_save(state, paths[0])
    atomic_write_text(paths[1], json.dumps(info, indent=2))
