"""The (epsilon, delta) certificate (poster eq. 3), its inverse, and the bound helpers, by hand."""

import pytest

from fedunlearn.curvature.certificate import (
    epsilon,
    gaussian_tail_constant,
    kronecker_inverse_gap,
    sensitivity,
    sigma_for_epsilon,
    theorem1_bound,
)
from fedunlearn.errors import ConfigError


def test_tail_constant_by_hand():
    # delta = 1e-5: ln(1.25 / 1e-5) = ln(125000) = 11.7360690; c = sqrt(23.4721380) = 4.8448053
    assert gaussian_tail_constant(1e-5) == pytest.approx(4.8448053, abs=1e-7)
    # delta = 0.05: ln(25) = 3.2188758; c = sqrt(6.4377516) = 2.5372725
    assert gaussian_tail_constant(0.05) == pytest.approx(2.5372725, abs=1e-7)


def test_epsilon_by_hand():
    # Delta = 1, sigma = 1, delta = 1e-5: 1/2 + 1 * 4.8448053 = 5.3448053
    assert epsilon(1.0, 1.0, 1e-5) == pytest.approx(5.3448053, abs=1e-7)
    # Delta = 1, sigma = 2, delta = 0.05: u = 0.5 -> 0.25/2 + 0.5 * 2.5372725 = 0.125 + 1.2686362 = 1.3936362
    assert epsilon(1.0, 2.0, 0.05) == pytest.approx(1.3936362, abs=1e-7)
    assert epsilon(0.0, 1.0) == 0.0


def test_sensitivity_by_hand():
    # |D_f| = 10, N = 1000, G_max = 2, mu = 0.5: 10 * 2 / (0.5 * 1000) = 0.04; gamma * ||g|| = 0.1 * 3 = 0.3
    assert sensitivity(10, 1000, 2.0, 0.5, gamma=0.1, forget_gradient_norm=3.0) == pytest.approx(0.34)
    assert sensitivity(10, 1000, 2.0, 0.5) == pytest.approx(0.04)


def test_sigma_for_epsilon_inverts_epsilon():
    # Delta = 1, epsilon = 5.3448053 (the value above) -> sigma = 1
    assert sigma_for_epsilon(1.0, 5.344805262605389, 1e-5) == pytest.approx(1.0, rel=1e-12)
    # Delta = 0.34, epsilon = 1, delta = 1e-5:
    # sigma = 0.34 (4.8448053 + sqrt(23.4721380 + 2)) / 2 = 0.17 * (4.8448053 + 5.0469930) = 1.6816059
    assert sigma_for_epsilon(0.34, 1.0, 1e-5) == pytest.approx(1.6816057, abs=1e-6)
    for target in (0.1, 1.0, 8.0):
        sigma = sigma_for_epsilon(0.7, target, 1e-6)
        assert epsilon(0.7, sigma, 1e-6) == pytest.approx(target, rel=1e-12)


def test_bad_values_raise():
    with pytest.raises(ConfigError) as info:
        epsilon(1.0, 0.0)
    assert info.value.key == "noise-sigma"
    with pytest.raises(ConfigError) as info:
        epsilon(1.0, 1.0, delta=1.5)
    assert info.value.key == "delta"
    with pytest.raises(ConfigError):
        sigma_for_epsilon(1.0, 0.0)
    with pytest.raises(ValueError):
        sensitivity(1, 10, 1.0, 0.0)


def test_bound_helpers_by_hand():
    # eps_KFAC = 0.5, eps_A = 0.1, eps_G = 0.2, ||A_hat||_F = 3, ||G_hat||_F = 4:
    # 0.5 + 0.1 * 4 + (3 + 0.1) * 0.2 = 0.5 + 0.4 + 0.62 = 1.52
    assert theorem1_bound(0.5, 0.1, 0.2, 3.0, 4.0) == pytest.approx(1.52)
    # gap_A = 0.1, ||A^-1|| = 2, gap_G = 0.05, ||G^-1|| = 4: 0.1 * (4 + 0.05) + 2 * 0.05 = 0.405 + 0.1 = 0.505
    assert kronecker_inverse_gap(0.1, 2.0, 0.05, 4.0) == pytest.approx(0.505)
