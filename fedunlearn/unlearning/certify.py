"""The release step every method's unlearned model goes through: Gaussian noise once, and an
(ε, δ) certificate where one is sound (docs/methods.md, "The release step and its certificate").

The server runs :func:`release` on each :class:`~fedunlearn.unlearning.api.Outcome` right after the
method's ``unlearn`` returns it::

    θ_released = θ_u + ξ,    ξ ~ N(0, σ² I) on every parameter    (σ = noise-sigma, or from target-epsilon)

**Where the certificate is sound.** When the model's objective is μ-strongly convex in every
parameter (``model.strong_convexity()`` > 0: ``logreg`` with ``l2-bias = true``), the remaining
objective L_r(θ) = mean cross-entropy over the remaining clients' data + (λ/2)‖θ‖² has one minimiser
θ_r*, and for *any* θ_u, however it was computed,

    ‖θ_u − θ_r*‖₂ ≤ ‖∇L_r(θ_u)‖₂ / μ = Δ

(strong convexity: μ‖θ − θ_r*‖² ≤ ⟨∇L_r(θ) − ∇L_r(θ_r*), θ − θ_r*⟩ ≤ ‖∇L_r(θ)‖ ‖θ − θ_r*‖). The server
measures ∇L_r(θ_u) exactly with one ``query.gradient`` round over the remaining clients, each
evaluating it in float64 (``FLOAT64``), and sums their answers weighted by example counts. Then
θ_u + ξ and θ_r* + ξ are (ε, δ)-indistinguishable by the Gaussian mechanism with ℓ2-sensitivity Δ:
the headline ``epsilon`` is the analytic Gaussian mechanism's (the smallest valid one), eq. (3)'s
larger value goes into the details beside it.

This is the structure of Guo et al. (2020, "Certified Data Removal from Machine Learning Models"): a
removal step whose gradient residual on the remaining objective is bounded, and Gaussian noise
calibrated to that bound. Their noise perturbs the training objective, which needs the exact
minimiser at training time; FedAvg does not give one, so the noise here perturbs the output instead
(θ_r* + ξ is output perturbation, Chaudhuri et al. 2011), and the reference is the exact minimiser of
the remaining objective plus the same noise, not the model FedAvg would retrain.

**Everywhere else** (non-convex models, logreg without the bias penalty, λ = 0, predictors such as
SISA's ensembles) ``epsilon`` is null and the outcome's details say why (``epsilon_reason``).

With ``sensitivity-budget`` B > 0 the ε certified is the one of B, fixed before any data is seen,
and a release whose measured Δ exceeds B gets no ε (Guo et al. fix a residual budget the same way
and retrain when it is spent). ``target-epsilon`` then calibrates σ to B before the run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from fedunlearn.curvature.certificate import analytic_epsilon, analytic_sigma_for_epsilon, epsilon as eq3_epsilon
from fedunlearn.errors import UnlearningFailed
from fedunlearn.training import derive_seed
from fedunlearn.unlearning.api import QUERY_PREFIX, Deletion, FederationPort, Outcome, State

# The message-config switch that makes a client answer a query with a float64 copy of the model and data.
FLOAT64 = "float64"
# The key under which the unnoised model's scores go into an outcome's details (Outcome.also_evaluate).
UNNOISED = "unnoised"


def release_sigma(config: Mapping[str, Any]) -> tuple[float, str]:
    """σ of the release noise and where it comes from: ``noise-sigma``, or calibrated from
    ``target-epsilon`` and ``sensitivity-budget`` (analytic Gaussian mechanism) before any data is seen."""
    if float(config["target-epsilon"]) > 0:
        sigma = analytic_sigma_for_epsilon(float(config["sensitivity-budget"]), float(config["target-epsilon"]), float(config["delta"]))
        return sigma, "target-epsilon"
    return float(config["noise-sigma"]), "noise-sigma"


def noise_seed(config: Mapping[str, Any], method_name: str) -> int:
    return derive_seed(config["seed"], "noise", method_name)


def add_noise(state: State, names: Sequence[str], sigma: float, seed: int) -> State:
    """A copy of ``state`` with σ ξ added to each named tensor, ξ ~ N(0, I) drawn in float64 on the CPU
    from a generator seeded by ``seed`` (the same noise on every device), in the order of ``names``;
    the sum is rounded to the tensor's dtype (post-processing, which keeps any certificate)."""
    generator = torch.Generator().manual_seed(seed)
    noisy = {name: tensor.clone() for name, tensor in state.items()}
    for name in names:
        value = state[name]
        xi = torch.randn(value.shape, generator=generator, dtype=torch.float64)
        noisy[name] = (value.detach().cpu().double() + sigma * xi).to(dtype=value.dtype, device=value.device)
    return noisy


def strong_convexity(model: nn.Module) -> tuple[float, str | None]:
    """(μ, None) when the model's objective is μ-strongly convex in every parameter, else (0, why not)."""
    constant = getattr(model, "strong_convexity", None)
    if not callable(constant):
        return 0.0, (
            f"{type(model).__name__} is not a convex model: no bound on the distance between the unlearned "
            "model and a retrained optimum exists, so noise certifies nothing"
        )
    mu = float(constant())
    if mu > 0:
        return mu, None
    if getattr(model, "l2_bias", True) is False:
        return 0.0, (
            "logreg without l2-bias: the cross-entropy does not change when every bias moves by the same "
            "constant, so the objective is not strongly convex in the bias and the remaining optimum is not "
            "unique (set l2-bias = true)"
        )
    return 0.0, "the model's L2 coefficient is 0: the objective is not strongly convex"


def remaining_gradient(port: FederationPort, partitions: Sequence[int], state: State, names: Sequence[str]) -> list[Tensor]:
    """∇L_r(θ) = Σ_j n_j ∇L_j(θ) / Σ_j n_j over ``partitions``, each client's gradient evaluated in
    float64 (one ``query.gradient`` round), summed in float64 in partition order."""
    partitions = sorted(partitions)
    replies = port.send(
        QUERY_PREFIX + "gradient", partitions, {"arrays": {name: tensor.detach().cpu() for name, tensor in state.items()}},
        {"param-names": list(names), FLOAT64: True},
    )
    sizes = {k: port.clients[k].num_examples for k in partitions}
    total = None
    for k in partitions:
        reply = replies[k]
        if int(reply.metrics.get("num-examples", -1)) != sizes[k]:
            raise UnlearningFailed(f"client {k} answered for {reply.metrics.get('num-examples')} examples, it holds {sizes[k]}")
        result = [reply.arrays["result"][name] for name in names]
        if any(tensor.dtype != torch.float64 for tensor in result):
            raise UnlearningFailed(f"client {k} answered the gradient in {result[0].dtype}, not float64")
        weighted = [sizes[k] * tensor for tensor in result]
        total = weighted if total is None else [t + w for t, w in zip(total, weighted)]
    count = sum(sizes.values())
    return [t / count for t in total]


def certified_epsilon(distance_bound: float, sigma: float, delta: float, budget: float) -> tuple[float | None, dict[str, Any], str | None]:
    """(ε or None, what it rests on, why None) for a release whose distance to θ_r* is at most ``distance_bound``."""
    info: dict[str, Any] = {}
    if not sigma > 0:
        return None, info, (
            "noise-sigma = 0: the release adds no noise, so it is not (ε, δ)-indistinguishable from anything; "
            "the deterministic bound distance_bound on ‖θ_u − θ_r*‖ still holds"
        )
    sensitivity = distance_bound
    if budget > 0:
        if distance_bound > budget:
            return None, info, (
                f"the measured distance bound Δ = {distance_bound:.6g} exceeds sensitivity-budget = {budget:g}: "
                "this release is not certified (a retrain would be due)"
            )
        sensitivity = budget
    info.update(
        sensitivity=sensitivity,
        epsilon_analytic=analytic_epsilon(sensitivity, sigma, delta),
        epsilon_eq3=eq3_epsilon(sensitivity, sigma, delta),
    )
    return info["epsilon_analytic"], info, None


def release(port: FederationPort, method_name: str, deletion: Deletion, outcome: Outcome) -> Outcome:
    """Noise on ``outcome.state`` and the certificate, in place: ``outcome.state`` becomes the released
    model, ``outcome.epsilon`` the certified ε or None (``details["epsilon_reason"]`` says why), and
    ``details["certificate"]`` holds the ingredients. Returns ``outcome``."""
    config = port.config
    sigma, sigma_from = release_sigma(config)
    delta, budget = float(config["delta"]), float(config["sensitivity-budget"])
    info: dict[str, Any] = {"noise_sigma": sigma, "sigma_from": sigma_from, "delta": delta, "sensitivity_budget": budget}
    if outcome.epsilon is not None:
        outcome.details["method_epsilon"] = outcome.epsilon  # a method's own claim: never the headline
    outcome.epsilon = None
    outcome.details["certificate"] = info
    if outcome.state is None:
        info["noise_added"] = False
        outcome.details["epsilon_reason"] = (
            "the method releases a predictor (an ensemble), not one set of weights: no noise is added and no ε certified"
        )
        return outcome

    model = port.new_model()
    model.load_state_dict(outcome.state)
    unnoised = outcome.state
    parameter_names = [name for name, _ in model.named_parameters()]
    mu, reason = strong_convexity(model)
    distance_bound = None
    if reason is None:
        remaining = port.remaining(deletion)
        if not remaining:
            reason = "no client remains: the remaining objective is empty"
        else:
            try:
                with port.phase(f"release: {method_name}"):
                    gradient = remaining_gradient(port, remaining, unnoised, parameter_names)
            except UnlearningFailed as failure:
                reason = f"the certificate's gradient round failed: {failure}"
            else:
                gradient_norm = float(torch.cat([g.reshape(-1) for g in gradient]).norm())
                distance_bound = gradient_norm / mu
                info.update(
                    strong_convexity=mu, remaining_gradient_norm=gradient_norm, distance_bound=distance_bound,
                    remaining_clients=list(remaining), communication_rounds=1,
                    reference="θ_r* + ξ: the exact minimiser of the remaining objective plus the same noise",
                )
    if distance_bound is not None and math.isfinite(distance_bound):
        outcome.epsilon, certified, reason = certified_epsilon(distance_bound, sigma, delta, budget)
        info.update(certified)
    elif distance_bound is not None:
        reason = f"the remaining gradient is not finite (‖∇L_r‖ = {info['remaining_gradient_norm']})"

    info["noise_added"] = sigma > 0
    if sigma > 0:
        outcome.state = add_noise(unnoised, parameter_names, sigma, noise_seed(config, method_name))
        reference = port.new_model()
        reference.load_state_dict(unnoised)
        outcome.also_evaluate[UNNOISED] = reference.eval()  # the accuracy the noise costs, in details["unnoised"]
    if reason is not None:
        outcome.details["epsilon_reason"] = reason
    return outcome
