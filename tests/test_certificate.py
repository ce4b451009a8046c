"""The release step's certificate, against references computed independently here.

1. The Gaussian mechanism: eq. (3) and its inverse by hand; the exact (analytic) δ(ε) against a numerical
   integral of the hockey-stick divergence of two Gaussians; the analytic ε solves δ(ε) = δ and is the
   smallest; eq. (3) is valid for every ε and never below it.
2. The distance bound on logreg with the bias penalised: the exact minimiser θ_r* of the remaining
   objective by Newton's method in float64 (analytic Hessian, ‖∇‖ < 1e-12), the remaining gradient by
   hand, and ‖θ_u − θ_r*‖ ≤ ‖∇L_r(θ_u)‖ / λ for several θ_u, with Δ attained along the flattest direction.
3. The release through the real ClientApp on the in-process grid (tests/fake_grid.py): the noise is the
   seeded N(0, σ² I) draw, ε is the analytic one of the measured Δ, and where no certificate is sound
   (logreg without l2-bias, simple-cnn, σ = 0, a predictor, a spent budget) ε is null with a reason.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import integrate
from scipy.stats import norm

from fake_grid import FakeGrid, grid_port
from clients.client_app import build_client_app
from fedunlearn import config as run_config
from fedunlearn.curvature.certificate import (
    analytic_epsilon,
    analytic_sigma_for_epsilon,
    epsilon,
    gaussian_delta,
    gaussian_tail_constant,
    kronecker_inverse_gap,
    sensitivity,
    sigma_for_epsilon,
    theorem1_bound,
)
from fedunlearn.environment import quiet_logging
from fedunlearn.errors import ConfigError
from fedunlearn.training import derive_seed
from fedunlearn.unlearning import Deletion, Outcome, create_method
from fedunlearn.unlearning.certify import UNNOISED, release, remaining_gradient
from fedunlearn.unlearning.objective import batches_of
from fedunlearn.unlearning.remaining import InProcessRemainingClients
from strategies.server_app import FederatedJob

quiet_logging()


# --- 1. the Gaussian mechanism ------------------------------------------------------------------


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
    with pytest.raises(ConfigError) as info:
        analytic_epsilon(1.0, 1.0, delta=0.0)
    assert info.value.key == "delta"
    with pytest.raises(ConfigError) as info:
        analytic_epsilon(1.0, -1.0)
    assert info.value.key == "noise-sigma"
    with pytest.raises(ConfigError):
        sigma_for_epsilon(1.0, 0.0)
    with pytest.raises(ConfigError):
        analytic_sigma_for_epsilon(1.0, 0.0)
    with pytest.raises(ValueError):
        sensitivity(1, 10, 1.0, 0.0)
    with pytest.raises(ValueError):
        analytic_epsilon(-1.0, 1.0)


def test_bound_helpers_by_hand():
    # eps_KFAC = 0.5, eps_A = 0.1, eps_G = 0.2, ||A_hat||_F = 3, ||G_hat||_F = 4:
    # 0.5 + 0.1 * 4 + (3 + 0.1) * 0.2 = 0.5 + 0.4 + 0.62 = 1.52
    assert theorem1_bound(0.5, 0.1, 0.2, 3.0, 4.0) == pytest.approx(1.52)
    # gap_A = 0.1, ||A^-1|| = 2, gap_G = 0.05, ||G^-1|| = 4: 0.1 * (4 + 0.05) + 2 * 0.05 = 0.405 + 0.1 = 0.505
    assert kronecker_inverse_gap(0.1, 2.0, 0.05, 4.0) == pytest.approx(0.505)


def _hockey_stick(eps: float, shift: float, sigma: float) -> float:
    """sup_S P[N(0,σ²) ∈ S] − e^ε P[N(Δ,σ²) ∈ S] = ∫ (p − e^ε q)₊, by quadrature (no closed form used)."""
    p, q = norm(0.0, sigma).pdf, norm(shift, sigma).pdf
    # p > e^ε q left of x0 = (Δ²/2 − ε σ²)/Δ; the integrand is 0 to its right.
    x0 = (shift * shift / 2 - eps * sigma * sigma) / shift
    value, error = integrate.quad(lambda x: max(p(x) - math.exp(eps) * q(x), 0.0), x0 - 40 * sigma, x0, epsabs=1e-15, epsrel=1e-11, limit=200)
    return value


@pytest.mark.parametrize(("shift", "sigma", "eps"), [(1.0, 1.0, 0.5), (1.0, 1.0, 4.0), (0.3, 2.0, 0.05), (2.0, 0.5, 8.0), (1.0, 0.2, 20.0)])
def test_exact_delta_is_the_hockey_stick_divergence_of_two_gaussians(shift, sigma, eps):
    assert gaussian_delta(eps, shift, sigma) == pytest.approx(_hockey_stick(eps, shift, sigma), rel=1e-7, abs=1e-14)


@pytest.mark.parametrize("delta", [1e-10, 1e-5, 1e-2])
@pytest.mark.parametrize(("shift", "sigma"), [(1.0, 1.0), (0.05, 1.0), (1.0, 0.1), (5.0, 0.01), (3.0, 7.0)])
def test_analytic_epsilon_solves_the_delta_equation_and_is_the_smallest(shift, sigma, delta):
    eps = analytic_epsilon(shift, sigma, delta)
    assert eps > 0
    assert gaussian_delta(eps, shift, sigma) <= delta  # valid
    assert gaussian_delta(eps, shift, sigma) == pytest.approx(delta, rel=1e-9)  # and the root
    assert gaussian_delta(eps * (1 - 1e-7), shift, sigma) > delta  # nothing smaller is valid
    # More distance or less noise never certifies a smaller ε.
    assert analytic_epsilon(1.1 * shift, sigma, delta) > eps
    assert analytic_epsilon(shift, 1.1 * sigma, delta) < eps


def test_analytic_epsilon_is_zero_when_the_two_gaussians_are_delta_close():
    # δ(0) = 2Φ(Δ/(2σ)) − 1 = total variation: Δ/σ = 1e-6 gives 4e-7 < 1e-5
    assert gaussian_delta(0.0, 1e-6, 1.0) == pytest.approx(2 * norm.cdf(0.5e-6) - 1, rel=1e-6)
    assert analytic_epsilon(1e-6, 1.0, 1e-5) == 0.0
    assert analytic_epsilon(0.0, 1.0, 1e-5) == 0.0


@pytest.mark.parametrize("delta", [1e-12, 1e-5, 1e-3, 0.1, 0.9])
def test_eq3_is_valid_for_every_epsilon_and_never_below_the_analytic_one(delta):
    c = gaussian_tail_constant(delta)
    for u in (1e-3, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0):  # u = Δ/σ: ε from 1e-3 to ~600
        eps3 = epsilon(u, 1.0, delta)
        # δ(ε) ≤ P[privacy loss > ε] = Φ(−c) ≤ φ(c)/c ≤ δ (module docstring of curvature/certificate.py)
        assert gaussian_delta(eps3, u, 1.0) <= norm.sf(c) <= norm.pdf(c) / c <= delta
        assert analytic_epsilon(u, 1.0, delta) <= eps3


@pytest.mark.parametrize(("shift", "target", "delta"), [(1.0, 1.0, 1e-5), (0.05, 0.1, 1e-6), (3.0, 10.0, 1e-3)])
def test_analytic_sigma_inverts_analytic_epsilon(shift, target, delta):
    sigma = analytic_sigma_for_epsilon(shift, target, delta)
    assert analytic_epsilon(shift, sigma, delta) == pytest.approx(target, rel=1e-8)
    assert analytic_epsilon(shift, sigma, delta) <= target * (1 + 1e-12)
    assert sigma < sigma_for_epsilon(shift, target, delta)  # less noise than eq. (3) asks for


# --- 2. the distance bound on logreg with the bias penalised ---------------------------------------

BASE = {"model": "logreg", "num-clients": 4, "num-rounds": 3, "local-epochs": 1, "mia-shadows": 0, "retrain-cache": False,
        "noise-floor": False}
FORGET = 0


class ExactLogreg:
    """Mean cross-entropy + (λ/2)(‖W‖² + ‖b‖²) over the named clients' data in float64, as one matrix
    T = [W | b] (classes × (features + 1)); gradient and Hessian in closed form."""

    def __init__(self, federation, clients, l2):
        rows = torch.cat([torch.as_tensor(federation.partitioning.rows_of(k)) for k in clients])
        inputs, targets = federation.data.train.tensors
        x = inputs[rows].double().flatten(1)
        self.x = torch.cat([x, torch.ones(len(rows), 1, dtype=torch.float64)], dim=1)
        self.y = targets[rows]
        self.l2, self.classes = l2, federation.data.num_classes

    def matrix(self, state) -> torch.Tensor:
        return torch.cat([state["linear.weight"].double(), state["linear.bias"].double()[:, None]], dim=1)

    def state(self, matrix) -> dict[str, torch.Tensor]:
        return {"linear.weight": matrix[:, :-1].float().contiguous(), "linear.bias": matrix[:, -1].float().contiguous()}

    def loss(self, t):
        return F.cross_entropy(self.x @ t.T, self.y) + 0.5 * self.l2 * t.pow(2).sum()

    def gradient(self, t):
        p = torch.softmax(self.x @ t.T, dim=1)
        p[torch.arange(len(self.y)), self.y] -= 1
        return p.T @ self.x / len(self.y) + self.l2 * t

    def hessian(self, t):
        p = torch.softmax(self.x @ t.T, dim=1)
        a = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        size = t.numel()
        h = torch.einsum("icd,ij,ik->cjdk", a, self.x, self.x).reshape(size, size) / len(self.y)
        return h + self.l2 * torch.eye(size, dtype=torch.float64)

    def minimise(self):
        """Newton's method with backtracking from 0 until ‖∇‖ < 1e-12."""
        t = torch.zeros(self.classes, self.x.shape[1], dtype=torch.float64)
        for _ in range(50):
            g = self.gradient(t)
            if g.norm() < 1e-12:
                return t
            step = torch.linalg.solve(self.hessian(t), g.flatten()).view_as(t)
            size, value = 1.0, self.loss(t)
            while self.loss(t - size * step) > value - 1e-4 * size * float((g * step).sum()):
                size /= 2
            t = t - size * step
        raise AssertionError(f"Newton did not converge: ‖∇‖ = {float(self.gradient(t).norm())}")


@pytest.fixture(scope="module")
def convex(tmp_path_factory):
    config = run_config.resolve({**BASE, "l2-bias": True, "out-dir": str(tmp_path_factory.mktemp("convex"))})
    grid, port, federation = grid_port(config)
    trained = port.train(list(port.clients), port.initial_state, 3, seed=0).state
    l2 = federation.new_model().l2
    remaining = [k for k in port.clients if k != FORGET]
    problem = ExactLogreg(federation, remaining, l2)
    optimum = problem.minimise()
    full_optimum = ExactLogreg(federation, list(port.clients), l2).minimise()
    return config, grid, port, federation, trained, remaining, problem, optimum, full_optimum


def test_l2_bias_penalises_the_bias_and_only_then_is_the_model_strongly_convex():
    config = run_config.resolve({"model": "logreg"})
    default = run_config.resolve({"model": "logreg", "l2-bias": False})
    assert config["l2-bias"] is False and default == config  # every existing run keeps its objective
    from fedunlearn.federation import build_federation

    for l2_bias in (False, True):
        model = build_federation(run_config.resolve({"model": "logreg", "l2-bias": l2_bias})).new_model()
        with torch.no_grad():
            model.linear.weight.fill_(2.0)
            model.linear.bias.fill_(5.0)
        weights = model.linear.weight.numel() * 4.0
        biases = model.linear.bias.numel() * 25.0 if l2_bias else 0.0
        assert model.regularizer().item() == pytest.approx(0.5 * model.l2 * (weights + biases))
        assert model.strong_convexity() == (model.l2 if l2_bias else 0.0)


def test_without_the_bias_penalty_a_gradient_bound_cannot_hold(convex):
    """Shifting every bias by c changes no prediction: with l2-bias = false two models at any distance have
    the same objective and the same gradient, so no ‖∇‖/λ can bound their distance to one optimum."""
    config, _, _, federation, trained, remaining, problem, _, _ = convex
    model = build_model_like(federation, {**config, "l2-bias": False})
    shifted = {name: value.clone() for name, value in trained.items()}
    shifted["linear.bias"] += 100.0
    batches = batches_of(federation.client_data(remaining[0]), 256)
    gradients = []
    for state in (trained, shifted):
        model.load_state_dict(state)
        objective = InProcessRemainingClients(model, {0: batches})
        gradients.append(torch.cat([g.flatten() for g in objective.gradient(["linear.weight", "linear.bias"])]))
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-5, atol=1e-6)


def build_model_like(federation, config):
    from fedunlearn.federation import Federation

    return Federation(config=dict(config), data=federation.data, partitioning=federation.partitioning).new_model()


def test_the_remaining_gradient_is_the_float64_gradient_by_hand(convex):
    _, _, port, _, trained, remaining, problem, _, _ = convex
    names = ["linear.weight", "linear.bias"]
    by_hand = problem.gradient(problem.matrix(trained))
    federated = remaining_gradient(port, remaining, trained, names)
    assert all(g.dtype == torch.float64 for g in federated)
    got = torch.cat([federated[0], federated[1][:, None]], dim=1)
    assert float((got - by_hand).norm()) <= 1e-12 * float(by_hand.norm())
    # The same query without the float64 switch is float32 arithmetic: 1e-8 .. 1e-6 off.
    single = port.remaining_objective(remaining, trained).gradient(names)
    single = torch.cat([single[0].double(), single[1].double()[:, None]], dim=1)
    assert float((single - by_hand).norm()) > 1e3 * float((got - by_hand).norm())


def _release_info(port, state, method="probe"):
    """The release of ``state`` as the outcome of ``method`` deleting client FORGET."""
    outcome = Outcome(state={name: value.clone() for name, value in state.items()}, affected_clients=[FORGET], communication_rounds=0)
    release(port, method, Deletion(forget_clients=(FORGET,), trained_state=state, trained_rounds=3), outcome)
    return outcome


def test_the_distance_bound_holds_and_is_attained_along_the_flattest_direction(convex):
    config, _, port, federation, trained, remaining, problem, optimum, full_optimum = convex
    l2 = problem.l2
    assert float(problem.gradient(optimum).norm()) < 1e-12
    # hf-kcu-global (float64, in process) from the exact optimum of the full objective, with a CG budget.
    newton = create_method("hf-kcu-global", run_config.resolve({**config, "damping": 0.0, "cg-iters": 20, "cg-tol": 1e-12}))
    model = federation.new_model().double()
    model.load_state_dict({name: value.double() for name, value in problem.state(full_optimum).items()})
    batches = {k: [(x.double(), y) for x, y in batches_of(federation.client_data(k), 256)] for k in remaining}
    update = newton.server_step(model, InProcessRemainingClients(model, batches))
    hf_kcu_global = problem.state(problem.matrix(problem.state(full_optimum)) + torch.cat([update.delta[0], update.delta[1][:, None]], dim=1))
    # Near the optimum: two exact Newton steps on the remaining objective from the full optimum (what
    # hf-kcu-global computes once CG has converged).
    near = full_optimum
    for _ in range(2):
        near = near - torch.linalg.solve(problem.hessian(near), problem.gradient(near).flatten()).view_as(near)
    eigenvalues, eigenvectors = torch.linalg.eigh(problem.hessian(optimum))
    assert eigenvalues[0] == pytest.approx(l2, rel=1e-9)  # always-zero pixels: the data adds no curvature there
    flattest = eigenvectors[:, 0].view_as(optimum)
    generator = torch.Generator().manual_seed(3)
    candidates = {
        "trained (FedAvg, 3 rounds)": trained,
        "hf-kcu-global from the full optimum (20 CG iterations)": hf_kcu_global,
        "two Newton steps from the full optimum": problem.state(near),
        "trained + N(0, 0.1²)": {k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in trained.items()},
        "optimum + 1.0 along the flattest direction": problem.state(optimum + flattest),
    }
    smoothness = l2 + 0.5 * float(problem.x.pow(2).sum(dim=1).max())  # ‖∇²L_r‖ ≤ λ + max‖x̃‖²/2
    distances, ratios = {}, {}
    for label, state in candidates.items():
        info = _release_info(port, state).details["certificate"]
        distances[label] = float((problem.matrix(state) - optimum).norm())
        by_hand = float(problem.gradient(problem.matrix(state)).norm()) / l2
        assert info["strong_convexity"] == l2
        assert info["distance_bound"] == pytest.approx(by_hand, rel=1e-10)
        assert distances[label] <= info["distance_bound"], label
        ratios[label] = info["distance_bound"] / distances[label]
        assert ratios[label] <= smoothness / l2, label  # Δ is a gradient norm over λ, not something larger
    print("\n‖θ_u − θ_r*‖ and Δ / ‖θ_u − θ_r*‖:", {label: (round(distances[label], 4), round(ratios[label], 3)) for label in ratios})
    # Along the flattest direction the bound is attained: 1/λ cannot be improved.
    assert ratios["optimum + 1.0 along the flattest direction"] == pytest.approx(1.0, abs=1e-3)
    # Near the optimum Δ stays within a small factor of the true distance (measured: 10.3).
    assert distances["two Newton steps from the full optimum"] < 0.02 * distances["trained (FedAvg, 3 rounds)"]
    assert ratios["two Newton steps from the full optimum"] < 20


# --- 3. the release through the real ClientApp ---------------------------------------------------

SIGMA = 0.05


def _port(tmp_path, **overrides):
    config = run_config.resolve({**BASE, "out-dir": str(tmp_path)}, overrides)
    return grid_port(config)


def test_release_adds_the_seeded_noise_once_and_certifies_the_analytic_epsilon(convex, tmp_path):
    config, _, _, _, trained, remaining, problem, _, _ = convex
    _, port, _ = _port(tmp_path, **{"l2-bias": True, "noise-sigma": SIGMA})
    outcome = _release_info(port, trained, method="hf-kcu")
    info = outcome.details["certificate"]
    assert "epsilon_reason" not in outcome.details
    # The noise: σ ξ with ξ ~ N(0, I) from the generator seeded by derive_seed(seed, "noise", method), in float64.
    generator = torch.Generator().manual_seed(derive_seed(config["seed"], "noise", "hf-kcu"))
    noise = []
    for name in ("linear.weight", "linear.bias"):
        xi = torch.randn(trained[name].shape, generator=generator, dtype=torch.float64)
        torch.testing.assert_close(outcome.state[name], (trained[name].double() + SIGMA * xi).float(), rtol=0, atol=0)
        noise.append((outcome.state[name].double() - trained[name].double()).flatten())
    noise = torch.cat(noise)
    n = noise.numel()
    assert abs(float(noise.std()) / SIGMA - 1) < 5 / math.sqrt(2 * n)
    assert abs(float(noise.mean())) < 5 * SIGMA / math.sqrt(n)
    # The unnoised model is kept for the evaluation (details["unnoised"]: the accuracy the noise costs).
    for name, value in outcome.also_evaluate[UNNOISED].state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0)
    # ε: the analytic Gaussian mechanism of Δ = ‖∇L_r(θ_u)‖ / λ, measured at the unnoised model.
    distance_bound = float(problem.gradient(problem.matrix(trained)).norm()) / problem.l2
    assert info["distance_bound"] == pytest.approx(distance_bound, rel=1e-10)
    assert info["remaining_clients"] == remaining
    assert outcome.epsilon == info["epsilon_analytic"] == analytic_epsilon(info["distance_bound"], SIGMA, config["delta"])
    assert info["epsilon_eq3"] == epsilon(info["distance_bound"], SIGMA, config["delta"]) >= outcome.epsilon
    assert info["noise_added"] and info["noise_sigma"] == SIGMA
    # Same seed, same release; another seed or another method, other noise.
    again = _release_info(port, trained, method="hf-kcu")
    for name in trained:
        torch.testing.assert_close(again.state[name], outcome.state[name], rtol=0, atol=0)
    _, other_seed, _ = _port(tmp_path, **{"l2-bias": True, "noise-sigma": SIGMA, "seed": 1})
    for other in (_release_info(other_seed, trained, method="hf-kcu"), _release_info(port, trained, method="finetune")):
        assert float((other.state["linear.weight"] - outcome.state["linear.weight"]).abs().max()) > SIGMA


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"l2-bias": False}, "logreg without l2-bias"),
        ({"model": "simple-cnn"}, "SimpleCNN is not a convex model"),
    ],
)
def test_no_certificate_where_none_is_sound_but_the_noise_is_added(tmp_path, overrides, reason):
    grid, port, federation = _port(tmp_path, **{"noise-sigma": SIGMA, **overrides})
    state = {name: value.clone() for name, value in port.initial_state.items()}
    outcome = _release_info(port, state)
    assert outcome.epsilon is None
    assert reason in outcome.details["epsilon_reason"]
    assert grid.count("query.gradient") == 0  # nothing is measured that certifies nothing
    parameters = dict(federation.new_model().named_parameters())
    for name, value in state.items():
        changed = not torch.equal(outcome.state[name], value)
        assert changed == (name in parameters and parameters[name].is_floating_point()), name  # parameters only, not buffers


def test_no_noise_no_epsilon_but_the_deterministic_bound(tmp_path, convex):
    _, _, _, _, trained, _, problem, _, _ = convex
    _, port, _ = _port(tmp_path, **{"l2-bias": True})
    outcome = _release_info(port, trained)
    assert outcome.epsilon is None and "noise-sigma = 0" in outcome.details["epsilon_reason"]
    assert outcome.details["certificate"]["distance_bound"] == pytest.approx(
        float(problem.gradient(problem.matrix(trained)).norm()) / problem.l2, rel=1e-10)
    assert all(torch.equal(outcome.state[name], trained[name]) for name in trained)
    assert UNNOISED not in outcome.also_evaluate


def test_a_predictor_is_released_as_it_is(tmp_path):
    grid, port, _ = _port(tmp_path, **{"l2-bias": True, "noise-sigma": SIGMA})
    ensemble = nn.Linear(64, 10)
    before = copy.deepcopy(ensemble.state_dict())
    outcome = Outcome(state=None, affected_clients=[FORGET], communication_rounds=0, predictor=ensemble, epsilon=1.0)
    release(port, "sisa", Deletion(forget_clients=(FORGET,), trained_state=port.initial_state, trained_rounds=3), outcome)
    assert outcome.epsilon is None and "predictor" in outcome.details["epsilon_reason"]
    assert outcome.details["method_epsilon"] == 1.0  # a method's own claim never becomes the headline
    assert all(torch.equal(ensemble.state_dict()[name], before[name]) for name in before)
    assert grid.count("query.gradient") == 0


def test_a_sensitivity_budget_certifies_its_own_epsilon_or_refuses(tmp_path, convex):
    config, _, _, _, trained, _, problem, _, _ = convex
    distance_bound = float(problem.gradient(problem.matrix(trained)).norm()) / problem.l2
    for budget in (2 * distance_bound, 0.5 * distance_bound):
        _, port, _ = _port(tmp_path, **{"l2-bias": True, "noise-sigma": SIGMA, "sensitivity-budget": budget})
        outcome = _release_info(port, trained)
        if budget > distance_bound:
            assert outcome.epsilon == analytic_epsilon(budget, SIGMA, config["delta"])  # fixed before the data
        else:
            assert outcome.epsilon is None and "exceeds sensitivity-budget" in outcome.details["epsilon_reason"]
    # target-epsilon calibrates σ to the budget: the release then certifies exactly that ε.
    _, port, _ = _port(tmp_path, **{"l2-bias": True, "sensitivity-budget": 2 * distance_bound, "target-epsilon": 2.0})
    outcome = _release_info(port, trained)
    info = outcome.details["certificate"]
    assert info["sigma_from"] == "target-epsilon"
    assert info["noise_sigma"] == analytic_sigma_for_epsilon(2 * distance_bound, 2.0, config["delta"])
    assert outcome.epsilon == pytest.approx(2.0, rel=1e-8) and outcome.epsilon <= 2.0 * (1 + 1e-12)


def test_the_job_releases_every_method_and_reports_epsilon_and_the_cost_of_the_noise(tmp_path):
    config = run_config.resolve({**BASE, "out-dir": str(tmp_path)},
                                {"l2-bias": True, "noise-sigma": 0.5, "unlearn-methods": "hf-kcu"})
    grid = FakeGrid(build_client_app(bound_config=config), 4)
    record = FederatedJob(grid, config, None, None).run()
    entry = record.methods["hf-kcu"]
    certificate = entry["details"]["certificate"]
    assert entry["epsilon"] == certificate["epsilon_analytic"] == analytic_epsilon(certificate["distance_bound"], 0.5, config["delta"])
    assert entry["details"][UNNOISED]["test_accuracy"] != entry["test_accuracy"]  # what σ = 0.5 costs
    released = [e for e in record.communication["log"] if e["phase"] == "release: hf-kcu"]
    assert sorted(e["partition"] for e in released) == [1, 2, 3] and {e["type"] for e in released} == {"query.gradient"}
    applied = [e for e in map(json.loads, (tmp_path / "ledger.jsonl").read_text().splitlines()) if e["status"] == "applied"]
    assert [e["epsilon"] for e in applied] == [entry["epsilon"]]
    assert entry["epsilon"] is not None


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"noise-sigma": -0.1}, "noise-sigma"),
        ({"noise-sigma": float("inf")}, "noise-sigma"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"delta": -1e-5}, "delta"),
        ({"sensitivity-budget": -1.0}, "sensitivity-budget"),
        ({"target-epsilon": 1.0}, "target-epsilon"),  # without a budget
        ({"target-epsilon": 1.0, "sensitivity-budget": 1.0, "noise-sigma": 0.1}, "noise-sigma"),
        ({"l2-bias": "sometimes"}, "l2-bias"),
    ],
)
def test_bad_release_values_are_config_errors_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        run_config.resolve(overrides)
    assert info.value.key == key
