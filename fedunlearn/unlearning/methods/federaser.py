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
from typing import Any, Protocol

import torch

from fedunlearn.config import ConfigKey, positive_int, unit_interval
from fedunlearn.errors import UnlearningFailed
from fedunlearn.training import REPLAY_ROUND_BASE
from fedunlearn.unlearning.api import TRAIN, Deletion, Every, FederationPort, Method, Outcome, Requirements, State
from fedunlearn.unlearning.history import StoredRound, storage_bytes
from fedunlearn.unlearning.registry import register

# Calibration rounds are numbered past any training round so their shuffling seeds stay distinct
# (and the lr schedule knows them: they train at the last training round's lr).
CALIBRATION_ROUND_BASE = REPLAY_ROUND_BASE


class ReplayClients(Protocol):
    """Short training of the remaining clients from a given model (one federated round per call)."""

    def calibrate(self, state: State, epochs: int) -> dict[int, State]: ...

    def sizes(self) -> dict[int, int]: ...


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


class _PortReplayClients:
    """FedEraser's calibration training: a ``train`` round with fewer local epochs, remaining clients only."""

    def __init__(self, port: FederationPort, remaining: Sequence[int]):
        self.port, self.remaining = port, sorted(remaining)
        self.rounds = 0

    def sizes(self) -> dict[int, int]:
        return {k: info.num_examples for k, info in self.port.clients.items()}

    def calibrate(self, state: State, epochs: int) -> dict[int, State]:
        self.rounds += 1
        config = {"server-round": CALIBRATION_ROUND_BASE + self.rounds, "local-epochs": epochs}
        replies = self.port.send(TRAIN, self.remaining, {"arrays": state}, config)
        return {k: reply.arrays["arrays"] for k, reply in replies.items()}


@register("federaser")
class FedEraser(Method):
    summary = "replay of the stored rounds with calibrated updates of the remaining clients"
    requirements = Requirements(round_history=Every("federaser-interval"))
    config_keys = (
        ConfigKey("federaser-interval", 2, "federaser: store every client's update every this many rounds (Δt).", check=positive_int),
        ConfigKey("federaser-calibration-ratio", 0.5, "federaser: calibration epochs as a share of local-epochs (the paper's 0.5).", check=unit_interval),
    )

    def unlearn(self, port: FederationPort, deletion: Deletion) -> Outcome:
        stored = port.history(self.requirements.round_history)
        if not stored:
            raise UnlearningFailed("federaser: no training updates were stored (it must be listed before training starts)")
        remaining = port.remaining(deletion)
        clients = _PortReplayClients(port, remaining)
        epochs = max(1, round(self.config["federaser-calibration-ratio"] * self.config["local-epochs"]))
        state, diagnostics = replay(stored, remaining, clients, epochs)
        return Outcome(
            state=state,
            affected_clients=sorted(deletion.forget_clients),
            communication_rounds=clients.rounds,
            details=diagnostics,
            headline={"storage_bytes": diagnostics["storage_bytes"]},
        )
