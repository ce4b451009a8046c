"""MNIST-1D: generated offline, cached, balanced, seeded; the models that take 1-D signals learn on it."""

import random

import numpy as np
import pytest
import torch

from fedunlearn import config as run_config
from fedunlearn import retrain_cache
from fedunlearn.curvature.kfac import kfac_layers
from fedunlearn.data import datasets, load_dataset, partition_labels
from fedunlearn.data import mnist1d as mnist1d_module
from fedunlearn.data.backdoor import Trigger
from fedunlearn.errors import ConfigError
from fedunlearn.models import build_model
from fedunlearn.training import LocalTrainingConfig, loss_and_accuracy, train_local


@pytest.fixture(scope="module")
def cache(project_cache):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDUNLEARN_CACHE", str(project_cache))
        yield project_cache


@pytest.fixture(scope="module")
def signals(cache):
    return load_dataset("mnist1d")  # the default: 20,000 signals


def test_default_is_20000_signals_of_length_40_split_80_20(signals):
    assert run_config.defaults()["mnist1d-samples"] == 20000
    assert signals.input_shape == (1, 40) and signals.num_classes == 10
    assert len(signals.train) == 16000 and len(signals.test) == 4000
    assert signals.train.tensors[0].shape == (16000, 1, 40) and signals.test.tensors[0].shape == (4000, 1, 40)
    assert signals.train.tensors[0].dtype == torch.float32 and signals.train.tensors[1].dtype == torch.int64
    # Standardised with the training split's statistics.
    assert abs(float(signals.train.tensors[0].mean())) < 1e-4
    assert float(signals.train.tensors[0].std()) == pytest.approx(1.0, abs=1e-3)


def test_every_class_has_a_tenth_of_the_signals_and_of_each_split(signals):
    train_counts = np.bincount(signals.train.tensors[1].numpy(), minlength=10)
    test_counts = np.bincount(signals.test.tensors[1].numpy(), minlength=10)
    assert (train_counts + test_counts).tolist() == [2000] * 10  # the generator makes each class equally often
    assert np.all(np.abs(train_counts / 16000 - 0.1) < 0.01)
    assert np.all(np.abs(test_counts / 4000 - 0.1) < 0.02)


def test_generation_is_deterministic_and_leaves_the_global_generators_alone(cache):
    random.seed(123)
    np.random.seed(123)
    expected_python, expected_numpy = random.random(), np.random.rand()
    random.seed(123)
    np.random.seed(123)
    first = mnist1d_module._generate(1000)
    second = mnist1d_module._generate(1000)
    # make_dataset seeds both global generators with 42; ours are back where they were.
    assert random.random() == expected_python and np.random.rand() == expected_numpy
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert np.array_equal(first[name], second[name])
    assert first["train_x"].shape == (800, 40) and first["test_x"].shape == (200, 40)
    # The test split is held out: no training signal appears in it.
    assert not {row.tobytes() for row in first["train_x"]} & {row.tobytes() for row in first["test_x"]}


def test_the_cached_file_holds_what_the_generator_makes(cache):
    datasets._cached_load.cache_clear()
    small = load_dataset("mnist1d", samples=1000)
    path = mnist1d_module._cache_path(1000)
    assert path.parent == cache / "datasets" and path.exists()
    generated = mnist1d_module._generate(1000)
    with np.load(path) as stored:
        for name in ("train_x", "train_y", "test_x", "test_y"):
            assert np.array_equal(stored[name], generated[name])
    assert np.array_equal(small.train.tensors[1].numpy(), generated["train_y"])
    # A second process (a Ray actor) reads the file instead of generating again.
    datasets._cached_load.cache_clear()
    again = load_dataset("mnist1d", samples=1000)
    assert torch.equal(again.train.tensors[0], small.train.tensors[0])
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_sample_count_is_a_checked_key_and_part_of_the_retrain_cache_key():
    config = run_config.resolve({"dataset": "mnist1d", "mnist1d-samples": 30000})
    assert config["mnist1d-samples"] == 30000
    with pytest.raises(ConfigError) as caught:
        run_config.resolve({"mnist1d-samples": 50})
    assert caught.value.key == "mnist1d-samples" and "an integer >= 100" in caught.value.one_line()
    other = dict(config, **{"mnist1d-samples": 20000})
    assert retrain_cache.retrain_key(config, [0], 5) != retrain_cache.retrain_key(other, [0], 5)


def test_dirichlet_partitions_of_the_training_signals_cover_them_once(signals):
    labels = signals.train_labels
    partitioning = partition_labels(labels, 100, "dirichlet", 0.5, min_size=10, seed=0)
    rows = np.concatenate(partitioning.client_indices)
    assert np.array_equal(np.sort(rows), np.arange(len(labels)))
    assert min(partitioning.sizes) >= 10


@pytest.mark.parametrize("name", ["logreg", "cnn1d"])
def test_signal_models_map_a_batch_to_logits_with_gradients(name):
    torch.manual_seed(0)
    model = build_model(name, (1, 40), 10)
    logits = model(torch.randn(5, 1, 40))
    assert logits.shape == (5, 10) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_cnn1d_layers_are_all_covered_by_kfac():
    model = build_model("cnn1d", (1, 40), 10)
    names = [name for name, _ in model.named_parameters()]
    layers, uncovered = kfac_layers(model, names)
    assert sorted(layers) == ["conv1", "conv2", "conv3", "fc"] and uncovered == []


def test_cnn1d_is_a_1d_convolution():
    # Conv2d with a 1 x k kernel over a height-1 map is Conv1d with the same weights.
    torch.manual_seed(0)
    model = build_model("cnn1d", (1, 40), 10)
    x = torch.randn(4, 1, 40)
    conv1d = torch.nn.functional.conv1d(x, model.conv1.weight.squeeze(2), model.conv1.bias, stride=2, padding=1)
    assert torch.allclose(model.conv1(x.unsqueeze(2)).squeeze(2), conv1d, atol=1e-6)


@pytest.mark.parametrize("name", ["simple-cnn", "resnet18", "vit-lite"])
def test_an_image_only_model_on_signals_is_a_config_error_naming_the_valid_ones(name):
    with pytest.raises(ConfigError) as caught:
        build_model(name, (1, 40), 10)
    error = caught.value
    assert error.key == "model" and error.value == name and error.choices == ["cnn1d", "logreg"]
    assert "1-D signals" in error.one_line() and "\n" not in error.one_line()


def _ray_sessions() -> set[str]:
    from fedunlearn.environment import ray_temp_dir

    return {path.name for path in ray_temp_dir().glob("session_*")}


def test_cli_refuses_an_image_model_on_mnist1d_in_one_line_before_ray_starts(run_cli, cache, tmp_path):
    sessions_before = _ray_sessions()
    completed = run_cli("run", "--run-config", "dataset=mnist1d mnist1d-samples=1000 model=simple-cnn", "--out", "out")
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert completed.stderr.strip().splitlines() == [
        (
            "fedunlearn: bad value for 'model': 'simple-cnn' (it needs 2-D images; the data set gives 1-D signals "
            "of shape (1, 40)); valid: cnn1d, logreg"
        )
    ]
    assert _ray_sessions() == sessions_before  # no Ray session was started
    assert not (tmp_path / "out").exists()


def test_backdoor_trigger_on_signals_is_a_run_of_samples_at_one_end():
    signals = torch.zeros(3, 1, 40)
    right = Trigger(4, "bottom-right", 9.0).stamp(signals)
    left = Trigger(4, "top-left", 9.0).stamp(signals)
    assert torch.all(right[..., 36:] == 9.0) and torch.all(right[..., :36] == 0)
    assert torch.all(left[..., :4] == 9.0) and torch.all(left[..., 4:] == 0)
    with pytest.raises(ConfigError) as caught:
        Trigger(41, "bottom-right", 9.0).stamp(signals)
    assert caught.value.key == "trigger-size"


@pytest.mark.parametrize(("name", "epochs", "floor"), [("logreg", 2, 0.25), ("cnn1d", 5, 0.6)])
def test_models_learn_well_above_chance_in_a_few_epochs(signals, name, epochs, floor):
    torch.manual_seed(0)
    model = build_model(name, signals.input_shape, signals.num_classes)
    before = loss_and_accuracy(model, signals.test, torch.device("cpu"))["accuracy"]
    train_local(model, signals.train, LocalTrainingConfig(epochs, 64, 0.01, 0.9), torch.device("cpu"), seed=0)
    after = loss_and_accuracy(model, signals.test, torch.device("cpu"))["accuracy"]
    assert before < 0.2  # ten classes: an untrained model guesses
    assert after > floor
