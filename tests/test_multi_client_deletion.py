"""Several clients deleted at once, released through the real ClientApp in-process (tests/fake_grid.py).

The release step adds its noise once to the unlearned global model, whatever the number of affected
clients, and certifies one ε against the exact minimiser of the objective of the clients that remain:
here clients 0 and 2 are deleted with hf-kcu (a client-side method with two affected clients), the
remaining gradient is computed by hand on clients 1 and 3's pooled data, and the ledger gives both
requests the one ε of the release. (tests/test_server_side.py checks hf-kcu's causally weighted sum of
the two clients' steps; tests/test_certificate.py the certificate itself.)
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from clients.client_app import build_client_app
from fake_grid import FakeGrid, grid_port
from fedunlearn import config as run_config
from fedunlearn.curvature.certificate import analytic_epsilon
from fedunlearn.environment import quiet_logging
from fedunlearn.training import derive_seed
from fedunlearn.unlearning import Deletion, create_method
from fedunlearn.unlearning.certify import UNNOISED, release
from strategies.server_app import FederatedJob

quiet_logging()

FORGET = (0, 2)
REMAINING = [1, 3]
SIGMA = 0.05
BASE = {"model": "logreg", "l2-bias": True, "noise-sigma": SIGMA, "num-clients": 4, "num-rounds": 3, "local-epochs": 1,
        "mia-shadows": 0, "retrain-cache": False, "noise-floor": False}


def _config(tmp_path, **overrides):
    return run_config.resolve({**BASE, "out-dir": str(tmp_path)}, overrides)


def _remaining_gradient_norm_by_hand(federation, state, clients):
    """‖∇(mean CE + (λ/2)‖θ‖²)‖ over the pooled data of ``clients``, float64 autograd."""
    model = federation.new_model().double()
    model.load_state_dict({name: value.double() for name, value in state.items()})
    rows = torch.cat([torch.as_tensor(federation.partitioning.rows_of(k)) for k in clients])
    inputs, targets = federation.data.train.tensors
    loss = F.cross_entropy(model(inputs[rows].double()), targets[rows]) + model.regularizer()
    gradients = torch.autograd.grad(loss, list(model.parameters()))
    return float(torch.cat([g.flatten() for g in gradients]).norm())


def test_two_deleted_clients_get_one_noise_draw_and_one_epsilon(tmp_path):
    config = _config(tmp_path)
    grid, port, federation = grid_port(config)
    trained = port.train(list(port.clients), port.initial_state, 3, seed=0).state
    deletion = Deletion(forget_clients=FORGET, trained_state=trained, trained_rounds=3)
    outcome = create_method("hf-kcu", config).unlearn(port, deletion)
    assert outcome.affected_clients == list(FORGET)
    unlearned = {name: value.clone() for name, value in outcome.state.items()}
    assert outcome.epsilon is None  # the method claims nothing; the release step certifies
    sent_before = len(grid.sent)
    release(port, "hf-kcu", deletion, outcome)
    # One gradient round, to the remaining clients only.
    assert grid.sent[sent_before:] == [("query.gradient", k) for k in REMAINING]
    info = outcome.details["certificate"]
    assert info["remaining_clients"] == REMAINING
    distance_bound = _remaining_gradient_norm_by_hand(federation, unlearned, REMAINING) / federation.new_model().l2
    assert info["distance_bound"] == pytest.approx(distance_bound, rel=1e-9)
    # One ε for the release (not one per client, not a sum).
    assert outcome.epsilon == analytic_epsilon(info["distance_bound"], SIGMA, config["delta"])
    assert all("certificate" not in client for client in outcome.details.get("clients", {}).values())
    # One noise draw on the global model: σ ξ, ξ from the generator of (seed, "noise", method).
    generator = torch.Generator().manual_seed(derive_seed(config["seed"], "noise", "hf-kcu"))
    for name in ("linear.weight", "linear.bias"):
        xi = torch.randn(unlearned[name].shape, generator=generator, dtype=torch.float64)
        torch.testing.assert_close(outcome.state[name], (unlearned[name].double() + SIGMA * xi).float(), rtol=0, atol=0)
    for name, value in outcome.also_evaluate[UNNOISED].state_dict().items():
        torch.testing.assert_close(value, unlearned[name], rtol=0, atol=0)


def test_the_job_logs_the_release_epsilon_for_both_requests(tmp_path):
    config = _config(tmp_path, **{"unlearn-methods": "hf-kcu", "forget-clients": "0,2"})
    grid = FakeGrid(build_client_app(bound_config=config), 4)
    record = FederatedJob(grid, config, None, None).run()
    entry = record.methods["hf-kcu"]
    assert entry["affected_clients"] == [0, 2]
    assert entry["epsilon"] is not None
    assert entry["epsilon"] == entry["details"]["certificate"]["epsilon_analytic"]
    assert entry["details"]["certificate"]["remaining_clients"] == REMAINING
    applied = [e for e in map(json.loads, (tmp_path / "ledger.jsonl").read_text().splitlines()) if e["status"] == "applied"]
    # One request per deleted client, each applied by the one hf-kcu release and its ε.
    assert sorted(client for e in applied for client in e["clients"]) == [0, 2]
    assert [e["epsilon"] for e in applied] == [entry["epsilon"]] * 2
    released = [e for e in record.communication["log"] if e["phase"] == "release: hf-kcu"]
    assert [(e["type"], e["partition"]) for e in released] == [("query.gradient", k) for k in REMAINING]
