"""Federated partitions of a training set, addressable as (client id, local index).

Dirichlet partitions come from flwr-datasets' ``DirichletPartitioner`` (partition by label); IID
partitions are a seeded shuffle cut into equal parts. Two controls make a deletion matter: ``forget_share``
gives the run's first deleted client a stratified share of the training set, ``exclusive_class`` gives it every
example of one class (see :func:`partition_labels`). A later deletion of samples or classes names
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
    *,
    holder: int = 0,
    forget_share: float = 0.0,
    exclusive_class: int = -1,
) -> Partitioning:
    """Split the training set's rows over ``num_clients`` clients.

    ``scheme`` (``dirichlet`` / ``iid``) splits the rows; two controls give client ``holder`` (the run's
    first deleted client) data that matters, everything else as ``scheme`` says:

    - ``forget_share`` in (0, 1): ``holder`` holds a stratified random sample of exactly
      round(share × N) rows (each class contributes ⌊share × n_c⌋ or ⌈share × n_c⌉, seeded), and the
      other ``num_clients - 1`` clients split the remaining rows by ``scheme``.
    - ``exclusive_class`` ≥ 0: every row of that class goes to ``holder`` and to nobody else; the rows
      of the other classes are split over all ``num_clients`` clients by ``scheme``.

    Both are functions of the arguments alone (every party rebuilds the same partition); 0 / -1 turn them
    off and leave the plain partition bit for bit as it was.
    """
    labels = np.asarray(labels)
    if num_clients > len(labels):
        raise ConfigError("num-clients", num_clients, f"at most {len(labels)} (the training set's size)")
    if scheme not in SCHEMES:
        raise ConfigError("partition", scheme, SCHEMES)
    if not 0.0 <= forget_share < 1.0:
        raise ConfigError("forget-share", forget_share, "a number in [0, 1)")
    if forget_share > 0 or exclusive_class >= 0:
        _check_holder_settings(labels, num_clients, holder, forget_share, exclusive_class)
    else:
        holder = -1  # no client is special: one cache entry for the plain partition
    return _cached_partition(
        labels.tobytes(), str(labels.dtype), num_clients, scheme, float(alpha), min_size, seed,
        holder, float(forget_share), int(exclusive_class),
    )


SCHEMES = ("dirichlet", "iid")
# Stream of the random generator that draws the forget-share sample (beside the run seed).
_FORGET_SHARE_STREAM = 0xF0E7


def _check_holder_settings(labels: np.ndarray, num_clients: int, holder: int, share: float, exclusive: int) -> None:
    which = "forget-share" if share > 0 else "exclusive-class"
    value = share if share > 0 else exclusive
    if share > 0 and exclusive >= 0:
        raise ConfigError(
            "exclusive-class", exclusive, "-1 (off) when forget-share > 0",
            reason=f"forget-share={share} already decides what the first of forget-clients holds; set one of the two",
        )
    if num_clients < 2:
        raise ConfigError("num-clients", num_clients, f"at least 2 with {which}", reason=f"{which} needs clients besides the deleted one")
    if not 0 <= holder < num_clients:
        raise ConfigError("forget-clients", holder, f"a first id in 0..{num_clients - 1}", reason=f"{which} gives that client its data")
    if exclusive >= 0 and not np.any(labels == exclusive):
        present = sorted(int(label) for label in np.unique(labels))
        raise ConfigError("exclusive-class", exclusive, ["-1 (off)", *present], reason="no training example has this class")
    if share > 0:
        held = forget_share_size(len(labels), share)
        if held < 1 or len(labels) - held < num_clients - 1:
            raise ConfigError(
                "forget-share", value, f"a share that leaves the deleted client 1..{len(labels) - num_clients + 1} of {len(labels)} examples",
                reason=f"round({share} x {len(labels)}) = {held} examples",
            )


def forget_share_size(num_examples: int, share: float) -> int:
    """round(share × N), halves rounded up: the exact number of rows the holder gets."""
    return int(np.floor(share * num_examples + 0.5))


def stratified_sample(labels: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Sorted rows of a seeded random sample of exactly ``forget_share_size(N, share)`` rows, stratified.

    Class c contributes ⌊share × n_c⌋ rows, and the classes with the largest remainders one more each
    (ties: the smaller label first) until the total is reached.
    """
    classes, counts = np.unique(labels, return_counts=True)
    exact = share * counts
    quota = np.floor(exact).astype(np.int64)
    spare = forget_share_size(len(labels), share) - int(quota.sum())
    quota[np.argsort(-(exact - quota), kind="stable")[:spare]] += 1
    rng = np.random.default_rng([seed, _FORGET_SHARE_STREAM])
    rows = [rng.choice(np.flatnonzero(labels == label), size=int(size), replace=False) for label, size in zip(classes, quota)]
    return np.sort(np.concatenate(rows)).astype(np.int64)


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


def _scheme_parts(labels: np.ndarray, num_clients: int, scheme: str, alpha: float, min_size: int, seed: int) -> list[np.ndarray]:
    """Positions in ``labels`` per client, split as ``scheme`` says."""
    if scheme == "dirichlet":
        return _load_or_compute_dirichlet(labels.tobytes(), labels, num_clients, alpha, min_size, seed)
    return _iid(len(labels), num_clients, seed)


@functools.lru_cache(maxsize=8)
def _cached_partition(
    label_bytes: bytes, dtype: str, num_clients: int, scheme: str, alpha: float, min_size: int, seed: int,
    holder: int, forget_share: float, exclusive_class: int,
) -> Partitioning:
    labels = np.frombuffer(label_bytes, dtype=dtype)
    if forget_share > 0:
        # The holder's sample first; the other clients split what is left (the Dirichlet disk cache
        # is keyed by those labels, so it needs no key of its own).
        held = stratified_sample(labels, forget_share, seed)
        rest = np.setdiff1d(np.arange(len(labels)), held)
        others = [rest[part] for part in _scheme_parts(labels[rest], num_clients - 1, scheme, alpha, min_size, seed)]
        parts = others[:holder] + [held] + others[holder:]
    elif exclusive_class >= 0:
        exclusive = labels == exclusive_class
        rest = np.flatnonzero(~exclusive)
        parts = [rest[part] for part in _scheme_parts(labels[rest], num_clients, scheme, alpha, min_size, seed)]
        parts[holder] = np.concatenate([parts[holder], np.flatnonzero(exclusive)])
    else:
        parts = _scheme_parts(labels, num_clients, scheme, alpha, min_size, seed)
    parts = [np.asarray(part, dtype=np.int64) for part in parts]
    empty = [client for client, rows in enumerate(parts) if len(rows) == 0]
    if empty:
        raise ConfigError("num-clients", num_clients, reason=f"clients {empty} would hold no data")
    return Partitioning(tuple(parts))
