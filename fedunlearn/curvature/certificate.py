"""The Gaussian mechanism's (epsilon, delta): the exact (analytic) one, the TensorUnlearn poster's
eq. (3), their inverses, and the poster's bound helpers.

If two releases differ by at most ``Delta`` in l2 before the same noise N(0, sigma^2 I) is added
(``Delta`` is the l2-sensitivity), the two noisy releases are (epsilon, delta)-indistinguishable for

* the **analytic Gaussian mechanism** (Balle & Wang 2018, Theorem 8): the smallest such epsilon is
  the root of

      delta(epsilon) = Phi(Delta/(2 sigma) - epsilon sigma/Delta) - e^epsilon Phi(-Delta/(2 sigma) - epsilon sigma/Delta),

  which is strictly decreasing in epsilon; :func:`analytic_epsilon` solves it by bisection and returns
  the upper end of the final bracket, so the epsilon it reports always satisfies delta(epsilon) <= delta.

* the poster's **eq. (3)**, the classical calibration written for every epsilon:

      epsilon(Delta, sigma, delta) = Delta^2 / (2 sigma^2) + (Delta / sigma) sqrt(2 ln(1.25 / delta)).

  It is a valid bound for every epsilon (not only epsilon < 1 as in Dwork & Roth's Theorem A.1), and
  slightly loose: with u = Delta/sigma and c = sqrt(2 ln(1.25/delta)) the privacy loss of the Gaussian
  mechanism is N(u^2/2, u^2), so P[loss > epsilon] = Phi(-c) exactly at this epsilon, and
  delta(epsilon) <= P[loss > epsilon] = Phi(-c) <= phi(c)/c = delta / (1.25 c sqrt(2 pi)) <= delta,
  because c >= sqrt(2 ln 1.25) = 0.668 > 1/(1.25 sqrt(2 pi)) = 0.319 for every delta in (0, 1).
  The analytic epsilon is therefore never larger (tests/test_certificate.py checks both steps).

With u = Delta / sigma, eq. (3) is u^2/2 + c u = epsilon, whose positive root gives the noise for a
target epsilon in closed form (:func:`sigma_for_epsilon`):

    sigma(epsilon) = Delta / (sqrt(c^2 + 2 epsilon) - c) = Delta (c + sqrt(c^2 + 2 epsilon)) / (2 epsilon);

:func:`analytic_sigma_for_epsilon` is the analytic mechanism's (smaller) sigma, again by bisection.

What Delta is, and when it bounds the distance to a reference at all, is the caller's business: the
release step (``fedunlearn/unlearning/certify.py``) uses Delta = ||grad L_r(theta_u)|| / lambda on a
lambda-strongly convex remaining objective. The poster's Delta_s (:func:`sensitivity`) assumes a local
strongly convex model near theta* and is not a bound for neural networks (docs/methods.md).
"""

from __future__ import annotations

import math

from scipy.special import log_ndtr, ndtr

from fedunlearn.errors import ConfigError

DEFAULT_DELTA = 1e-5
# Bisection stops when the bracket is this small relative to its upper end.
BISECTION_RELATIVE_TOLERANCE = 1e-13
BISECTION_MAX_STEPS = 400


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ConfigError("delta", delta, "a number in (0, 1)")


def _check_sigma(sigma: float) -> None:
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ConfigError("noise-sigma", sigma, "a number > 0 (sigma = 0 certifies nothing)")


def _check_sensitivity(sensitivity_value: float) -> None:
    if not (sensitivity_value >= 0 and math.isfinite(sensitivity_value)):
        raise ValueError(f"sensitivity must be a finite number >= 0, got {sensitivity_value}")


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
    """The poster's Delta_s = |D_f| G_max / (mu N) + gamma ||grad L(D_f)||_2 (Newton residual + approximation gap).

    A bound on ||theta_u - theta_r*|| only under the poster's local mu-strongly-convex model of the loss
    near theta*; for a neural network with mu = damping it is a heuristic, not a guarantee.
    """
    if not strong_convexity > 0:
        raise ValueError(f"the strong-convexity constant mu must be > 0, got {strong_convexity}")
    if not num_total > 0 or num_forget < 0:
        raise ValueError(f"need |D_f| >= 0 and N > 0, got |D_f| = {num_forget}, N = {num_total}")
    if min(max_forget_grad_norm, gamma, forget_gradient_norm) < 0:
        raise ValueError("G_max, gamma and ||grad L(D_f)|| are norms and must be >= 0")
    return num_forget * max_forget_grad_norm / (strong_convexity * num_total) + gamma * forget_gradient_norm


def epsilon(sensitivity_value: float, sigma: float, delta: float = DEFAULT_DELTA) -> float:
    """eq. (3): an epsilon that Gaussian noise of scale sigma certifies for l2-sensitivity Delta, valid
    for every epsilon and never below :func:`analytic_epsilon` (see the module docstring)."""
    _check_sigma(sigma)
    _check_sensitivity(sensitivity_value)
    ratio = sensitivity_value / sigma
    return ratio**2 / 2.0 + ratio * gaussian_tail_constant(delta)


def sigma_for_epsilon(sensitivity_value: float, target_epsilon: float, delta: float = DEFAULT_DELTA) -> float:
    """The sigma at which eq. (3) gives exactly ``target_epsilon`` (the inverse of :func:`epsilon`)."""
    if not target_epsilon > 0:
        raise ConfigError("target-epsilon", target_epsilon, "a number > 0")
    _check_sensitivity(sensitivity_value)
    c = gaussian_tail_constant(delta)
    return sensitivity_value * (c + math.sqrt(c * c + 2.0 * target_epsilon)) / (2.0 * target_epsilon)


def gaussian_delta(epsilon_value: float, sensitivity_value: float, sigma: float) -> float:
    """The exact delta(epsilon) of the Gaussian mechanism (Balle & Wang 2018, Theorem 8):
    Phi(Delta/(2 sigma) - epsilon sigma/Delta) - e^epsilon Phi(-Delta/(2 sigma) - epsilon sigma/Delta).

    The second term is evaluated as exp(epsilon + log Phi(.)), which neither overflows for large
    epsilon nor underflows before the difference matters. 0 for Delta = 0."""
    _check_sigma(sigma)
    _check_sensitivity(sensitivity_value)
    if epsilon_value < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon_value}")
    if sensitivity_value == 0:
        return 0.0
    u = sensitivity_value / sigma
    shift = epsilon_value / u
    value = float(ndtr(u / 2.0 - shift)) - math.exp(epsilon_value + float(log_ndtr(-u / 2.0 - shift)))
    return max(value, 0.0)


def analytic_epsilon(sensitivity_value: float, sigma: float, delta: float = DEFAULT_DELTA) -> float:
    """The smallest epsilon for which N(0, sigma^2 I) noise on an l2-sensitivity-Delta release is
    (epsilon, delta)-indistinguishable (analytic Gaussian mechanism), by bisection on
    :func:`gaussian_delta`; the returned value is the bracket's upper end, so it is always valid."""
    _check_delta(delta)
    if gaussian_delta(0.0, sensitivity_value, sigma) <= delta:
        return 0.0
    high = epsilon(sensitivity_value, sigma, delta)  # valid (module docstring), so delta(high) <= delta
    while gaussian_delta(high, sensitivity_value, sigma) > delta:  # guards against rounding only
        high *= 2.0
    low = 0.0
    for _ in range(BISECTION_MAX_STEPS):
        if high - low <= BISECTION_RELATIVE_TOLERANCE * high:
            break
        middle = 0.5 * (low + high)
        if gaussian_delta(middle, sensitivity_value, sigma) > delta:
            low = middle
        else:
            high = middle
    return high


def analytic_sigma_for_epsilon(sensitivity_value: float, target_epsilon: float, delta: float = DEFAULT_DELTA) -> float:
    """The smallest sigma at which the analytic Gaussian mechanism certifies ``target_epsilon`` for
    l2-sensitivity Delta (the inverse of :func:`analytic_epsilon`), by bisection on u = Delta / sigma;
    the returned sigma is the bracket's upper end, so ``analytic_epsilon(Delta, sigma) <= target``."""
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError("target-epsilon", target_epsilon, "a number > 0")
    _check_delta(delta)
    _check_sensitivity(sensitivity_value)
    if sensitivity_value == 0:
        raise ValueError("a sensitivity of 0 needs no noise; sigma is not defined by it")
    # delta(epsilon; u) grows with u; eq. (3)'s sigma is valid, so its u is a lower end.
    low = sensitivity_value / sigma_for_epsilon(sensitivity_value, target_epsilon, delta)
    high = 2.0 * low
    while gaussian_delta(target_epsilon, high, 1.0) <= delta:
        low, high = high, 2.0 * high
    for _ in range(BISECTION_MAX_STEPS):
        if high - low <= BISECTION_RELATIVE_TOLERANCE * high:
            break
        middle = 0.5 * (low + high)
        if gaussian_delta(target_epsilon, middle, 1.0) <= delta:
            low = middle
        else:
            high = middle
    return sensitivity_value / low


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
