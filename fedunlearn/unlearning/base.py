"""The small interface where a method meets the strategy.

A *client-side* method runs on each affected client (``train.unlearn``): from the trained global
model θ* and the client's own data it returns an update Δ_k to add to θ*, the norm of its forget
gradient (the strategy's causal weights need it) and diagnostics. A *server-side* method runs on the
server and asks the remaining clients for products through a :class:`RemainingClients` object (one
federated round per call). The strategy never knows a method's math; a method never reaches into the
strategy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch.nn as nn
from torch import Tensor

from fedunlearn.curvature import Batches


@dataclass
class ClientUpdate:
    """What an affected client sends back: Δ_k (ordered as ``param_names``) and what it learned."""

    param_names: list[str]
    delta: list[Tensor]
    forget_gradient_norm: float
    num_forget_examples: int
    diagnostics: dict[str, Any] = field(default_factory=dict)
    epsilon: float | None = None


@dataclass
class ServerUpdate:
    param_names: list[str]
    delta: list[Tensor]
    communication_rounds: int
    diagnostics: dict[str, Any] = field(default_factory=dict)
    epsilon: float | None = None


class ClientSideMethod(Protocol):
    name: str
    runs_on: str  # "client"

    def solve(
        self,
        model: nn.Module,
        forget_batches: Batches,
        influence_weight: float,
        config: dict[str, Any],
    ) -> ClientUpdate: ...


class RemainingClients(Protocol):
    """The remaining clients' objective, seen only through products (each call: one round)."""

    def gradient(self, param_names: Sequence[str]) -> list[Tensor]: ...

    def curvature_product(self, param_names: Sequence[str], vector: Sequence[Tensor], curvature: str) -> list[Tensor]: ...

    def diagonal_fisher(self, param_names: Sequence[str]) -> list[Tensor]: ...


class ServerSideMethod(Protocol):
    name: str
    runs_on: str  # "server"

    def solve(self, model: nn.Module, remaining: RemainingClients, config: dict[str, Any]) -> ServerUpdate: ...
