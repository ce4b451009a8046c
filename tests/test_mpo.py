"""MPO (TT-SVD + ALS) and the MPO factor inverse against dense matrices; Theorem 1 and Proposition 2."""

import math

import pytest
import torch

from fedunlearn.curvature import SolverSettings
from fedunlearn.curvature.certificate import theorem1_bound
from fedunlearn.curvature.factor_solvers import (
    MPOFactorInverse,
    Prop2Error,
    make_factor_inverse,
    prop2_inverse_bound,
)
from fedunlearn.curvature.mpo import als_solve, mode_sizes, smooth_dim, tt_svd

F64 = torch.float64


def settings(**changes):
    return SolverSettings.defaults().replace(**changes)


def smooth_kernel(dim, length=0.2):
    t = torch.linspace(0, 1, dim, dtype=F64)
    return torch.exp(-((t[:, None] - t[None, :]) ** 2) / (2 * length**2))


def random_psd(dim, seed=0):
    x = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return x @ x.T / dim


def test_mode_sizes_and_padding():
    assert mode_sizes(4096) == [4, 4, 4, 4, 4, 4]
    assert mode_sizes(4096, max_mode=8) == [8, 8, 8, 8]
    assert mode_sizes(25088) == [4, 4, 4, 4, 2, 7, 7]  # 512 channels x 7 x 7, channel-major
    assert math.prod(mode_sizes(288)) == 288
    assert smooth_dim(289) == 294 and smooth_dim(4096) == 4096  # 289 = 17^2 is padded
    with pytest.raises(ValueError):
        mode_sizes(17)


def test_tt_svd_is_exact_at_full_rank_and_products_match():
    a = random_psd(64)
    mpo, error = tt_svd(a, [4, 4, 4], rank=1000)
    assert torch.allclose(mpo.to_dense(), a, atol=1e-12)
    assert error < 1e-10
    x = torch.randn(64, 3, dtype=F64)
    assert torch.allclose(mpo @ x, a @ x, atol=1e-12)
    assert torch.allclose(mpo.transpose().to_dense(), a.T, atol=1e-12)
    assert mpo.frobenius_norm() == pytest.approx(float(torch.linalg.matrix_norm(a)), rel=1e-12)


def test_kronecker_product_has_bond_dimension_one():
    factors = [random_psd(n, seed) for seed, n in enumerate([2, 3, 4])]
    a = torch.kron(torch.kron(factors[0], factors[1]), factors[2])
    mpo, error = tt_svd(a, [2, 3, 4], rank=1)
    assert mpo.ranks == [1, 1]
    assert torch.allclose(mpo.to_dense(), a, atol=1e-12) and error < 1e-10


def test_reported_truncation_error_is_the_frobenius_error():
    a = random_psd(64, seed=1)
    for rank in (2, 5, 9):
        mpo, error = tt_svd(a, [4, 4, 4], rank)
        exact_error = float(torch.linalg.matrix_norm(a - mpo.to_dense()))
        assert error == pytest.approx(exact_error, rel=1e-8)
        assert max(mpo.ranks) <= rank


def test_als_solve_equals_dense_solve_of_the_mpo():
    a = random_psd(64, seed=2) + 0.1 * torch.eye(64, dtype=F64)
    b = torch.randn(64, 5, dtype=F64)
    mpo, _ = tt_svd(a, [4, 4, 4], rank=1000)
    x, info = als_solve(mpo, b, rank=64)
    assert torch.allclose(x, torch.linalg.solve(a, b), rtol=1e-9, atol=1e-10)
    assert info.residual_history[-1] < 1e-10
    # A truncated MPO: ALS solves the compressed system, whatever its error to the original.
    coarse, _ = tt_svd(a, [4, 4, 4], rank=6)
    x, _ = als_solve(coarse, b, rank=64)
    assert torch.allclose(x, torch.linalg.solve(coarse.to_dense(), b), rtol=1e-8, atol=1e-9)


def test_mpo_inverse_on_a_smooth_kernel_is_accurate_and_passes_prop2():
    dim, damping = 256, 1e-2
    kernel = smooth_kernel(dim)
    t = torch.linspace(0, 1, dim, dtype=F64)
    rhs = torch.stack([torch.sin((j + 1) * math.pi * t) for j in range(4)], 1)
    inverse = MPOFactorInverse(kernel, damping, rank=12, prop2_fallback="dense", seed=0)
    prop2 = inverse.diagnostics["prop2"]
    assert prop2["holds"] and inverse.used == "mpo"
    damped = kernel + damping * torch.eye(dim, dtype=F64)
    exact = torch.linalg.solve(damped, rhs)
    got = inverse @ rhs
    assert float(torch.linalg.matrix_norm(got - exact) / torch.linalg.matrix_norm(exact)) < 1e-3
    assert torch.equal(inverse.solve(rhs), got)
    # Proposition 2's bound (Neumann-series form) holds for the compressed inverse.
    approx = inverse.mpo.to_dense()
    inverse_gap = float(torch.linalg.matrix_norm(torch.linalg.inv(approx) - torch.linalg.inv(damped), ord=2))
    assert inverse_gap <= prop2["inverse_error_bound"] * 1.01
    assert inverse.diagnostics["truncation_error"] == pytest.approx(
        float(torch.linalg.matrix_norm(approx - damped)), rel=1e-6, abs=1e-12
    )


def test_prop2_failure_falls_back_to_dense_or_raises():
    # A rank-deficient random covariance has no tensor-train structure: the coarse MPO is useless.
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(3), dtype=F64)
    covariance = x.T @ x / 40
    damping = 1e-3
    inverse = MPOFactorInverse(covariance, damping, rank=3, prop2_fallback="dense", seed=0)
    assert not inverse.diagnostics["prop2"]["holds"]
    assert inverse.used == "dense" and inverse.diagnostics["fallback"] == "dense"
    b = torch.randn(64, 2, dtype=F64)
    exact = torch.linalg.solve(covariance + damping * torch.eye(64, dtype=F64), b)
    assert torch.allclose(inverse @ b, exact, rtol=1e-8, atol=1e-8)
    with pytest.raises(Prop2Error, match="Proposition 2"):
        MPOFactorInverse(covariance, damping, rank=3, prop2_fallback="raise", seed=0)


def test_factor_solver_registry_threshold_and_padding():
    a = random_psd(289, seed=4)  # 289 = 17^2: padded to 294 for the MPO
    damping = 0.5
    b = torch.randn(289, 3, dtype=F64)
    exact = torch.linalg.solve(a + damping * torch.eye(289, dtype=F64), b)
    small = make_factor_inverse(a, settings(damping=damping, factor_solver="mpo", mpo_threshold=300))
    assert small.diagnostics["solver"] == "dense"  # below the threshold
    full = make_factor_inverse(a, settings(damping=damping, factor_solver="mpo", kfac_rank=10_000, mpo_threshold=256))
    assert full.diagnostics["padded_dim"] == 294 and full.used == "mpo"
    assert torch.allclose(full @ b, exact, rtol=1e-7, atol=1e-8)
    assert torch.allclose(small @ b, exact, rtol=1e-9, atol=1e-10)


def test_theorem1_bound_holds_for_compressed_factors():
    a_hat = smooth_kernel(64, 0.3) + 0.1 * torch.eye(64, dtype=F64)
    g_hat = random_psd(16, seed=5) + 0.1 * torch.eye(16, dtype=F64)
    a_mpo, eps_a = tt_svd(a_hat, [4, 4, 4], rank=2)
    g_mpo, eps_g = tt_svd(g_hat, [4, 4], rank=2)
    a_tilde, g_tilde = a_mpo.to_dense(), g_mpo.to_dense()
    # F := A_hat kron G_hat exactly, so eps_KFAC = 0 and only the MPO part remains.
    actual = float(torch.linalg.matrix_norm(torch.kron(a_hat, g_hat) - torch.kron(a_tilde, g_tilde)))
    bound = theorem1_bound(0.0, eps_a, eps_g, float(torch.linalg.matrix_norm(a_hat)), float(torch.linalg.matrix_norm(g_hat)))
    assert eps_a > 0 and eps_g > 0
    assert actual <= bound


def test_prop2_bound_is_tight_on_a_diagonal_example_and_the_printed_eq2_is_not_a_bound():
    # A_hat = diag(L, lam), A_tilde = diag(L, lam - e): ||A_tilde^-1 - A_hat^-1|| = e / (lam (lam - e)).
    big, lam, e = 10.0, 1.0, 0.1
    kappa = big / lam
    actual = e / (lam * (lam - e))
    assert prop2_inverse_bound(e, big, kappa) == pytest.approx(actual, rel=1e-12)
    printed_eq2 = kappa**2 * e / (big * (kappa * big - kappa * e))
    assert printed_eq2 < actual  # the poster's printed denominator under-estimates the gap
