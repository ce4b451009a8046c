"""HVP / GGN-vector products against dense matrices from torch.autograd.functional."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedunlearn.curvature.products import (
    dense_curvature,
    flatten,
    ggn_vp,
    hvp,
    loss_gradient,
    unflatten,
)


def tiny_setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    # Uneven batches: the mean over the data set must weight batches by size.
    batches = [(x[:5], y[:5]), (x[5:10], y[5:10]), (x[10:], y[10:])]
    return model, x, y, batches


def full_loss_of_flat(model, x, y, names):
    shapes = [p for n, p in model.named_parameters() if n in names]

    def loss(flat):
        params = dict(zip(names, unflatten(flat, shapes)))
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return loss


def reference_hessian(model, x, y, names):
    params = dict(model.named_parameters())
    flat = flatten([params[n].detach() for n in names])
    return torch.autograd.functional.hessian(full_loss_of_flat(model, x, y, names), flat)


def reference_ggn(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    flat = flatten([params[n].detach() for n in names])
    shapes = [params[n] for n in names]

    def outputs(flat_params):
        return functional_call(model, dict(zip(names, unflatten(flat_params, shapes))), (x,))

    jac = torch.autograd.functional.jacobian(outputs, flat)  # (N, C, D)
    probs = torch.softmax(outputs(flat), dim=1)
    n = x.shape[0]
    ggn = torch.zeros(flat.numel(), flat.numel(), dtype=torch.float64)
    for i in range(n):
        output_hessian = (torch.diag(probs[i]) - torch.outer(probs[i], probs[i])) / n
        ggn += jac[i].T @ output_hessian @ jac[i]
    return ggn


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def test_hessian_products_equal_dense_hessian():
    model, x, y, batches = tiny_setup()
    names = [n for n, _ in model.named_parameters()]
    exact = reference_hessian(model, x, y, names)
    dense = dense_curvature(model, None, batches, "hessian")
    assert rel(dense, exact) < 1e-10
    v = torch.randn(exact.shape[0], dtype=torch.float64)
    like = [p.detach() for p in model.parameters()]
    assert rel(flatten(hvp(model, None, batches, unflatten(v, like))), exact @ v) < 1e-10


def test_ggn_products_equal_dense_ggn():
    model, x, y, batches = tiny_setup(1)
    exact = reference_ggn(model, x, y)
    dense = dense_curvature(model, None, batches, "ggn")
    assert rel(dense, exact) < 1e-10
    # The GGN is PSD; this model's Hessian is not the GGN (tanh has curvature of its own).
    assert torch.linalg.eigvalsh(dense).min() > -1e-12
    assert rel(dense_curvature(model, None, batches, "hessian"), exact) > 1e-3


def test_products_on_a_parameter_subset_are_the_subblock():
    model, x, y, batches = tiny_setup(2)
    subset = ["2.weight", "2.bias"]
    exact = reference_hessian(model, x, y, subset)
    like = [dict(model.named_parameters())[n].detach() for n in subset]
    v = torch.randn(sum(t.numel() for t in like), dtype=torch.float64)
    got = flatten(hvp(model, subset, batches, unflatten(v, like)))
    assert rel(got, exact @ v) < 1e-10
    # For the last linear layer of a CE model Hessian and GGN blocks coincide.
    got_ggn = flatten(ggn_vp(model, subset, batches, unflatten(v, like)))
    assert rel(got_ggn, exact @ v) < 1e-10


def test_loss_gradient_equals_autograd():
    model, x, y, batches = tiny_setup(3)
    loss = F.cross_entropy(model(x), y)
    expected = torch.autograd.grad(loss, list(model.parameters()))
    got = loss_gradient(model, None, batches)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, rtol=1e-12, atol=1e-14)


def test_bad_vector_and_empty_loader_are_rejected():
    model, _, _, batches = tiny_setup()
    with pytest.raises(ValueError, match="expected"):
        hvp(model, None, batches, [torch.zeros(2)])
    like = [p.detach() for p in model.parameters()]
    with pytest.raises(ValueError, match="empty"):
        hvp(model, None, [], [torch.zeros_like(t) for t in like])
    with pytest.raises(KeyError):
        hvp(model, ["nope"], batches, [torch.zeros(1)])
