"""FedAvg that knows which node holds which partition.

Flower's FedAvg samples node ids with Python's ``random``; node ids are random per run, so a
seeded ``random`` still picks different *partitions* from run to run. This subclass first asks
every node which partition it holds (a ``query.identify`` round), then samples partitions with
its own seeded generator and orders replies by partition before averaging, so a seed fixes the
whole run. The same map later routes ``train.unlearn`` messages to the nodes that held deleted data.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedunlearn.errors import RunFailed
from fedunlearn.unlearning.federaser import StoredRound

IDENTIFY = f"{MessageType.QUERY}.identify"


@dataclass(frozen=True)
class ClientInfo:
    partition_id: int
    node_id: int
    num_examples: int
    label_histogram: tuple[int, ...]


class ClientDiscoveryError(RunFailed):
    """Fewer nodes than num-clients answered, or two claimed the same partition."""


class UnlearningFailed(RunFailed):
    """An affected client failed or timed out: the request fails and θ* stays as it was."""


class UnlearningFedAvg(FedAvg):
    def __init__(
        self,
        *,
        num_clients: int,
        seed: int,
        round_timeout: float = 3600.0,
        excluded_partitions: tuple[int, ...] = (),
        store_every: int = 0,
        **fedavg_options,
    ):
        fedavg_options.setdefault("min_train_nodes", 1)
        fedavg_options.setdefault("min_evaluate_nodes", 1 if fedavg_options.get("fraction_evaluate", 1.0) else 0)
        fedavg_options.setdefault("min_available_nodes", num_clients)
        super().__init__(**fedavg_options)
        self.num_clients = num_clients
        self.round_timeout = round_timeout
        self.sampler = random.Random(seed)
        self.clients: dict[int, ClientInfo] = {}
        self.trained_partitions: dict[int, list[int]] = {}
        # Deleted clients take no part in training (the retrain oracle, training after a deletion).
        self.excluded_partitions = set(excluded_partitions)
        # Every message this strategy sent, for the communication account in results.json (and tests).
        self.message_log: list[dict[str, object]] = []
        self.phase = "training"  # the job's current phase, recorded with every message
        # FedEraser's server state: every store_every-th round, the global model sent and each
        # client's update (0: keep nothing).
        self.store_every = store_every
        self.stored_rounds: dict[int, StoredRound] = {}
        # Aggregated client metrics by round, readable while the round is still running
        # (Strategy.start only hands its Result back at the end).
        self.client_metrics: dict[int, dict[str, float]] = {}

    # --- who holds what ------------------------------------------------------------------------

    def discover_clients(self, grid: Grid) -> dict[int, ClientInfo]:
        deadline = time.monotonic() + self.round_timeout
        while len(node_ids := sorted(grid.get_node_ids())) < self.num_clients:
            if time.monotonic() > deadline:
                raise ClientDiscoveryError(
                    f"only {len(node_ids)} of num-clients={self.num_clients} nodes connected "
                    f"within {self.round_timeout:.0f} s"
                )
            time.sleep(0.5)
        messages = [
            Message(content=RecordDict(), message_type=IDENTIFY, dst_node_id=node_id) for node_id in node_ids
        ]
        replies = list(grid.send_and_receive(messages, timeout=self.round_timeout))
        failures = [reply for reply in replies if reply.has_error()]
        if failures or len(replies) != len(node_ids):
            reasons = "; ".join(reply.error.reason for reply in failures) or "missing replies"
            raise ClientDiscoveryError(f"{len(failures)} of {len(node_ids)} nodes failed to identify: {reasons}")
        clients: dict[int, ClientInfo] = {}
        for reply in replies:
            record = reply.content["client"]
            partition_id = int(record["partition-id"])
            if partition_id in clients:
                raise ClientDiscoveryError(f"two nodes claim partition-id {partition_id}; check their node config")
            clients[partition_id] = ClientInfo(
                partition_id=partition_id,
                node_id=reply.metadata.src_node_id,
                num_examples=int(record["num-examples"]),
                label_histogram=tuple(int(count) for count in record["label-histogram"]),
            )
        self.clients = dict(sorted(clients.items()))
        return self.clients

    def node_of(self, partition_id: int) -> int:
        return self.clients[partition_id].node_id

    def _sample_partitions(self, fraction: float, minimum: int) -> list[int]:
        partitions = sorted(set(self.clients) - self.excluded_partitions)
        size = min(len(partitions), max(int(len(partitions) * fraction), minimum))
        return sorted(self.sampler.sample(partitions, size))

    def _messages_for(self, partitions: list[int], record: RecordDict, message_type: str) -> list[Message]:
        self.message_log.extend(
            {"type": message_type, "partition": partition, "phase": self.phase} for partition in partitions
        )
        return [
            Message(content=record, message_type=message_type, dst_node_id=self.node_of(partition))
            for partition in partitions
        ]

    def exchange(self, grid: Grid, partitions: list[int], record: RecordDict, message_type: str, timeout: float) -> dict[int, Message]:
        """Send ``record`` to ``partitions``; all must answer without error, else :class:`UnlearningFailed`."""
        replies = list(grid.send_and_receive(self._messages_for(partitions, record, message_type), timeout=timeout))
        by_partition: dict[int, Message] = {}
        for reply in replies:
            if reply.has_error():
                raise UnlearningFailed(f"{message_type}: a client failed: {reply.error.reason}")
            by_partition[int(reply.content["client"]["partition-id"])] = reply
        missing = sorted(set(partitions) - set(by_partition))
        if missing:
            raise UnlearningFailed(f"{message_type}: no reply from client(s) {missing} within {timeout:.0f} s")
        return dict(sorted(by_partition.items()))

    def train_from(self, grid: Grid, state: dict, num_rounds: int, evaluate_fn=None) -> dict:
        """``num_rounds`` rounds of this FedAvg from ``state``; the final global ``state_dict``."""
        result = self.start(
            grid=grid,
            initial_arrays=ArrayRecord(state),
            num_rounds=num_rounds,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            evaluate_fn=evaluate_fn,
            timeout=self.round_timeout,
        )
        return result.arrays.to_torch_state_dict()

    # --- FedAvg hooks -----------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_train == 0.0:
            return []
        partitions = self._sample_partitions(self.fraction_train, self.min_train_nodes)
        self.trained_partitions[server_round] = partitions
        if self.store_every and (server_round - 1) % self.store_every == 0:
            self.stored_rounds[server_round] = StoredRound(global_state=arrays.to_torch_state_dict())
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._messages_for(partitions, record, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        partitions = self._sample_partitions(self.fraction_evaluate, self.min_evaluate_nodes)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._messages_for(partitions, record, MessageType.EVALUATE)

    @staticmethod
    def _by_partition(replies: Iterable[Message]) -> list[Message]:
        # Float sums depend on order; replies arrive in completion order.
        def partition_of(reply: Message) -> int:
            return -1 if reply.has_error() else int(reply.content["client"]["partition-id"])

        return sorted(replies, key=partition_of)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = self._by_partition(replies)
        if server_round in self.stored_rounds:
            stored = self.stored_rounds[server_round]
            for reply in replies:
                if reply.has_error():
                    continue
                local_state = reply.content["arrays"].to_torch_state_dict()
                stored.client_updates[int(reply.content["client"]["partition-id"])] = {
                    name: local_state[name] - stored.global_state[name] for name in local_state
                }
        arrays, metrics = super().aggregate_train(server_round, replies)
        if metrics is not None:
            self.client_metrics.setdefault(server_round, {}).update(metrics)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(server_round, self._by_partition(replies))
        if metrics is not None:
            self.client_metrics.setdefault(server_round, {}).update(metrics)
        return metrics
