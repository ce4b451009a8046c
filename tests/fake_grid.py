"""An in-process Flower Grid for fast tests of the server side (no Ray, no SuperLink).

It delivers each message to the real ClientApp in this process — the same handlers, records and
replies a simulation or a deployment uses — one node per partition, with node ids that are not the
partition ids (as on a real SuperLink). A node can be told to fail (an error reply) or to stay
silent (no reply), to test what the server does then. Every delivered message is kept in ``sent``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class FakeGrid(Grid):
    def __init__(self, client_app, num_nodes: int, run_config: dict | None = None, fail: set[int] = frozenset(), silent: set[int] = frozenset()):
        self.client_app = client_app
        # Node ids unrelated to partition ids and not in partition order.
        self.node_ids = [1_000_003 * (7 * partition + 3) % 999_983 + 17 for partition in range(num_nodes)]
        self.partition_of_node = {node: partition for partition, node in enumerate(self.node_ids)}
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config={"partition-id": partition, "num-partitions": num_nodes},
                          state=RecordDict(), run_config=dict(run_config or {}))
            for node, partition in self.partition_of_node.items()
        }
        self.fail, self.silent = set(fail), set(silent)  # partitions
        self.sent: list[tuple[str, int]] = []  # (message type, partition)
        self._run = None
        # Messages take their run id from the process's task identity (set by Flower's runtimes).
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    # --- Grid's abstract interface ----------------------------------------------------------------

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id="", ttl=None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages):
        raise NotImplementedError("FakeGrid delivers through send_and_receive only")

    def pull_messages(self, message_ids):
        raise NotImplementedError("FakeGrid delivers through send_and_receive only")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            message.metadata.__dict__["_src_node_id"] = 0
            message.metadata.__dict__["_created_at"] = time.time()
            partition = self.partition_of_node[message.metadata.dst_node_id]
            self.sent.append((message.metadata.message_type, partition))
            if partition in self.silent:
                continue
            if partition in self.fail:
                replies.append(Message(Error(code=1, reason=f"partition {partition} was told to fail"), reply_to=message))
                continue
            reply = self.client_app(message, self.contexts[message.metadata.dst_node_id])
            reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
            replies.append(reply)
        return replies

    def count(self, message_type: str) -> int:
        return sum(1 for sent_type, _ in self.sent if sent_type == message_type)

    def partitions_sent(self, message_type: str) -> list[int]:
        return [partition for sent_type, partition in self.sent if sent_type == message_type]


def grid_port(config, grid: FakeGrid | None = None):
    """(grid, port, federation): a GridPort over a FakeGrid running the real ClientApp, clients discovered."""
    from clients.client_app import build_client_app
    from fedunlearn.federation import build_federation
    from strategies.port import GridPort
    from strategies.roster import MessageLog, Roster

    grid = grid or FakeGrid(build_client_app(bound_config=config), config["num-clients"])
    federation = build_federation(config)
    roster, log = Roster(), MessageLog()
    roster.discover(grid, config["num-clients"], timeout=5)
    initial = federation.initial_model().state_dict()
    port = GridPort(grid, config, roster, log, initial, federation.new_model, config["out-dir"])
    return grid, port, federation


def fedavg_by_hand(federation, config, start, partitions, rounds, first_round=1):
    """FedAvg written out: every partition trains locally with its round's seed; example-weighted mean."""
    import torch

    from fedunlearn.training import derive_seed, train_local

    state = {name: tensor.clone() for name, tensor in start.items()}
    for server_round in range(first_round, first_round + rounds):
        models, sizes = [], []
        for k in partitions:
            model = federation.new_model()
            model.load_state_dict(state)
            data = federation.client_data(k)
            train_local(model, data, federation.local_training, torch.device("cpu"), seed=derive_seed(config["seed"], "train", server_round, k))
            models.append(model.state_dict())
            sizes.append(len(data))
        total = sum(sizes)
        state = {name: sum(m[name] * (n / total) for m, n in zip(models, sizes)) for name in state}
    return state
