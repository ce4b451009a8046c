"""FedEraser (Liu et al. 2021): replay the stored training rounds without the deleted clients.

During training the server keeps, every ``federaser-interval``-th round, each client's update
U_k^t = θ_k^t − θ^t (its returned model minus the global model it started from). To unlearn, it
starts again from the initial model and, for each stored round t, lets the *remaining* clients run a
short calibration training (``federaser-calibration-ratio`` × ``local-epochs`` epochs) from the current
unlearned model, and keeps the direction of their fresh update with the stored update's magnitude,
per parameter tensor (the paper's eq. for Ũ):

    Ũ_k^t = ‖U_k^t‖ · Û_k^t / ‖Û_k^t‖,        θ'^{t+Δt} = θ'^t + Σ_{k remaining} (n_k / n_rem) Ũ_k^t

Only the remaining clients' stored updates are used; the deleted clients' are dropped.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

State = dict[str, Tensor]


@dataclass
class StoredRound:
    global_state: State
    client_updates: dict[int, State] = field(default_factory=dict)


class ReplayClients(Protocol):
    """Short training of the remaining clients from a given model (one federated round per call)."""

    def calibrate(self, state: State, epochs: int) -> dict[int, State]: ...

    def sizes(self) -> dict[int, int]: ...


def storage_bytes(stored: Mapping[int, StoredRound]) -> int:
    return sum(
        tensor.numel() * tensor.element_size()
        for entry in stored.values()
        for update in entry.client_updates.values()
        for tensor in update.values()
    )


def calibrated_update(stored_update: State, fresh_update: State) -> State:
    calibrated = {}
    for name, stored in stored_update.items():
        fresh = fresh_update[name].to(stored.dtype)
        if not torch.is_floating_point(stored):
            calibrated[name] = torch.zeros_like(stored)
            continue
        fresh_norm = fresh.norm()
        calibrated[name] = stored.norm() * fresh / fresh_norm if fresh_norm > 0 else torch.zeros_like(stored)
    return calibrated


def replay(
    stored: Mapping[int, StoredRound],
    remaining: Sequence[int],
    clients: ReplayClients,
    calibration_epochs: int,
) -> tuple[State, dict[str, Any]]:
    """The unlearned state after replaying every stored round; diagnostics say what it cost."""
    start = time.perf_counter()
    rounds = sorted(stored)
    state = {name: tensor.clone() for name, tensor in stored[rounds[0]].global_state.items()}
    sizes = clients.sizes()
    total = sum(sizes[k] for k in remaining)
    for round_number in rounds:
        fresh_models = clients.calibrate(state, calibration_epochs)
        combined = {name: torch.zeros_like(tensor) for name, tensor in state.items() if torch.is_floating_point(tensor)}
        for k in remaining:
            fresh_update = {name: fresh_models[k][name] - state[name] for name in combined}
            stored_update = {name: stored[round_number].client_updates[k][name] for name in combined}
            for name, value in calibrated_update(stored_update, fresh_update).items():
                combined[name] += (sizes[k] / total) * value
        state = {name: (tensor + combined[name] if name in combined else tensor) for name, tensor in state.items()}
    return state, {
        "replayed_rounds": rounds,
        "calibration_epochs": calibration_epochs,
        "storage_bytes": storage_bytes(stored),
        "seconds": time.perf_counter() - start,
    }


class FedEraser:
    name = "federaser"
    runs_on = "replay"  # needs the server's stored training updates and calibration rounds
    needs_stored_updates = True
