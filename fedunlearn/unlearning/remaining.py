"""The remaining clients' objective computed in one process (no Flower): for studies and exact tests.

Same contract as the federated version the strategy provides (one product = one "round").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn as nn
from torch import Tensor

from fedunlearn.curvature.kfac import compute_kfac_factors, sum_factors
from fedunlearn.unlearning.methods.fisher import diagonal_fisher
from fedunlearn.unlearning.objective import count_examples, objective_curvature_product, objective_gradient


class InProcessRemainingClients:
    def __init__(self, model: nn.Module, client_batches: Mapping[int, Sequence[tuple[Tensor, Tensor]]]):
        self.model = model
        self.client_batches = dict(client_batches)
        sizes = {client: count_examples(batches) for client, batches in self.client_batches.items()}
        total = sum(sizes.values())
        self.weights = {client: size / total for client, size in sizes.items()}
        self.rounds = 0

    def _weighted_sum(self, per_client) -> list[Tensor]:
        total = None
        for client, batches in self.client_batches.items():
            part = [self.weights[client] * value for value in per_client(batches)]
            total = part if total is None else [t + p for t, p in zip(total, part)]
        self.rounds += 1
        return total

    def gradient(self, param_names: Sequence[str]) -> list[Tensor]:
        return self._weighted_sum(lambda batches: objective_gradient(self.model, param_names, batches))

    def curvature_product(self, param_names: Sequence[str], vector: Sequence[Tensor], curvature: str) -> list[Tensor]:
        return self._weighted_sum(
            lambda batches: objective_curvature_product(self.model, param_names, batches, vector, curvature)
        )

    def diagonal_fisher(self, param_names: Sequence[str]) -> list[Tensor]:
        return self._weighted_sum(lambda batches: diagonal_fisher(self.model, param_names, batches))

    def kfac_factors(self, param_names: Sequence[str]) -> dict[str, tuple[Tensor, Tensor]]:
        per_client = {
            client: compute_kfac_factors(self.model, batches, param_names)[0] for client, batches in self.client_batches.items()
        }
        self.rounds += 1
        return sum_factors(per_client, self.weights)
