"""Hessian- and GGN-vector products of a model's mean loss over a stream of batches.

Vectors are lists of parameter-shaped tensors, in the order of ``param_names`` (see
:func:`resolve_param_names`). The products are plain functions so that a caller can sum
them over several clients (HF-KCU's server-side variant) without any object in between.

The mean loss over a data set of N examples split into batches of sizes n_b is
L = sum_b (n_b / N) L_b with L_b the batch's mean loss, so every product is the
n_b-weighted sum of per-batch products divided by N. The loss must use mean reduction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp

LossFn = Callable[[Tensor, Tensor], Tensor]
Batches = Iterable[tuple[Tensor, Tensor]]


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean-reduced cross-entropy, the default loss of every product here."""
    return F.cross_entropy(logits, targets, reduction="mean")


def resolve_param_names(model: nn.Module, param_names: Sequence[str] | None = None) -> list[str]:
    """The parameters a product differentiates: the given names, or every trainable one."""
    named = dict(model.named_parameters())
    if param_names is None:
        return [name for name, p in named.items() if p.requires_grad]
    unknown = [name for name in param_names if name not in named]
    if unknown:
        raise KeyError(f"unknown parameter names {unknown}; the model has {list(named)}")
    return list(param_names)


def _split_params(model: nn.Module, param_names: list[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    # Parameters not being differentiated and buffers are passed as constants.
    chosen = set(param_names)
    differentiated = {name: p.detach() for name, p in model.named_parameters() if name in chosen}
    constants = {name: p.detach() for name, p in model.named_parameters() if name not in chosen}
    constants.update({name: b for name, b in model.named_buffers()})
    return differentiated, constants


def _check_vector(vector: Sequence[Tensor], params: dict[str, Tensor], names: list[str]) -> None:
    if len(vector) != len(names):
        raise ValueError(f"vector has {len(vector)} tensors, expected one per parameter ({len(names)})")
    for v, name in zip(vector, names):
        if v.shape != params[name].shape:
            raise ValueError(f"vector entry for {name!r} has shape {tuple(v.shape)}, expected {tuple(params[name].shape)}")


def _example_weighted_mean(
    batches: Batches, names: list[str], params: dict[str, Tensor], per_batch: Callable[[Tensor, Tensor], dict[str, Tensor]]
) -> list[Tensor]:
    """Σ_b n_b · per_batch(b) / N: the mean-loss product from per-batch mean-loss products."""
    total = [torch.zeros_like(params[name]) for name in names]
    num_examples = 0
    for inputs, targets in batches:
        result = per_batch(inputs, targets)
        n = inputs.shape[0]
        num_examples += n
        for acc, name in zip(total, names):
            acc.add_(result[name], alpha=n)
    if num_examples == 0:
        raise ValueError("no batches: the data loader is empty")
    return [acc / num_examples for acc in total]


def hvp(
    model: nn.Module,
    param_names: Sequence[str] | None,
    batches: Batches,
    vector: Sequence[Tensor],
    loss_fn: LossFn = cross_entropy,
) -> list[Tensor]:
    """H v for the Hessian H of the mean loss over ``batches`` w.r.t. ``param_names``.

    Forward-over-reverse (``jvp`` of ``grad``): one forward and one backward pass with
    dual numbers per batch, measured fastest on CPU here.
    """
    names = resolve_param_names(model, param_names)
    params, constants = _split_params(model, names)
    _check_vector(vector, params, names)
    tangent = {name: v.to(params[name].dtype) for name, v in zip(names, vector)}

    def batch_product(inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        def batch_loss(p: dict[str, Tensor]) -> Tensor:
            return loss_fn(functional_call(model, {**constants, **p}, (inputs,)), targets)

        return jvp(grad(batch_loss), (params,), (tangent,))[1]

    return _example_weighted_mean(batches, names, params, batch_product)


def ggn_vp(
    model: nn.Module,
    param_names: Sequence[str] | None,
    batches: Batches,
    vector: Sequence[Tensor],
    loss_fn: LossFn = cross_entropy,
) -> list[Tensor]:
    """G v for the generalized Gauss-Newton G = J^T H_out J of the mean loss.

    J is the Jacobian of the model outputs w.r.t. the parameters and H_out the Hessian of
    the loss w.r.t. the outputs; G is positive semi-definite whenever the loss is convex in
    the outputs (cross-entropy, MSE), unlike the Hessian.
    """
    names = resolve_param_names(model, param_names)
    params, constants = _split_params(model, names)
    _check_vector(vector, params, names)
    tangent = {name: v.to(params[name].dtype) for name, v in zip(names, vector)}

    def batch_product(inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        def outputs_of(p: dict[str, Tensor]) -> Tensor:
            return functional_call(model, {**constants, **p}, (inputs,))

        def loss_of_outputs(out: Tensor) -> Tensor:
            return loss_fn(out, targets)

        outputs, jacobian_vector = jvp(outputs_of, (params,), (tangent,))
        _, output_hessian_jv = jvp(grad(loss_of_outputs), (outputs.detach(),), (jacobian_vector,))
        _, pullback = vjp(outputs_of, params)
        return pullback(output_hessian_jv)[0]

    return _example_weighted_mean(batches, names, params, batch_product)


def loss_gradient(
    model: nn.Module,
    param_names: Sequence[str] | None,
    batches: Batches,
    loss_fn: LossFn = cross_entropy,
) -> list[Tensor]:
    """The gradient of the mean loss over ``batches`` (e.g. the forget gradient)."""
    names = resolve_param_names(model, param_names)
    params, constants = _split_params(model, names)
    def batch_gradient(inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        def batch_loss(p: dict[str, Tensor]) -> Tensor:
            return loss_fn(functional_call(model, {**constants, **p}, (inputs,)), targets)

        return grad(batch_loss)(params)

    return _example_weighted_mean(batches, names, params, batch_gradient)


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    pieces, offset = [], 0
    for t in like:
        pieces.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} entries, the shapes need {offset}")
    return pieces


def dense_curvature(
    model: nn.Module,
    param_names: Sequence[str] | None,
    batches: Sequence[tuple[Tensor, Tensor]],
    curvature: str = "hessian",
    loss_fn: LossFn = cross_entropy,
) -> Tensor:
    """The dense D x D curvature matrix, column by column. For tests and tiny models only."""
    names = resolve_param_names(model, param_names)
    params = dict(model.named_parameters())
    like = [params[name].detach() for name in names]
    dim = sum(t.numel() for t in like)
    product = {"hessian": hvp, "ggn": ggn_vp}[curvature]
    columns = []
    for i in range(dim):
        unit = torch.zeros(dim, dtype=like[0].dtype)
        unit[i] = 1.0
        columns.append(flatten(product(model, names, batches, unflatten(unit, like), loss_fn)))
    return torch.stack(columns, dim=1)
