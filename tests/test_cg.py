"""CG against torch.linalg.solve, the CG convergence theorem, negative curvature and NaN handling,
for the local curvature and for any callable curvature product."""

import math

import pytest
import torch
from torch import nn

from fedunlearn.curvature import (
    DAMPING_GROWTH,
    DAMPING_RETRIES,
    CallableCurvature,
    CGInverse,
    CGResult,
    NegativeCurvatureError,
    NonFiniteCurvatureError,
    SolverSettings,
    after_negative_curvature,
    conjugate_gradient,
)
from fedunlearn.curvature.products import (
    dense_curvature,
    flatten,
    loss_gradient,
    unflatten,
)
from fedunlearn.errors import ConfigError


def settings(**changes):
    return SolverSettings.defaults().replace(**changes)


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
    result = conjugate_gradient(lambda v: a @ v, b, max_iters=10, tol=1e-6)
    assert result.negative_curvature and result.stop_reason == "negative-curvature"
    assert result.negative_curvature_value <= 0
    assert not result.converged


def test_nan_in_products_raises_a_clear_error():
    def broken(v):
        return torch.full_like(v, float("nan"))

    with pytest.raises(NonFiniteCurvatureError, match="NaN"):
        conjugate_gradient(broken, torch.ones(4), max_iters=5, tol=1e-6)
    with pytest.raises(NonFiniteCurvatureError):
        conjugate_gradient(lambda v: v, torch.tensor([1.0, float("inf")]), max_iters=5, tol=1e-6)


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
    inverse = CGInverse.from_local(model, batches, settings(damping=damping, curvature="ggn", cg_iters=500, cg_tol=1e-12))
    got = flatten(inverse @ forget_gradient)
    assert float(torch.linalg.norm(got - exact) / torch.linalg.norm(exact)) < 1e-8
    assert inverse.diagnostics["converged"]
    assert inverse.diagnostics["cg_iterations"] == len(inverse.diagnostics["residual_history"]) - 1
    assert inverse.diagnostics["attempts"] == [
        {"curvature": "ggn", "damping": damping, "iterations": inverse.diagnostics["cg_iterations"],
         "stop_reason": "converged", "negative_curvature_value": None, "products": inverse.diagnostics["cg_iterations"]}
    ]
    # .apply is what @ runs
    assert torch.equal(flatten(inverse.apply(forget_gradient)), got)


def test_indefinite_hessian_stops_or_falls_back_to_the_ggn():
    model, batches = tiny_model()
    damping = 0.01
    hessian = dense_curvature(model, None, batches, "hessian")
    assert torch.linalg.eigvalsh(hessian).min() < -damping  # the damped Hessian is indefinite here
    like = [p.detach() for p in model.parameters()]
    b = torch.randn(hessian.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    vector = unflatten(b, like)

    hessian_settings = settings(damping=damping, curvature="hessian", cg_iters=500, cg_tol=1e-12)

    stop = CGInverse.from_local(model, batches, hessian_settings.replace(cg_iters=200, negative_curvature="stop"))
    stop @ vector
    assert stop.diagnostics["negative_curvature"] and stop.diagnostics["stop_reason"] == "negative-curvature"

    with pytest.raises(NegativeCurvatureError, match="damping"):
        CGInverse.from_local(model, batches, hessian_settings.replace(negative_curvature="raise")) @ vector

    fallback = CGInverse.from_local(model, batches, hessian_settings.replace(negative_curvature="ggn"))
    got = flatten(fallback @ vector)
    ggn = dense_curvature(model, None, batches, "ggn")
    exact = torch.linalg.solve(ggn + damping * torch.eye(ggn.shape[0], dtype=torch.float64), b)
    assert fallback.diagnostics["curvature"] == "ggn"
    assert [a["curvature"] for a in fallback.diagnostics["attempts"]] == ["hessian", "ggn"]
    assert float(torch.linalg.norm(got - exact) / torch.linalg.norm(exact)) < 1e-8

    raised = CGInverse.from_local(model, batches, hessian_settings.replace(negative_curvature="damping"))
    got = flatten(raised @ vector)
    final_damping = raised.diagnostics["damping"]
    assert final_damping > damping and raised.diagnostics["attempts"][-1]["stop_reason"] != "negative-curvature"
    exact = torch.linalg.solve(hessian + final_damping * torch.eye(hessian.shape[0], dtype=torch.float64), b)
    assert float(torch.linalg.norm(got - exact) / torch.linalg.norm(exact)) < 1e-8


def test_bad_config_values_raise_config_error():
    model, batches = tiny_model()
    with pytest.raises(ConfigError) as info:
        CGInverse.from_local(model, batches, settings(curvature="fisher"))
    assert info.value.key == "curvature" and "ggn" in info.value.choices
    with pytest.raises(ConfigError):
        CGInverse.from_local(model, batches, settings(negative_curvature="ignore"))
    with pytest.raises(ConfigError):
        CGInverse.from_local(model, batches, settings(cg_iters=0))
    with pytest.raises(ConfigError):
        CGInverse.from_local(model, batches, settings(damping=-1.0))
    with pytest.raises(ConfigError) as info:
        CallableCurvature(lambda curvature, v: v, [torch.zeros(3)], 0.1, "fisher")
    assert info.value.key == "curvature"
    with pytest.raises(ConfigError):
        CallableCurvature(lambda curvature, v: v, [torch.zeros(3)], -0.1, "ggn")


def negative_curvature_result():
    return CGResult(
        solution=torch.zeros(2), iterations=3, negative_curvature=True, negative_curvature_value=-0.5,
        stop_reason="negative-curvature",
    )


def test_negative_curvature_policy():
    result = negative_curvature_result()
    # ggn: switch a Hessian solve to the GGN at the same damping, once.
    assert after_negative_curvature(result, "ggn", "hessian", 0.1, 1) == ("ggn", 0.1)
    assert after_negative_curvature(result, "ggn", "ggn", 0.1, 2) is None
    # damping: the same curvature at DAMPING_GROWTH times the damping, while attempt <= DAMPING_RETRIES.
    damping = 0.1
    for attempt in range(1, DAMPING_RETRIES + 1):
        retry = after_negative_curvature(result, "damping", "hessian", damping, attempt)
        assert retry == ("hessian", damping * DAMPING_GROWTH)
        damping = retry[1]
    assert after_negative_curvature(result, "damping", "hessian", damping, DAMPING_RETRIES + 1) is None
    assert after_negative_curvature(result, "stop", "hessian", 0.1, 1) is None
    with pytest.raises(NegativeCurvatureError, match="damping"):
        after_negative_curvature(result, "raise", "hessian", 0.1, 1)
    # Without negative curvature every policy keeps the result, raise included.
    fine = CGResult(solution=torch.zeros(2), iterations=3, converged=True, stop_reason="converged")
    for policy in ("stop", "ggn", "damping", "raise"):
        assert after_negative_curvature(fine, policy, "hessian", 0.1, 1) is None
    with pytest.raises(ConfigError):
        after_negative_curvature(result, "ignore", "hessian", 0.1, 1)


def split_like(dim):
    # Parameter-shaped pieces of a flat vector of length dim: a matrix and a vector.
    return [torch.zeros(3, (dim - 2) // 3, dtype=torch.float64), torch.zeros(dim - 3 * ((dim - 2) // 3), dtype=torch.float64)]


def test_cg_inverse_over_a_callable_product_equals_linalg_solve():
    dim, damping = 20, 0.3
    a = spd_matrix(dim, torch.linspace(0.1, 5.0, dim, dtype=torch.float64), seed=5)
    b = torch.randn(dim, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    like = split_like(dim)
    calls = []

    def product(curvature, flat):
        calls.append(curvature)
        return a @ flat

    inverse = CGInverse.from_callable(
        product, like, settings(damping=damping, curvature="ggn", cg_iters=200, cg_tol=1e-13), param_names=["w", "b"]
    )
    got = inverse @ unflatten(b, like)
    assert [t.shape for t in got] == [t.shape for t in like] and inverse.param_names == ["w", "b"]
    exact = torch.linalg.solve(a + damping * torch.eye(dim, dtype=torch.float64), b)
    assert float(torch.linalg.norm(flatten(got) - exact) / torch.linalg.norm(exact)) < 1e-10
    diagnostics = inverse.diagnostics
    assert diagnostics["converged"] and diagnostics["curvature"] == "ggn" and diagnostics["damping"] == damping
    assert len(calls) == diagnostics["cg_iterations"] == diagnostics["products"] == diagnostics["attempts"][0]["products"]
    assert set(calls) == {"ggn"}
    # The same object built by hand, and the operator itself: (C + lambda I) v.
    operator = CallableCurvature(product, like, damping, "ggn")
    by_hand = CGInverse(operator, inverse.settings) @ unflatten(b, like)
    assert all(torch.equal(x, y) for x, y in zip(by_hand, got))
    assert torch.allclose(flatten(operator @ unflatten(b, like)), a @ b + damping * b, rtol=0, atol=1e-12)
    assert torch.equal(operator.matvec(b), a @ b + damping * b)


def test_callable_cg_switches_to_the_products_ggn_branch_on_negative_curvature():
    dim, damping = 12, 0.05
    eigenvalues = torch.linspace(-1.0, 4.0, dim, dtype=torch.float64)  # an indefinite "Hessian"
    hessian = spd_matrix(dim, eigenvalues, seed=7)
    ggn = spd_matrix(dim, torch.linspace(0.2, 3.0, dim, dtype=torch.float64), seed=8)
    b = torch.randn(dim, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    like = split_like(dim)
    calls = []

    def product(curvature, flat):
        calls.append(curvature)
        return (hessian if curvature == "hessian" else ggn) @ flat

    base = settings(damping=damping, curvature="hessian", cg_iters=200, cg_tol=1e-13)
    inverse = CGInverse.from_callable(product, like, base.replace(negative_curvature="ggn"))
    got = flatten(inverse @ unflatten(b, like))
    attempts = inverse.diagnostics["attempts"]
    assert [a["curvature"] for a in attempts] == ["hessian", "ggn"]
    assert attempts[0]["stop_reason"] == "negative-curvature" and attempts[0]["negative_curvature_value"] <= 0
    assert calls[0] == "hessian" and calls[-1] == "ggn" and "ggn" in calls
    assert calls == ["hessian"] * attempts[0]["products"] + ["ggn"] * attempts[1]["products"]
    assert inverse.diagnostics["curvature"] == "ggn" and inverse.diagnostics["negative_curvature"]
    exact = torch.linalg.solve(ggn + damping * torch.eye(dim, dtype=torch.float64), b)
    assert float(torch.linalg.norm(got - exact) / torch.linalg.norm(exact)) < 1e-10

    # The damping policy on the same product: the Hessian again, with lambda raised until CG completes.
    raised = CGInverse.from_callable(product, like, base.replace(negative_curvature="damping"))
    got = flatten(raised @ unflatten(b, like))
    final = raised.diagnostics["damping"]
    assert final == pytest.approx(damping * DAMPING_GROWTH ** (len(raised.diagnostics["attempts"]) - 1))
    assert raised.diagnostics["curvature"] == "hessian" and raised.diagnostics["stop_reason"] == "converged"
    exact = torch.linalg.solve(hessian + final * torch.eye(dim, dtype=torch.float64), b)
    assert float(torch.linalg.norm(got - exact) / torch.linalg.norm(exact)) < 1e-10

    with pytest.raises(NegativeCurvatureError):
        CGInverse.from_callable(product, like, base.replace(negative_curvature="raise")) @ unflatten(b, like)
