"""The server side in seconds: strategy, port, hooks and each method's server logic against the real
ClientApp on an in-process grid (tests/fake_grid.py; no Ray). Real Ray / SuperLink runs stay in
their own tests; these check behaviour against references computed independently here."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from clients.client_app import build_client_app
from fake_grid import FakeGrid, fedavg_by_hand, grid_port
from fedunlearn import config as run_config
from fedunlearn.environment import quiet_logging
from fedunlearn.errors import UnlearningFailed
from fedunlearn.federation import build_federation
from fedunlearn.unlearning import ClientContext, Deletion, create_method
from fedunlearn.unlearning.api import UNLEARN, Every, TrainingHook
from fedunlearn.unlearning.causal import adaptive_scale, causal_weights
from fedunlearn.unlearning.history import RoundHistory
from fedunlearn.unlearning.objective import batches_of
from fedunlearn.unlearning.registry import _METHODS
from fedunlearn.unlearning.remaining import InProcessRemainingClients
from strategies.server_app import FederatedJob

quiet_logging()

BASE = {"model": "logreg", "num-clients": 4, "num-rounds": 3, "local-epochs": 1, "mia-shadows": 0, "retrain-cache": False}


def _config(tmp_path, **overrides):
    return run_config.resolve({**BASE, "out-dir": str(tmp_path)}, overrides)


def test_roster_maps_partitions_to_nodes_whatever_the_node_ids(tmp_path):
    config = _config(tmp_path)
    grid, port, _ = grid_port(config)
    assert sorted(port.clients) == [0, 1, 2, 3]
    for partition, info in port.clients.items():
        assert grid.partition_of_node[info.node_id] == partition  # node ids are not partition ids
        assert info.num_examples == len(build_federation(config).client_data(partition))


def test_port_train_is_fedavg_over_exactly_the_named_partitions(tmp_path):
    config = _config(tmp_path)
    grid, port, federation = grid_port(config)
    training = port.train([1, 3], port.initial_state, 2, seed=5, first_round=4)
    reference = fedavg_by_hand(federation, config, port.initial_state, [1, 3], 2, first_round=4)
    for name in reference:
        torch.testing.assert_close(training.state[name], reference[name], rtol=1e-5, atol=1e-6)
    assert sorted(set(grid.partitions_sent("train"))) == [1, 3]
    assert training.client_trainings == 4


def test_sampling_picks_the_same_partitions_in_any_node_order(tmp_path):
    config = _config(tmp_path, **{"fraction-train": 0.5})
    picks = []
    for reverse in (False, True):
        grid = FakeGrid(build_client_app(bound_config=config), 4)
        if reverse:
            grid.node_ids.reverse()
        _, port, _ = grid_port(config, grid)
        strategy = port.fedavg([0, 1, 2, 3], seed=11, evaluate_on_clients=False)
        port.run_fedavg(strategy, port.initial_state, 3)
        picks.append(strategy.trained_partitions)
    assert picks[0] == picks[1] and all(len(p) == 2 for p in picks[0].values())


class _Recorder(TrainingHook):
    def __init__(self):
        self.sent, self.returned = {}, {}

    def before_round(self, server_round, global_state, partitions):
        self.sent[server_round] = (copy.deepcopy(global_state), list(partitions))

    def after_round(self, server_round, client_states, num_examples):
        self.returned[server_round] = copy.deepcopy(dict(client_states))


def test_round_history_keeps_every_nth_round_with_each_clients_update(tmp_path):
    config = _config(tmp_path, **{"num-rounds": 5})
    _, port, _ = grid_port(config)
    history, recorder = RoundHistory(interval=2), _Recorder()
    port.train([0, 1, 2, 3], port.initial_state, 5, seed=0, hooks=[history, recorder])
    assert sorted(history.rounds) == [1, 3, 5]
    for server_round, stored in history.rounds.items():
        sent, _ = recorder.sent[server_round]
        assert sorted(stored.client_updates) == [0, 1, 2, 3]
        for k, update in stored.client_updates.items():
            for name, value in update.items():
                torch.testing.assert_close(value, recorder.returned[server_round][k][name] - sent[name])
    # Round 1's global model is the initial model.
    for name, value in history.rounds[1].global_state.items():
        torch.testing.assert_close(value, port.initial_state[name])


def test_send_fails_the_request_when_a_client_fails_or_is_silent(tmp_path):
    config = _config(tmp_path)
    for broken, message in (("fail", "told to fail"), ("silent", r"no reply from client\(s\) \[2\]")):
        grid, port, _ = grid_port(config)
        setattr(grid, broken, {2})
        with pytest.raises(UnlearningFailed, match=message):
            port.send("query.gradient", [1, 2], {"arrays": port.initial_state}, {"param-names": ["linear.weight"]})


def test_federated_objective_is_the_example_weighted_mean_of_the_named_clients(tmp_path):
    config = _config(tmp_path)
    _, port, federation = grid_port(config)
    model = federation.new_model()
    model.load_state_dict(port.initial_state)
    names = [name for name, _ in model.named_parameters()]
    remaining = [0, 2, 3]
    federated = port.remaining_objective(remaining, port.initial_state)
    local = InProcessRemainingClients(model, {k: batches_of(federation.client_data(k), config["curvature-batch-size"]) for k in remaining})
    for got, want in zip(federated.gradient(names), local.gradient(names)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    vector = [torch.randn_like(p) for p in model.parameters()]
    for got, want in zip(federated.curvature_product(names, vector, "ggn"), local.curvature_product(names, vector, "ggn")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert federated.rounds == 2


def _trained(port, config, rounds=3):
    return port.train(list(port.clients), port.initial_state, rounds, seed=0).state


def test_client_side_update_is_the_causally_weighted_scaled_sum_of_the_affected_clients_solves(tmp_path):
    """Two affected clients with different forget-gradient norms: swapping them, dropping the causal
    weight, flipping a sign or skipping the scaling changes θ_u."""
    config = _config(tmp_path, **{"scaling-constant": 0.5, "curvature": "ggn", "cg-iters": 5})
    grid, port, federation = grid_port(config)
    trained = _trained(port, config)
    method = create_method("hf-kcu", config)
    forget = (0, 2)
    outcome = method.unlearn(port, Deletion(forget_clients=forget, trained_state=trained, trained_rounds=3))
    assert grid.partitions_sent(UNLEARN) == [0, 2]  # causal routing: only the clients that held the data

    sizes = {k: len(federation.client_data(k)) for k in range(4)}
    remaining_examples = sum(sizes.values()) - sizes[0] - sizes[2]
    deltas, norms = {}, {}
    for k in forget:
        model = federation.new_model()
        model.load_state_dict(trained)
        context = ClientContext(partition_id=k, num_examples=sizes[k], total_examples=sum(sizes.values()),
                                influence_weight=sizes[k] / remaining_examples, seed=config["seed"], device=torch.device("cpu"))
        update = method.solve(model, batches_of(federation.client_data(k), config["curvature-batch-size"]), context)
        deltas[k], norms[k] = dict(zip(update.param_names, update.delta)), update.forget_gradient_norm
    assert abs(norms[0] - norms[2]) > 1e-3 * max(norms.values())  # the weights really differ from 1
    weights = causal_weights(norms, list(forget), range(4))
    assert weights[0] != pytest.approx(1.0)
    expected = {name: tensor.clone() for name, tensor in trained.items()}
    for k in forget:
        weighted = {name: weights[k] * value for name, value in deltas[k].items()}
        scale = adaptive_scale(list(weighted.values()), 0.5)
        assert scale < 1.0  # the scaling is active in this test
        for name, value in weighted.items():
            expected[name] = expected[name] + scale * value
    for name in expected:
        torch.testing.assert_close(outcome.state[name], expected[name], rtol=1e-5, atol=1e-7)


def test_the_ablation_without_causal_weighting_sums_the_clients_updates_with_equal_weights(tmp_path):
    # Without adaptive scaling the two runs differ only in the weights: on = w_k Δ_k with
    # w = |K| ‖g_k‖ / Σ‖g_j‖ (≠ 1 here), off = Δ_0 + Δ_2.
    runs = {}
    for weighting in ("on", "off"):
        config = _config(tmp_path / weighting, **{"scaling-constant": 0.0, "curvature": "ggn", "cg-iters": 5, "causal-weighting": weighting})
        _, port, _ = grid_port(config)
        trained = _trained(port, config)
        outcome = create_method("hf-kcu", config).unlearn(port, Deletion(forget_clients=(0, 2), trained_state=trained, trained_rounds=3))
        runs[weighting] = (trained, outcome)
    on, off = runs["on"][1], runs["off"][1]
    assert off.details["causal_weights"] == {"0": 1.0, "2": 1.0} and off.details["causal_weighting"] == "off"
    weights = {int(k): w for k, w in on.details["causal_weights"].items()}
    assert weights[0] != pytest.approx(1.0) and weights[0] + weights[2] == pytest.approx(2.0)
    # Per client, Δ_k = (on's norm before scaling) / w_k = off's norm: the same solves, other weights.
    for k in (0, 2):
        assert on.details["update_norms_before_scaling"][str(k)] == pytest.approx(weights[k] * off.details["update_norms_before_scaling"][str(k)], rel=1e-5)
    trained = runs["on"][0]
    assert any(not torch.allclose(on.state[name], off.state[name]) for name in trained)
    with pytest.raises(run_config.ConfigError, match="causal-weighting"):
        run_config.resolve({**BASE, "causal-weighting": "maybe"})


def test_a_variant_label_runs_the_method_with_its_own_keys_on_the_clients_too(tmp_path):
    # The label travels in train.unlearn; the client must apply cg-iters=1 from it, or its CG would
    # run the run's 5 iterations.
    config = _config(tmp_path, **{"curvature": "ggn", "cg-iters": 5, "unlearn-methods": "hf-kcu,hf-kcu[causal-weighting=off;cg-iters=1]"})
    _, port, _ = grid_port(config)
    trained = _trained(port, config)
    variant = create_method("hf-kcu[causal-weighting=off;cg-iters=1]", config)
    assert variant.name == "hf-kcu[causal-weighting=off;cg-iters=1]" and variant.config["cg-iters"] == 1
    assert variant.config["causal-weighting"] == "off" and config["cg-iters"] == 5
    outcome = variant.unlearn(port, Deletion(forget_clients=(0, 2), trained_state=trained, trained_rounds=3))
    assert outcome.details["causal_weighting"] == "off"
    assert all(client["cg_iterations"] == 1 for client in outcome.details["clients"].values())
    plain = create_method("hf-kcu", config).unlearn(port, Deletion(forget_clients=(0, 2), trained_state=trained, trained_rounds=3))
    assert all(client["cg_iterations"] > 1 for client in plain.details["clients"].values())
    for bad, named in (("hf-kcu[num-rounds=3]", "num-rounds"), ("hf-kcu[causal-weighting]", "key=value"),
                       ("hf-kcu[causal-weighting=maybe]", "causal-weighting"), ("hf-kcu,hf-kcu", "twice")):
        with pytest.raises(run_config.ConfigError, match=named):
            run_config.resolve({**BASE, "unlearn-methods": bad})


def test_hf_kcu_global_through_the_port_equals_the_in_process_solve(tmp_path):
    config = _config(tmp_path, **{"cg-iters": 5})
    _, port, federation = grid_port(config)
    trained = _trained(port, config)
    method = create_method("hf-kcu-global", config)
    outcome = method.unlearn(port, Deletion(forget_clients=(1,), trained_state=trained, trained_rounds=3))
    model = federation.new_model()
    model.load_state_dict(trained)
    local = InProcessRemainingClients(model, {k: batches_of(federation.client_data(k), config["curvature-batch-size"]) for k in (0, 2, 3)})
    update = method.server_step(model, local)
    for name, delta in zip(update.param_names, update.delta):
        torch.testing.assert_close(outcome.state[name], trained[name] + delta, rtol=1e-4, atol=1e-6)
    assert outcome.communication_rounds == update.communication_rounds == local.rounds
    assert outcome.details["queried_clients"] == [0, 2, 3]


def test_kfac_through_the_port_is_the_in_process_step_on_the_remaining_factors(tmp_path):
    # Deleting 1 and 3: the factors come from 0 and 2 (query.kfac_factors), the forget gradient is
    # the example-weighted mean of 1's and 3's (query.gradient), the weight n_f / n_rem.
    config = _config(tmp_path, **{"damping": 0.05})
    grid, port, federation = grid_port(config)
    trained = _trained(port, config)
    outcome = create_method("kfac", config).unlearn(port, Deletion(forget_clients=(3, 1), trained_state=trained, trained_rounds=3))
    assert grid.partitions_sent("query.kfac_factors") == [0, 2]
    assert grid.partitions_sent("query.gradient") == [1, 3]
    assert grid.partitions_sent("train.unlearn") == []
    model = federation.new_model()
    model.load_state_dict(trained)
    batches = {k: batches_of(federation.client_data(k), config["curvature-batch-size"]) for k in range(4)}
    sizes = {k: len(federation.client_data(k)) for k in range(4)}
    update = create_method("kfac", config).newton_step(
        model,
        InProcessRemainingClients(model, {k: batches[k] for k in (0, 2)}),
        InProcessRemainingClients(model, {k: batches[k] for k in (1, 3)}),
        (sizes[1] + sizes[3]) / (sizes[0] + sizes[2]),
    )
    for name, delta in zip(update.param_names, update.delta):
        assert float(delta.norm()) > 0
        torch.testing.assert_close(outcome.state[name], trained[name] + delta, rtol=1e-4, atol=1e-6)
    assert outcome.affected_clients == [1, 3] and outcome.communication_rounds == 1
    assert outcome.details["queried_clients"] == [0, 2]


def test_federaser_replays_the_stored_rounds_on_the_remaining_clients_only(tmp_path):
    config = _config(tmp_path, **{"num-rounds": 5, "federaser-interval": 2})
    grid, port, _ = grid_port(config)
    method = create_method("federaser", config)
    hooks = port.history_hooks([method.requirements])
    trained = port.train(list(port.clients), port.initial_state, 5, seed=0, hooks=hooks).state
    assert sorted(port.history(Every("federaser-interval"))) == [1, 3, 5]
    before = len(grid.sent)
    with port.phase("unlearning: federaser"):
        outcome = method.unlearn(port, Deletion(forget_clients=(1,), trained_state=trained, trained_rounds=5))
    calibration = grid.sent[before:]
    # Round 1 is averaged (no message); rounds 3 and 5 are one calibration round each.
    assert len(calibration) == 2 * 3 and {partition for _, partition in calibration} == {0, 2, 3}
    assert outcome.communication_rounds == 2
    assert outcome.headline["storage_bytes"] == 3 * 4 * sum(t.numel() * 4 for t in trained.values())
    # Without the history, FedEraser refuses instead of replaying nothing.
    _, fresh_port, _ = grid_port(config)
    with pytest.raises(UnlearningFailed, match="no training updates"):
        create_method("federaser", config).unlearn(fresh_port, Deletion(forget_clients=(1,), trained_state=trained, trained_rounds=5))


def test_a_method_registered_in_one_place_runs_through_the_job(tmp_path):
    """The seam: a method the strategy has never heard of, with a training hook and a client part."""
    from fedunlearn.unlearning import register
    from fedunlearn.unlearning.api import Requirements
    from fedunlearn.unlearning.client_side import ClientSideMethod

    seen_rounds = []

    class Counter(TrainingHook):
        def after_round(self, server_round, client_states, num_examples):
            seen_rounds.append((server_round, sorted(client_states)))

    @register("test-zero-step")
    class ZeroStep(ClientSideMethod):
        requirements = Requirements(client_solve=True, per_round_statistics=True)

        def training_hooks(self):
            return [Counter()]

        def solve(self, model, forget_batches, context):
            from fedunlearn.unlearning.api import ClientUpdate

            names = [name for name, _ in model.named_parameters()]
            return ClientUpdate(names, [torch.zeros_like(p) for p in model.parameters()], 1.0, context.num_examples,
                                diagnostics={"partition": context.partition_id})

    try:
        config = _config(tmp_path, **{"unlearn-methods": "test-zero-step", "forget-clients": "2"})
        grid = FakeGrid(build_client_app(bound_config=config), 4)
        record = FederatedJob(grid, config, None, None).run()
    finally:
        _METHODS.pop("test-zero-step")
    assert seen_rounds == [(1, [0, 1, 2, 3]), (2, [0, 1, 2, 3]), (3, [0, 1, 2, 3])]
    entry = record.methods["test-zero-step"]
    assert entry["details"]["clients"]["2"]["partition"] == 2
    assert entry["test_accuracy"] == record.methods["original"]["test_accuracy"]  # a zero step changes nothing
    events = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert [e["status"] for e in events] == ["pending", "applied"]


def test_job_on_the_in_process_grid_fails_one_method_and_applies_the_others(tmp_path):
    config = _config(tmp_path, **{"unlearn-methods": "hf-kcu-global,kfac-forget", "forget-clients": "1"})
    grid = FakeGrid(build_client_app(bound_config=config), 4)
    job = FederatedJob(grid, config, None, None)
    # Client 1 (the deleted one) fails once training is over: kfac-forget (train.unlearn to it) fails,
    # hf-kcu-global (queries to the others) is applied.
    original_send = grid.send_and_receive

    def failing_after_training(messages, timeout=None):
        messages = list(messages)
        if any(m.metadata.message_type == UNLEARN for m in messages):
            grid.fail = {1}
        return original_send(messages, timeout=timeout)

    grid.send_and_receive = failing_after_training
    record = job.run()
    assert "failed" in record.methods["kfac-forget"] and "kl_to_retrain" in record.methods["hf-kcu-global"]
    statuses = [(e["status"], e.get("method")) for e in map(json.loads, (tmp_path / "ledger.jsonl").read_text().splitlines())]
    assert statuses == [("pending", None), ("applied", "hf-kcu-global"), ("failed", "kfac-forget")]
    assert record.communication["train_unlearn_sent_to"] == [1]


def test_kfac_mpo_solves_the_wide_layer_with_the_mpo_where_proposition_2_holds(tmp_path):
    """simple-cnn-wide on digits: fc1's A is 2049 x 2049 (2048 inputs + bias), the only factor above
    mpo-threshold. At the default damping the MPO fails Proposition 2 and the dense solve is used; at three
    times the measured spectral truncation error it holds and the MPO really solves. Then only fc1's
    update may differ from the dense kfac's, and by less than A's curvature is worth: measured 0.57 on
    fc1.weight (0.13 on fc1.bias), where replacing the ALS solve by the curvature-free B / damping gives 0.80."""
    config = _config(tmp_path, **{"model": "simple-cnn-wide", "dataset": "digits"})
    _, port, _ = grid_port(config)
    trained = _trained(port, config)
    deletion = Deletion(forget_clients=(1,), trained_state=trained, trained_rounds=3)

    def unlearn(name, **overrides):
        return create_method(name, run_config.resolve({**config, **overrides})).unlearn(port, deletion)

    default = unlearn("kfac-mpo").details["server"]["layers"]
    a = default["fc1"]["A"]
    assert a["dim"] == 2049 and a["border"] == 1 and a["modes"] == [4, 4, 4, 4, 4, 2]
    assert not a["prop2"]["holds"] and a["fallback"] == "dense" and a["truncation_error"] == 0.0
    assert a["mpo_truncation_error"] > 0
    assert all(default[layer][f]["solver"] == "dense" for layer in default for f in "AG" if (layer, f) != ("fc1", "A"))
    damping = 3 * a["prop2"]["spectral_error"]
    mpo = unlearn("kfac-mpo", damping=damping, **{"prop2-fallback": "raise"})
    dense = unlearn("kfac", damping=damping)
    a = mpo.details["server"]["layers"]["fc1"]["A"]
    assert a["prop2"]["holds"] and "fallback" not in a and a["truncation_error"] > 0 and a["als"]["sweeps"] >= 1
    for name in trained:
        mpo_step, dense_step = mpo.state[name] - trained[name], dense.state[name] - trained[name]
        assert float(dense_step.norm()) > 0
        difference = float((mpo_step - dense_step).norm() / dense_step.norm())
        if name.startswith("fc1."):
            assert 0 < difference < 0.7, name
        else:
            assert difference < 1e-6, name
