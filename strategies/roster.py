"""Who holds what: the partition each node holds, learned once per job (``query.identify``).

Flower's node ids are random per run; partitions are what a seed, a deletion request and the
results speak of. The roster maps one to the other for every strategy and method of the job.
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedunlearn.errors import RunFailed
from fedunlearn.unlearning.api import ClientInfo

IDENTIFY = f"{MessageType.QUERY}.identify"


class ClientDiscoveryError(RunFailed):
    """Fewer nodes than num-clients answered, or two claimed the same partition."""


class Roster:
    def __init__(self, clients: dict[int, ClientInfo] | None = None):
        self.clients: dict[int, ClientInfo] = dict(sorted((clients or {}).items()))

    def discover(self, grid: Grid, num_clients: int, timeout: float, stamp: dict | None = None) -> dict[int, ClientInfo]:
        """Wait for ``num_clients`` nodes, ask each which partition it holds (``stamp``: the run's
        config entries every message carries, see ``GridPort``)."""
        deadline = time.monotonic() + timeout
        while len(node_ids := sorted(grid.get_node_ids())) < num_clients:
            if time.monotonic() > deadline:
                raise ClientDiscoveryError(
                    f"only {len(node_ids)} of num-clients={num_clients} nodes connected within {timeout:.0f} s"
                )
            time.sleep(0.5)
        content = RecordDict({"config": ConfigRecord(dict(stamp))}) if stamp else RecordDict()
        messages = [Message(content=content, message_type=IDENTIFY, dst_node_id=node_id) for node_id in node_ids]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
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

    @property
    def partitions(self) -> list[int]:
        return list(self.clients)


class MessageLog:
    """Every message the job sent (type, partition, phase), for results.json's communication account."""

    def __init__(self) -> None:
        self.entries: list[dict[str, object]] = []
        self.phase = "training"

    def record(self, message_type: str, partitions) -> None:
        self.entries.extend({"type": message_type, "partition": partition, "phase": self.phase} for partition in partitions)

    def counts(self, phases) -> dict[str, int]:
        """Messages sent in ``phases``, by message type (each one client's computation)."""
        wanted = set(phases)
        counts: dict[str, int] = {}
        for entry in self.entries:
            if entry["phase"] in wanted:
                counts[str(entry["type"])] = counts.get(str(entry["type"]), 0) + 1
        return dict(sorted(counts.items()))

    def summary(self) -> dict[str, object]:
        counts: dict[str, int] = {}
        for entry in self.entries:
            counts[str(entry["type"])] = counts.get(str(entry["type"]), 0) + 1
        unlearn_targets = sorted({int(e["partition"]) for e in self.entries if e["type"] == "train.unlearn"})
        return {"messages_by_type": counts, "train_unlearn_sent_to": unlearn_targets, "log": self.entries}
