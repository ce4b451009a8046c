"""FedEraser as the authors' code runs it (unlearning / unlearning_step_once in IAMGaoyangLiu/FedEraser):
the first stored round averaged, ceil(r × E) calibration epochs, the weighted means of the stored and the
calibration updates rescaled per tensor (not each client's), and, in each stored round, the clients of
that round that remain (fraction-train < 1). The references here are computed by hand or with local
training written out, not with the module's own helpers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fake_grid import grid_port
from fedunlearn import config as run_config
from fedunlearn.environment import quiet_logging
from fedunlearn.errors import ConfigError
from fedunlearn.models import build_model
from fedunlearn.training import derive_seed, train_local
from fedunlearn.unlearning import Deletion, create_method
from fedunlearn.unlearning.api import Every
from fedunlearn.unlearning.history import StoredRound
from fedunlearn.unlearning.methods.federaser import CALIBRATION_SALT, calibrated_step, calibration_epochs, replay

quiet_logging()


class _FixedClients:
    """Calibration that returns given updates (by replayed round) added to the model it is sent."""

    def __init__(self, fresh_updates):
        self.fresh_updates = fresh_updates  # {round: {client: {name: update}}}
        self.calls = []

    def calibrate(self, state, partitions, epochs, replayed_round):
        self.calls.append((replayed_round, list(partitions), epochs))
        return {k: {name: state[name] + self.fresh_updates[replayed_round][k][name] for name in state} for k in partitions}


def _t(*values):
    return torch.tensor(values, dtype=torch.float32)


# --- the first stored round ---------------------------------------------------------------------------


def test_the_first_stored_round_is_the_weighted_mean_of_the_remaining_stored_updates_uncalibrated():
    start = {"w": _t(1.0, -1.0), "b": _t(0.5)}
    updates = {0: {"w": _t(3.0, 0.0), "b": _t(1.0)}, 1: {"w": _t(100.0, 100.0), "b": _t(100.0)}, 2: {"w": _t(0.0, 6.0), "b": _t(-2.0)}}
    clients = _FixedClients({})
    state, details = replay({1: StoredRound(start, updates)}, remaining=[0, 2], sizes={0: 10, 1: 50, 2: 30}, clients=clients, epochs=3)
    # (10·U_0 + 30·U_2) / 40, added to the round's global model; client 1 (deleted) is not in it.
    torch.testing.assert_close(state["w"], _t(1.0 + 0.75, -1.0 + 4.5))
    torch.testing.assert_close(state["b"], _t(0.5 + (10 * 1.0 - 30 * 2.0) / 40))
    assert clients.calls == [] and details["calibrated_rounds"] == [] and details["replayed_rounds"] == [1]


def test_replaying_only_round_one_through_the_client_app_is_the_fedavg_round_without_the_deleted_client(tmp_path):
    """One stored round: the unlearned model is round 1 of FedAvg over the remaining clients, by hand."""
    config = run_config.resolve({"model": "logreg", "num-clients": 4, "num-rounds": 1, "local-epochs": 2, "mia-shadows": 0,
                                 "retrain-cache": False, "out-dir": str(tmp_path), "federaser-interval": 1})
    grid, port, federation = grid_port(config)
    method = create_method("federaser", config)
    trained = port.train(list(port.clients), port.initial_state, 1, seed=0, hooks=port.history_hooks([method.requirements])).state
    before = len(grid.sent)
    outcome = method.unlearn(port, Deletion(forget_clients=(2,), trained_state=trained, trained_rounds=1))
    assert grid.sent[before:] == [] and outcome.communication_rounds == 0
    models, sizes = [], []
    for k in (0, 1, 3):
        model = federation.new_model()
        model.load_state_dict(port.initial_state)
        train_local(model, federation.client_data(k), federation.local_training, torch.device("cpu"), seed=derive_seed(config["seed"], "train", 1, k))
        models.append(model.state_dict())
        sizes.append(len(federation.client_data(k)))
    for name in outcome.state:
        expected = sum(m[name] * (n / sum(sizes)) for m, n in zip(models, sizes))
        torch.testing.assert_close(outcome.state[name], expected, rtol=1e-5, atol=1e-6)


# --- calibration epochs ---------------------------------------------------------------------------------


def test_calibration_epochs_are_the_ceiling_of_ratio_times_local_epochs():
    assert calibration_epochs(0.5, 5) == 3  # round() gave 2
    assert calibration_epochs(0.5, 10) == 5
    assert calibration_epochs(0.5, 1) == 1
    assert calibration_epochs(0.25, 5) == 2
    assert calibration_epochs(1.0, 5) == 5
    assert calibration_epochs(0.3, 10) == 3  # 0.3 × 10 = 3.0000000000000004 in floats: not a 4th epoch


# --- aggregate, then normalise ---------------------------------------------------------------------------


STORED = {0: {"w": _t(2.0, 0.0), "b": _t(1.0)}, 1: {"w": _t(0.0, 2.0), "b": _t(3.0)}}
FRESH = {0: {"w": _t(1.0, 0.0), "b": _t(-1.0)}, 1: {"w": _t(0.0, 3.0), "b": _t(-1.0)}}
HALVES = {0: 0.5, 1: 0.5}


def test_the_aggregates_are_rescaled_per_tensor_not_each_client():
    step = calibrated_step(STORED, FRESH, HALVES, ["w", "b"])
    # w: stored mean (1, 1), norm √2; fresh mean (0.5, 1.5), norm √2.5 → √2 · (0.5, 1.5) / √2.5.
    torch.testing.assert_close(step["w"], _t(0.5, 1.5) * math.sqrt(2 / 2.5))
    # b on its own: stored mean 2, fresh mean −1 → −2 (its norm is not mixed with w's).
    torch.testing.assert_close(step["b"], _t(-2.0))


def test_per_client_normalisation_is_the_other_option_and_differs_on_the_same_example():
    step = calibrated_step(STORED, FRESH, HALVES, ["w", "b"], normalise="per-client")
    # Each client: its stored norm (2, 2) along its own direction ((1, 0), (0, 1)), then the mean.
    torch.testing.assert_close(step["w"], _t(1.0, 1.0))
    torch.testing.assert_close(step["b"], _t(-0.5 * 1.0 - 0.5 * 3.0))
    assert not torch.allclose(step["w"], calibrated_step(STORED, FRESH, HALVES, ["w"])["w"])


def test_a_zero_calibration_aggregate_takes_no_step():
    fresh = {0: {"w": _t(1.0, 0.0)}, 1: {"w": _t(-1.0, 0.0)}}
    step = calibrated_step({0: {"w": _t(1.0, 1.0)}, 1: {"w": _t(1.0, 1.0)}}, fresh, HALVES, ["w"])
    assert torch.equal(step["w"], torch.zeros(2))


def test_replay_calibrates_the_later_rounds_from_the_unlearned_model_with_the_rounds_own_clients():
    start = {"w": _t(0.0, 0.0), "b": _t(0.0)}
    later_global = {"w": _t(9.0, 9.0), "b": _t(9.0)}  # the old trajectory's model: never stepped from
    stored = {
        1: StoredRound(start, {0: {"w": _t(2.0, 0.0), "b": _t(0.0)}, 1: {"w": _t(0.0, 2.0), "b": _t(0.0)}, 2: {"w": _t(5.0, 5.0), "b": _t(5.0)}}),
        3: StoredRound(later_global, {**STORED, 2: {"w": _t(7.0, 7.0), "b": _t(7.0)}}),
    }
    clients = _FixedClients({3: FRESH})
    state, details = replay(stored, remaining=[0, 1], sizes={0: 4, 1: 4, 2: 4}, clients=clients, epochs=2)
    assert clients.calls == [(3, [0, 1], 2)]
    first = _t(1.0, 1.0)  # round 1: the mean of clients 0 and 1
    torch.testing.assert_close(state["w"], first + _t(0.5, 1.5) * math.sqrt(2 / 2.5))
    torch.testing.assert_close(state["b"], _t(0.0) + _t(-2.0))
    assert details["replayed_rounds"] == [1, 3] and details["calibrated_rounds"] == [3]


def test_a_stored_round_without_a_remaining_client_is_skipped():
    start = {"w": _t(0.0, 0.0)}
    stored = {
        1: StoredRound(start, {1: {"w": _t(5.0, 5.0)}}),  # only the deleted client was sampled
        3: StoredRound({"w": _t(9.0, 9.0)}, {0: {"w": _t(3.0, 4.0)}, 1: {"w": _t(1.0, 1.0)}}),
        5: StoredRound({"w": _t(9.0, 9.0)}, {1: {"w": _t(1.0, 1.0)}}),
    }
    clients = _FixedClients({3: {0: {"w": _t(0.0, -1.0)}}})
    state, details = replay(stored, remaining=[0], sizes={0: 1, 1: 1}, clients=clients, epochs=1)
    # Round 1 leaves the start model; round 3 is calibrated from it (stored norm 5, fresh direction); round 5 has no one.
    torch.testing.assert_close(state["w"], _t(0.0, -5.0))
    assert clients.calls == [(3, [0], 1)]
    assert details["skipped_rounds"] == [1, 5] and details["replayed_rounds"] == [3]


def test_the_normalisation_key_takes_only_its_two_values():
    assert run_config.resolve({})["federaser-normalise"] == "aggregate"
    with pytest.raises(ConfigError, match="federaser-normalise.*valid: aggregate, per-client"):
        run_config.resolve({"federaser-normalise": "per-layer"})


# --- fraction-train < 1: each stored round's own remaining clients, through the ClientApp ----------------


def _by_hand(federation, config, stored, remaining):
    """FedEraser written out: round 1 averaged, then every stored round t's remaining clients train
    ceil(r·E) epochs at round t's lr (lr · decay^(t−1)), shuffled with the calibration's salt; aggregate, then rescale."""
    epochs = math.ceil(config["federaser-calibration-ratio"] * config["local-epochs"])
    rounds = sorted(stored)
    sizes = {k: len(federation.client_data(k)) for k in range(config["num-clients"])}
    state = None
    for index, t in enumerate(rounds):
        clients = sorted(k for k in stored[t].client_updates if k in remaining)
        if not clients:
            continue
        total = sum(sizes[k] for k in clients)
        old = {name: sum(stored[t].client_updates[k][name] * (sizes[k] / total) for k in clients) for name in stored[t].global_state}
        if index == 0:
            state = {name: stored[t].global_state[name] + old[name] for name in old}
            continue
        settings = federation.local_training
        settings = type(settings)(epochs=epochs, batch_size=settings.batch_size, momentum=settings.momentum,
                                  lr=config["lr"] * config["lr-decay"] ** (t - 1))
        new = {name: torch.zeros_like(value) for name, value in state.items()}
        for k in clients:
            model = federation.new_model()
            model.load_state_dict(state)
            train_local(model, federation.client_data(k), settings, torch.device("cpu"),
                        seed=derive_seed(config["seed"], "train", t, k, CALIBRATION_SALT))
            for name, value in model.state_dict().items():
                new[name] += (sizes[k] / total) * (value - state[name])
        state = {name: state[name] + old[name].norm() * new[name] / new[name].norm() for name in state}
    return state


def test_with_fraction_train_below_one_each_round_replays_its_own_remaining_clients(tmp_path):
    config = run_config.resolve({"model": "logreg", "num-clients": 5, "num-rounds": 7, "local-epochs": 5, "mia-shadows": 0,
                                 "retrain-cache": False, "out-dir": str(tmp_path), "federaser-interval": 2, "fraction-train": 0.6,
                                 "lr": 0.05, "lr-decay": 0.7})
    grid, port, federation = grid_port(config)
    method = create_method("federaser", config)
    trained = port.train(list(port.clients), port.initial_state, 7, seed=3, hooks=port.history_hooks([method.requirements])).state
    stored = port.history(Every("federaser-interval"))
    assert sorted(stored) == [1, 3, 5, 7] and all(len(entry.client_updates) == 3 for entry in stored.values())
    deleted = 1
    remaining = [k for k in range(5) if k != deleted]
    # The case the old code failed on (KeyError): a remaining client that was not sampled in a stored round.
    assert any(set(remaining) - set(entry.client_updates) for entry in stored.values())
    before = len(grid.sent)
    with port.phase("unlearning: federaser"):
        outcome = method.unlearn(port, Deletion(forget_clients=(deleted,), trained_state=trained, trained_rounds=7))
    expected_clients = {t: sorted(set(stored[t].client_updates) - {deleted}) for t in (3, 5, 7)}
    sent = grid.sent[before:]
    assert sent == [("train", k) for t in (3, 5, 7) for k in expected_clients[t]]
    assert outcome.communication_rounds == 3 and outcome.details["calibration_epochs"] == 3  # ceil(0.5 × 5); round() gave 2
    assert outcome.details["participants"] == {str(t): expected_clients[t] for t in (3, 5, 7)} | {"1": sorted(set(stored[1].client_updates) - {deleted})}
    reference = _by_hand(federation, config, stored, remaining)
    for name, value in reference.items():
        torch.testing.assert_close(outcome.state[name], value, rtol=1e-4, atol=1e-6)


# --- a real run -----------------------------------------------------------------------------------------


@pytest.mark.simulation
def test_federaser_stores_rounds_over_interval_times_clients_updates(tmp_path, project_cache):
    env = dict(os.environ, FEDUNLEARN_CACHE=str(project_cache), COLUMNS="160")
    run_config_text = "num-clients=4 num-rounds=5 federaser-interval=2 local-epochs=1 forget-clients=1 unlearn-methods=federaser mia-shadows=0"
    completed = subprocess.run(
        [sys.executable, "-m", "fedunlearn.cli", "run", "--run-config", run_config_text, "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    entry = results["methods"]["federaser"]
    stored_rounds = math.ceil(5 / 2)  # rounds 1, 3, 5
    assert entry["details"]["replayed_rounds"] == [1, 3, 5]
    model_bytes = sum(p.numel() * 4 for p in build_model("simple-cnn", (1, 8, 8), 10).state_dict().values())
    assert entry["storage_bytes"] == stored_rounds * 4 * model_bytes
    # Round 1 is averaged; each later stored round is one calibration round of the remaining clients.
    assert entry["communication_rounds"] == stored_rounds - 1
    calibration = [e for e in results["communication"]["log"] if e["phase"] == "unlearning: federaser"]
    assert len(calibration) == (stored_rounds - 1) * 3 and all(e["partition"] != 1 for e in calibration)
