"""The (epsilon, delta) certificate of the TensorUnlearn poster (Theorem 3, eq. 3) and its inverse.

Under a local mu-strongly-convex model of the loss near theta*, the unlearned parameters are within
the l2-sensitivity

    Delta_s = |D_f| G_max / (mu N) + gamma ||grad L(D_f, theta*)||_2

of the retrained ones, and the Gaussian mechanism with noise N(0, sigma^2 I) gives

    epsilon(Delta_s, sigma, delta) = Delta_s^2 / (2 sigma^2) + (Delta_s / sigma) sqrt(2 ln(1.25 / delta)).

With u = Delta_s / sigma and c = sqrt(2 ln(1.25/delta)) this is u^2/2 + c u = epsilon, whose positive
root gives the noise for a target epsilon in closed form:

    sigma(epsilon) = Delta_s / (sqrt(c^2 + 2 epsilon) - c) = Delta_s (c + sqrt(c^2 + 2 epsilon)) / (2 epsilon).
"""

from __future__ import annotations

import math

from fedunlearn.errors import ConfigError

DEFAULT_DELTA = 1e-5


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ConfigError("delta", delta, "a number in (0, 1)")


def gaussian_tail_constant(delta: float) -> float:
    """c = sqrt(2 ln(1.25 / delta))."""
    _check_delta(delta)
    return math.sqrt(2.0 * math.log(1.25 / delta))


def sensitivity(
    num_forget: int,
    num_total: int,
    max_forget_grad_norm: float,
    strong_convexity: float,
    gamma: float = 0.0,
    forget_gradient_norm: float = 0.0,
) -> float:
    """Delta_s = |D_f| G_max / (mu N) + gamma ||grad L(D_f)||_2 (Newton residual + approximation gap)."""
    if not strong_convexity > 0:
        raise ValueError(f"the strong-convexity constant mu must be > 0, got {strong_convexity}")
    if not num_total > 0 or num_forget < 0:
        raise ValueError(f"need |D_f| >= 0 and N > 0, got |D_f| = {num_forget}, N = {num_total}")
    if min(max_forget_grad_norm, gamma, forget_gradient_norm) < 0:
        raise ValueError("G_max, gamma and ||grad L(D_f)|| are norms and must be >= 0")
    return num_forget * max_forget_grad_norm / (strong_convexity * num_total) + gamma * forget_gradient_norm


def epsilon(sensitivity_value: float, sigma: float, delta: float = DEFAULT_DELTA) -> float:
    """eq. (3): the epsilon certified by Gaussian noise of scale sigma for l2-sensitivity Delta_s."""
    if not sigma > 0:
        raise ConfigError("noise-sigma", sigma, "a number > 0 (sigma = 0 certifies nothing)")
    if sensitivity_value < 0:
        raise ValueError(f"sensitivity must be >= 0, got {sensitivity_value}")
    ratio = sensitivity_value / sigma
    return ratio**2 / 2.0 + ratio * gaussian_tail_constant(delta)


def sigma_for_epsilon(sensitivity_value: float, target_epsilon: float, delta: float = DEFAULT_DELTA) -> float:
    """The sigma at which eq. (3) gives exactly ``target_epsilon`` (the inverse of :func:`epsilon`)."""
    if not target_epsilon > 0:
        raise ConfigError("target-epsilon", target_epsilon, "a number > 0")
    if sensitivity_value < 0:
        raise ValueError(f"sensitivity must be >= 0, got {sensitivity_value}")
    c = gaussian_tail_constant(delta)
    return sensitivity_value * (c + math.sqrt(c * c + 2.0 * target_epsilon)) / (2.0 * target_epsilon)


def kronecker_inverse_gap(a_inverse_gap: float, a_inverse_norm: float, g_inverse_gap: float, g_inverse_norm: float) -> float:
    """A bound on ||A_tilde^{-1} kron G_tilde^{-1} - A_hat^{-1} kron G_hat^{-1}||_2 from per-factor gaps.

    (A~^-1 - A^-1) kron G~^-1 + A^-1 kron (G~^-1 - G^-1), with ||G~^-1|| <= ||G^-1|| + gap_G.
    This is the poster's gamma for one layer measured against KFAC, not against the true Fisher:
    the Kronecker error epsilon_KFAC of Theorem 1 is not computable without the Fisher itself.
    """
    return a_inverse_gap * (g_inverse_norm + g_inverse_gap) + a_inverse_norm * g_inverse_gap


def theorem1_bound(kfac_error: float, eps_a: float, eps_g: float, a_hat_fro: float, g_hat_fro: float) -> float:
    """Poster eq. (1): ||F - A~ kron G~||_F <= eps_KFAC + eps_A ||G_hat||_F + (||A_hat||_F + eps_A) eps_G."""
    return kfac_error + eps_a * g_hat_fro + (a_hat_fro + eps_a) * eps_g
