"""Fisher forgetting (Golatkar, Achille & Soatto 2020, "Eternal Sunshine of the Spotless Net"), as the
authors' reference code (``Forgetting.ipynb``, ``get_mean_var``) runs it.

The trained weights are perturbed with Gaussian noise whose variance is the inverse diagonal Fisher of
the *remaining* data: parameters the remaining data pins down move little, parameters only the deleted
data needed move a lot. Federated: each remaining client returns its local diagonal Fisher
(``query.fisher``, one round); the server averages them with the clients' data shares, which gives the
Fisher of the pooled remaining data, and sets θ_u = μ + sqrt(v) ⊙ ξ, ξ ~ N(0, I), with, per parameter
tensor p (α = ``fisher-alpha``, C = the number of classes):

1. u = min(1 / (F + 1e-8), cap), cap = 10² if p's first dimension is C (the reference's test for "last
   layer"), else 10³;
2. v = α · u, and for a tensor of two or more dimensions v is replaced by its mean over dimension 1
   (a linear layer's inputs, a convolution's input channels), broadcast back to p's shape;
3. v ×= 10 if p is in the last layer or is one-dimensional (biases, normalisation scales and shifts);
4. μ = θ*, except for a class that the deletion removes entirely (some deleted client holds it, no
   remaining client does: the reference's class-forgetting case): that class's row of every last-layer
   tensor gets μ = 0 and v = 10 · 10⁻⁴ = 10⁻³.

The Fisher is the reference's: the true Fisher (the expectation over the model's own predictive
distribution, not over the data's labels), from per-example gradients of the cross-entropy, the model
in eval mode, averaged over the remaining examples. docs/methods.md lists where we still differ.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fedunlearn.config import ConfigKey, positive_float
from fedunlearn.curvature import Batches, resolve_param_names
from fedunlearn.training import derive_seed
from fedunlearn.unlearning.api import Deletion, FederationPort, Outcome, RemainingClients, Requirements, ServerUpdate
from fedunlearn.unlearning.objective import per_example_cross_entropy_gradients
from fedunlearn.unlearning.registry import client_query, register
from fedunlearn.unlearning.server_side import ServerSideMethod

FISHER_FLOOR = 1e-8
INVERSE_FISHER_CAP = 1e3  # every tensor
LAST_LAYER_CAP = 1e2  # tensors whose first dimension is the number of classes
VARIANCE_BOOST = 10.0  # last-layer and one-dimensional tensors
FORGOTTEN_CLASS_VARIANCE = 1e-4  # a wholly deleted class's output row, before the boost


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


def number_of_classes(model: nn.Module) -> int:
    """The model's output size: the ``out_features`` of its last ``nn.Linear`` (every model of
    :mod:`fedunlearn.models` ends in one), else the first dimension of its last parameter."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if linears:
        return int(linears[-1].out_features)
    return int(list(model.parameters())[-1].shape[0])


def is_last_layer(shape: Sequence[int], num_classes: int) -> bool:
    """The reference's test: a tensor whose first dimension equals the number of classes."""
    return len(shape) > 0 and int(shape[0]) == num_classes


def forgetting_variance(fisher: Tensor, alpha: float, last_layer: bool) -> Tensor:
    """The noise variance of one parameter tensor from its diagonal Fisher (steps 1–3 of the module doc)."""
    cap = LAST_LAYER_CAP if last_layer else INVERSE_FISHER_CAP
    variance = alpha * (1.0 / (fisher + FISHER_FLOOR)).clamp(max=cap)
    if variance.dim() > 1:
        variance = variance.mean(dim=1, keepdim=True).expand_as(fisher).clone()
    if last_layer or variance.dim() == 1:
        variance = variance * VARIANCE_BOOST
    return variance


def wholly_deleted_classes(port: FederationPort, deletion: Deletion) -> tuple[int, ...]:
    """Classes some deleted client holds and no remaining client does (from the label histograms the
    clients report at discovery): for them the deletion is a class deletion."""
    remaining = port.remaining(deletion)
    classes = len(next(iter(port.clients.values())).label_histogram)
    held_by_remaining = [sum(port.clients[k].label_histogram[c] for k in remaining) for c in range(classes)]
    held_by_deleted = [sum(port.clients[k].label_histogram[c] for k in deletion.forget_clients) for c in range(classes)]
    return tuple(c for c in range(classes) if held_by_deleted[c] > 0 and held_by_remaining[c] == 0)


@register("fisher")
class FisherForgetting(ServerSideMethod):
    summary = "Gaussian noise with the remaining clients' inverse diagonal Fisher as variance (the authors' per-layer rules)"
    requirements = Requirements(client_queries=("fisher",))
    config_keys = (
        ConfigKey("fisher-alpha", 1e-6, "fisher: α scaling the inverse-Fisher noise variance (Golatkar et al.'s default).", check=positive_float),
    )
    _forgotten_classes: tuple[int, ...] = ()

    def unlearn(self, port: FederationPort, deletion: Deletion) -> Outcome:
        self._forgotten_classes = wholly_deleted_classes(port, deletion)
        try:
            return super().unlearn(port, deletion)
        finally:
            self._forgotten_classes = ()

    def server_step(
        self, model: nn.Module, remaining: RemainingClients, forgotten_classes: Sequence[int] | None = None
    ) -> ServerUpdate:
        """Δ = μ − θ* + sqrt(v) ⊙ ξ. ``forgotten_classes`` (default: what :meth:`unlearn` found) are
        the classes whose last-layer rows the reference zeroes."""
        config = self.config
        start = time.perf_counter()
        forgotten = sorted(int(c) for c in (self._forgotten_classes if forgotten_classes is None else forgotten_classes))
        names = resolve_param_names(model)
        parameters = dict(model.named_parameters())
        num_classes = number_of_classes(model)
        fisher = remaining.diagonal_fisher(names)
        alpha = float(config["fisher-alpha"])
        generator = torch.Generator().manual_seed(derive_seed(config["seed"], "fisher-forgetting"))
        delta, last_layer_names, capped, noise_squared = [], [], 0, 0.0
        for name, value in zip(names, fisher):
            last_layer = is_last_layer(value.shape, num_classes)
            variance = forgetting_variance(value, alpha, last_layer)
            shift = torch.zeros_like(value)
            if last_layer:
                last_layer_names.append(name)
                if forgotten:
                    shift[forgotten] = -parameters[name].detach().to(value)[forgotten]
                    variance[forgotten] = FORGOTTEN_CLASS_VARIANCE * VARIANCE_BOOST
            capped += int((1.0 / (value + FISHER_FLOOR) >= (LAST_LAYER_CAP if last_layer else INVERSE_FISHER_CAP)).sum())
            noise = variance.sqrt() * torch.randn(value.shape, generator=generator, dtype=value.dtype)
            noise_squared += float((noise.double() ** 2).sum())
            delta.append(shift + noise)
        diagnostics = {
            "fisher_alpha": alpha,
            "num_classes": num_classes,
            "last_layer_parameters": last_layer_names,
            "forgotten_classes": forgotten,
            "parameters_at_variance_cap": capped,
            "parameters": sum(value.numel() for value in fisher),
            "noise_norm": noise_squared**0.5,
            "seconds": time.perf_counter() - start,
        }
        return ServerUpdate(param_names=names, delta=delta, communication_rounds=1, diagnostics=diagnostics)
