"""finetune: k FedAvg rounds on the remaining clients from θ*, checked against FedAvg written out."""

import torch

from clients.client_app import build_client_app
from fake_grid import FakeGrid, fedavg_by_hand, grid_port
from fedunlearn import config as run_config
from fedunlearn.environment import quiet_logging
from fedunlearn.unlearning import Deletion, create_method
from strategies.server_app import FederatedJob

quiet_logging()


def _config(tmp_path):
    return run_config.resolve({"model": "logreg", "num-clients": 4, "num-rounds": 2, "local-epochs": 1, "mia-shadows": 0,
                               "retrain-cache": False, "out-dir": str(tmp_path), "unlearn-methods": "finetune",
                               "forget-clients": "1", "finetune-rounds": 2})


def test_finetune_continues_fedavg_on_the_remaining_clients_from_the_trained_model(tmp_path):
    config = _config(tmp_path)
    grid, port, federation = grid_port(config)
    trained = port.train([0, 1, 2, 3], port.initial_state, 2, seed=0).state
    before = len(grid.sent)
    outcome = create_method("finetune", config).unlearn(port, Deletion(forget_clients=(1,), trained_state=trained, trained_rounds=2))
    # Rounds 3 and 4 (they continue training's numbering) on clients 0, 2, 3, from θ*.
    reference = fedavg_by_hand(federation, config, trained, [0, 2, 3], 2, first_round=3)
    for name in reference:
        torch.testing.assert_close(outcome.state[name], reference[name], rtol=1e-5, atol=1e-6)
    assert sorted({partition for _, partition in grid.sent[before:]}) == [0, 2, 3]
    assert outcome.communication_rounds == 2 and outcome.headline["client_trainings"] == 6


def test_finetune_runs_in_the_job_and_is_logged_under_its_phase(tmp_path):
    config = _config(tmp_path)
    record = FederatedJob(FakeGrid(build_client_app(bound_config=config), 4), config, None, None).run()
    entry = record.methods["finetune"]
    assert entry["client_trainings"] == 6 and "kl_to_retrain" in entry
    logged = [e["partition"] for e in record.communication["log"] if e["phase"] == "unlearning: finetune"]
    assert sorted(logged) == [0, 0, 2, 2, 3, 3]
