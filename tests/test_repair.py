"""Repair rounds (``repair-rounds``): k FedAvg rounds on the remaining clients after a method's update,
against FedAvg written out by hand, and through the job: only remaining clients train, the rounds are
counted in the method's cost, a per-method variant repairs one method and not the other."""

from __future__ import annotations

import pytest
import torch

from clients.client_app import build_client_app
from fake_grid import FakeGrid, fedavg_by_hand, grid_port
from fedunlearn import config as run_config
from fedunlearn.environment import quiet_logging
from fedunlearn.errors import ConfigError
from fedunlearn.unlearning import Deletion, create_method
from fedunlearn.unlearning.api import Outcome
from fedunlearn.unlearning.repair import repair
from strategies.server_app import FederatedJob

quiet_logging()

BASE = {"model": "logreg", "num-clients": 4, "num-rounds": 3, "local-epochs": 1, "mia-shadows": 0, "retrain-cache": False,
        "noise-floor": False}


def _config(tmp_path, **overrides):
    return run_config.resolve({**BASE, "out-dir": str(tmp_path)}, overrides)


def test_repair_is_fedavg_of_the_remaining_clients_from_the_methods_model_continuing_the_rounds(tmp_path):
    config = _config(tmp_path)
    grid, port, federation = grid_port(config)
    trained = port.train(list(port.clients), port.initial_state, 3, seed=0).state
    # Some method's model: the trained one moved off along a fixed direction.
    moved = {name: tensor + 0.3 * torch.ones_like(tensor) for name, tensor in trained.items()}
    outcome = Outcome(state=moved, affected_clients=[1], communication_rounds=1)
    before = len(grid.sent)
    seconds = repair(port, Deletion(forget_clients=(1,), trained_state=trained, trained_rounds=3), outcome, 2)
    assert grid.sent[before:] == [("train", k) for _ in range(2) for k in (0, 2, 3)]
    # Rounds 4 and 5 (the run's numbering goes on: shuffling seeds and lr of those rounds), client 1 left out.
    expected = fedavg_by_hand(federation, config, moved, [0, 2, 3], 2, first_round=4)
    for name in expected:
        torch.testing.assert_close(outcome.state[name], expected[name], rtol=1e-5, atol=1e-6)
    assert outcome.communication_rounds == 3 and seconds > 0
    assert outcome.details["repair"]["client_trainings"] == 6 and outcome.details["repair"]["clients"] == [0, 2, 3]
    assert outcome.headline["repair_client_trainings"] == 6


def test_no_rounds_or_no_single_model_leaves_the_outcome_alone(tmp_path):
    config = _config(tmp_path)
    grid, port, _ = grid_port(config)
    deletion = Deletion(forget_clients=(1,), trained_state=port.initial_state, trained_rounds=3)
    outcome = Outcome(state=dict(port.initial_state), affected_clients=[1], communication_rounds=1)
    before = len(grid.sent)
    assert repair(port, deletion, outcome, 0) == 0.0 and outcome.details == {} and outcome.communication_rounds == 1
    ensemble = Outcome(state=None, affected_clients=[1], communication_rounds=1, predictor=torch.nn.Identity())
    assert repair(port, deletion, ensemble, 2) == 0.0 and ensemble.state is None
    assert "skipped" in ensemble.details["repair"] and len(grid.sent) == before


def test_repair_rounds_is_a_per_method_key_and_checked():
    config = run_config.resolve({})
    assert config["repair-rounds"] == 0
    assert create_method("hf-kcu[repair-rounds=2]", config).config["repair-rounds"] == 2
    assert create_method("hf-kcu", config).config["repair-rounds"] == 0
    with pytest.raises(ConfigError, match="repair-rounds"):
        run_config.resolve({"repair-rounds": -1})
    with pytest.raises(ConfigError, match="repair-rounds"):
        create_method("hf-kcu[repair-rounds=two]", config)


def test_the_job_repairs_the_variant_only_on_remaining_clients_and_counts_the_rounds(tmp_path):
    config = _config(tmp_path, **{"unlearn-methods": "naive-ga,naive-ga[repair-rounds=2]", "forget-clients": "1", "ga-epochs": 3})
    record = FederatedJob(FakeGrid(build_client_app(bound_config=config), 4), config, None, None).run()
    plain, repaired = record.methods["naive-ga"], record.methods["naive-ga[repair-rounds=2]"]
    assert plain["communication_rounds"] == 1 and repaired["communication_rounds"] == 3
    assert "repair" not in plain["details"] and repaired["details"]["repair"]["rounds"] == 2
    # What each cost the clients: the ascent is one train.unlearn to client 1; repair adds 2 rounds x 3 trainings.
    assert (plain["client_trainings"], plain["client_computations"]) == (0, 1)
    assert plain["client_messages"] == {"train.unlearn": 1}
    assert (repaired["client_trainings"], repaired["client_computations"]) == (6, 7)
    assert record.methods["original"]["client_trainings"] == 3 * 4 and record.methods["retrain"]["client_trainings"] == 3 * 3
    log = record.communication["log"]
    repair_messages = [e for e in log if e["phase"] == "repair: naive-ga[repair-rounds=2]"]
    assert sorted(e["partition"] for e in repair_messages) == [0, 0, 2, 2, 3, 3]
    assert all(e["type"] == "train" for e in repair_messages)
    assert not [e for e in log if e["phase"] == "repair: naive-ga"]
    # The same ascent, then two rounds of the remaining clients' training: closer to retrain than the ascent alone.
    assert repaired["kl_to_retrain"] < plain["kl_to_retrain"]


def test_a_client_failing_in_the_repair_rounds_fails_that_method_not_the_run(tmp_path):
    """FedAvg (Flower's) averages whatever replies come back; a repair round that lost a client is not the
    repair asked for (and one that lost all of them gave an empty model): the variant fails, its request
    is logged failed, the unrepaired method and the retrain are unaffected."""
    config = _config(tmp_path, **{"unlearn-methods": "naive-ga,naive-ga[repair-rounds=2]", "forget-clients": "1", "ga-epochs": 1})
    grid = FakeGrid(build_client_app(bound_config=config), 4)
    original_send, armed = grid.send_and_receive, []

    def failing_first_repair_round(messages, timeout=None):
        messages = list(messages)
        types = {m.metadata.message_type for m in messages}
        if "train.unlearn" in types:
            armed.append(True)
        grid.fail = {2} if armed == [True, True] and types == {"train"} else set()
        if types == {"train"} and armed == [True, True]:
            armed.append(False)  # only the first repair round's batch
        return original_send(messages, timeout=timeout)

    grid.send_and_receive = failing_first_repair_round
    record = FederatedJob(grid, config, None, None).run()
    failed = record.methods["naive-ga[repair-rounds=2]"]["failed"]
    assert "1 client training(s) failed" in failed and "round 4" in failed and "told to fail" in failed
    assert "kl_to_retrain" in record.methods["naive-ga"] and "kl_to_retrain" in record.methods["retrain"]
