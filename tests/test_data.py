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


# --- forget-share and exclusive-class: a deleted client whose data matters -------------------------

def _as_lists(partitioning):
    return [rows.tolist() for rows in partitioning.client_indices]


@pytest.mark.parametrize("scheme", ["dirichlet", "iid"])
def test_forget_share_gives_the_holder_an_exact_stratified_share(digits, scheme):
    labels = digits.train_labels
    share, holder = 0.15, 3
    partitioning = partition_labels(labels, 10, scheme, 0.5, 10, seed=0, holder=holder, forget_share=share)
    held = partitioning.rows_of(holder)
    assert len(held) == round(share * len(labels)) == 216  # 0.15 x 1437 = 215.55
    held_counts = np.bincount(labels[held], minlength=10)
    all_counts = np.bincount(labels, minlength=10)
    for label in range(10):  # each class contributes its share, rounded down or up
        assert np.floor(share * all_counts[label]) <= held_counts[label] <= np.ceil(share * all_counts[label])
    rows = np.concatenate(partitioning.client_indices)
    assert np.array_equal(np.sort(rows), np.arange(len(labels)))  # every example once, nobody else holds these


@pytest.mark.parametrize("scheme", ["dirichlet", "iid"])
def test_other_clients_split_the_rest_as_the_scheme_says_whoever_holds_the_share(digits, scheme):
    labels = digits.train_labels
    by_holder = {
        holder: partition_labels(labels, 10, scheme, 0.5, 10, seed=0, holder=holder, forget_share=0.2) for holder in (0, 6)
    }
    held = by_holder[0].rows_of(0)
    assert np.array_equal(held, by_holder[6].rows_of(6))  # the sample does not depend on who holds it
    rest = np.setdiff1d(np.arange(len(labels)), held)
    plain = partition_labels(labels[rest], 9, scheme, 0.5, 10, seed=0)  # the scheme on the rest, 9 clients
    expected = [rest[part].tolist() for part in plain.client_indices]
    assert _as_lists(by_holder[0])[1:] == expected
    assert _as_lists(by_holder[6])[:6] + _as_lists(by_holder[6])[7:] == expected


def test_forget_share_sample_is_seeded_and_survives_the_caches(digits, monkeypatch, tmp_path):
    labels = digits.train_labels
    settings = dict(holder=2, forget_share=0.12)
    monkeypatch.delenv("FEDUNLEARN_CACHE", raising=False)
    partition_module._cached_partition.cache_clear()
    computed = partition_labels(labels, 10, "dirichlet", 0.5, 10, seed=4, **settings)
    monkeypatch.setenv("FEDUNLEARN_CACHE", str(tmp_path))
    for _ in range(2):  # computed and stored on disk, then read back from disk
        partition_module._cached_partition.cache_clear()
        assert _as_lists(partition_labels(labels.copy(), 10, "dirichlet", 0.5, 10, seed=4, **settings)) == _as_lists(computed)
    assert list((tmp_path / "partitions").glob("*.npz"))
    other_seed = partition_labels(labels, 10, "dirichlet", 0.5, 10, seed=5, **settings)
    assert not np.array_equal(other_seed.rows_of(2), computed.rows_of(2))
    other_share = partition_labels(labels, 10, "dirichlet", 0.5, 10, seed=4, holder=2, forget_share=0.13)
    assert len(other_share.rows_of(2)) == round(0.13 * len(labels)) != len(computed.rows_of(2))


def test_keys_off_leave_the_plain_partition_bit_for_bit(digits):
    labels = digits.train_labels
    plain = partition_labels(labels, 10, "dirichlet", 0.5, 10, seed=0)
    off = partition_labels(labels, 10, "dirichlet", 0.5, 10, seed=0, holder=7, forget_share=0.0, exclusive_class=-1)
    assert _as_lists(off) == _as_lists(plain)


@pytest.mark.parametrize("scheme", ["dirichlet", "iid"])
def test_exclusive_class_lives_only_and_wholly_at_the_holder(digits, scheme):
    labels = digits.train_labels
    holder, exclusive = 4, 7
    partitioning = partition_labels(labels, 10, scheme, 0.5, 10, seed=0, holder=holder, exclusive_class=exclusive)
    histograms = partitioning.label_histograms(labels, 10)
    assert histograms[holder][exclusive] == int(np.sum(labels == exclusive))  # all of it there
    assert all(histogram[exclusive] == 0 for client, histogram in enumerate(histograms) if client != holder)
    # The other classes are split over all ten clients exactly as the scheme splits them alone.
    rest = np.flatnonzero(labels != exclusive)
    plain = partition_labels(labels[rest], 10, scheme, 0.5, 10, seed=0)
    for client, part in enumerate(plain.client_indices):
        own = partitioning.rows_of(client)
        assert sorted(own[labels[own] != exclusive].tolist()) == sorted(rest[part].tolist())
    again = partition_labels(labels.copy(), 10, scheme, 0.5, 10, seed=0, holder=holder, exclusive_class=exclusive)
    assert _as_lists(again) == _as_lists(partitioning)


@pytest.mark.parametrize("settings, key", [
    (dict(forget_share=1.0), "forget-share"),
    (dict(forget_share=-0.1), "forget-share"),
    (dict(forget_share=0.0001), "forget-share"),  # round(0.0001 x 1437) = 0 examples
    (dict(forget_share=0.1, exclusive_class=3), "exclusive-class"),
    (dict(forget_share=0.1, holder=10), "forget-clients"),
    (dict(exclusive_class=3, holder=-1), "forget-clients"),
])
def test_impossible_holder_settings_are_config_errors(digits, settings, key):
    with pytest.raises(ConfigError) as caught:
        partition_labels(digits.train_labels, 10, "iid", 0.5, 10, seed=0, **settings)
    assert caught.value.key == key


def test_a_share_or_class_needs_clients_besides_the_holder(digits):
    for settings in (dict(forget_share=0.1), dict(exclusive_class=0)):
        with pytest.raises(ConfigError) as caught:
            partition_labels(digits.train_labels, 1, "iid", 0.5, 10, seed=0, **settings)
        assert caught.value.key == "num-clients"


def test_an_exclusive_class_without_examples_is_a_config_error_naming_the_classes():
    labels = np.repeat(np.arange(3), 20)
    with pytest.raises(ConfigError) as caught:
        partition_labels(labels, 4, "iid", seed=0, exclusive_class=5)
    assert caught.value.key == "exclusive-class" and caught.value.choices == ["-1 (off)", 0, 1, 2]


def _federation_config(**overrides):
    from fedunlearn import config as run_config

    return run_config.resolve({"num-clients": 10, "partition": "iid"}, overrides)


def test_build_federation_gives_the_first_of_forget_clients_the_data():
    from fedunlearn.federation import build_federation

    federation = build_federation(_federation_config(**{"forget-share": 0.15, "forget-clients": "3,1"}))
    assert federation.partitioning.sizes[3] == 216
    federation = build_federation(_federation_config(**{"exclusive-class": 9, "forget-clients": " 5, 0"}))
    labels = federation.data.train_labels
    assert set(np.flatnonzero(labels == 9)) <= set(federation.partitioning.rows_of(5).tolist())


@pytest.mark.parametrize("overrides, key, hint", [
    ({"exclusive-class": 10}, "exclusive-class", "0..9"),
    ({"forget-share": 0.1, "forget-clients": ""}, "forget-clients", "0..9"),
    ({"forget-share": 0.1, "forget-clients": "12"}, "forget-clients", "0..9"),
    ({"exclusive-class": 2, "forget-clients": "x"}, "forget-clients", "0..9"),
])
def test_build_federation_checks_the_holder_against_the_data_and_clients(overrides, key, hint):
    from fedunlearn.federation import build_federation

    with pytest.raises(ConfigError) as caught:
        build_federation(_federation_config(**overrides))
    assert caught.value.key == key and hint in caught.value.one_line()
