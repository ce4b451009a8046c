"""FedAvg that samples partitions, not node ids, with its own seeded generator.

Flower's FedAvg samples node ids with Python's ``random``; node ids are random per run, so a seeded
``random`` still picks different *partitions* from run to run. This subclass samples partitions
(from the job's :class:`~strategies.roster.Roster`) with its own seeded generator and orders replies
by partition before averaging, so a seed fixes the whole run. Training hooks (round history, a
method's per-round statistics) see the global model sent and every client's returned model.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedunlearn.unlearning.api import TrainingHook
from strategies.roster import MessageLog, Roster


class SeededFedAvg(FedAvg):
    def __init__(
        self,
        *,
        roster: Roster,
        log: MessageLog,
        participants: Sequence[int],
        seed: int,
        hooks: Sequence[TrainingHook] = (),
        round_offset: int = 0,
        stamp: dict | None = None,
        **fedavg_options,
    ):
        fedavg_options.setdefault("min_train_nodes", 1)
        fedavg_options.setdefault("min_evaluate_nodes", 1 if fedavg_options.get("fraction_evaluate", 1.0) else 0)
        fedavg_options.setdefault("min_available_nodes", len(roster.clients))
        super().__init__(**fedavg_options)
        self.roster, self.log = roster, log
        self.participants = sorted(participants)
        self.sampler = random.Random(seed)
        self.hooks = list(hooks)
        # Rounds are numbered round_offset + 1, … in what clients see (their shuffling seeds) and
        # in what hooks see, so a phase that continues a model continues its round numbers too.
        self.round_offset = round_offset
        # Config entries every train / evaluate message carries (the run's overrides, a shuffle salt).
        self.stamp = dict(stamp or {})
        self.trained_partitions: dict[int, list[int]] = {}
        # Aggregated client metrics by round, readable while the round is still running
        # (Strategy.start only hands its Result back at the end).
        self.client_metrics: dict[int, dict[str, float]] = {}
        # (round as the clients saw it, reason) of every train reply that came back as an error; FedAvg
        # averages the others (Flower's behaviour), and port.train refuses a result that lost any.
        self.failures: list[tuple[int, str]] = []

    def _sample(self, fraction: float, minimum: int) -> list[int]:
        size = min(len(self.participants), max(int(len(self.participants) * fraction), minimum))
        return sorted(self.sampler.sample(self.participants, size))

    def _messages_for(self, partitions: list[int], record: RecordDict, message_type: str) -> list[Message]:
        self.log.record(message_type, partitions)
        return [
            Message(content=record, message_type=message_type, dst_node_id=self.roster.node_of(partition))
            for partition in partitions
        ]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_train == 0.0:
            return []
        partitions = self._sample(self.fraction_train, self.min_train_nodes)
        self.trained_partitions[server_round] = partitions
        if self.hooks:
            global_state = arrays.to_torch_state_dict()
            for hook in self.hooks:
                hook.before_round(self.round_offset + server_round, global_state, partitions)
        config["server-round"] = self.round_offset + server_round
        config.update(self.stamp)
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._messages_for(partitions, record, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        partitions = self._sample(self.fraction_evaluate, self.min_evaluate_nodes)
        config["server-round"] = self.round_offset + server_round
        config.update(self.stamp)
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
        self.failures += [(self.round_offset + server_round, reply.error.reason) for reply in replies if reply.has_error()]
        if self.hooks:
            client_states, num_examples = {}, {}
            for reply in replies:
                if reply.has_error():
                    continue
                partition = int(reply.content["client"]["partition-id"])
                client_states[partition] = reply.content["arrays"].to_torch_state_dict()
                num_examples[partition] = int(reply.content["metrics"]["num-examples"])
            for hook in self.hooks:
                hook.after_round(self.round_offset + server_round, client_states, num_examples)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if metrics is not None:
            self.client_metrics.setdefault(server_round, {}).update(metrics)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(server_round, self._by_partition(replies))
        if metrics is not None:
            self.client_metrics.setdefault(server_round, {}).update(metrics)
        return metrics
