"""The local objective every client optimises: mean cross-entropy plus the model's regulariser.

``logreg`` carries an L2 term; the influence step's gradient and curvature must include it (the
remaining objective's optimum depends on it), so both go through here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, Dataset

from fedunlearn.curvature import ggn_vp, hvp, loss_gradient, resolve_param_names


def batches_of(data: Dataset, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """A re-iterable list of (x, y) batches in a fixed order (curvature products make several passes)."""
    return [(inputs, targets) for inputs, targets in DataLoader(data, batch_size=batch_size, shuffle=False)]


def count_examples(batches: Sequence[tuple[Tensor, Tensor]]) -> int:
    return sum(len(targets) for _, targets in batches)


def _regularizer_terms(model: nn.Module, names: Sequence[str], vector: Sequence[Tensor] | None) -> list[Tensor] | None:
    """∇R (vector None) or ∇²R v of the model's regulariser R, or None when the model has none."""
    regularizer = getattr(model, "regularizer", None)
    if not callable(regularizer):
        return None
    params = dict(model.named_parameters())
    chosen = [params[name] for name in names]
    with torch.enable_grad():
        value = regularizer()
        gradients = torch.autograd.grad(value, chosen, create_graph=vector is not None, allow_unused=True)
        gradients = [torch.zeros_like(p) if g is None else g for g, p in zip(gradients, chosen)]
        if vector is None:
            return [g.detach() for g in gradients]
        dot = sum((g * v).sum() for g, v in zip(gradients, vector) if g.requires_grad)
        if not torch.is_tensor(dot) or not dot.requires_grad:
            return [torch.zeros_like(p) for p in chosen]
        products = torch.autograd.grad(dot, chosen, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(products, chosen)]


def regularizer_gradient(model: nn.Module, names: Sequence[str]) -> list[Tensor] | None:
    """∇R for ``names``, or None when the model has no regulariser."""
    return _regularizer_terms(model, names, None)


def objective_gradient(model: nn.Module, names: Sequence[str] | None, batches) -> list[Tensor]:
    names = resolve_param_names(model, names)
    gradient = loss_gradient(model, names, batches)
    regularizer = _regularizer_terms(model, names, None)
    return gradient if regularizer is None else [g + r for g, r in zip(gradient, regularizer)]


def objective_curvature_product(
    model: nn.Module, names: Sequence[str] | None, batches, vector: Sequence[Tensor], curvature: str
) -> list[Tensor]:
    """H v (``hessian``) or G v (``ggn``) of the local objective; R's Hessian is added to both."""
    names = resolve_param_names(model, names)
    product = hvp if curvature == "hessian" else ggn_vp
    result = product(model, names, batches, vector)
    regularizer = _regularizer_terms(model, names, vector)
    return result if regularizer is None else [c + r for c, r in zip(result, regularizer)]


def regularizer_curvature(model: nn.Module) -> float:
    """The regulariser's curvature as a scalar (λ_R of (λ_R/2)‖W‖²); 0 without one.

    Solvers that take the data curvature from elsewhere (KFAC, the CG of the curvature core) add it to
    the damping: exact on the weights, a slight over-damping of the bias.
    """
    return float(getattr(model, "l2", 0.0))


def per_example_cross_entropy_gradients(model: nn.Module, names: Sequence[str] | None):
    """A function ``(inputs, labels) -> {name: per-example gradients}`` of the cross-entropy (``torch.func.vmap``).

    Used by the certificate's G_max (TensorUnlearn) and the diagonal Fisher (Fisher forgetting).
    """
    names = resolve_param_names(model, names)
    chosen = set(names)
    params = {name: p.detach() for name, p in model.named_parameters() if name in chosen}
    constants = {name: p.detach() for name, p in model.named_parameters() if name not in chosen}
    constants.update(dict(model.named_buffers()))

    def example_loss(p, x, label):
        logits = functional_call(model, {**p, **constants}, (x.unsqueeze(0),))
        return F.cross_entropy(logits, label.unsqueeze(0))

    batched = vmap(grad(example_loss), in_dims=(None, 0, 0))
    return lambda inputs, labels: batched(params, inputs, labels)
