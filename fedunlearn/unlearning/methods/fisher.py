"""Fisher forgetting (Golatkar, Achille & Soatto 2020, "Eternal Sunshine of the Spotless Net").

The trained weights are perturbed with Gaussian noise whose variance is the inverse diagonal Fisher
of the *remaining* data: parameters the remaining data pins down move little, parameters only the
deleted data needed move a lot. Federated: each remaining client returns its local diagonal Fisher
(``query.fisher``, one round); the server averages them with the clients' data shares and adds

    θ_u = θ* + sqrt(α · min(1 / (F_rem + 1e-8), 1e3)) ⊙ ξ,    ξ ~ N(0, I),  α = ``fisher-alpha``

(the clamp at 10³ is the authors' reference code; docs/methods.md says where we differ).
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fedunlearn.curvature import Batches, resolve_param_names
from fedunlearn.training import derive_seed
from fedunlearn.config import ConfigKey, positive_float
from fedunlearn.unlearning.api import RemainingClients, Requirements, ServerUpdate
from fedunlearn.unlearning.server_side import ServerSideMethod
from fedunlearn.unlearning.registry import client_query, register
from fedunlearn.unlearning.objective import per_example_cross_entropy_gradients

INVERSE_FISHER_CAP = 1e3
FISHER_FLOOR = 1e-8


def diagonal_fisher(model: nn.Module, names, batches: Batches) -> list[Tensor]:
    """The exact diagonal Fisher: E_x Σ_c p(c|x) (∂ log p(c|x) / ∂θ)², per-example gradients by vmap."""
    names = resolve_param_names(model, names)
    per_example = per_example_cross_entropy_gradients(model, names)
    parameters = dict(model.named_parameters())
    total = {name: torch.zeros_like(parameters[name]) for name in names}
    count = 0
    was_training = model.training
    model.eval()
    for inputs, _ in batches:
        with torch.no_grad():
            probabilities = F.softmax(model(inputs), dim=1)
        for label in range(probabilities.shape[1]):
            labels = torch.full((len(inputs),), label, dtype=torch.long, device=inputs.device)
            gradients = per_example(inputs, labels)
            weight = probabilities[:, label]
            for name, g in gradients.items():
                total[name] += torch.einsum("n,n...->...", weight, g.pow(2))
        count += len(inputs)
    model.train(was_training)
    return [total[name] / max(count, 1) for name in names]


@client_query("fisher")
def _fisher_query(model: nn.Module, names, batches: Batches, message_config, vector) -> list[Tensor]:
    """``query.fisher``: this client's diagonal Fisher at the model sent."""
    return diagonal_fisher(model, names, batches)


@register("fisher")
class FisherForgetting(ServerSideMethod):
    summary = "Gaussian noise with the remaining clients' inverse diagonal Fisher as variance"
    requirements = Requirements(client_queries=("fisher",))
    config_keys = (
        ConfigKey("fisher-alpha", 1e-6, "fisher: α scaling the inverse-Fisher noise variance (Golatkar et al.'s default).", check=positive_float),
    )

    def server_step(self, model: nn.Module, remaining: RemainingClients) -> ServerUpdate:
        config = self.config
        start = time.perf_counter()
        names = resolve_param_names(model)
        fisher = remaining.diagonal_fisher(names)
        alpha = float(config["fisher-alpha"])
        generator = torch.Generator().manual_seed(derive_seed(config["seed"], "fisher-forgetting"))
        delta = []
        for value in fisher:
            variance = alpha * (1.0 / (value + FISHER_FLOOR)).clamp(max=INVERSE_FISHER_CAP)
            delta.append(variance.sqrt() * torch.randn(value.shape, generator=generator, dtype=value.dtype))
        capped = sum(int((1.0 / (value + FISHER_FLOOR) >= INVERSE_FISHER_CAP).sum()) for value in fisher)
        diagnostics = {
            "fisher_alpha": alpha,
            "parameters_at_variance_cap": capped,
            "parameters": sum(value.numel() for value in fisher),
            "noise_norm": float(torch.sqrt(sum((d.double() ** 2).sum() for d in delta))),
            "seconds": time.perf_counter() - start,
        }
        return ServerUpdate(param_names=names, delta=delta, communication_rounds=1, diagnostics=diagnostics)
