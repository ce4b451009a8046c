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
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

State = dict[str, Tensor]


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


class SISA:
    name = "sisa"
    # Trains its own constituents during the training phase and unlearns by retraining a shard:
    # the strategy runs it on the grid, not on a client or on the server's curvature rounds.
    runs_on = "shards"
