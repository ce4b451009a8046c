"""Several clients deleted at once, through the real ClientApp in-process (tests/fake_grid.py).

tests/test_server_side.py checks hf-kcu's causally weighted, scaled sum for two clients; here the same for
kfac (no adaptive scaling), and TensorUnlearn's noise and certificate with two affected clients: each
client's ε is eq. (3) of its own sensitivity, computed here by hand (per-example gradients one by one),
the outcome's ε is their sum (basic composition), and the two clients' noises are independent draws.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from clients.client_app import build_client_app
from fake_grid import FakeGrid, grid_port
from fedunlearn import config as run_config
from fedunlearn.curvature import certificate
from fedunlearn.environment import quiet_logging
from fedunlearn.unlearning import ClientContext, Deletion, create_method
from fedunlearn.unlearning.objective import batches_of
from strategies.server_app import FederatedJob

quiet_logging()

FORGET = (0, 2)
# Small against the sensitivities (μ = λ + λ_R = 0.011 makes them large): ε is huge, but composes the same.
SIGMA = 0.05
# scaling-constant is hf-kcu's; kfac must ignore it (a tiny value would shrink every step if it did not).
BASE = {"model": "logreg", "num-clients": 4, "num-rounds": 3, "local-epochs": 1, "mia-shadows": 0, "retrain-cache": False,
        "damping": 0.01, "scaling-constant": 1e-3}


def _config(tmp_path, **overrides):
    return run_config.resolve({**BASE, "out-dir": str(tmp_path)}, overrides)


def _by_hand(federation, state, k):
    """‖∇L_k(θ*)‖ and G_max = max_z ‖∇(ℓ(z) + R)‖ on client k's data, one example at a time."""
    model = federation.new_model()
    model.load_state_dict(state)
    data = federation.client_data(k)
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([int(data[i][1]) for i in range(len(data))])

    def gradient(inputs, targets):
        model.zero_grad()
        (F.cross_entropy(model(inputs), targets) + model.regularizer()).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]).double()

    forget_gradient_norm = float(gradient(x, y).norm())
    g_max = max(float(gradient(x[i : i + 1], y[i : i + 1]).norm()) for i in range(len(y)))
    return forget_gradient_norm, g_max


def _client_solve(method, federation, config, state, k, sizes):
    model = federation.new_model()
    model.load_state_dict(state)
    remaining_examples = sum(sizes.values()) - sum(sizes[j] for j in FORGET)
    context = ClientContext(partition_id=k, num_examples=sizes[k], total_examples=sum(sizes.values()),
                            influence_weight=sizes[k] / remaining_examples, seed=config["seed"], device=torch.device("cpu"))
    update = method.solve(model, batches_of(federation.client_data(k), config["curvature-batch-size"]), context)
    return dict(zip(update.param_names, update.delta)), update


def test_kfac_with_noise_weights_each_client_and_adds_up_their_epsilons(tmp_path):
    config = _config(tmp_path, **{"noise-sigma": SIGMA})
    grid, port, federation = grid_port(config)
    trained = port.train(list(port.clients), port.initial_state, 3, seed=0).state
    method = create_method("kfac", config)
    outcome = method.unlearn(port, Deletion(forget_clients=FORGET, trained_state=trained, trained_rounds=3))
    assert grid.partitions_sent("train.unlearn") == list(FORGET)

    sizes = {k: len(federation.client_data(k)) for k in range(4)}
    total = sum(sizes.values())
    strong_convexity = config["damping"] + federation.new_model().l2  # μ = λ + λ_R
    norms, epsilons = {}, {}
    for k in FORGET:
        norms[k], g_max = _by_hand(federation, trained, k)
        sensitivity = sizes[k] * g_max / (strong_convexity * total)  # γ = 0: dense factors
        reported = outcome.details["clients"][str(k)]["certificate"]
        # Agrees to ~6e-8 (float32); leaving logreg's ∇R out of G_max shifts it by 2e-6.
        assert reported["sensitivity"] == pytest.approx(sensitivity, rel=5e-7)
        epsilons[k] = certificate.epsilon(sensitivity, SIGMA, config["delta"])
    assert abs(epsilons[0] - epsilons[2]) > 0.05 * max(epsilons.values())  # the sum is not 2 ε of either
    assert outcome.epsilon == pytest.approx(epsilons[0] + epsilons[2], rel=1e-4)

    # Causal weights |K| ‖∇L_k‖ / Σ_j ‖∇L_j‖, not 1, and no adaptive scaling for kfac.
    weights = {k: 2 * norms[k] / (norms[0] + norms[2]) for k in FORGET}
    assert abs(weights[0] - 1) > 0.05
    for k in FORGET:
        assert outcome.details["causal_weights"][str(k)] == pytest.approx(weights[k], rel=1e-4)
        assert outcome.details["adaptive_scales"][str(k)] == 1.0
    assert max(outcome.details["update_norms_before_scaling"].values()) > 10 * config["scaling-constant"]

    # θ_u = θ* + Σ_k w_k (Δ_k + σ ξ_k): each affected client's step and noise, as it computes them itself.
    noiseless = create_method("kfac", {**config, "noise-sigma": 0.0})
    expected = {name: value.clone() for name, value in trained.items()}
    noises = {}
    for k in FORGET:
        noisy, _ = _client_solve(method, federation, config, trained, k, sizes)
        clean, _ = _client_solve(noiseless, federation, config, trained, k, sizes)
        noises[k] = torch.cat([(noisy[name] - clean[name]).flatten() for name in noisy]) / SIGMA
        for name, value in noisy.items():
            expected[name] = expected[name] + weights[k] * value
    for name in expected:
        torch.testing.assert_close(outcome.state[name], expected[name], rtol=1e-4, atol=1e-6)
    # Each client's noise is N(0, σ² I) of its own: unit variance, uncorrelated with the other client's.
    n = len(noises[0])
    for k in FORGET:
        assert abs(float(noises[k].var()) - 1) < 5 * (2 / n) ** 0.5
    assert abs(float(torch.corrcoef(torch.stack([noises[0], noises[2]]))[0, 1])) < 5 / n**0.5


def test_the_job_logs_the_composed_epsilon_in_the_results_and_the_ledger(tmp_path):
    config = _config(tmp_path, **{"noise-sigma": SIGMA, "unlearn-methods": "kfac", "forget-clients": "0,2"})
    record = FederatedJob(FakeGrid(build_client_app(bound_config=config), 4), config, None, None).run()
    entry = record.methods["kfac"]
    assert entry["affected_clients"] == [0, 2]
    sensitivities = [entry["details"]["clients"][k]["certificate"]["sensitivity"] for k in ("0", "2")]
    composed = sum(certificate.epsilon(s, SIGMA, config["delta"]) for s in sensitivities)
    assert entry["epsilon"] == pytest.approx(composed, rel=1e-9)
    applied = [e for e in map(json.loads, (tmp_path / "ledger.jsonl").read_text().splitlines()) if e["status"] == "applied"]
    # One request per deleted client, each applied by the one kfac release whose ε is the composed one.
    assert [e["epsilon"] for e in applied] == [pytest.approx(composed, rel=1e-9)] * 2
