"""Round history: the training hook behind ``Requirements(round_history=Every(...))``.

In the rounds the interval picks (1, 1 + n, 1 + 2n, …) it keeps the global model the server sent
and each client's update U_k^t = θ_k^t − θ^t (its returned model minus that global model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fedunlearn.unlearning.api import State, TrainingHook


@dataclass
class StoredRound:
    global_state: State
    client_updates: dict[int, State] = field(default_factory=dict)


class RoundHistory(TrainingHook):
    def __init__(self, interval: int):
        if interval < 1:
            raise ValueError(f"a round-history interval must be >= 1, got {interval}")
        self.interval = interval
        self.rounds: dict[int, StoredRound] = {}

    def keeps(self, server_round: int) -> bool:
        return (server_round - 1) % self.interval == 0

    def before_round(self, server_round: int, global_state: State, partitions: Sequence[int]) -> None:
        if self.keeps(server_round):
            self.rounds[server_round] = StoredRound(global_state=global_state)

    def after_round(self, server_round: int, client_states: Mapping[int, State], num_examples: Mapping[int, int]) -> None:
        stored = self.rounds.get(server_round)
        if stored is None:
            return
        for partition, local_state in client_states.items():
            stored.client_updates[partition] = {
                name: local_state[name] - stored.global_state[name] for name in local_state
            }

    def storage_bytes(self) -> int:
        return storage_bytes(self.rounds)


def storage_bytes(stored: Mapping[int, StoredRound]) -> int:
    """Bytes of the stored client updates (the global models are the server's own)."""
    return sum(
        tensor.numel() * tensor.element_size()
        for entry in stored.values()
        for update in entry.client_updates.values()
        for tensor in update.values()
    )


def weighted_mean(states: Mapping[int, State], weights: Mapping[int, float], names: Sequence[str]) -> State:
    """Σ_k w_k state_k per named entry, summed in partition order (float sums depend on order): the
    FedAvg of client models or updates, e.g. of a stored round's remaining clients."""
    return {name: sum(weights[k] * states[k][name] for k in sorted(weights)) for name in names}
