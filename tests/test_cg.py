"""CG against torch.linalg.solve, the CG convergence theorem, negative curvature and NaN handling."""

import math

import pytest
import torch
from torch import nn

from fedunlearn.curvature import (
    CGInverse,
    NegativeCurvatureError,
    NonFiniteCurvatureError,
    conjugate_gradient,
)
from fedunlearn.curvature.products import (
    dense_curvature,
    flatten,
    loss_gradient,
    unflatten,
)
from fedunlearn.errors import ConfigError


def spd_matrix(dim, eigenvalues, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return q @ torch.diag(eigenvalues) @ q.T


def test_cg_equals_linalg_solve_on_spd_systems():
    for seed, dim in [(0, 5), (1, 30), (2, 60)]:
        eigenvalues = torch.linspace(0.5, 20.0, dim, dtype=torch.float64)
        a = spd_matrix(dim, eigenvalues, seed)
        b = torch.randn(dim, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
        result = conjugate_gradient(a.__matmul__, b, max_iters=10 * dim, tol=1e-13)
        exact = torch.linalg.solve(a, b)
        assert result.converged and result.stop_reason == "converged"
        assert float(torch.linalg.norm(result.solution - exact) / torch.linalg.norm(exact)) < 1e-10
        assert len(result.residual_norms) == result.iterations + 1
        assert result.residual_norms[0] == pytest.approx(float(torch.linalg.norm(b)))
        assert result.residual_norms[-1] <= 1e-13 * float(torch.linalg.norm(b))


def test_cg_error_respects_the_convergence_theorem():
    # ||x_k - x*||_A <= 2 ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^k ||x_0 - x*||_A  (HF-KCU eq. 6)
    dim, kappa = 80, 400.0
    eigenvalues = torch.logspace(0, math.log10(kappa), dim, dtype=torch.float64)
    a = spd_matrix(dim, eigenvalues, seed=3)
    b = torch.randn(dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    exact = torch.linalg.solve(a, b)

    def energy_norm(e):
        return float(torch.sqrt(e @ a @ e))

    rate = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)
    initial = energy_norm(exact)  # x_0 = 0
    for k in range(1, 40):
        x_k = conjugate_gradient(lambda v: a @ v, b, max_iters=k, tol=1e-300).solution
        assert energy_norm(x_k - exact) <= 2 * rate**k * initial * (1 + 1e-9)


def test_negative_curvature_is_detected_and_reported():
    a = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64))
    b = torch.ones(3, dtype=torch.float64)
    result = conjugate_gradient(lambda v: a @ v, b, max_iters=10)
    assert result.negative_curvature and result.stop_reason == "negative-curvature"
    assert result.negative_curvature_value <= 0
    assert not result.converged


def test_nan_in_products_raises_a_clear_error():
    def broken(v):
        return torch.full_like(v, float("nan"))

    with pytest.raises(NonFiniteCurvatureError, match="NaN"):
        conjugate_gradient(broken, torch.ones(4), max_iters=5)
    with pytest.raises(NonFiniteCurvatureError):
        conjugate_gradient(lambda v: v, torch.tensor([1.0, float("inf")]), max_iters=5)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    return model, [(x[:7], y[:7]), (x[7:], y[7:])]


def test_cg_inverse_equals_solve_with_the_damped_ggn():
    model, batches = tiny_model()
    damping = 0.05
    ggn = dense_curvature(model, None, batches, "ggn")
    forget_gradient = loss_gradient(model, None, batches[:1])
    b = flatten(forget_gradient)
    exact = torch.linalg.solve(ggn + damping * torch.eye(ggn.shape[0], dtype=torch.float64), b)
    inverse = CGInverse(model, batches, damping, curvature="ggn", cg_iters=500, cg_tol=1e-12)
    got = flatten(inverse.apply(forget_gradient))
    assert float(torch.linalg.norm(got - exact) / torch.linalg.norm(exact)) < 1e-8
    assert inverse.diagnostics["converged"]
    assert inverse.diagnostics["cg_iterations"] == len(inverse.diagnostics["residual_history"]) - 1


def test_indefinite_hessian_stops_or_falls_back_to_the_ggn():
    model, batches = tiny_model()
    damping = 0.01
    hessian = dense_curvature(model, None, batches, "hessian")
    assert torch.linalg.eigvalsh(hessian).min() < -damping  # the damped Hessian is indefinite here
    like = [p.detach() for p in model.parameters()]
    b = torch.randn(hessian.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    vector = unflatten(b, like)

    stop = CGInverse(model, batches, damping, curvature="hessian", cg_iters=200, cg_tol=1e-12)
    stop.apply(vector)
    assert stop.diagnostics["negative_curvature"] and stop.diagnostics["stop_reason"] == "negative-curvature"

    with pytest.raises(NegativeCurvatureError, match="damping"):
        CGInverse(model, batches, damping, curvature="hessian", negative_curvature="raise").apply(vector)

    fallback = CGInverse(model, batches, damping, curvature="hessian", cg_iters=500, cg_tol=1e-12, negative_curvature="ggn")
    got = flatten(fallback.apply(vector))
    ggn = dense_curvature(model, None, batches, "ggn")
    exact = torch.linalg.solve(ggn + damping * torch.eye(ggn.shape[0], dtype=torch.float64), b)
    assert fallback.diagnostics["curvature"] == "ggn"
    assert [a["curvature"] for a in fallback.diagnostics["attempts"]] == ["hessian", "ggn"]
    assert float(torch.linalg.norm(got - exact) / torch.linalg.norm(exact)) < 1e-8

    raised = CGInverse(model, batches, damping, curvature="hessian", cg_iters=500, cg_tol=1e-12, negative_curvature="damping")
    got = flatten(raised.apply(vector))
    final_damping = raised.diagnostics["damping"]
    assert final_damping > damping and raised.diagnostics["attempts"][-1]["stop_reason"] != "negative-curvature"
    exact = torch.linalg.solve(hessian + final_damping * torch.eye(hessian.shape[0], dtype=torch.float64), b)
    assert float(torch.linalg.norm(got - exact) / torch.linalg.norm(exact)) < 1e-8


def test_bad_config_values_raise_config_error():
    model, batches = tiny_model()
    with pytest.raises(ConfigError) as info:
        CGInverse(model, batches, 0.1, curvature="fisher")
    assert info.value.key == "curvature" and "ggn" in info.value.choices
    with pytest.raises(ConfigError):
        CGInverse(model, batches, 0.1, negative_curvature="ignore")
    with pytest.raises(ConfigError):
        CGInverse(model, batches, 0.1, cg_iters=0)
    with pytest.raises(ConfigError):
        CGInverse(model, batches, -1.0)
