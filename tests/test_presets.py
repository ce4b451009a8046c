"""The benchmark presets (simulations/*.toml) and the controls they use: the lr schedule (``lr-decay``)
and the partition controls (tests/test_data.py checks the partitions themselves)."""

from __future__ import annotations

import io
import tomllib
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from fedunlearn import config as run_config
from fedunlearn.federation import build_federation
from fedunlearn.training import derive_seed, objective, round_lr, train_local
from simulations import preset_paths

BENCHMARK_PRESETS = ("large-deletion", "exclusive-class", "converged", "fashion-mnist")
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


# --- the lr schedule -----------------------------------------------------------------------------

def test_round_lr_decays_geometrically():
    assert round_lr(0.1, 0.5, 1) == 0.1
    assert round_lr(0.1, 0.5, 4) == pytest.approx(0.1 * 0.5**3)
    assert round_lr(0.1, 0.5, 22) == pytest.approx(0.1 * 0.5**21)  # fine-tuning goes on decaying
    assert round_lr(0.1, 1.0, 500) == 0.1
    with pytest.raises(ValueError):
        round_lr(0.1, 0.5, 0)


def _schedule_config(**overrides):
    return run_config.resolve(
        {"model": "logreg", "num-clients": 4, "partition": "iid", "lr": 0.2, "lr-decay": 0.5, "momentum": 0.0,
         "local-epochs": 1, "batch-size": 1024, "num-rounds": 6},
        overrides,
    )


@pytest.mark.parametrize("server_round, overrides, exponent", [
    (1, {}, 0),
    (4, {}, 3),
    (8, {}, 7),  # fine-tuning after the 6 training rounds goes on decaying
])
def test_the_optimizer_of_a_round_steps_with_that_rounds_lr(server_round, overrides, exponent):
    config = _schedule_config(**overrides)
    federation = build_federation(config)
    settings = federation.local_training_for(server_round)
    assert settings.lr == pytest.approx(0.2 * 0.5**exponent)
    # One full-batch SGD step without momentum through train_local: θ − lr·∇f(θ), with that lr.
    data = Subset(federation.client_data(0), list(range(32)))
    model = federation.initial_model()
    start = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    inputs = torch.stack([data[i][0] for i in range(32)])
    targets = torch.stack([data[i][1] for i in range(32)])
    model.zero_grad()
    objective(model, model(inputs), targets).backward()
    expected = {name: start[name] - 0.2 * 0.5**exponent * parameter.grad for name, parameter in model.named_parameters()}
    model.load_state_dict(start)
    train_local(model, data, settings, torch.device("cpu"), seed=1)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.detach(), expected[name], rtol=1e-5, atol=1e-7)


def test_clients_train_each_round_with_its_scheduled_lr(tmp_path):
    """FedAvg through the real ClientApp (in-process grid) equals FedAvg by hand with the schedule."""
    from fake_grid import grid_port
    from fedunlearn.environment import quiet_logging

    quiet_logging()
    config = _schedule_config(**{"out-dir": str(tmp_path), "batch-size": 32, "momentum": 0.9, "mia-shadows": 0})
    _, port, federation = grid_port(config)
    training = port.train([0, 1, 2, 3], port.initial_state, 3, seed=5, first_round=1)
    state = {name: tensor.clone() for name, tensor in port.initial_state.items()}
    for server_round in (1, 2, 3):
        models, sizes = [], []
        for client in range(4):
            model = federation.new_model()
            model.load_state_dict(state)
            data = federation.client_data(client)
            seed = derive_seed(config["seed"], "train", server_round, client)
            train_local(model, data, federation.local_training_for(server_round), torch.device("cpu"), seed=seed)
            models.append(model.state_dict())
            sizes.append(len(data))
        state = {name: sum(m[name] * (n / sum(sizes)) for m, n in zip(models, sizes)) for name in state}
    for name in state:
        torch.testing.assert_close(training.state[name], state[name], rtol=1e-5, atol=1e-6)


# --- the presets ---------------------------------------------------------------------------------

def _preset(name: str) -> dict:
    from fedunlearn.cli import resolve_job

    return resolve_job(name, None, "", "/tmp/unused-out-dir")


def test_every_preset_parses_resolves_and_describes_itself():
    from fedunlearn.cli import main

    assert set(BENCHMARK_PRESETS) <= set(preset_paths())
    listing = io.StringIO()
    with redirect_stdout(listing):
        assert main(["presets"]) == 0
    for name, path in preset_paths().items():
        with path.open("rb") as handle:
            document = tomllib.load(handle)
        assert document.get("description"), f"{name} has no description"
        assert name in listing.getvalue() and document["description"] in listing.getvalue()
        config = _preset(name)
        assert config["mia-shadows"] <= 2 and config["mia-shadow-epochs"] <= 20  # evaluation stays modest


def test_converged_is_the_default_setting_with_only_the_schedule_changed():
    default, converged = _preset("default"), _preset("converged")
    changed = {key for key in default if default[key] != converged[key]} - {"out-dir"}
    assert changed == {"num-rounds", "lr", "lr-decay"}
    assert converged["lr-decay"] < 1 and converged["num-rounds"] > default["num-rounds"]
    for name in ("large-deletion", "exclusive-class"):  # the deletion benchmarks train on the same schedule
        assert {key: _preset(name)[key] for key in changed} == {key: converged[key] for key in changed}


def test_large_deletion_gives_the_deleted_client_at_least_a_tenth_of_the_data():
    config = _preset("large-deletion")
    assert (config["dataset"], config["model"], config["num-clients"]) == ("digits", "simple-cnn", 10)
    assert config["lr-decay"] < 1
    federation = build_federation(config)
    holder = int(config["forget-clients"].split(",")[0])
    assert federation.partitioning.sizes[holder] >= 0.10 * len(federation.data.train)


def test_exclusive_class_preset_deletes_the_only_holder_of_a_class():
    config = _preset("exclusive-class")
    federation = build_federation(config)
    labels, holder = federation.data.train_labels, int(config["forget-clients"].split(",")[0])
    histograms = federation.partitioning.label_histograms(labels, federation.data.num_classes)
    exclusive = config["exclusive-class"]
    assert histograms[holder][exclusive] == int(np.sum(labels == exclusive)) > 0
    assert sum(histogram[exclusive] for histogram in histograms) == histograms[holder][exclusive]


def test_fashion_mnist_preset_reads_debians_folder():
    config = _preset("fashion-mnist")
    assert config["dataset"] == "fashion-mnist" and Path(config["data-dir"]) == FASHION_MNIST_DEBIAN
    if not (FASHION_MNIST_DEBIAN / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    federation = build_federation(config)
    assert len(federation.data.train) == 60_000 and len(federation.data.test) == 10_000
    assert federation.data.input_shape == (1, 28, 28)
