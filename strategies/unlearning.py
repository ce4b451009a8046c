"""The server side of unlearning: route ``train.unlearn`` to the clients that held the deleted data,
weigh and scale their updates, or run a server-side method through rounds of curvature products.

Nothing here knows a method's math: a client-side method returns Δ_k and ‖∇L(D_f,k)‖, a server-side
method asks a :class:`FederatedRemainingClients` for products.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

from fedunlearn.unlearning import federaser, get_method
from fedunlearn.unlearning.causal import adaptive_scale, causal_weights
from strategies.fedavg import UnlearningFailed, UnlearningFedAvg
from strategies.sisa import unlearn_shards

UNLEARN = f"{MessageType.TRAIN}.unlearn"
QUERY_GRADIENT = f"{MessageType.QUERY}.gradient"
QUERY_CURVATURE = f"{MessageType.QUERY}.curvature"
QUERY_FISHER = f"{MessageType.QUERY}.fisher"


@dataclass
class UnlearningOutcome:
    """What one method produced: a new global model (``state``), or a predictor that is not one
    model's weights (SISA's ensemble, ``predictor``)."""

    method: str
    state: dict[str, Tensor] | None
    seconds: float
    affected_clients: list[int]
    communication_rounds: int
    epsilon: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    predictor: torch.nn.Module | None = None


def _as_named_arrays(names: Sequence[str], tensors: Sequence[Tensor]) -> ArrayRecord:
    return ArrayRecord({name: tensor.detach().cpu().contiguous() for name, tensor in zip(names, tensors)})


def _with_delta(state: dict[str, Tensor], names: Sequence[str], delta: Sequence[Tensor]) -> dict[str, Tensor]:
    updated = {name: tensor.clone() for name, tensor in state.items()}
    for name, change in zip(names, delta):
        updated[name] = updated[name] + change.to(updated[name].dtype)
    return updated


def unlearn_on_affected_clients(
    strategy: UnlearningFedAvg,
    grid: Grid,
    state: dict[str, Tensor],
    method: str,
    forget_partitions: Sequence[int],
    config: dict[str, Any],
) -> UnlearningOutcome:
    """Client-side method: ``train.unlearn`` to the affected clients only; θ_u = θ* + Σ_k s_k w_k Δ_k."""
    start = time.perf_counter()
    solver = get_method(method)
    affected = sorted(forget_partitions)
    total_examples = sum(info.num_examples for info in strategy.clients.values())
    forgotten_examples = sum(strategy.clients[k].num_examples for k in affected)
    record = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "config": ConfigRecord(
                {
                    "method": method,
                    # One record goes to every affected client; each multiplies by its own n_k
                    # to get its influence weight n_k / (n − n_K).
                    "influence-weight-per-example": 1.0 / (total_examples - forgotten_examples),
                    "num-total-examples": total_examples,
                }
            ),
        }
    )
    replies = strategy.exchange(grid, affected, record, UNLEARN, timeout=config["unlearn-timeout"])
    norms, deltas, client_details, epsilons = {}, {}, {}, []
    names: list[str] = []
    for partition, reply in replies.items():
        update = reply.content["update"].to_torch_state_dict()
        names = list(update)
        deltas[partition] = [update[name] for name in names]
        metrics = reply.content["metrics"]
        norms[partition] = float(metrics["forget-gradient-norm"])
        details = json.loads(str(reply.content["client"]["diagnostics"]))
        if "epsilon" in reply.content["client"]:
            epsilons.append(float(reply.content["client"]["epsilon"]))
        client_details[partition] = {"seconds": float(metrics["seconds"]), **details}
    weights = causal_weights(norms, affected, sorted(strategy.clients))
    total_delta = [torch.zeros_like(state[name]) for name in names]
    scales, norms_before_scaling = {}, {}
    for partition in affected:
        weighted = [weights[partition] * part for part in deltas[partition]]
        norms_before_scaling[partition] = float(torch.sqrt(sum((w.double() ** 2).sum() for w in weighted)))
        scales[partition] = (
            adaptive_scale(weighted, config["scaling-constant"]) if getattr(solver, "uses_adaptive_scaling", False) else 1.0
        )
        total_delta = [t + scales[partition] * w for t, w in zip(total_delta, weighted)]
    seconds = time.perf_counter() - start
    return UnlearningOutcome(
        method=method,
        state=_with_delta(state, names, total_delta),
        seconds=seconds,
        affected_clients=affected,
        communication_rounds=1,
        # Each affected client releases its own noisy update: their ε add up (basic composition).
        epsilon=sum(epsilons) if epsilons and len(epsilons) == len(affected) else None,
        details={
            "causal_weights": {str(k): w for k, w in weights.items() if w},
            "adaptive_scales": {str(k): s for k, s in scales.items()},
            "update_norms_before_scaling": {str(k): n for k, n in norms_before_scaling.items()},
            "clients": {str(k): v for k, v in client_details.items()},
        },
    )


class FederatedRemainingClients:
    """The remaining clients' objective through ``query.*`` rounds (one product = one round)."""

    def __init__(self, strategy: UnlearningFedAvg, grid: Grid, state: dict[str, Tensor], remaining: Sequence[int], timeout: float):
        self.strategy, self.grid, self.state, self.timeout = strategy, grid, state, timeout
        self.remaining = sorted(remaining)
        sizes = {k: strategy.clients[k].num_examples for k in self.remaining}
        total = sum(sizes.values())
        self.weights = {k: size / total for k, size in sizes.items()}
        self.rounds = 0

    def _round(self, message_type: str, names: Sequence[str], extra: dict[str, Any], vector: Sequence[Tensor] | None) -> list[Tensor]:
        content = {"arrays": ArrayRecord(self.state), "config": ConfigRecord({"param-names": list(names), **extra})}
        if vector is not None:
            content["vector"] = _as_named_arrays(names, vector)
        replies = self.strategy.exchange(self.grid, self.remaining, RecordDict(content), message_type, self.timeout)
        self.rounds += 1
        total = None
        for partition, reply in replies.items():
            result = reply.content["result"].to_torch_state_dict()
            weighted = [self.weights[partition] * result[name] for name in names]
            total = weighted if total is None else [t + w for t, w in zip(total, weighted)]
        return total

    def gradient(self, param_names: Sequence[str]) -> list[Tensor]:
        return self._round(QUERY_GRADIENT, param_names, {}, None)

    def curvature_product(self, param_names: Sequence[str], vector: Sequence[Tensor], curvature: str) -> list[Tensor]:
        return self._round(QUERY_CURVATURE, param_names, {"curvature": curvature}, vector)

    def diagonal_fisher(self, param_names: Sequence[str]) -> list[Tensor]:
        return self._round(QUERY_FISHER, param_names, {}, None)


def unlearn_on_server(
    strategy: UnlearningFedAvg,
    grid: Grid,
    state: dict[str, Tensor],
    model: torch.nn.Module,
    method: str,
    forget_partitions: Sequence[int],
    config: dict[str, Any],
) -> UnlearningOutcome:
    start = time.perf_counter()
    remaining = [k for k in strategy.clients if k not in set(forget_partitions) and k not in strategy.excluded_partitions]
    model.load_state_dict(state)
    oracle = FederatedRemainingClients(strategy, grid, state, remaining, config["unlearn-timeout"])
    update = get_method(method).solve(model, oracle, config)
    return UnlearningOutcome(
        method=method,
        state=_with_delta(state, update.param_names, update.delta),
        seconds=time.perf_counter() - start,
        affected_clients=sorted(forget_partitions),
        communication_rounds=oracle.rounds,
        epsilon=update.epsilon,
        details={"server": update.diagnostics, "queried_clients": remaining},
    )


class FederatedReplayClients:
    """FedEraser's calibration training: a ``train`` round with fewer local epochs, remaining clients only."""

    def __init__(self, strategy: UnlearningFedAvg, grid: Grid, remaining: Sequence[int], timeout: float):
        self.strategy, self.grid, self.remaining, self.timeout = strategy, grid, sorted(remaining), timeout
        self.rounds = 0

    def sizes(self) -> dict[int, int]:
        return {k: info.num_examples for k, info in self.strategy.clients.items()}

    def calibrate(self, state: dict[str, Tensor], epochs: int) -> dict[int, dict[str, Tensor]]:
        self.rounds += 1
        # Round numbers past any training round keep the calibration's shuffling seeds distinct.
        config = ConfigRecord({"server-round": CALIBRATION_ROUND_BASE + self.rounds, "local-epochs": epochs})
        record = RecordDict({"arrays": ArrayRecord(state), "config": config})
        replies = self.strategy.exchange(self.grid, self.remaining, record, MessageType.TRAIN, self.timeout)
        return {k: reply.content["arrays"].to_torch_state_dict() for k, reply in replies.items()}


CALIBRATION_ROUND_BASE = 1_000_000


def unlearn_by_replay(strategy, grid, forget_partitions, config) -> UnlearningOutcome:
    """FedEraser: replay the stored rounds with calibrated updates of the remaining clients."""
    start = time.perf_counter()
    if not strategy.stored_rounds:
        raise UnlearningFailed("federaser: no training updates were stored (it must be listed before training starts)")
    remaining = [k for k in strategy.clients if k not in set(forget_partitions)]
    clients = FederatedReplayClients(strategy, grid, remaining, config["unlearn-timeout"])
    epochs = max(1, round(config["federaser-calibration-ratio"] * config["local-epochs"]))
    state, diagnostics = federaser.replay(strategy.stored_rounds, remaining, clients, epochs)
    return UnlearningOutcome(
        method="federaser",
        state=state,
        seconds=time.perf_counter() - start,
        affected_clients=sorted(forget_partitions),
        communication_rounds=clients.rounds,
        details=diagnostics,
    )


def apply_method(strategy, grid, state, model, method, forget_partitions, config, sisa_training=None, new_model=None) -> UnlearningOutcome:
    if get_method(method).runs_on == "shards":
        if sisa_training is None:
            raise UnlearningFailed("sisa: no constituents were trained (it must be listed before training starts)")
        return unlearn_shards(grid, strategy.clients, sisa_training, list(forget_partitions), config, new_model, strategy.message_log)
    if get_method(method).runs_on == "replay":
        return unlearn_by_replay(strategy, grid, forget_partitions, config)
    if get_method(method).runs_on == "server":
        return unlearn_on_server(strategy, grid, state, model, method, forget_partitions, config)
    return unlearn_on_affected_clients(strategy, grid, state, method, forget_partitions, config)
