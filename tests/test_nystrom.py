"""Randomized Nystrom approximation and its Woodbury inverse against dense linear algebra."""

import pytest
import torch

from fedunlearn.curvature import SolverSettings
from fedunlearn.curvature.factor_solvers import (
    NystromFactorInverse,
    make_factor_inverse,
)
from fedunlearn.curvature.nystrom import NystromApproximation, covariance_matmat
from fedunlearn.errors import ConfigError

F64 = torch.float64


def settings(**changes):
    return SolverSettings.defaults().replace(**changes)


def low_rank_psd(dim, rank, seed=0):
    x = torch.randn(dim, rank, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return x @ x.T


def slow_decay_psd(dim, seed=0):
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return q @ torch.diag(1.0 / torch.arange(1, dim + 1, dtype=F64)) @ q.T


def test_exact_on_matrices_of_rank_at_most_k():
    a = low_rank_psd(40, 5)
    approx = NystromApproximation(a, 40, rank=8)
    reconstruction = approx.matmat(torch.eye(40, dtype=F64))
    assert torch.allclose(reconstruction, a, atol=1e-9)
    damping = 0.1
    b = torch.randn(40, 3, dtype=F64)
    exact = torch.linalg.solve(a + damping * torch.eye(40, dtype=F64), b)
    assert torch.allclose(approx.damped_inverse_matmat(b, damping), exact, rtol=1e-8, atol=1e-9)


def test_woodbury_inverse_is_the_inverse_of_the_damped_approximation():
    a = slow_decay_psd(50, seed=1)
    approx = NystromApproximation(a, 50, rank=10, seed=3)
    a_k = approx.matmat(torch.eye(50, dtype=F64))
    damping = 1e-2
    inverse = approx.damped_inverse_matmat(torch.eye(50, dtype=F64), damping)
    assert torch.allclose(inverse, torch.linalg.inv(a_k + damping * torch.eye(50, dtype=F64)), rtol=1e-8, atol=1e-8)
    # Positive definite by construction: symmetric, and every eigenvalue of the inverse is in [1/(||A_k||+lam), 1/lam].
    assert torch.allclose(inverse, inverse.T, atol=1e-10)
    eigenvalues = torch.linalg.eigvalsh(inverse)
    assert eigenvalues.min() > 0 and eigenvalues.max() <= 1 / damping * (1 + 1e-9)
    assert torch.all(approx.eigenvalues >= 0)


def test_error_falls_with_rank_and_vanishes_at_full_rank():
    a = slow_decay_psd(60, seed=2)
    errors = [
        float(torch.linalg.matrix_norm(a - NystromApproximation(a, 60, k, seed=0).matmat(torch.eye(60, dtype=F64))))
        for k in (5, 20, 60)
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-8


def test_products_only_from_activations_match_the_dense_factor():
    x = torch.randn(30, 45, generator=torch.Generator().manual_seed(5), dtype=F64)
    covariance = x.T @ x / 30
    from_matrix = NystromApproximation(covariance, 45, rank=12, seed=7)
    from_activations = NystromApproximation(covariance_matmat(x), 45, rank=12, seed=7)
    b = torch.randn(45, 2, dtype=F64)
    assert torch.allclose(from_matrix.damped_inverse_matmat(b, 0.1), from_activations.damped_inverse_matmat(b, 0.1), atol=1e-10)


def test_factor_inverse_reports_truncation_error_and_rejects_bad_values():
    a = slow_decay_psd(300, seed=3)
    inverse = make_factor_inverse(a, settings(damping=0.01, factor_solver="nystrom", nystrom_rank=20))
    assert isinstance(inverse, NystromFactorInverse)
    b = torch.randn(300, 2, dtype=F64)
    assert torch.equal(inverse @ b, inverse.approximation.damped_inverse_matmat(b, 0.01))
    a_k = inverse.approximation.matmat(torch.eye(300, dtype=F64))
    assert inverse.diagnostics["truncation_error"] == pytest.approx(float(torch.linalg.matrix_norm(a - a_k)), rel=1e-9)
    assert inverse.diagnostics["bytes"] == 300 * 20 * 8 + 20 * 8
    with pytest.raises(ConfigError):
        NystromFactorInverse(a, 0.01, rank=0, seed=0)
    with pytest.raises(ConfigError):
        NystromFactorInverse(a, 0.0, rank=5, seed=0)
    with pytest.raises(ConfigError) as info:
        make_factor_inverse(a, settings(damping=0.01, factor_solver="svd"))
    assert info.value.key == "factor-solver" and "nystrom" in info.value.choices


def test_auto_uses_dense_within_budget_and_the_better_approximation_beyond():
    a = low_rank_psd(300, 6, seed=4)
    damping = 0.1
    auto = settings(damping=damping, factor_solver="auto")
    assert make_factor_inverse(a, auto.replace(factor_memory_budget=300 * 300 * 8)).diagnostics["solver"] == "dense"
    chosen = make_factor_inverse(a, auto.replace(kfac_rank=4, nystrom_rank=16, factor_memory_budget=1000))
    # Rank 6 is exactly captured by Nystrom at k = 16; the MPO at bond dimension 4 is not.
    assert chosen.diagnostics["solver"] == "nystrom"
    assert chosen.diagnostics["auto_estimates"]["nystrom"] < chosen.diagnostics["auto_estimates"]["mpo"]
