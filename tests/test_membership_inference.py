"""Membership inference: detects data an overfit model saw, is at chance on data no model saw.

Small MLPs on digits keep every test at a few seconds; the attack code is architecture-agnostic.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import Subset

from fedunlearn.data import load_dataset, partition_labels
from fedunlearn.metrics import MembershipInference, auc_and_success, class_matching_weights
from fedunlearn.metrics.membership import attack_features
from fedunlearn.training import LocalTrainingConfig, train_local

OVERFIT = LocalTrainingConfig(epochs=100, batch_size=32, lr=0.05, momentum=0.9)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two cores shared with other jobs: one thread avoids oversubscription stalls.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def trained(data, settings=OVERFIT, seed=1) -> nn.Module:
    torch.manual_seed(seed)
    model = mlp()
    train_local(model, data, settings, torch.device("cpu"), seed=seed)
    return model


# --- the scoring, on scores we know --------------------------------------------------------------


def test_auc_and_success_on_known_scores():
    assert auc_and_success(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == (1.0, 1.0)
    assert auc_and_success(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == (0.0, 0.5)  # success >= chance
    auc, success = auc_and_success(np.zeros(5), np.zeros(7))
    assert auc == 0.5 and success == 0.5
    # One overlap: members {2, 4}, non-members {1, 3}; 3 of 4 pairs ranked right.
    auc, success = auc_and_success(np.array([2.0, 4.0]), np.array([1.0, 3.0]))
    assert auc == pytest.approx(0.75) and success == pytest.approx(0.75)


def test_success_is_the_best_balanced_accuracy_over_thresholds():
    rng = np.random.default_rng(0)
    members, nonmembers = rng.normal(0.5, 1, 40), rng.normal(0, 1, 90)
    best = max(
        ((members >= t).mean() + (nonmembers < t).mean()) / 2
        for t in np.concatenate([members, nonmembers, [np.inf]])
    )
    assert auc_and_success(members, nonmembers)[1] == pytest.approx(best)


def test_set_sizes_do_not_change_auc_or_success():
    rng = np.random.default_rng(1)
    members, nonmembers = rng.normal(1, 1, 30), rng.normal(0, 1, 50)
    assert auc_and_success(members, nonmembers) == pytest.approx(auc_and_success(members, np.tile(nonmembers, 7)))


def test_class_matching_removes_a_label_skew_that_is_not_membership():
    # Class 0 is "easy" (high score) for members and non-members alike; members are mostly class 0.
    member_labels = np.array([0] * 30 + [1] * 10)
    nonmember_labels = np.array([0] * 50 + [1] * 50 + [2] * 20)
    score_of_class = np.array([2.0, 0.0, -1.0])
    members, nonmembers = score_of_class[member_labels], score_of_class[nonmember_labels]
    assert auc_and_success(members, nonmembers)[0] > 0.65  # the skew alone looks like membership
    weights = class_matching_weights(member_labels, nonmember_labels)
    assert auc_and_success(members, nonmembers, *weights) == pytest.approx((0.5, 0.5))
    # Class 2 has no member to compare with; classes only members have get weight 0.
    assert np.all(weights[1][nonmember_labels == 2] == 0)
    assert np.all(class_matching_weights(np.array([0, 3]), np.array([0, 1]))[0] == [1, 0])
    with pytest.raises(ValueError, match="share no class"):
        class_matching_weights(np.array([0, 0]), np.array([1, 2]))


def test_attack_features_are_finite_for_extreme_logits():
    logits = torch.tensor([[1000.0, -1000.0, 0.0], [0.0, 0.0, 0.0]])
    features = attack_features(logits, torch.tensor([1, 2]))
    assert features.shape == (2, 3 + 4) and np.all(np.isfinite(features))


# --- on digits ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overfit_setting(digits):
    """A model fitted hard to half of one client's data; shadows from rows no one else uses."""
    partitioning = partition_labels(digits.train_labels, 10, "iid", seed=0)
    client_rows = partitioning.rows_of(3)
    seen, unseen = client_rows[: len(client_rows) // 2], client_rows[len(client_rows) // 2 :]
    pool_rows = np.concatenate([partitioning.rows_of(k) for k in (5, 6)])
    model = trained(Subset(digits.train, seen.tolist()))
    attack = MembershipInference(mlp, Subset(digits.train, pool_rows.tolist()), OVERFIT, seed=0).fit()
    return model, attack, Subset(digits.train, seen.tolist()), Subset(digits.train, unseen.tolist())


def test_overfit_model_gives_its_training_data_away(digits, overfit_setting):
    model, attack, seen, _ = overfit_setting
    result = attack.attack(model, seen, digits.test)
    print("overfit:", {key: value for key, value in result.items() if key.startswith("mia")})
    assert result["mia_loss_auc"] > 0.65 and result["mia_shadow_auc"] > 0.65
    assert result["mia_loss_success"] > 0.6 and result["mia_shadow_success"] > 0.6
    assert attack.summary["shadow_in_accuracy"] > attack.summary["shadow_out_accuracy"]


def test_data_the_model_never_saw_is_at_chance(digits, overfit_setting):
    model, attack, _, unseen = overfit_setting
    result = attack.attack(model, unseen, digits.test)
    print("unseen:", {key: value for key, value in result.items() if key.startswith("mia")})
    for key in ("mia_auc", "mia_loss_auc", "mia_shadow_auc"):
        assert abs(result[key] - 0.5) < 0.1, key


def test_retrained_model_is_at_chance_on_the_deleted_client(digits):
    """The issue's check: a model trained without client k cannot tell k's data from test data.

    Dirichlet partition (label-skewed client), so this also exercises the class matching.
    """
    partitioning = partition_labels(digits.train_labels, 10, "dirichlet", 0.5, 10, seed=0)
    forget_rows = partitioning.rows_of(3)
    retain_rows = np.setdiff1d(np.arange(len(digits.train)), forget_rows)
    settings = LocalTrainingConfig(epochs=15, batch_size=32, lr=0.05, momentum=0.9)
    retrained = trained(Subset(digits.train, retain_rows.tolist()), settings)
    attack = MembershipInference(
        mlp, Subset(digits.train, retain_rows[::2].tolist()), settings, seed=0, num_shadows=2
    ).fit()
    result = attack.attack(retrained, Subset(digits.train, forget_rows.tolist()), digits.test)
    print("retrained:", {key: value for key, value in result.items() if key.startswith("mia")})
    assert result["mia_members"] == len(forget_rows) - np.count_nonzero(digits.train_labels[forget_rows] == 9)
    for key in ("mia_auc", "mia_loss_auc", "mia_shadow_auc"):
        assert abs(result[key] - 0.5) < 0.1, key


def test_same_seed_same_numbers(digits):
    pool = Subset(digits.train, list(range(200, 400)))
    members, settings = Subset(digits.train, list(range(60))), LocalTrainingConfig(5, 32, 0.05, 0.9)
    model = trained(members, settings)
    results = [
        MembershipInference(mlp, pool, settings, seed=7, num_shadows=2).fit().attack(model, members, digits.test)
        for _ in range(2)
    ]
    assert results[0] == results[1]
    other = MembershipInference(mlp, pool, settings, seed=8, num_shadows=2).fit().attack(model, members, digits.test)
    assert other["mia_shadow_auc"] != results[0]["mia_shadow_auc"]
    assert other["mia_loss_auc"] == results[0]["mia_loss_auc"]  # the loss attack has no randomness


def test_without_shadow_pool_only_the_loss_attack_runs(digits):
    model = trained(Subset(digits.train, list(range(60))), LocalTrainingConfig(2, 32, 0.05))
    result = MembershipInference(None, None).fit().attack(model, Subset(digits.train, list(range(60))), digits.test)
    assert result["mia_attack"] == "loss-threshold" and result["mia_auc"] == result["mia_loss_auc"]
    assert np.isnan(result["mia_shadow_auc"])


def test_bad_input_is_named(digits):
    settings = LocalTrainingConfig(1, 32, 0.05)
    model = mlp()
    empty = Subset(digits.train, [])
    loss_only = MembershipInference(None, None)
    with pytest.raises(ValueError, match="members .* is empty"):
        loss_only.attack(model, empty, digits.test)
    with pytest.raises(ValueError, match="non-members is empty"):
        loss_only.attack(model, Subset(digits.train, [0, 1]), Subset(digits.test, []))
    with pytest.raises(ValueError, match="share 1 rows"):
        loss_only.attack(model, Subset(digits.test, [0, 1]), Subset(digits.test, [1, 2, 3]))
    with pytest.raises(ValueError, match="at least 20"):
        MembershipInference(mlp, Subset(digits.train, list(range(5))), settings)
    with pytest.raises(ValueError, match="model_factory"):
        MembershipInference(None, digits.test, settings)
    pool = Subset(digits.test, list(range(100)))
    unfitted = MembershipInference(mlp, pool, settings)
    with pytest.raises(RuntimeError, match="fit"):
        unfitted.attack(model, Subset(digits.train, [0, 1]), Subset(digits.test, list(range(100, 200))))
    with pytest.raises(ValueError, match="shadow_pool shares 50 rows with the non-members"):
        unfitted.fit().attack(model, Subset(digits.train, [0, 1]), Subset(digits.test, list(range(50, 200))))


def test_result_is_json_serialisable_once_nan_is_replaced(digits):
    from fedunlearn.files import json_ready

    result = MembershipInference(None, None).attack(mlp(), Subset(digits.train, [0, 1, 2]), digits.test)
    json.dumps(json_ready(result), allow_nan=False)
