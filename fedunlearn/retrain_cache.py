"""Cache of retrained oracle models, keyed by a hash of everything that determines them.

Retraining is the expensive reference every evaluation needs; the same configuration (data,
partition, model, training settings, seed, deleted clients, library versions, the source of the code
that trains, the device kind) always gives the same model, so a repeated run loads it instead of paying again. The cached entry keeps the seconds the
original retraining took, so speedups stay honest.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fedunlearn.files import atomic_torch_save, atomic_write_text
from fedunlearn.training import resolve_device

# Keys that change the retrained model; out-dir, methods, solver settings and the like do not.
TRAINING_KEYS = (
    "dataset", "data-dir", "mnist1d-samples", "model", "l2-bias", "num-clients", "partition", "dirichlet-alpha", "min-partition-size",
    "local-epochs", "batch-size", "lr", "momentum", "seed", "fraction-train",
    "backdoor-client", "poison-fraction", "target-class", "trigger-size", "trigger-position",
    "forget-share", "exclusive-class", "lr-decay",
    # In order: the first deleted client is the one forget-share / exclusive-class give their data to.
    "forget-clients",
)
# The code that trains a model: a change in any of these modules changes the key (their source is hashed).
TRAINING_MODULES = (
    "fedunlearn.training", "fedunlearn.federation", "fedunlearn.data.datasets", "fedunlearn.data.partition",
    "fedunlearn.data.backdoor", "fedunlearn.data.mnist1d", "fedunlearn.models", "fedunlearn.models.logreg",
    "fedunlearn.models.simple_cnn", "fedunlearn.models.resnet", "fedunlearn.models.vit_lite", "fedunlearn.models.cnn1d",
    "strategies.fedavg", "strategies.port", "clients.client_app",
)


@functools.lru_cache(maxsize=1)
def training_code_hash() -> str:
    """SHA-256 (first 16 hex digits) over the source of :data:`TRAINING_MODULES` (those that exist)."""
    digest = hashlib.sha256()
    for name in TRAINING_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue
        digest.update(name.encode())
        digest.update(Path(spec.origin).read_bytes())
    return digest.hexdigest()[:16]


def library_versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in ("fedunlearn", "torch", "flwr", "flwr-datasets")}


def training_key(config: dict[str, Any], rounds: int, **identity: Any) -> str:
    """A hash of everything that determines a model trained with ``config``: the :data:`TRAINING_KEYS`,
    the rounds, the library versions, and ``identity`` (JSON-ready: what else sets it apart, e.g. the
    deleted clients of the retrained oracle, or a shadow's index and clients). Shared by every cache
    of trained models (this one, U-LiRA's shadow federations)."""
    content = {"config": {key: config[key] for key in TRAINING_KEYS}, "rounds": rounds, **identity,
               "versions": library_versions(), "code": training_code_hash(),
               # Float results differ across devices (cuDNN kernels); "auto" is resolved where this runs.
               "device": resolve_device(config["device"]).type}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:24]


def retrain_key(config: dict[str, Any], forget_clients: list[int], rounds: int) -> str:
    return training_key(config, rounds, forget_clients=sorted(forget_clients))


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
