"""The method seam: where an unlearning method meets the federation (docs/architecture.md).

A method is one module in :mod:`fedunlearn.unlearning.methods` holding one class registered with
``@register("name")``. It declares up front what it needs of training and of the federation
(:class:`Requirements`), may subscribe :class:`TrainingHook` objects to training, and unlearns through
one entry point::

    outcome = method.unlearn(port, deletion)

``port`` (a :class:`FederationPort`) is the only way a method talks to the federation: send a message
type to named clients and collect their replies, run k FedAvg rounds on a subset of clients from a
given model, query the remaining clients' objective, read the round history training kept for it.
``strategies/`` implements the port over Flower's Grid; the tests run the same methods against an
in-process grid. The :class:`Outcome` is plain data the server weighs, logs and evaluates without
knowing which method made it. Nothing here imports Flower.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.nn as nn
from torch import Tensor

State = dict[str, Tensor]

# Message types the client app answers (Flower's Message API: "<train|evaluate|query>.<name>").
TRAIN = "train"
UNLEARN = "train.unlearn"
QUERY_PREFIX = "query."


@dataclass(frozen=True)
class ClientInfo:
    """What a client told the server about itself (``query.identify``)."""

    partition_id: int
    node_id: int
    num_examples: int
    label_histogram: tuple[int, ...]


@dataclass(frozen=True)
class Every:
    """A round interval: every round, or every ``config[interval_key]``-th round (rounds 1, 1 + n, …)."""

    interval_key: str | None = None

    def interval(self, config: Mapping[str, Any]) -> int:
        return 1 if self.interval_key is None else int(config[self.interval_key])


@dataclass(frozen=True)
class Requirements:
    """What a method needs beyond the trained model; the job subscribes training accordingly.

    - ``round_history``: the server keeps the global model sent and every client's update
      (returned model − global model) in the rounds this interval picks (FedEraser, FedRecover);
      the method reads it with ``port.history(...)``.
    - ``trains_constituents``: the method trains its own models once training has finished, before
      the deletion (SISA); its :meth:`Method.training_hooks` do it in ``after_training``.
    - ``per_round_statistics``: the method's training hooks observe every round (HF-OCU).
    - ``client_queries``: the ``query.*`` kinds its server logic sends to the clients.
    - ``client_solve``: it runs :meth:`Method.solve` on the affected clients (``train.unlearn``).
    """

    round_history: Every | None = None
    trains_constituents: bool = False
    per_round_statistics: bool = False
    client_queries: tuple[str, ...] = ()
    client_solve: bool = False


@dataclass(frozen=True)
class Deletion:
    """What the methods of a run unlearn: the clients whose data is deleted, from the trained model."""

    forget_clients: tuple[int, ...]
    trained_state: State
    trained_rounds: int


@dataclass
class Outcome:
    """What one method produced. ``state`` is the new global model, or ``predictor`` a model that is
    not one set of weights (SISA's ensemble). ``headline`` numbers go beside the standard metrics in
    results.json; ``also_evaluate`` names more predictors whose scores go into ``details``."""

    state: State | None
    affected_clients: list[int]
    communication_rounds: int
    epsilon: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    predictor: nn.Module | None = None
    headline: dict[str, Any] = field(default_factory=dict)
    also_evaluate: dict[str, nn.Module] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    """One client's answer to a message, as plain tensors and values."""

    partition: int
    arrays: dict[str, State]
    metrics: dict[str, float]
    info: dict[str, Any]


@dataclass(frozen=True)
class Training:
    """The result of ``port.train``: the final global model and the local trainings that ran."""

    state: State
    client_trainings: int


@dataclass(frozen=True)
class ClientContext:
    """What a client-side method knows besides the model and its data (explicit, not config keys)."""

    partition_id: int
    num_examples: int
    total_examples: int
    influence_weight: float  # n_k / (n − n_K): this client's share of the remaining objective's step
    seed: int
    device: torch.device
    # The ``train.unlearn`` message's config as sent by the method's server side (numbers, strings):
    # what a method tells its clients beyond the model, e.g. a radius or a step budget.
    request: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class ClientUpdate:
    """What an affected client sends back: Δ_k (ordered as ``param_names``) and what it learned."""

    param_names: list[str]
    delta: list[Tensor]
    forget_gradient_norm: float
    num_forget_examples: int
    diagnostics: dict[str, Any] = field(default_factory=dict)
    epsilon: float | None = None


@dataclass
class ServerUpdate:
    """A server-side step Δ (ordered as ``param_names``) and what it cost."""

    param_names: list[str]
    delta: list[Tensor]
    communication_rounds: int
    diagnostics: dict[str, Any] = field(default_factory=dict)
    epsilon: float | None = None


class TrainingHook:
    """Subscribed to FedAvg training; every method is a no-op unless overridden."""

    def before_round(self, server_round: int, global_state: State, partitions: Sequence[int]) -> None:
        """The server is about to send ``global_state`` to ``partitions`` for round ``server_round``."""

    def after_round(self, server_round: int, client_states: Mapping[int, State], num_examples: Mapping[int, int]) -> None:
        """The clients' returned models of round ``server_round`` (by partition), before averaging."""

    def after_training(self, port: FederationPort, final_state: State, rounds: int) -> None:
        """Training has finished and a deletion is about to be applied."""


class RemainingClients(Protocol):
    """The remaining clients' objective, seen only through products (each call: one round)."""

    def gradient(self, param_names: Sequence[str]) -> list[Tensor]: ...

    def curvature_product(self, param_names: Sequence[str], vector: Sequence[Tensor], curvature: str) -> list[Tensor]: ...

    def diagonal_fisher(self, param_names: Sequence[str]) -> list[Tensor]: ...

    def kfac_factors(self, param_names: Sequence[str]) -> dict[str, tuple[Tensor, Tensor]]:
        """The clients' undamped KFAC factors (A, G) per layer, example-weighted: the factors of
        their pooled data."""


class FederationPort(Protocol):
    """The federation as a method sees it (implemented by ``strategies.port.GridPort``)."""

    config: Mapping[str, Any]
    clients: Mapping[int, ClientInfo]  # every partition, by id
    initial_state: State
    out_dir: Path

    def new_model(self) -> nn.Module: ...

    def remaining(self, deletion: Deletion) -> list[int]:
        """The clients left once ``deletion`` (and every earlier one) is applied."""

    def send(
        self, message_type: str, partitions: Sequence[int], arrays: Mapping[str, State], config: Mapping[str, Any]
    ) -> dict[int, Reply]:
        """One message to each of ``partitions``; every reply, by partition. A failure or a missing
        reply raises :class:`fedunlearn.errors.UnlearningFailed`."""

    def train(
        self, partitions: Sequence[int], start: State, rounds: int, *, seed: int, evaluate_on_clients: bool = False, first_round: int = 1
    ) -> Training:
        """``rounds`` FedAvg rounds over ``partitions`` (sampled as ``fraction-train`` says, with a
        generator seeded by ``seed``) from ``start``; clients see the rounds numbered from ``first_round``."""

    def remaining_objective(self, partitions: Sequence[int], state: State) -> RemainingClients:
        """The example-weighted objective of ``partitions`` at ``state``, one ``query.*`` round per call."""

    def history(self, every: Every) -> Mapping[int, Any]:
        """The rounds training kept for a ``round_history`` requirement: ``{round: StoredRound}``."""

    def phase(self, label: str) -> Any:
        """A context manager: messages sent inside are logged under ``label``, which is shown as progress."""


class Method:
    """Base of every unlearning method. A subclass sets ``name`` (by ``@register``), ``requirements``,
    its own ``config_keys`` (kebab-case run-config keys with defaults, in the schema's format), and
    implements :meth:`unlearn` (server side) and, for client-side methods, :meth:`solve`."""

    name: ClassVar[str] = ""
    requirements: ClassVar[Requirements] = Requirements()
    config_keys: ClassVar[tuple] = ()  # tuple[fedunlearn.config.ConfigKey, ...]
    summary: ClassVar[str] = ""

    def __init__(self, config: Mapping[str, Any]):
        self.config = config

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> None:
        """Checks across keys, run before anything starts; raise ConfigError."""

    def training_hooks(self) -> list[TrainingHook]:
        return []

    def unlearn(self, port: FederationPort, deletion: Deletion) -> Outcome:
        raise NotImplementedError

    def solve(self, model: nn.Module, forget_batches, context: ClientContext) -> ClientUpdate:
        raise NotImplementedError(f"{self.name} has no client-side part")


def with_delta(state: State, names: Sequence[str], delta: Sequence[Tensor]) -> State:
    """A copy of ``state`` with ``delta`` added to the named tensors."""
    updated = {name: tensor.clone() for name, tensor in state.items()}
    for name, change in zip(names, delta):
        updated[name] = updated[name] + change.to(updated[name].dtype)
    return updated
