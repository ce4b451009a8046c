"""Federated partitions of a training set, addressable as (client id, local index).

Dirichlet partitions come from flwr-datasets' ``DirichletPartitioner`` (partition by label); IID
partitions are a seeded shuffle cut into equal parts. A later deletion of samples or classes names
``(client, local_index)`` pairs; :class:`Partitioning` maps them to rows of the training set.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from fedunlearn.errors import ConfigError
from fedunlearn.files import atomic_savez


@dataclass(frozen=True)
class Partitioning:
    client_indices: tuple[np.ndarray, ...]  # row numbers of the training set, per client, in local order

    @property
    def num_clients(self) -> int:
        return len(self.client_indices)

    @property
    def sizes(self) -> list[int]:
        return [len(rows) for rows in self.client_indices]

    def rows_of(self, client: int) -> np.ndarray:
        if not 0 <= client < self.num_clients:
            raise ConfigError("client", client, f"an id in 0..{self.num_clients - 1}")
        return self.client_indices[client]

    def global_index(self, client: int, local_index: int) -> int:
        rows = self.rows_of(client)
        if not 0 <= local_index < len(rows):
            raise ConfigError("local-index", local_index, f"0..{len(rows) - 1} for client {client}")
        return int(rows[local_index])

    def address_of(self, global_index: int) -> tuple[int, int]:
        for client, rows in enumerate(self.client_indices):
            hits = np.flatnonzero(rows == global_index)
            if hits.size:
                return client, int(hits[0])
        raise ConfigError("global-index", global_index, "a row held by some client")

    def label_histogram(self, client: int, labels: np.ndarray, num_classes: int) -> list[int]:
        return np.bincount(labels[self.client_indices[client]], minlength=num_classes).astype(int).tolist()

    def label_histograms(self, labels: np.ndarray, num_classes: int) -> list[list[int]]:
        return [self.label_histogram(client, labels, num_classes) for client in range(len(self.client_indices))]


def _dirichlet(labels: np.ndarray, num_clients: int, alpha: float, min_size: int, seed: int) -> list[np.ndarray]:
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    table = Dataset.from_dict({"label": labels.tolist(), "row": np.arange(len(labels)).tolist()})
    partitioner = DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        alpha=alpha,
        min_partition_size=min_size,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )
    partitioner.dataset = table
    try:
        with warnings.catch_warnings():
            # It warns on every resampling attempt; if all attempts fail we raise one clear error below.
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            return [
                np.asarray(partitioner.load_partition(client)["row"], dtype=np.int64) for client in range(num_clients)
            ]
    except ValueError as error:
        raise ConfigError(
            "min-partition-size",
            min_size,
            reason=(
                f"the Dirichlet partitioner could not give each of {num_clients} clients {min_size} examples "
                f"with dirichlet-alpha={alpha} over {len(labels)} examples ({error}); "
                "lower min-partition-size or num-clients, or raise dirichlet-alpha"
            ),
        ) from None


def _iid(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(num_examples)
    return [part.astype(np.int64) for part in np.array_split(order, num_clients)]


def partition_labels(
    labels: np.ndarray,
    num_clients: int,
    scheme: str = "dirichlet",
    alpha: float = 0.5,
    min_size: int = 10,
    seed: int = 0,
) -> Partitioning:
    labels = np.asarray(labels)
    if num_clients > len(labels):
        raise ConfigError("num-clients", num_clients, f"at most {len(labels)} (the training set's size)")
    return _cached_partition(labels.tobytes(), str(labels.dtype), num_clients, scheme, float(alpha), min_size, seed)


def _disk_cache_path(label_bytes: bytes, *settings: object) -> Path | None:
    """Where a computed Dirichlet partition is kept (a pure cache: deleting it only costs time).

    Every simulated client would otherwise import Hugging Face ``datasets`` (4 s) and rerun the
    partitioner (3 s) when it starts.
    """
    cache = os.environ.get("FEDUNLEARN_CACHE")
    if not cache:
        return None
    key = hashlib.sha256(label_bytes + repr((settings, metadata.version("flwr-datasets"))).encode()).hexdigest()
    return Path(cache) / "partitions" / f"{key[:32]}.npz"


def _load_or_compute_dirichlet(label_bytes: bytes, labels: np.ndarray, *settings) -> list[np.ndarray]:
    path = _disk_cache_path(label_bytes, "dirichlet", *settings)
    if path is not None and path.exists():
        with np.load(path) as stored:
            return [stored[f"client_{client}"] for client in range(len(stored.files))]
    parts = _dirichlet(labels, *settings)
    if path is not None:
        atomic_savez(path, {f"client_{client}": rows for client, rows in enumerate(parts)})
    return parts


@functools.lru_cache(maxsize=8)
def _cached_partition(
    label_bytes: bytes, dtype: str, num_clients: int, scheme: str, alpha: float, min_size: int, seed: int
) -> Partitioning:
    labels = np.frombuffer(label_bytes, dtype=dtype)
    if scheme == "dirichlet":
        parts = _load_or_compute_dirichlet(label_bytes, labels, num_clients, alpha, min_size, seed)
    elif scheme == "iid":
        parts = _iid(len(labels), num_clients, seed)
    else:
        raise ConfigError("partition", scheme, ("dirichlet", "iid"))
    empty = [client for client, rows in enumerate(parts) if len(rows) == 0]
    if empty:
        raise ConfigError("num-clients", num_clients, reason=f"clients {empty} would hold no data")
    return Partitioning(tuple(parts))
