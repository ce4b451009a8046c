"""PGA (Halimi et al. 2022; fedunlearn/unlearning/methods/pga.py): the reference model is the example-weighted
mean of the other clients' last local models, the deleted client ascends its cross-entropy from it (SGD,
clipping, momentum), every iterate is projected onto the L2 ball around it, and the ascent stops at the first
check where the client's accuracy is at most τ. References are computed by hand here (closed-form logistic
regression gradients, local training written out), not with the module's helpers."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from clients.client_app import build_client_app
from fake_grid import FakeGrid, fedavg_by_hand, grid_port
from fedunlearn import config as run_config
from fedunlearn.environment import quiet_logging
from fedunlearn.errors import ConfigError, UnlearningFailed
from fedunlearn.federation import build_federation
from fedunlearn.training import LocalTrainingConfig, derive_seed, train_local
from fedunlearn.unlearning import ClientContext, Deletion, create_method
from fedunlearn.unlearning.api import UNLEARN
from fedunlearn.unlearning.methods.pga import ProjectedGradientAscent, project_onto_ball
from fedunlearn.unlearning.objective import batches_of
from strategies.server_app import FederatedJob

quiet_logging()
pytestmark = pytest.mark.usefixtures("one_thread")

BASE = {"model": "logreg", "num-clients": 4, "num-rounds": 3, "local-epochs": 1, "mia-shadows": 0, "retrain-cache": False}


def _config(tmp_path=None, **overrides):
    return run_config.resolve({**BASE, **({"out-dir": str(tmp_path)} if tmp_path else {})}, overrides)


def _flat(tensors):
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def _context(partition, n, radius, seed=0):
    return ClientContext(partition_id=partition, num_examples=n, total_examples=n, influence_weight=1.0, seed=seed,
                         device=torch.device("cpu"), request={"pga-radius": radius})


def _trained_client(config, client=0, epochs=10):
    """A logreg model fitted to one client's data (so that ascent has something to undo)."""
    federation = build_federation(config)
    torch.manual_seed(0)
    model = federation.new_model()
    data = federation.client_data(client)
    train_local(model, data, LocalTrainingConfig(epochs=epochs, batch_size=32, lr=0.1, momentum=0.9), torch.device("cpu"), seed=0)
    return model.eval(), batches_of(data, config["curvature-batch-size"])


def _accuracy(model, state, batches):
    model.load_state_dict(state)
    with torch.no_grad():
        return sum(int((model(x).argmax(1) == y).sum()) for x, y in batches) / sum(len(y) for _, y in batches)


class _Iterates:
    """Every iterate the ascent computes a gradient at (a forward pre-hook in training mode), and every
    model right after an optimiser step, before any projection (a wrapper of SGD.step)."""

    def __init__(self, model, monkeypatch):
        self.at_forward, self.after_step = [], []
        params = list(model.parameters())
        model.register_forward_pre_hook(lambda module, args: self.at_forward.append(_flat(params)) if module.training else None)
        original = torch.optim.SGD.step

        def step(optimizer, *args, **kwargs):
            result = original(optimizer, *args, **kwargs)
            self.after_step.append(_flat(p for group in optimizer.param_groups for p in group["params"]))
            return result

        monkeypatch.setattr(torch.optim.SGD, "step", step)


# --- the projection --------------------------------------------------------------------------------------


def test_the_projection_is_the_exact_euclidean_projection_onto_the_ball_over_all_tensors_together():
    """A point outside goes to c + δ (x − c) / ‖x − c‖, the norm over weight and bias together (a per-tensor
    projection, a squared radius or clipping coordinates fail); a point inside stays; and no point of the
    ball is closer to x than its projection."""
    generator = torch.Generator().manual_seed(0)
    centre = [torch.randn(3, 4, generator=generator), torch.randn(3, generator=generator)]
    radius = 0.7
    point = [c + 2.0 * torch.randn(c.shape, generator=generator) for c in centre]
    x, c = _flat(point), _flat(centre)
    assert (x - c).norm() > radius
    # The largest tensor's own norm is below the radius only when the projection is done over the whole vector.
    params = [p.clone() for p in point]
    before = project_onto_ball(params, centre, radius)
    assert before == pytest.approx(float((x - c).norm()), rel=1e-12)
    expected = c + radius * (x - c) / (x - c).norm()
    torch.testing.assert_close(_flat(params), expected, rtol=1e-6, atol=1e-6)
    assert float((_flat(params) - c).norm()) == pytest.approx(radius, rel=1e-6)
    # Optimality against random points of the ball.
    distance = float((x - _flat(params)).norm())
    for _ in range(500):
        direction = torch.randn(c.shape, generator=generator, dtype=torch.float64)
        y = c + radius * float(torch.rand(1, generator=generator)) ** (1 / len(c)) * direction / direction.norm()
        assert distance <= float((x - y).norm()) + 1e-9
    # Inside: unchanged, bit for bit.
    inside = [ci + 0.01 * torch.randn(ci.shape, generator=generator) for ci in centre]
    kept = [p.clone() for p in inside]
    project_onto_ball(kept, centre, radius)
    assert all(torch.equal(a, b) for a, b in zip(kept, inside))


# --- the client's ascent ---------------------------------------------------------------------------------


def test_one_unprojected_step_is_the_reference_plus_lr_times_the_cross_entropy_gradient_by_hand():
    """One full-batch step of plain SGD (no momentum effect on the first step, no clipping, a ball too large
    to bind, no stopping): Δ = lr · ∇CE(w_ref), the gradient written out for logistic regression:
    ∇_W = (softmax(XWᵀ + b) − Y)ᵀ X / n, ∇_b = mean(softmax − Y). A sign flip (descent), the logreg L2
    term in the objective or a step from another model fails. Then with clipping at a norm below ‖∇‖:
    Δ = lr · c · ∇ / ‖∇‖."""
    config = _config()
    model, batches = _trained_client(config)
    inputs = torch.cat([x for x, _ in batches]).flatten(1).double()
    targets = torch.cat([y for _, y in batches])
    n = len(targets)
    weight, bias = model.linear.weight.detach().double(), model.linear.bias.detach().double()
    residual = torch.softmax(inputs @ weight.T + bias, dim=1) - F.one_hot(targets, weight.shape[0]).double()
    gradient = [residual.T @ inputs / n, residual.mean(0)]
    norm = float(_flat(gradient).norm())
    assert norm > 1e-3
    lr = 0.3
    for clip, factor in ((0.0, 1.0), (0.25 * norm, 0.25)):
        step = run_config.resolve(config, {"pga-epochs": 1, "batch-size": n, "pga-lr": lr, "pga-stop-accuracy": 0.0,
                                           "pga-clip-norm": clip})
        start = {k: v.clone() for k, v in model.state_dict().items()}
        fresh = build_federation(config).new_model()
        fresh.load_state_dict(start)
        update = create_method("pga", step).solve(fresh.eval(), batches, _context(0, n, radius=1e6))
        assert update.diagnostics["optimizer_steps"] == 1 and update.diagnostics["projected_steps"] == 0
        delta = dict(zip(update.param_names, update.delta))
        torch.testing.assert_close(delta["linear.weight"].double(), lr * factor * gradient[0], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(delta["linear.bias"].double(), lr * factor * gradient[1], rtol=1e-4, atol=1e-7)


def test_every_iterate_stays_in_the_ball_even_when_the_steps_would_leave_it(monkeypatch):
    """A learning rate that jumps far out of a small ball: every step leaves it before the projection (so
    the projection is active), and every iterate the ascent continues from, and the final one, is within δ
    of w_ref over all parameters together (a projection onto the wrong centre, a per-tensor projection or a
    skipped one fails)."""
    config = _config()
    model, batches = _trained_client(config)
    reference = _flat(model.parameters())
    radius = 0.05
    settings = run_config.resolve(config, {"pga-lr": 5.0, "pga-momentum": 0.0, "pga-clip-norm": 0.0,
                                           "pga-stop-accuracy": 0.0, "pga-epochs": 2, "batch-size": 64})
    iterates = _Iterates(model, monkeypatch)
    n = sum(len(y) for _, y in batches)
    update = create_method("pga", settings).solve(model, batches, _context(0, n, radius))
    steps = update.diagnostics["optimizer_steps"]
    assert steps == 2 * math.ceil(n / 64) == len(iterates.after_step) == len(iterates.at_forward)
    assert all(float((x - reference).norm()) > 2 * radius for x in iterates.after_step)
    assert update.diagnostics["projected_steps"] == steps
    final = reference + _flat(update.delta)
    for x in iterates.at_forward[1:] + [final]:
        assert float((x - reference).norm()) <= radius * (1 + 1e-6)
    assert float((final - reference).norm()) == pytest.approx(radius, rel=1e-5)  # on the boundary
    torch.testing.assert_close(iterates.at_forward[0], reference)  # the first gradient is taken at w_ref
    assert max(update.diagnostics["distance_by_step"]) <= radius * (1 + 1e-6)


def test_early_stopping_stops_at_the_first_check_at_or_below_tau(monkeypatch):
    """Accuracies of every iterate computed here: the ascent ends at the first iterate whose accuracy on the
    client's data is ≤ τ (every earlier one is above it; τ is an accuracy one iterate has exactly, so "<"
    fails); with τ = 0 it runs every epoch; with τ at or above the reference's accuracy it takes no step."""
    config = _config()
    model, batches = _trained_client(config)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    n = sum(len(y) for _, y in batches)
    probe = build_federation(config).new_model()
    reference_accuracy = _accuracy(probe, start, batches)
    common = {"pga-lr": 0.5, "pga-momentum": 0.0, "pga-epochs": 4, "batch-size": 64}

    full = create_method("pga", run_config.resolve(config, {**common, "pga-stop-accuracy": 0.0})).solve(
        model, batches, _context(0, n, radius=1e6))
    per_epoch = math.ceil(n / 64)
    assert full.diagnostics["optimizer_steps"] == 4 * per_epoch and not full.diagnostics["stopped_early"]
    final_accuracy = full.diagnostics["final_forget_accuracy"]
    assert final_accuracy < reference_accuracy - 0.2
    # τ = an accuracy an iterate really has (k / n), the first one below the midpoint: at that iterate
    # "≤ τ" stops and "< τ" would not.
    midpoint = (reference_accuracy + final_accuracy) / 2
    tau = next(accuracy for _, accuracy in full.diagnostics["accuracy_checks"] if accuracy < midpoint)

    model.load_state_dict(start)
    iterates = _Iterates(model, monkeypatch)
    stopped = create_method("pga", run_config.resolve(config, {**common, "pga-stop-accuracy": tau})).solve(
        model, batches, _context(0, n, radius=1e6))
    steps = stopped.diagnostics["optimizer_steps"]
    assert stopped.diagnostics["stopped_early"] and 0 < steps < 4 * per_epoch
    names = [name for name, _ in probe.named_parameters()]

    def accuracy_at(flat):
        state, offset = dict(start), 0
        for name in names:
            size = start[name].numel()
            state[name] = flat[offset:offset + size].view_as(start[name]).float()
            offset += size
        return _accuracy(probe, state, batches)

    reference = _flat(start[name] for name in names)
    assert accuracy_at(reference + _flat(stopped.delta)) <= tau
    assert all(accuracy_at(x) > tau for x in iterates.at_forward)  # w_ref and every iterate before the last step
    assert stopped.diagnostics["final_forget_accuracy"] == pytest.approx(accuracy_at(reference + _flat(stopped.delta)))

    model.load_state_dict(start)
    none = create_method("pga", run_config.resolve(config, {**common, "pga-stop-accuracy": reference_accuracy})).solve(
        model, batches, _context(0, n, radius=1e6))
    assert none.diagnostics["optimizer_steps"] == 0 and all(float(d.abs().max()) == 0 for d in none.delta)


# --- through the ClientApp on the in-process grid ------------------------------------------------------


def _capture_unlearn_messages(grid):
    """The model and config of every train.unlearn message the grid delivers."""
    captured = []
    original = grid.send_and_receive

    def send_and_receive(messages, timeout=None):
        messages = list(messages)
        for message in messages:
            if message.metadata.message_type == UNLEARN:
                captured.append((grid.partition_of_node[message.metadata.dst_node_id],
                                 message.content["arrays"].to_torch_state_dict(), dict(message.content["config"])))
        return original(messages, timeout=timeout)

    grid.send_and_receive = send_and_receive
    return captured


def _last_local_models(federation, config, start, partitions, rounds):
    """FedAvg by hand for rounds − 1 rounds, then each client's local model of the last round."""
    before_last = fedavg_by_hand(federation, config, start, partitions, rounds - 1)
    models = {}
    for k in partitions:
        model = federation.new_model()
        model.load_state_dict(before_last)
        train_local(model, federation.client_data(k), federation.local_training, torch.device("cpu"),
                    seed=derive_seed(config["seed"], "train", rounds, k))
        models[k] = model.state_dict()
    return models


def test_the_deleted_client_alone_starts_from_the_example_weighted_mean_of_the_others_last_local_models(tmp_path):
    """w_ref written out: the last round's local models from local training by hand, averaged over the
    clients that stay with their example counts. Using θ*, including the deleted client, equal weights or
    another round fails. Only the deleted client gets train.unlearn, with the server's radius, which is the
    authors' rule: δ² = mean ‖w_ref − r_k‖² / 3 over fresh initialisations r_k."""
    config = _config(tmp_path)
    grid, port, federation = grid_port(config)
    method = create_method("pga", config)
    trained = port.train(list(port.clients), port.initial_state, 3, seed=0, hooks=method.training_hooks()).state
    captured = _capture_unlearn_messages(grid)
    outcome = method.unlearn(port, Deletion(forget_clients=(1,), trained_state=trained, trained_rounds=3))
    assert grid.partitions_sent(UNLEARN) == [1] and [c[0] for c in captured] == [1]
    _, sent_model, sent_config = captured[0]

    locals_ = _last_local_models(federation, config, port.initial_state, [0, 1, 2, 3], 3)
    sizes = {k: len(federation.client_data(k)) for k in range(4)}
    others = sum(sizes[k] for k in (0, 2, 3))
    expected = {name: sum(locals_[k][name] * (sizes[k] / others) for k in (0, 2, 3)) for name in trained}
    unweighted = {name: sum(locals_[k][name] for k in (0, 2, 3)) / 3 for name in trained}
    for name in trained:
        torch.testing.assert_close(sent_model[name], expected[name], rtol=1e-5, atol=1e-6)
        # θ*, including client 1, is not w_ref; neither is the equal-weight mean (the clients' sizes differ).
        assert float((trained[name] - expected[name]).abs().max()) > 1e-4
        assert float((unweighted[name] - expected[name]).abs().max()) > 1e-4

    # The radius: fresh initialisations seeded from the run seed, distances over the parameters.
    reference = [expected[name] for name, _ in federation.new_model().named_parameters()]
    distances = []
    for index in range(10):
        torch.manual_seed(derive_seed(config["seed"], "pga-random-model", index))
        distances.append(float((_flat(reference) - _flat(federation.new_model().parameters())).norm()))
    assert len({round(d, 6) for d in distances}) == 10  # ten different models
    assert sent_config["pga-radius"] == pytest.approx(math.sqrt(sum(d * d for d in distances) / 10 / 3), rel=1e-5)
    assert outcome.details["radius"] == sent_config["pga-radius"]
    assert outcome.communication_rounds == 1 and outcome.affected_clients == [1]
    assert outcome.details["reference_clients"] == [0, 2, 3] and outcome.details["reference_round"] == 3
    assert outcome.details["reference_distance_from_trained"] > 0
    assert outcome.headline["storage_bytes"] == 4 * sum(t.numel() * 4 for t in trained.values())  # one round kept

    # The other averaging rule: the mean distance, not the root mean square.
    plain = create_method("pga", run_config.resolve(config, {"pga-radius-average": "distance"}))
    plain.last_round = method.last_round
    assert plain.unlearn(port, Deletion(forget_clients=(1,), trained_state=trained, trained_rounds=3)).details["radius"] == \
        pytest.approx(sum(distances) / 10 / 3, rel=1e-5)


def test_the_radius_in_the_request_is_what_the_client_projects_onto(tmp_path, monkeypatch):
    """pga-radius set small: the client's solve sees it in its request, and the unlearned model lies on that
    sphere around w_ref (the ascent would go farther), not on one of a radius the client made up."""
    config = _config(tmp_path, **{"pga-radius": 0.02, "pga-stop-accuracy": 0.0})
    grid, port, _ = grid_port(config)
    method = create_method("pga", config)
    trained = port.train(list(port.clients), port.initial_state, 3, seed=0, hooks=method.training_hooks()).state
    seen = []
    original = ProjectedGradientAscent.solve

    def spy(self, model, forget_batches, context):
        seen.append((context.partition_id, dict(context.request)))
        return original(self, model, forget_batches, context)

    monkeypatch.setattr(ProjectedGradientAscent, "solve", spy)
    captured = _capture_unlearn_messages(grid)
    outcome = method.unlearn(port, Deletion(forget_clients=(2,), trained_state=trained, trained_rounds=3))
    assert [(k, request["pga-radius"]) for k, request in seen] == [(2, 0.02)]
    assert outcome.details["random_model_distances"] == []  # no random models needed
    reference = captured[0][1]
    names = [name for name in trained]
    distance = float((_flat(outcome.state[n] for n in names) - _flat(reference[n] for n in names)).norm())
    assert distance == pytest.approx(0.02, rel=1e-4) == outcome.details["distance_from_reference"]
    assert outcome.details["clients"]["2"]["projected_steps"] > 0


def test_several_deleted_clients_each_ascend_from_the_same_reference_and_are_averaged_by_examples(tmp_path):
    config = _config(tmp_path, **{"pga-stop-accuracy": 0.0, "pga-epochs": 2, "pga-lr": 0.05})
    grid, port, federation = grid_port(config)
    method = create_method("pga", config)
    trained = port.train(list(port.clients), port.initial_state, 3, seed=0, hooks=method.training_hooks()).state
    captured = _capture_unlearn_messages(grid)
    outcome = method.unlearn(port, Deletion(forget_clients=(2, 0), trained_state=trained, trained_rounds=3))
    assert sorted(k for k, _, _ in captured) == [0, 2]
    reference, radius = captured[0][1], captured[0][2]["pga-radius"]
    assert all(torch.equal(captured[1][1][name], reference[name]) for name in reference) and captured[1][2]["pga-radius"] == radius
    assert outcome.details["reference_clients"] == [1, 3]
    sizes = {k: len(federation.client_data(k)) for k in (0, 2)}
    expected = {name: tensor.clone() for name, tensor in reference.items()}
    for k in (0, 2):
        model = federation.new_model()
        model.load_state_dict(reference)
        update = method.solve(model, batches_of(federation.client_data(k), config["curvature-batch-size"]), _context(k, sizes[k], radius))
        for name, delta in zip(update.param_names, update.delta):
            expected[name] = expected[name] + sizes[k] / (sizes[0] + sizes[2]) * delta
    for name in expected:
        torch.testing.assert_close(outcome.state[name], expected[name], rtol=1e-5, atol=1e-6)
    assert outcome.affected_clients == [0, 2] and outcome.communication_rounds == 1
    assert outcome.details["distance_from_reference"] <= radius * (1 + 1e-6)


def test_pga_refuses_without_the_last_round_or_when_no_remaining_client_trained_in_it(tmp_path):
    config = _config(tmp_path, **{"fraction-train": 0.5})
    _, port, _ = grid_port(config)
    trained = port.train(list(port.clients), port.initial_state, 3, seed=0).state
    with pytest.raises(UnlearningFailed, match="kept no client models"):
        create_method("pga", config).unlearn(port, Deletion(forget_clients=(1,), trained_state=trained, trained_rounds=3))
    method = create_method("pga", config)
    trained = port.train(list(port.clients), port.initial_state, 3, seed=0, hooks=method.training_hooks()).state
    last = sorted(method.last_round.client_states)
    assert len(last) == 2  # half the clients trained in round 3
    with pytest.raises(UnlearningFailed, match="no remaining client trained in round 3"):
        method.unlearn(port, Deletion(forget_clients=tuple(last), trained_state=trained, trained_rounds=3))
    with pytest.raises(UnlearningFailed, match="round 3, the trained model of round 2"):
        method.unlearn(port, Deletion(forget_clients=(last[0],), trained_state=trained, trained_rounds=2))


def test_the_job_subscribes_the_hook_and_applies_pga_in_one_round(tmp_path):
    """The seam: FederatedJob runs pga from the unlearn-methods list (its hook sees training), the ledger
    says applied, results carry the radius and the ascent's record."""
    config = _config(tmp_path, **{"unlearn-methods": "pga", "forget-clients": "3", "noise-floor": False})
    grid = FakeGrid(build_client_app(bound_config=config), 4)
    record = FederatedJob(grid, config, None, None).run()
    entry = record.methods["pga"]
    assert entry["communication_rounds"] == 1 and entry["affected_clients"] == [3]
    assert entry["details"]["reference_round"] == 3 and entry["details"]["radius"] > 0
    assert entry["details"]["distance_from_reference"] <= entry["details"]["radius"] * (1 + 1e-6)
    assert "forget_accuracy_by_epoch" in entry["details"] and record.communication["train_unlearn_sent_to"] == [3]
    events = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert [e["status"] for e in events] == ["pending", "applied"]


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("pga-lr", 0.0, "a number > 0"),
        ("pga-epochs", 0, "an integer >= 1"),
        ("pga-stop-accuracy", 1.5, "a number in [0, 1]"),
        ("pga-radius-fraction", -0.1, "a number > 0"),
        ("pga-radius-average", "cube", "squared-distance, distance"),
        ("pga-momentum", 1.0, "a number in [0, 1)"),
        ("pga-random-models", 0, "an integer >= 1"),
        ("pga-radius", -1.0, "a number >= 0"),
        ("pga-clip-norm", -5.0, "a number >= 0"),
    ],
)
def test_bad_pga_values_name_the_key_the_value_and_the_valid_choices(key, value, fragment):
    with pytest.raises(ConfigError) as error:
        run_config.resolve({key: value})
    message = str(error.value)
    assert f"'{key}'" in message and repr(value) in message and fragment in message
