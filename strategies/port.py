"""The federation port over Flower's Grid: the only way a method talks to the clients.

It implements :class:`fedunlearn.unlearning.api.FederationPort`: send a message type to named
clients and collect their replies, run FedAvg rounds on a subset of clients from a given model,
query the remaining clients' objective (one round per product), hand a method the round history
training kept for it. Every message goes into the job's one :class:`~strategies.roster.MessageLog`
under the current phase.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

from fedunlearn.curvature.kfac import factors_from_arrays, sum_factors
from fedunlearn.errors import UnlearningFailed
from fedunlearn.unlearning.api import QUERY_PREFIX, Deletion, Every, Reply, State, Training, TrainingHook
from fedunlearn.unlearning.history import RoundHistory
from strategies.fedavg import SeededFedAvg
from strategies.roster import MessageLog, Roster


def _plain(record: Any) -> Any:
    """A ConfigRecord / MetricRecord as a plain dict of Python values."""
    return {key: (list(value) if isinstance(value, (list, tuple)) else value) for key, value in record.items()}


class GridPort:
    def __init__(
        self,
        grid: Grid,
        config: Mapping[str, Any],
        roster: Roster,
        log: MessageLog,
        initial_state: State,
        new_model: Callable[[], nn.Module],
        out_dir: Path,
        on_phase: Callable[[str], None] = lambda phase: None,
        stamp: Mapping[str, Any] | None = None,
    ):
        self.grid, self.config, self.roster, self.log = grid, config, roster, log
        self.initial_state, self._new_model, self.out_dir = initial_state, new_model, Path(out_dir)
        self.on_phase = on_phase
        # Config entries every message of this run carries: which run of a several-run job it is
        # (``run-overrides``, JSON), so one set of clients serves every seed.
        self.stamp = dict(stamp or {})
        self.deleted: set[int] = set()  # clients whose deletion was applied earlier in the job
        self.histories: dict[int, RoundHistory] = {}  # round interval -> what training kept

    # --- what the federation is -----------------------------------------------------------------

    @property
    def clients(self):
        return self.roster.clients

    def new_model(self) -> nn.Module:
        return self._new_model()

    def remaining(self, deletion: Deletion) -> list[int]:
        gone = set(deletion.forget_clients) | self.deleted
        return [k for k in self.clients if k not in gone]

    @contextlib.contextmanager
    def phase(self, label: str) -> Iterator[None]:
        previous = self.log.phase
        self.log.phase = label
        self.on_phase(label)
        try:
            yield
        finally:
            self.log.phase = previous

    # --- messages ---------------------------------------------------------------------------------

    def send(
        self, message_type: str, partitions: Sequence[int], arrays: Mapping[str, State], config: Mapping[str, Any]
    ) -> dict[int, Reply]:
        partitions = list(partitions)
        content = RecordDict({name: ArrayRecord(state) for name, state in arrays.items()})
        content["config"] = ConfigRecord({**config, **self.stamp})
        timeout = float(self.config["unlearn-timeout"])
        self.log.record(message_type, partitions)
        messages = [
            Message(content=content, message_type=message_type, dst_node_id=self.roster.node_of(partition))
            for partition in partitions
        ]
        replies: dict[int, Reply] = {}
        for message in self.grid.send_and_receive(messages, timeout=timeout):
            if message.has_error():
                raise UnlearningFailed(f"{message_type}: a client failed: {message.error.reason}")
            identity = _plain(message.content["client"])
            partition = int(identity["partition-id"])
            replies[partition] = Reply(
                partition=partition,
                arrays={name: record.to_torch_state_dict() for name, record in message.content.array_records.items()},
                metrics=_plain(message.content.metric_records.get("metrics", {})),
                info=identity,
            )
        missing = sorted(set(partitions) - set(replies))
        if missing:
            raise UnlearningFailed(f"{message_type}: no reply from client(s) {missing} within {timeout:.0f} s")
        return dict(sorted(replies.items()))

    def train(
        self,
        partitions: Sequence[int],
        start: State,
        rounds: int,
        *,
        seed: int,
        evaluate_on_clients: bool = False,
        first_round: int = 1,
        hooks: Sequence[TrainingHook] = (),
        evaluate_fn: Callable | None = None,
        shuffle_salt: str = "",
    ) -> Training:
        strategy = self.fedavg(
            partitions, seed=seed, evaluate_on_clients=evaluate_on_clients, hooks=hooks, round_offset=first_round - 1,
            shuffle_salt=shuffle_salt,
        )
        state = self.run_fedavg(strategy, start, rounds, evaluate_fn)
        if strategy.failures:
            # A method's rounds (fine-tuning, repair, SISA's stages, a retrain) averaged without some
            # client, or without any (an empty model): not the training asked for.
            server_round, reason = strategy.failures[0]
            raise UnlearningFailed(
                f"train: {len(strategy.failures)} client training(s) failed, the first in round {server_round}: {reason}"
            )
        return Training(state=state, client_trainings=sum(len(trained) for trained in strategy.trained_partitions.values()))

    def fedavg(
        self, partitions: Sequence[int], *, seed: int, evaluate_on_clients: bool, hooks: Sequence[TrainingHook] = (),
        round_offset: int = 0, shuffle_salt: str = "",
    ) -> SeededFedAvg:
        return SeededFedAvg(
            stamp={**self.stamp, **({"shuffle-salt": shuffle_salt} if shuffle_salt else {})},
            roster=self.roster,
            log=self.log,
            participants=partitions,
            seed=seed,
            hooks=hooks,
            round_offset=round_offset,
            fraction_train=self.config["fraction-train"],
            fraction_evaluate=self.config["fraction-evaluate"] if evaluate_on_clients else 0.0,
        )

    def run_fedavg(self, strategy: SeededFedAvg, start: State, rounds: int, evaluate_fn: Callable | None = None) -> State:
        result = strategy.start(
            grid=self.grid,
            initial_arrays=ArrayRecord(start),
            num_rounds=rounds,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            evaluate_fn=evaluate_fn,
            timeout=self.config["round-timeout"],
        )
        return result.arrays.to_torch_state_dict()

    def remaining_objective(self, partitions: Sequence[int], state: State) -> FederatedObjective:
        return FederatedObjective(self, partitions, state)

    # --- what training kept -------------------------------------------------------------------------

    def history(self, every: Every) -> Mapping[int, Any]:
        history = self.histories.get(every.interval(self.config))
        return {} if history is None else history.rounds

    def history_hooks(self, requirements) -> list[RoundHistory]:
        """One round-history store per distinct interval the methods' requirements ask for."""
        for requirement in requirements:
            if requirement.round_history is not None:
                interval = requirement.round_history.interval(self.config)
                self.histories.setdefault(interval, RoundHistory(interval))
        return list(self.histories.values())


class FederatedObjective:
    """The remaining clients' objective through ``query.*`` rounds; each call is one round and
    returns the example-weighted mean Σ_j q_j r_j, q_j = n_j / Σ n_i, summed in partition order."""

    def __init__(self, port: GridPort, partitions: Sequence[int], state: State):
        self.port, self.state = port, state
        self.partitions = sorted(partitions)
        sizes = {k: port.clients[k].num_examples for k in self.partitions}
        total = sum(sizes.values())
        self.weights = {k: size / total for k, size in sizes.items()}
        self.rounds = 0

    def _round(self, kind: str, names: Sequence[str], extra: dict[str, Any], vector: Sequence[Tensor] | None) -> list[Tensor]:
        arrays = {"arrays": self.state}
        if vector is not None:
            arrays["vector"] = {name: tensor.detach().cpu().contiguous() for name, tensor in zip(names, vector)}
        replies = self.port.send(QUERY_PREFIX + kind, self.partitions, arrays, {"param-names": list(names), **extra})
        self.rounds += 1
        total = None
        for partition, reply in replies.items():
            result = reply.arrays["result"]
            weighted = [self.weights[partition] * result[name] for name in names]
            total = weighted if total is None else [t + w for t, w in zip(total, weighted)]
        return total

    def gradient(self, param_names: Sequence[str]) -> list[Tensor]:
        return self._round("gradient", param_names, {}, None)

    def curvature_product(self, param_names: Sequence[str], vector: Sequence[Tensor], curvature: str) -> list[Tensor]:
        return self._round("curvature", param_names, {"curvature": curvature}, vector)

    def diagonal_fisher(self, param_names: Sequence[str]) -> list[Tensor]:
        return self._round("fisher", param_names, {}, None)

    def kfac_factors(self, param_names: Sequence[str]) -> dict[str, tuple[Tensor, Tensor]]:
        """One ``query.kfac_factors`` round: Σ_j q_j A_j and Σ_j q_j G_j per layer, which are the
        KFAC factors of the clients' pooled data (the factors are example means)."""
        replies = self.port.send(
            QUERY_PREFIX + "kfac_factors", self.partitions, {"arrays": self.state}, {"param-names": list(param_names)}
        )
        self.rounds += 1
        return sum_factors({k: factors_from_arrays(reply.arrays["result"]) for k, reply in replies.items()}, self.weights)


__all__ = ["FederatedObjective", "GridPort", "MessageType"]
