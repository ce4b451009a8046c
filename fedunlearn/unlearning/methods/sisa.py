"""SISA (Bourtoule et al. 2021, "Machine Unlearning"): Sharded, Isolated, Sliced, Aggregated training.

Federated reading, as this project runs it: the *clients* are the data points SISA shards.

- **Sharded.** The clients are shuffled with the run seed and dealt round-robin into S shards
  (``sisa-shards``); each shard trains its own model, a *constituent*, with FedAvg over its clients
  only. No constituent ever sees another shard's data (isolation).
- **Sliced.** Within a shard the clients enter training in R slices (``sisa-slices``): stage r runs
  FedAvg on slices 0..r, starting from the checkpoint left by stage r − 1 (the initial model for
  stage 0); a checkpoint is kept after every stage. The training rounds are split over the stages.
- **Aggregated.** Prediction combines the constituents: the mean of their softmax probabilities (the
  module's output is its logarithm, so softmax/KL/loss read it as a distribution), and a majority
  vote (ties broken by the mean probability).
- **Unlearning.** A deleted client lives in exactly one shard and one slice j. Only that shard is
  retrained, from the checkpoint taken *before* slice j entered (stage j − 1's), redoing stages j..R−1
  without the client. Every other constituent is left untouched, bit for bit. A shard left without
  clients drops out of the ensemble.

``retrained_fraction`` is the share of the original SISA training (client-trainings: one client's
local training in one round) that the deletion redid.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from fedunlearn.config import ConfigKey, positive_int
from fedunlearn.errors import ConfigError, UnlearningFailed
from fedunlearn.files import atomic_torch_save
from fedunlearn.training import derive_seed
from fedunlearn.unlearning.api import Deletion, FederationPort, Method, Outcome, Requirements, State, TrainingHook
from fedunlearn.unlearning.registry import register


@dataclass(frozen=True)
class ShardPlan:
    """Which clients each shard holds, in slices, and how many FedAvg rounds each stage runs."""

    slices: tuple[tuple[tuple[int, ...], ...], ...]  # slices[shard][slice] = client ids
    stage_rounds: tuple[tuple[int, ...], ...]  # stage_rounds[shard][stage]

    @property
    def num_shards(self) -> int:
        return len(self.slices)

    def clients_of(self, shard: int) -> list[int]:
        return [client for part in self.slices[shard] for client in part]

    def stage_clients(self, shard: int, stage: int, deleted: frozenset[int] = frozenset()) -> list[int]:
        """The clients stage ``stage`` trains on: slices 0..stage, less the deleted ones."""
        return sorted(c for part in self.slices[shard][: stage + 1] for c in part if c not in deleted)

    def locate(self, client: int) -> tuple[int, int]:
        for shard, parts in enumerate(self.slices):
            for position, part in enumerate(parts):
                if client in part:
                    return shard, position
        raise KeyError(f"client {client} is in no SISA shard")

    def first_stage_to_redo(self, shard: int, deleted: frozenset[int]) -> int | None:
        """The earliest slice holding a deleted client (its stage and all later ones are redone)."""
        positions = [position for position, part in enumerate(self.slices[shard]) if set(part) & deleted]
        return min(positions) if positions else None

    def to_json(self) -> dict[str, object]:
        return {"slices": [[list(part) for part in parts] for parts in self.slices],
                "stage_rounds": [list(rounds) for rounds in self.stage_rounds]}


def plan_shards(clients: list[int], num_shards: int, num_slices: int, rounds: int, seed: int) -> ShardPlan:
    """Deal the shuffled clients round-robin into shards, cut each shard into contiguous slices.

    A shard gets at most as many slices as it has clients and as there are rounds (a stage needs one
    round at least); the rounds are split as evenly as possible, earlier stages taking the remainder.
    """
    if num_shards > len(clients):
        raise ValueError(f"{num_shards} SISA shards need at least as many clients, got {len(clients)}")
    order = sorted(clients)
    random.Random(seed).shuffle(order)
    slices, stage_rounds = [], []
    for shard in range(num_shards):
        members = order[shard::num_shards]
        count = max(1, min(num_slices, len(members), rounds))
        base, extra = divmod(len(members), count)
        parts, start = [], 0
        for position in range(count):
            size = base + (1 if position < extra else 0)
            parts.append(tuple(members[start : start + size]))
            start += size
        per_stage, spare = divmod(rounds, count)
        slices.append(tuple(parts))
        stage_rounds.append(tuple(per_stage + (1 if stage < spare else 0) for stage in range(count)))
    return ShardPlan(tuple(slices), tuple(stage_rounds))


@dataclass
class ShardHistory:
    """One constituent's checkpoints: ``checkpoints[r]`` is the model after stage r; the cost of each stage."""

    initial: State
    checkpoints: list[State] = field(default_factory=list)
    client_trainings: list[int] = field(default_factory=list)  # per stage: local trainings run

    def start_of(self, stage: int) -> State:
        return self.initial if stage == 0 else self.checkpoints[stage - 1]

    @property
    def final(self) -> State:
        return self.checkpoints[-1]


def retrained_fraction(redone_trainings: int, histories: list[ShardHistory]) -> float:
    total = sum(sum(history.client_trainings) for history in histories)
    return redone_trainings / total if total else 0.0


class SisaEnsemble(nn.Module):
    """The aggregate predictor. ``forward`` gives log of the mean probability of the constituents."""

    # There is no single parameter vector to set beside the retrained model's: metrics that compare
    # weights (the parameter gap) are undefined for an ensemble.
    has_single_parameter_vector = False

    def __init__(self, constituents: list[nn.Module]):
        super().__init__()
        if not constituents:
            raise ValueError("a SISA ensemble needs at least one constituent")
        self.constituents = nn.ModuleList(constituents)

    def probabilities(self, inputs: Tensor) -> Tensor:
        """(constituents, batch, classes) softmax outputs."""
        return torch.stack([torch.softmax(model(inputs), dim=-1) for model in self.constituents])

    def forward(self, inputs: Tensor) -> Tensor:
        return torch.log(self.probabilities(inputs).mean(dim=0).clamp_min(1e-12))

    @torch.no_grad()
    def vote(self, inputs: Tensor) -> Tensor:
        """Majority vote over the constituents' argmax; a tie goes to the class of higher mean probability."""
        probabilities = self.probabilities(inputs)
        classes = probabilities.shape[-1]
        votes = torch.nn.functional.one_hot(probabilities.argmax(dim=-1), classes).sum(dim=0).to(probabilities.dtype)
        # Mean probabilities are < 1, so they only separate classes with the same number of votes.
        return (votes + probabilities.mean(dim=0)).argmax(dim=-1)


def ensemble_of(states: list[State], new_model) -> SisaEnsemble:
    constituents = []
    for state in states:
        model = new_model()
        model.load_state_dict(state)
        constituents.append(model)
    return SisaEnsemble(constituents)


@dataclass
class SisaTraining:
    plan: ShardPlan
    histories: list[ShardHistory]
    seconds: float
    checkpoint_dir: Path

    @property
    def constituents(self) -> list[State]:
        return [history.final for history in self.histories]


def _run_stage(port: FederationPort, start: State, partitions: list[int], rounds: int, seed: int, phase: str) -> tuple[State, int]:
    """``rounds`` FedAvg rounds over ``partitions`` from ``start``; the model and the local trainings run."""
    with port.phase(phase):
        # The ensemble is evaluated as a whole, on the server: no client evaluation rounds.
        training = port.train(partitions, start, rounds, seed=seed, evaluate_on_clients=False)
    if training.client_trainings == 0:
        raise UnlearningFailed(f"sisa: {phase} trained no client")
    return training.state, training.client_trainings


def train_constituents(port: FederationPort, config, initial_state: State, rounds: int) -> SisaTraining:
    """Every shard's constituent from the same initial model, checkpointed after each stage."""
    start = time.perf_counter()
    plan = plan_shards(sorted(port.clients), config["sisa-shards"], config["sisa-slices"], rounds,
                       seed=derive_seed(config["seed"], "sisa-shards"))
    training = SisaTraining(plan=plan, histories=[], seconds=0.0, checkpoint_dir=Path(port.out_dir) / "sisa")
    for shard in range(plan.num_shards):
        history = ShardHistory(initial=initial_state)
        for stage, stage_rounds in enumerate(plan.stage_rounds[shard]):
            state, trainings = _run_stage(
                port, history.start_of(stage), plan.stage_clients(shard, stage), stage_rounds,
                seed=derive_seed(config["seed"], "sisa", shard, stage), phase=f"sisa-training: shard {shard} stage {stage}",
            )
            history.checkpoints.append(state)
            history.client_trainings.append(trainings)
            atomic_torch_save(state, training.checkpoint_dir / f"shard-{shard}" / f"stage-{stage}.pt")
        training.histories.append(history)
    atomic_torch_save(training.constituents, training.checkpoint_dir / "constituents.pt")
    training.seconds = time.perf_counter() - start
    return training


class _TrainConstituents(TrainingHook):
    def __init__(self, method: SISA):
        self.method = method

    def after_training(self, port: FederationPort, final_state: State, rounds: int) -> None:
        self.method.training = train_constituents(port, self.method.config, port.initial_state, rounds)


@register("sisa")
class SISA(Method):
    summary = "sharded, sliced constituents with checkpoints; deletion retrains the affected shard"
    requirements = Requirements(trains_constituents=True)
    config_keys = (
        ConfigKey("sisa-shards", 2, "sisa: shards S; each trains its own FedAvg constituent on its clients only.", check=positive_int),
        ConfigKey("sisa-slices", 2, "sisa: slices R per shard; clients enter in R stages, a checkpoint after each (at most the shard's clients and the rounds).", check=positive_int),
    )

    def __init__(self, config):
        super().__init__(config)
        self.training: SisaTraining | None = None

    @classmethod
    def check_config(cls, config) -> None:
        if config["sisa-shards"] > config["num-clients"]:
            raise ConfigError("sisa-shards", config["sisa-shards"], f"1..{config['num-clients']} (num-clients)")

    def training_hooks(self) -> list[TrainingHook]:
        return [_TrainConstituents(self)]

    def unlearn(self, port: FederationPort, deletion: Deletion) -> Outcome:
        """Retrain the shards holding the deleted clients from their last checkpoint before it; the new ensemble."""
        training = self.training
        if training is None:
            raise UnlearningFailed("sisa: no constituents were trained (it must be listed before training starts)")
        config = self.config
        deleted = frozenset(deletion.forget_clients)
        plan = training.plan
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
                state, trainings = _run_stage(
                    port, state, partitions, plan.stage_rounds[shard][stage],
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
        atomic_torch_save(constituents, training.checkpoint_dir / "constituents-after-deletion.pt")
        fraction = retrained_fraction(redone_trainings, training.histories)
        return Outcome(
            state=None,
            predictor=ensemble_of(kept, port.new_model),
            affected_clients=sorted(deletion.forget_clients),
            communication_rounds=rounds_run,
            headline={"retrained_fraction": fraction},
            # SISA's own starting point (its ensemble before the deletion), not a method of its own.
            also_evaluate={"ensemble_before_deletion": ensemble_of(training.constituents, port.new_model)},
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
