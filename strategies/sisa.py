"""SISA on the Flower grid: train each shard's constituent stage by stage with FedAvg over its own
clients, keep a checkpoint after every stage, and on a deletion retrain only the affected shards
from the checkpoint before the deleted client's slice. The plan and the ensemble live in
:mod:`fedunlearn.unlearning.sisa`; this module only runs rounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.serverapp import Grid

from fedunlearn.training import derive_seed
from fedunlearn.unlearning.sisa import ShardHistory, ShardPlan, State, ensemble_of, plan_shards, retrained_fraction
from strategies.fedavg import ClientInfo, UnlearningFailed, UnlearningFedAvg


@dataclass
class SisaTraining:
    plan: ShardPlan
    histories: list[ShardHistory]
    seconds: float
    checkpoint_dir: Path
    message_log: list[dict[str, object]] = field(default_factory=list)

    @property
    def constituents(self) -> list[State]:
        return [history.final for history in self.histories]


class ShardTrainer:
    """Runs FedAvg stages restricted to one shard's clients on the grid."""

    def __init__(self, grid: Grid, clients: dict[int, ClientInfo], config: dict[str, Any], message_log: list):
        self.grid, self.clients, self.config, self.message_log = grid, clients, config, message_log

    def run_stage(self, start: State, partitions: list[int], rounds: int, seed: int, phase: str) -> tuple[State, int]:
        """``rounds`` FedAvg rounds over ``partitions`` from ``start``; the model and the local trainings run."""
        strategy = UnlearningFedAvg(
            num_clients=self.config["num-clients"],
            seed=seed,
            fraction_train=self.config["fraction-train"],
            fraction_evaluate=0.0,  # the ensemble is evaluated as a whole, on the server
            round_timeout=self.config["round-timeout"],
            excluded_partitions=tuple(sorted(set(self.clients) - set(partitions))),
        )
        strategy.clients = dict(self.clients)
        strategy.phase = phase
        state = strategy.train_from(self.grid, start, rounds)
        self.message_log.extend(strategy.message_log)
        trainings = sum(len(trained) for trained in strategy.trained_partitions.values())
        if trainings == 0:
            raise UnlearningFailed(f"sisa: {phase} trained no client")
        return state, trainings


def _save(path: Path, state: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    temporary.replace(path)


def train_constituents(
    grid: Grid,
    clients: dict[int, ClientInfo],
    config: dict[str, Any],
    initial_state: State,
    rounds: int,
    out_dir: Path,
    on_phase: Callable[[str], None] = lambda phase: None,
) -> SisaTraining:
    """Every shard's constituent from the same initial model, checkpointed after each stage."""
    start = time.perf_counter()
    plan = plan_shards(sorted(clients), config["sisa-shards"], config["sisa-slices"], rounds,
                       seed=derive_seed(config["seed"], "sisa-shards"))
    training = SisaTraining(plan=plan, histories=[], seconds=0.0, checkpoint_dir=out_dir / "sisa")
    trainer = ShardTrainer(grid, clients, config, training.message_log)
    for shard in range(plan.num_shards):
        history = ShardHistory(initial=initial_state)
        for stage, stage_rounds in enumerate(plan.stage_rounds[shard]):
            phase = f"sisa-training: shard {shard} stage {stage}"
            on_phase(phase)
            state, trainings = trainer.run_stage(
                history.start_of(stage), plan.stage_clients(shard, stage), stage_rounds,
                seed=derive_seed(config["seed"], "sisa", shard, stage), phase=phase,
            )
            history.checkpoints.append(state)
            history.client_trainings.append(trainings)
            _save(training.checkpoint_dir / f"shard-{shard}" / f"stage-{stage}.pt", state)
        training.histories.append(history)
    _save(training.checkpoint_dir / "constituents.pt", training.constituents)
    training.seconds = time.perf_counter() - start
    return training


def unlearn_shards(grid: Grid, clients: dict[int, ClientInfo], training: SisaTraining, forget: list[int],
                   config: dict[str, Any], new_model, message_log: list):
    """Retrain the shards holding ``forget`` from their last checkpoint before it; the new ensemble."""
    from strategies.unlearning import UnlearningOutcome  # the outcome type lives with the other methods

    start = time.perf_counter()
    deleted = frozenset(forget)
    plan = training.plan
    trainer = ShardTrainer(grid, clients, config, message_log)
    constituents: list[State | None] = list(training.constituents)
    redone_trainings, rounds_run, retrained = 0, 0, {}
    for shard in range(plan.num_shards):
        first = plan.first_stage_to_redo(shard, deleted)
        if first is None:
            continue
        state = training.histories[shard].start_of(first)
        redone_stages = []
        for stage in range(first, len(plan.stage_rounds[shard])):
            partitions = plan.stage_clients(shard, stage, deleted)
            if not partitions:
                continue  # this stage's slices were all deleted: the model carries over
            state, trainings = trainer.run_stage(
                state, partitions, plan.stage_rounds[shard][stage],
                seed=derive_seed(config["seed"], "sisa", shard, stage), phase="unlearning: sisa",
            )
            redone_trainings += trainings
            rounds_run += plan.stage_rounds[shard][stage]
            redone_stages.append(stage)
        # A shard with no client left has nothing to predict from: it leaves the ensemble.
        constituents[shard] = state if plan.stage_clients(shard, len(plan.stage_rounds[shard]) - 1, deleted) else None
        retrained[str(shard)] = {"restarted_from": "initial model" if first == 0 else f"stage {first - 1} checkpoint",
                                 "redone_stages": redone_stages,
                                 "dropped": constituents[shard] is None}
    kept = [state for state in constituents if state is not None]
    if not kept:
        raise UnlearningFailed("sisa: every shard lost all its clients; no constituent is left to predict")
    _save(training.checkpoint_dir / "constituents-after-deletion.pt", constituents)
    seconds = time.perf_counter() - start
    fraction = retrained_fraction(redone_trainings, training.histories)
    return UnlearningOutcome(
        method="sisa",
        state=None,
        predictor=ensemble_of(kept, new_model),
        seconds=seconds,
        affected_clients=sorted(forget),
        communication_rounds=rounds_run,
        details={
            "retrained_fraction": fraction,
            "redone_client_trainings": redone_trainings,
            "total_client_trainings": sum(sum(h.client_trainings) for h in training.histories),
            "retrained_shards": retrained,
            "plan": plan.to_json(),
            "sisa_training_seconds": training.seconds,
            "checkpoints": str(training.checkpoint_dir),
        },
    )
