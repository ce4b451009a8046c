"""Membership inference: detects data an overfit model saw, is at chance on data no model saw, and
fits nothing (threshold, attack model, choice of headline attack) on the data it is evaluated on.

Small MLPs on digits keep every test at a few seconds; the attack code is architecture-agnostic.
"""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import Subset

from fedunlearn.data import load_dataset, partition_labels
from fedunlearn.metrics import (
    MembershipInference,
    balanced_accuracy,
    class_matching_weights,
    fit_threshold,
    logit_scaled_confidence,
    membership_auc,
)
from fedunlearn.metrics.membership import attack_features, per_example_loss
from fedunlearn.training import LocalTrainingConfig, train_local

OVERFIT = LocalTrainingConfig(epochs=100, batch_size=32, lr=0.05, momentum=0.9)


pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_auc_and_balanced_accuracy_on_known_scores():
    assert membership_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert membership_auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert membership_auc(np.zeros(5), np.zeros(7)) == 0.5
    # One overlap: members {2, 4}, non-members {1, 3}; 3 of 4 pairs ranked right.
    assert membership_auc(np.array([2.0, 4.0]), np.array([1.0, 3.0])) == pytest.approx(0.75)
    # "member iff score >= t": at t = 3, TPR = 1/2 (4), TNR = 2/2 -> 0.75; at t = 5 nobody is a member -> 0.5.
    assert balanced_accuracy(np.array([2.0, 4.0]), np.array([1.0, 3.0]), 3.0) == 0.5 * (0.5 + 0.5)
    assert balanced_accuracy(np.array([2.0, 4.0]), np.array([1.0, 3.0]), 3.5) == 0.75
    assert balanced_accuracy(np.array([2.0, 4.0]), np.array([1.0, 3.0]), 5.0) == 0.5
    # Weights: the member scoring 2 counts three times, so TPR at 3.5 is 1/4.
    assert balanced_accuracy(np.array([2.0, 4.0]), np.array([1.0, 3.0]), 3.5, np.array([3.0, 1.0])) == (0.25 + 1.0) / 2


def test_fit_threshold_is_the_best_balanced_accuracy_on_its_own_scores():
    assert fit_threshold(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 2.5  # the midpoint of the gap
    rng = np.random.default_rng(0)
    members, nonmembers = rng.normal(0.5, 1, 40), rng.normal(0, 1, 90)
    best = max(
        ((members >= t).mean() + (nonmembers < t).mean()) / 2
        for t in np.concatenate([members, nonmembers, [np.inf]])
    )
    assert balanced_accuracy(members, nonmembers, fit_threshold(members, nonmembers)) == pytest.approx(best)


def test_set_sizes_do_not_change_auc_or_balanced_accuracy():
    rng = np.random.default_rng(1)
    members, nonmembers = rng.normal(1, 1, 30), rng.normal(0, 1, 50)
    assert membership_auc(members, nonmembers) == pytest.approx(membership_auc(members, np.tile(nonmembers, 7)))
    tiled = np.tile(nonmembers, 7)
    assert balanced_accuracy(members, nonmembers, 0.4) == pytest.approx(balanced_accuracy(members, tiled, 0.4))


def test_class_matching_removes_a_label_skew_that_is_not_membership():
    # Class 0 is "easy" (high score) for members and non-members alike; members are mostly class 0.
    member_labels = np.array([0] * 30 + [1] * 10)
    nonmember_labels = np.array([0] * 50 + [1] * 50 + [2] * 20)
    score_of_class = np.array([2.0, 0.0, -1.0])
    members, nonmembers = score_of_class[member_labels], score_of_class[nonmember_labels]
    assert membership_auc(members, nonmembers) > 0.65  # the skew alone looks like membership
    weights = class_matching_weights(member_labels, nonmember_labels)
    assert membership_auc(members, nonmembers, *weights) == pytest.approx(0.5)
    assert balanced_accuracy(members, nonmembers, 1.0, *weights) == pytest.approx(0.5)  # class 0 "member", class 1 not
    # Class 2 has no member to compare with; classes only members have get weight 0.
    assert np.all(weights[1][nonmember_labels == 2] == 0)
    assert np.all(class_matching_weights(np.array([0, 3]), np.array([0, 1]))[0] == [1, 0])
    with pytest.raises(ValueError, match="share no class"):
        class_matching_weights(np.array([0, 0]), np.array([1, 2]))


def test_attack_features_are_finite_for_extreme_logits():
    logits = torch.tensor([[1000.0, -1000.0, 0.0], [0.0, 0.0, 0.0]])
    features = attack_features(logits, torch.tensor([1, 2]))
    assert features.shape == (2, 3 + 4) and np.all(np.isfinite(features))


def test_logit_scaled_confidence_is_log_odds_of_the_label_and_stable():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0], [40.0, 0.0, 0.0], [-30.0, 0.0, 5.0]])
    labels = torch.tensor([0, 2, 0, 0])
    p = torch.softmax(logits.double(), dim=1).gather(1, labels[:, None]).squeeze(1).numpy()
    with np.errstate(divide="ignore"):
        direct = np.log(p) - np.log1p(-p)
    phi = logit_scaled_confidence(logits, labels)
    np.testing.assert_allclose(phi[[0, 1, 3]], direct[[0, 1, 3]], rtol=1e-9)
    assert phi[1] == pytest.approx(np.log(1 / 3) - np.log(2 / 3))
    # p_y rounds to 1 in float64 here (direct gives inf); the log-odds is 40 - log 2.
    assert not np.isfinite(direct[2]) and phi[2] == pytest.approx(40.0 - np.log(2.0))


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
    # Success at the thresholds fit on the shadows (measured 0.74 / 0.73).
    assert result["mia_loss_success"] > 0.6 and result["mia_shadow_success"] > 0.6
    assert attack.summary["shadow_in_accuracy"] > attack.summary["shadow_out_accuracy"]


def test_data_the_model_never_saw_is_at_chance(digits, overfit_setting):
    model, attack, _, unseen = overfit_setting
    result = attack.attack(model, unseen, digits.test)
    print("unseen:", {key: value for key, value in result.items() if key.startswith("mia")})
    for key in ("mia_auc", "mia_loss_auc", "mia_shadow_auc", "mia_success", "mia_loss_success"):
        assert abs(result[key] - 0.5) < 0.1, key


def ten_class_logits(losses, label=0):
    """Logits of 10 classes whose cross-entropy for ``label`` is exactly ``losses`` (nats)."""
    p = np.exp(-np.asarray(losses, float))
    logits = torch.zeros(len(p), 10, dtype=torch.float64)
    logits[:, label] = torch.from_numpy(np.log(9 * p / (1 - p)))
    return logits, torch.full((len(p),), label, dtype=torch.long)


def test_thresholds_are_fit_on_the_shadows_not_on_the_evaluated_data(overfit_setting):
    _, attack, _, _ = overfit_setting
    # What fit() derived from the shadows' own in/out examples (the pool halves, 4 shadows).
    shadow_in, shadow_out = attack.shadow_scores["loss"]
    assert len(shadow_in) + len(shadow_out) == 4 * len(attack.shadow_pool)
    assert attack.loss_threshold == fit_threshold(shadow_in, shadow_out)
    assert attack.shadow_threshold == fit_threshold(*attack.shadow_scores["shadow"])
    # Evaluated data built around the shadows' threshold (member iff loss <= t, in nats):
    # members at t/4, t/2, 2t, 3t and non-members at 4t..7t. The best threshold on these data lies
    # between 3t and 4t (balanced accuracy 1); the shadows' threshold gets TPR 1/2, TNR 1.
    t = -attack.loss_threshold
    assert t > 0
    member_logits, member_labels = ten_class_logits([t / 4, t / 2, 2 * t, 3 * t])
    nonmember_logits, nonmember_labels = ten_class_logits([4 * t, 5 * t, 6 * t, 7 * t])
    np.testing.assert_allclose(per_example_loss(member_logits, member_labels), [t / 4, t / 2, 2 * t, 3 * t])
    result = attack.attack_outputs(member_logits.float(), member_labels, nonmember_logits.float(), nonmember_labels)
    assert result["mia_loss_auc"] == 1.0
    assert result["mia_loss_success"] == 0.75


def test_headline_is_the_shadow_attack_even_when_the_loss_attack_is_stronger(overfit_setting):
    _, fitted, _, _ = overfit_setting
    attack = copy.copy(fitted)

    class InvertedLoss:  # an attack model that ranks members last: "member" = high loss
        def decision_function(self, features):
            return features[:, 10 + 2]  # the loss column of attack_features (10 classes)

    attack.attack_model = InvertedLoss()
    member_logits, member_labels = ten_class_logits([0.01, 0.02, 0.03])
    nonmember_logits, nonmember_labels = ten_class_logits([1.0, 2.0, 3.0])
    result = attack.attack_outputs(member_logits.float(), member_labels, nonmember_logits.float(), nonmember_labels)
    assert result["mia_loss_auc"] == 1.0 and result["mia_shadow_auc"] == 0.0
    assert result["mia_attack"] == "shadow-model"
    assert result["mia_auc"] == result["mia_shadow_auc"] and result["mia_success"] == result["mia_shadow_success"]


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
    # No shadows, nothing to fit a threshold on: no success rate (never one fit on the evaluated data).
    assert np.isnan(result["mia_success"]) and np.isnan(result["mia_loss_success"])


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
