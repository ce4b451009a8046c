"""FedEraser (Liu et al., IWQoS 2021): replay the stored training rounds without the deleted clients.

During training the server keeps, every ``federaser-interval``-th round (Δt; rounds 1, 1 + Δt, …), the
global model θ^t it sent and each sampled client's update U_k^t = θ_k^t − θ^t. To unlearn, with R_t the
clients of stored round t that remain (those sampled in t, minus every deleted one) and w_k = n_k / Σ_{j∈R_t} n_j:

- the first stored round (round 1, from the initial model) is not calibrated: the old and the new
  trajectory start from the same model, so θ' = θ^1 + Σ_{k∈R_1} w_k U_k^1, the FedAvg round without the
  deleted clients (the authors' code: the plain average of the remaining clients' stored models);
- every later stored round t: the clients of R_t train ``ceil(federaser-calibration-ratio × local-epochs)``
  epochs from θ' (one ``train`` message each: their ordinary local SGD with round t's settings, lr
  included, only fewer epochs), giving Û_k^t = θ̂_k^t − θ', and per state-dict entry (each layer's weight,
  bias, … separately)

      U^t = Σ_{k∈R_t} w_k U_k^t,   Û^t = Σ_{k∈R_t} w_k Û_k^t,   θ' ← θ' + ‖U^t‖ · Û^t / ‖Û^t‖

  (``federaser-normalise = "aggregate"``, the authors' ``unlearning_step_once``: the aggregates are
  normalised, not the clients). ``"per-client"`` instead steps by Σ_k w_k ‖U_k^t‖ Û_k^t / ‖Û_k^t‖, each
  client's stored magnitude with its own calibrated direction (what this module did before; kept to compare).

A stored round in which no remaining client took part is skipped (no step). Where we differ from the
authors' code (docs/methods.md has the measurements): we keep the first round of each interval (they keep
the last, so their first step starts from a model the deleted client already shaped when Δt > 1); the
weights are the clients' example counts, as in our FedAvg (theirs are equal, their clients equal-sized);
the stored step is measured from θ^t, the model the round started from, as in the paper and in their own
docstring (their indexing passes θ^{t+1}, the aggregate of the same round, instead); their lr is constant,
ours follows lr-decay, and a calibration of round t trains at round t's lr; non-float state entries are
not stepped; a zero calibration aggregate gives no step (theirs: NaN).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from fedunlearn.config import ConfigKey, positive_int, unit_interval
from fedunlearn.errors import UnlearningFailed
from fedunlearn.unlearning.api import TRAIN, Deletion, Every, FederationPort, Method, Outcome, Requirements, State
from fedunlearn.unlearning.history import StoredRound, storage_bytes, weighted_mean
from fedunlearn.unlearning.registry import register

# A calibration message carries the replayed round's number, so the client trains with that round's lr
# (lr-decay), and this salt, so that its shuffling differs from the training round's.
CALIBRATION_SALT = "federaser-calibration"

NORMALISATIONS = ("aggregate", "per-client")


class ReplayClients(Protocol):
    """Short training of named clients from a given model (one federated round per call)."""

    def calibrate(self, state: State, partitions: Sequence[int], epochs: int, replayed_round: int) -> dict[int, State]:
        """The models ``partitions`` return after ``epochs`` local epochs from ``state``, replaying ``replayed_round``."""


def calibration_epochs(ratio: float, local_epochs: int) -> int:
    """``ceil(ratio × local_epochs)``, as the authors' code takes it (0.5 × 5 → 3); the product is
    rounded to 9 decimals first so that a float artefact (0.3 × 10 = 3.0000000000000004) is not a 4th epoch."""
    return max(1, math.ceil(round(ratio * local_epochs, 9)))


def _float_names(state: State) -> list[str]:
    return [name for name, tensor in state.items() if torch.is_floating_point(tensor)]


def _rescaled(magnitude_of: torch.Tensor, direction_of: torch.Tensor) -> torch.Tensor:
    """‖magnitude_of‖ · direction_of / ‖direction_of‖; no step when direction_of is zero."""
    norm = direction_of.norm()
    return magnitude_of.norm() * direction_of / norm if norm > 0 else torch.zeros_like(direction_of)


def calibrated_step(
    stored_updates: Mapping[int, State],
    fresh_updates: Mapping[int, State],
    weights: Mapping[int, float],
    names: Sequence[str],
    normalise: str = "aggregate",
) -> State:
    """One replayed round's step, per entry of ``names`` (weights sum to 1 over the round's clients)."""
    if normalise == "aggregate":
        stored = weighted_mean(stored_updates, weights, names)
        fresh = weighted_mean(fresh_updates, weights, names)
        return {name: _rescaled(stored[name], fresh[name].to(stored[name].dtype)) for name in names}
    if normalise == "per-client":
        return {
            name: sum(
                weights[k] * _rescaled(stored_updates[k][name], fresh_updates[k][name].to(stored_updates[k][name].dtype))
                for k in sorted(weights)
            )
            for name in names
        }
    raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")


def replay(
    stored: Mapping[int, StoredRound],
    remaining: Sequence[int],
    sizes: Mapping[int, int],
    clients: ReplayClients,
    epochs: int,
    normalise: str = "aggregate",
) -> tuple[State, dict[str, Any]]:
    """The unlearned state after replaying every stored round; diagnostics say what it cost.

    ``sizes``: each client's number of examples (the FedAvg weights). Non-float entries of the state
    (none in this project's models) are left at the first stored round's values.
    """
    start = time.perf_counter()
    rounds = sorted(stored)
    kept = set(remaining)
    state = {name: tensor.clone() for name, tensor in stored[rounds[0]].global_state.items()}
    names = _float_names(state)
    replayed, skipped, participants_of = [], [], {}
    for index, round_number in enumerate(rounds):
        entry = stored[round_number]
        participants = sorted(k for k in entry.client_updates if k in kept)
        if not participants:
            skipped.append(round_number)
            continue
        total = sum(sizes[k] for k in participants)
        weights = {k: sizes[k] / total for k in participants}
        if index == 0:
            # Both trajectories start from this round's global model: the FedAvg step of the remaining clients.
            step = weighted_mean(entry.client_updates, weights, names)
        else:
            fresh_models = clients.calibrate(state, participants, epochs, round_number)
            fresh_updates = {k: {name: fresh_models[k][name] - state[name] for name in names} for k in participants}
            step = calibrated_step(entry.client_updates, fresh_updates, weights, names, normalise)
        state = {name: (tensor + step[name].to(tensor.dtype) if name in step else tensor) for name, tensor in state.items()}
        replayed.append(round_number)
        participants_of[round_number] = participants
    return state, {
        "replayed_rounds": replayed,
        "skipped_rounds": skipped,
        "calibrated_rounds": [r for r in replayed if r != rounds[0]],
        "participants": {str(r): p for r, p in participants_of.items()},
        "calibration_epochs": epochs,
        "normalise": normalise,
        "storage_bytes": storage_bytes(stored),
        "seconds": time.perf_counter() - start,
    }


class _PortReplayClients:
    """FedEraser's calibration training: a ``train`` message to the named clients numbered as the replayed
    round (its lr) with fewer local epochs and a salt of its own for the shuffling."""

    def __init__(self, port: FederationPort):
        self.port = port
        self.rounds = 0
        self.trainings = 0

    def calibrate(self, state: State, partitions: Sequence[int], epochs: int, replayed_round: int) -> dict[int, State]:
        self.rounds += 1
        self.trainings += len(partitions)
        config = {"server-round": replayed_round, "local-epochs": epochs, "shuffle-salt": CALIBRATION_SALT}
        replies = self.port.send(TRAIN, sorted(partitions), {"arrays": state}, config)
        return {k: reply.arrays["arrays"] for k, reply in replies.items()}


@register("federaser")
class FedEraser(Method):
    summary = "replay of the stored rounds with calibrated updates of the remaining clients"
    requirements = Requirements(round_history=Every("federaser-interval"))
    config_keys = (
        ConfigKey("federaser-interval", 2, "federaser: store every client's update every this many rounds (Δt).", check=positive_int),
        ConfigKey(
            "federaser-calibration-ratio", 0.5,
            "federaser: calibration epochs = ceil(this × local-epochs) (0.5: the authors' code).", check=unit_interval,
        ),
        ConfigKey(
            "federaser-normalise", "aggregate",
            "federaser: rescale the weighted mean of the calibration updates to the stored mean's norm, per tensor "
            "(aggregate: the authors' code), or each client's update to its own stored norm (per-client).",
            choices=NORMALISATIONS,
        ),
    )

    def unlearn(self, port: FederationPort, deletion: Deletion) -> Outcome:
        stored = port.history(self.requirements.round_history)
        if not stored:
            raise UnlearningFailed("federaser: no training updates were stored (it must be listed before training starts)")
        remaining = port.remaining(deletion)
        clients = _PortReplayClients(port)
        epochs = calibration_epochs(self.config["federaser-calibration-ratio"], self.config["local-epochs"])
        sizes = {k: info.num_examples for k, info in port.clients.items()}
        state, diagnostics = replay(stored, remaining, sizes, clients, epochs, self.config["federaser-normalise"])
        diagnostics["calibration_trainings"] = clients.trainings
        return Outcome(
            state=state,
            affected_clients=sorted(deletion.forget_clients),
            communication_rounds=clients.rounds,
            details=diagnostics,
            headline={"storage_bytes": diagnostics["storage_bytes"]},
        )
