import numpy as np
import pytest
import torch

from fedunlearn.data import load_dataset, partition_labels
from fedunlearn.data import partition as partition_module
from fedunlearn.errors import ConfigError


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_is_a_fixed_stratified_split_of_all_1797_images(digits):
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert len(digits.train) + len(digits.test) == 1797
    assert digits.train.tensors[0].shape[1:] == (1, 8, 8)
    assert digits.train.tensors[0].dtype == torch.float32 and digits.train.tensors[1].dtype == torch.int64
    test_share = np.bincount(digits.test.tensors[1].numpy(), minlength=10) / len(digits.test)
    assert np.all(np.abs(test_share - 0.1) < 0.02)
    # Standardised with the training split's statistics.
    assert abs(float(digits.train.tensors[0].mean())) < 1e-5


def test_partition_sizes_add_up_and_every_client_holds_data(digits):
    labels = digits.train_labels
    for scheme, alpha in (("dirichlet", 0.1), ("dirichlet", 0.5), ("iid", 1.0)):
        partitioning = partition_labels(labels, 10, scheme, alpha, min_size=10, seed=0)
        rows = np.concatenate(partitioning.client_indices)
        assert sum(partitioning.sizes) == len(labels)
        assert np.array_equal(np.sort(rows), np.arange(len(labels)))  # each example exactly once
        assert min(partitioning.sizes) >= 10


def _mean_label_entropy(histograms) -> float:
    entropies = []
    for histogram in np.asarray(histograms, dtype=float):
        share = histogram / histogram.sum()
        share = share[share > 0]
        entropies.append(-(share * np.log(share)).sum())
    return float(np.mean(entropies))


def test_small_alpha_skews_label_histograms(digits):
    labels = digits.train_labels
    skewed = partition_labels(labels, 10, "dirichlet", 0.1, 10, 0).label_histograms(labels, 10)
    mild = partition_labels(labels, 10, "dirichlet", 100.0, 10, 0).label_histograms(labels, 10)
    uniform_entropy = np.log(10)
    assert _mean_label_entropy(mild) > 0.95 * uniform_entropy
    assert _mean_label_entropy(skewed) < 0.6 * uniform_entropy
    # With alpha=0.1 most clients miss at least one class entirely.
    assert sum(1 for histogram in skewed if 0 in histogram) >= 5


def test_same_seed_same_partitions_other_seed_other_partitions(digits, monkeypatch):
    monkeypatch.delenv("FEDUNLEARN_CACHE", raising=False)  # recompute, do not read a cached answer
    labels = digits.train_labels
    first = partition_labels(labels, 10, "dirichlet", 0.5, 10, seed=7)
    partition_module._cached_partition.cache_clear()
    again = partition_labels(labels.copy(), 10, "dirichlet", 0.5, 10, seed=7)
    other = partition_labels(labels, 10, "dirichlet", 0.5, 10, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first.client_indices, again.client_indices))
    assert not all(np.array_equal(a, b) for a, b in zip(first.client_indices, other.client_indices))


def test_every_example_is_addressable_as_client_and_local_index(digits):
    partitioning = partition_labels(digits.train_labels, 5, "dirichlet", 0.5, 10, 0)
    for client in range(5):
        for local_index in (0, partitioning.sizes[client] - 1):
            row = partitioning.global_index(client, local_index)
            assert partitioning.address_of(row) == (client, local_index)
    with pytest.raises(ConfigError):
        partitioning.global_index(5, 0)
    with pytest.raises(ConfigError):
        partitioning.global_index(0, partitioning.sizes[0])


def test_impossible_partition_is_a_config_error(digits):
    with pytest.raises(ConfigError) as caught:
        partition_labels(digits.train_labels, 100, "dirichlet", 0.05, min_size=20, seed=0)
    assert caught.value.key == "min-partition-size"
    with pytest.raises(ConfigError):
        partition_labels(digits.train_labels, 5000, "iid", 1.0, 10, 0)
