"""Repair rounds: k FedAvg rounds on the remaining clients after any method's update.

Halimi et al.'s post-training after PGA and FedEraser's calibration are this idea: whatever the
method left, a few rounds of ordinary training on the data that remains pull the model back towards
the remaining objective's minimum. ``repair-rounds = k`` (run-wide, or per method with a variant label
``name[repair-rounds=k]``) runs them after the method's update and its release step (the noise; the
rounds use only the remaining clients' data, so they are post-processing and keep any certificate).
The rounds continue θ*'s numbering (rounds T+1, …, T+k: lr-decay goes on, the clients' shuffling
seeds are those rounds'), sampled as ``fraction-train`` says with a generator seeded per method, so two
methods repaired in one run get the same sampling. Their seconds and client trainings are the
method's cost; ``communication_rounds`` grows by k.
"""

from __future__ import annotations

import time

from fedunlearn.training import derive_seed
from fedunlearn.unlearning.api import Deletion, FederationPort, Outcome


def repair(port: FederationPort, deletion: Deletion, outcome: Outcome, rounds: int) -> float:
    """Replace ``outcome.state`` by ``rounds`` FedAvg rounds over the remaining clients from it; record
    them in ``outcome.details["repair"]`` and the counters. Returns the seconds spent (0 when nothing ran)."""
    if rounds <= 0:
        return 0.0
    if outcome.state is None:
        # An ensemble (SISA) is not one set of weights FedAvg could continue from.
        outcome.details["repair"] = {"rounds": 0, "skipped": "the method's model is not a single set of weights"}
        return 0.0
    start = time.perf_counter()
    remaining = port.remaining(deletion)
    training = port.train(
        remaining, outcome.state, rounds,
        seed=derive_seed(port.config["seed"], "repair"), first_round=deletion.trained_rounds + 1,
    )
    seconds = time.perf_counter() - start
    outcome.state = training.state
    outcome.communication_rounds += rounds
    outcome.details["repair"] = {
        "rounds": rounds, "client_trainings": training.client_trainings, "clients": remaining, "seconds": seconds,
    }
    outcome.headline["repair_client_trainings"] = training.client_trainings
    return seconds
