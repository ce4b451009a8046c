"""U-LiRA: shadow federations, per-example Gaussian tests, and the unlearning AUC against retrain.

The known-answer case: logreg on digits, 4 Dirichlet clients, client 0 (532 of 1437 examples)
deleted, 3 FedAvg rounds of 2 local epochs. A second retrain (other shuffling seeds) must look like
the retrain (ulira_auc near 0.5); the original model, which trained on client 0, must not.
"""

import math
import random

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve
from torch.utils.data import TensorDataset

import fedunlearn.metrics.lira as lira
from fake_grid import fedavg_by_hand, grid_port
from fedunlearn import config as run_config
from fedunlearn.errors import ConfigError
from fedunlearn.federation import build_federation
from fedunlearn.metrics import ULIRA_KEYS, LiraShadows, tpr_at_fpr
from fedunlearn.metrics.lira import (
    federated_averaging,
    fit_gaussians,
    offline_scores,
    online_scores,
    paired_memberships,
    shadow_key,
)
from fedunlearn.training import derive_seed

ROUNDS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(**overrides):
    return run_config.resolve({"model": "logreg", "num-clients": 4, "num-rounds": ROUNDS, "local-epochs": 2,
                               "mia-shadows": 0, "retrain-cache": False, **overrides})


@pytest.fixture(scope="module")
def federation():
    return build_federation(small_config())


def as_model(federation, state):
    model = federation.new_model()
    model.load_state_dict(state)
    return model


# --- the statistics, on numbers we know -----------------------------------------------------------


def test_tpr_at_fpr_on_a_hand_example():
    negatives = np.arange(100) / 100  # 0.00 .. 0.99
    positives = np.array([1.5, 0.985, 0.975, 0.2])
    # 1 % of 100 negatives: one may score above the threshold, so it sits just above 0.98 (the 2nd highest).
    assert tpr_at_fpr(positives, negatives, 0.01) == 0.5
    assert tpr_at_fpr(positives, negatives, 0.02) == 0.75  # above 0.97
    assert tpr_at_fpr(positives, negatives, 0.001) is None  # 0.1 % of 100 negatives: not one false positive allowed
    assert tpr_at_fpr(positives, np.arange(1000) / 1000, 0.001) == 0.25  # 1 of 1000 allowed: above 0.998
    assert tpr_at_fpr(positives, negatives, 1.0) == 1.0
    # A positive tied with the cut is not above it (counting it would also let the tied negative in: 2 %).
    assert tpr_at_fpr(np.array([0.98, 0.99]), negatives, 0.01) == 0.5


def test_tpr_at_fpr_agrees_with_the_roc_curve():
    rng = np.random.default_rng(3)
    positives, negatives = rng.normal(1, 1, 300), rng.normal(0, 1, 700)
    truth = np.r_[np.ones(300), np.zeros(700)]
    fpr, tpr, _ = roc_curve(truth, np.r_[positives, negatives])
    for level in (0.01, 0.05, 0.2):
        assert tpr_at_fpr(positives, negatives, level) == pytest.approx(tpr[fpr <= level].max())


def test_gaussian_fit_by_hand_and_the_sign_of_the_online_score():
    # 4 shadows x 2 targets; target 0 is IN shadows 0 and 2, target 1 IN shadows 1 and 3.
    phi = np.array([[4.0, 0.0], [1.0, 3.0], [6.0, 1.0], [-1.0, 5.0]])
    inside = np.array([[True, False], [False, True], [True, False], [False, True]])
    fit = fit_gaussians(phi, inside)
    assert fit.variance == "pooled"
    np.testing.assert_allclose(fit.mu_in, [5.0, 4.0])
    np.testing.assert_allclose(fit.mu_out, [0.0, 0.5])
    # Pooled within-target variance: IN (1 + 1 + 1 + 1) / 2 = 2; OUT (1 + 1 + 0.25 + 0.25) / 2 = 1.25.
    np.testing.assert_allclose(fit.sd_in, [math.sqrt(2.0)] * 2)
    np.testing.assert_allclose(fit.sd_out, [math.sqrt(1.25)] * 2)
    per_example = fit_gaussians(phi, inside, variance="per-example")
    np.testing.assert_allclose(per_example.sd_out, [math.sqrt(2.0), math.sqrt(0.5)])
    # Online: the log-density ratio, written out.
    observed = np.array([4.5, 1.0])
    expected = [
        (-(x - mi) ** 2 / (2 * si**2) - math.log(si)) - (-(x - mo) ** 2 / (2 * so**2) - math.log(so))
        for x, mi, si, mo, so in zip(observed, fit.mu_in, fit.sd_in, fit.mu_out, fit.sd_out)
    ]
    np.testing.assert_allclose(online_scores(observed, fit), expected)
    # A model that looks like the IN shadows scores higher than one that looks like the OUT shadows.
    assert (online_scores(fit.mu_in, fit) > online_scores(fit.mu_out, fit)).all()
    # Offline: -log Pr[Z >= phi] under the OUT Gaussian, increasing in phi.
    z = (observed - fit.mu_out) / fit.sd_out
    survival = np.array([0.5 * math.erfc(v / math.sqrt(2)) for v in z])  # Pr[Z >= phi]
    np.testing.assert_allclose(offline_scores(observed, fit), -np.log(survival))
    assert offline_scores(np.array([40.0, 40.0]), fit)[0] > offline_scores(np.array([30.0, 30.0]), fit)[0] > 0


def test_identical_shadows_do_not_divide_by_zero():
    phi = np.ones((4, 3))
    fit = fit_gaussians(phi, np.array([[1, 1, 0], [0, 0, 0], [1, 1, 0], [0, 0, 0]], bool))
    assert np.isfinite(online_scores(np.full(3, 1.0), fit)[:2]).all()
    assert np.isfinite(offline_scores(np.full(3, 2.0), fit)).all()


def test_paired_design_puts_every_client_in_and_out():
    memberships = paired_memberships(num_clients=4, num_shadows=8, seed=0)
    assert memberships.shape == (8, 4)
    np.testing.assert_array_equal(memberships[1::2], ~memberships[0::2])  # shadow 2j+1 = the others
    assert (memberships.sum(axis=0) == 4).all()  # every client IN exactly half the shadows
    assert (0 < memberships.sum(axis=1)).all() and (memberships.sum(axis=1) < 4).all()  # no empty federation
    # Shadow s does not depend on how many there are (the cache is reused when adding shadows);
    # an odd count leaves the last one unpaired.
    np.testing.assert_array_equal(paired_memberships(4, 5, 0), memberships[:5])
    assert not np.array_equal(paired_memberships(4, 8, 1), memberships)  # the seed matters
    two = paired_memberships(2, 4, 0)
    assert sorted(map(tuple, two[:2])) == [(False, True), (True, False)]


def test_shadow_federation_is_the_runs_fedavg(tmp_path):
    """With the run's seeds the in-process FedAvg gives what the real strategy and ClientApp give,
    client sampling (fraction-train) included."""
    config = small_config(**{"fraction-train": 0.5, "local-epochs": 1, "out-dir": str(tmp_path)})
    _, port, federation = grid_port(config)
    start = port.initial_state
    flower = port.train([0, 1, 2, 3], start, 2, seed=11).state
    ours = federated_averaging(
        federation, [0, 1, 2, 3], start, 2, "cpu",
        train_seed=lambda r, k: derive_seed(config["seed"], "train", r, k),
        sampler=random.Random(11), fraction=0.5,
    )
    for name in flower:
        torch.testing.assert_close(ours[name], flower[name], rtol=1e-5, atol=1e-6)
    # Every client, example-weighted: FedAvg written out.
    by_hand = fedavg_by_hand(federation, config, start, [0, 2, 3], 2)
    ours = federated_averaging(federation, [3, 0, 2], start, 2, "cpu",
                               train_seed=lambda r, k: derive_seed(config["seed"], "train", r, k))
    for name in by_hand:
        torch.testing.assert_close(ours[name], by_hand[name], rtol=1e-5, atol=1e-6)


# --- U-LiRA on a case with a known answer ---------------------------------------------------------


@pytest.fixture(scope="module")
def known_case(federation, tmp_path_factory):
    config = small_config()
    start = federation.initial_model().state_dict()
    original = fedavg_by_hand(federation, config, start, [0, 1, 2, 3], ROUNDS)
    retrained = fedavg_by_hand(federation, config, start, [1, 2, 3], ROUNDS)
    # A second retrain: the same FedAvg without client 0, other shuffling seeds.
    second = fedavg_by_hand(federation, small_config(seed=1), start, [1, 2, 3], ROUNDS)
    messages = []
    cache = tmp_path_factory.mktemp("lira")
    shadows = LiraShadows.fit(federation, config, [0], 8, "cpu", cache, progress=messages.append)
    return shadows, {name: as_model(federation, state) for name, state in
                     (("original", original), ("retrain", retrained), ("second", second))}, messages


def test_ulira_tells_the_original_from_retrain_but_not_a_second_retrain(known_case):
    shadows, models, _ = known_case
    retrain = models["retrain"]
    results = {name: shadows.attack(model, retrain) for name, model in models.items()}
    print({name: {k: v for k, v in r.items() if "auc" in k or "tpr" in k} for name, r in results.items()})
    # Measured: retrain 0.5 exactly, second retrain 0.52, original 0.95.
    assert results["retrain"]["ulira_auc"] == 0.5  # the same model: every score tied
    assert abs(results["second"]["ulira_auc"] - 0.5) < 0.1
    assert results["original"]["ulira_auc"] - results["second"]["ulira_auc"] > 0.25
    assert results["original"]["ulira_tpr_at_1pct_fpr"] > results["second"]["ulira_tpr_at_1pct_fpr"] + 0.1
    for result in results.values():
        assert tuple(result) == ULIRA_KEYS
        assert result["ulira_variant"] == "online" and result["lira_variant"] == "offline"
        assert result["ulira_examples"] == 532 and result["lira_nonmembers"] == 360
        assert result["ulira_tpr_at_0.1pct_fpr"] is None  # 532 negatives < 1000
        assert result["lira_tpr_at_1pct_fpr"] is not None and result["lira_tpr_at_0.1pct_fpr"] is None
    # The population form ranks the original's forget examples above its test examples more than retrain's.
    assert results["original"]["lira_auc"] > results["retrain"]["lira_auc"] + 0.1


def test_every_forget_example_has_in_and_out_shadows_and_progress_is_shown(known_case):
    shadows, _, messages = known_case
    assert shadows.summary["forget_in_shadows"] == 4 and shadows.summary["forget_out_shadows"] == 4
    assert (shadows.forget_inside.sum(axis=0) == 4).all()
    assert messages[0] == "U-LiRA shadow 1/8: round 1/3" and messages[-1] == "U-LiRA shadow 8/8: round 3/3"
    assert len(messages) == 8 * ROUNDS


def test_offline_variant_on_request_and_when_a_side_has_fewer_than_two_shadows(known_case):
    shadows, models, _ = known_case
    offline = shadows.attack(models["original"], models["retrain"], variant="offline")
    assert offline["ulira_variant"] == "offline" and offline["ulira_auc"] > 0.75

    def with_memberships(rows):
        memberships = np.array(rows, dtype=bool)
        count = len(memberships)
        return LiraShadows(
            forget_set=shadows.forget_set, test_set=shadows.test_set, forget_client_of=shadows.forget_client_of,
            memberships=memberships, forget_phi=shadows.forget_phi[:count], test_phi=shadows.test_phi[:count],
            shadows=shadows.shadows[:count], rounds=ROUNDS,
        )

    # Client 0 IN one shadow, OUT of two: the offline test.
    one_in = with_memberships([[1, 0, 1, 0], [0, 1, 0, 1], [0, 1, 1, 0]])
    assert one_in.variant() == "offline"
    assert one_in.attack(models["original"], models["retrain"])["ulira_variant"] == "offline"
    with pytest.raises(ValueError, match="online test needs >= 2 IN and >= 2 OUT"):
        one_in.attack(models["original"], models["retrain"], variant="online")
    # OUT of one shadow only: no test at all.
    with pytest.raises(ValueError, match=">= 2 OUT shadows"):
        with_memberships([[1, 0, 1, 0], [1, 1, 0, 1], [0, 1, 1, 0]]).variant()
    assert with_memberships([[1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 1, 0], [0, 0, 1, 1]]).variant() == "online"


def test_a_diverged_model_is_refused(known_case, federation):
    shadows, models, _ = known_case
    broken = federation.new_model()
    with torch.no_grad():
        broken.linear.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN or infinity"):
        shadows.attack(broken, models["retrain"])


# --- the cache ------------------------------------------------------------------------------------


def test_cache_is_reused_and_changes_with_what_determines_a_shadow(tmp_path, monkeypatch):
    calls = []
    real_train_local = lira.train_local

    def counting(*args, **kwargs):
        calls.append(1)
        return real_train_local(*args, **kwargs)

    monkeypatch.setattr(lira, "train_local", counting)
    config = small_config(**{"num-rounds": 2})
    federation = build_federation(config)
    first = LiraShadows.fit(federation, config, [0], 4, "cpu", tmp_path)
    trained = len(calls)
    # Two complementary pairs: each pair trains every client once per round.
    assert trained == 2 * 2 * 4 and first.summary["from_cache"] == 0
    assert len(list(tmp_path.glob("*.pt"))) == 4 and len(list(tmp_path.glob("*.json"))) == 4
    messages = []
    again = LiraShadows.fit(federation, config, [0], 4, "cpu", tmp_path, progress=messages.append)
    assert len(calls) == trained and again.summary["from_cache"] == 4  # nothing trained
    assert messages == [f"U-LiRA shadow {s}/4: from the cache" for s in range(1, 5)]
    np.testing.assert_array_equal(again.forget_phi, first.forget_phi)
    assert again.summary["seconds"] == first.summary["seconds"]  # the cache keeps the training seconds
    # Shadows do not depend on the deletion: another forget client reuses them.
    LiraShadows.fit(federation, config, [2], 4, "cpu", tmp_path)
    assert len(calls) == trained
    # Two more shadows (a third pair): only those two train.
    LiraShadows.fit(federation, config, [0], 6, "cpu", tmp_path)
    assert len(calls) == trained + 2 * 4 and len(list(tmp_path.glob("*.pt"))) == 6
    # A training key changes every shadow.
    before = len(calls)
    other = {**config, "lr": 0.02}
    LiraShadows.fit(build_federation(other), other, [0], 4, "cpu", tmp_path)
    assert len(calls) > before and len(list(tmp_path.glob("*.pt"))) == 10
    # No cache folder: nothing written, everything trained.
    before = len(calls)
    LiraShadows.fit(federation, config, [0], 4, "cpu", None)
    assert len(calls) > before and len(list(tmp_path.glob("*.pt"))) == 10


def test_shadow_key_depends_on_what_determines_the_shadow(federation):
    config = small_config()

    def key(rounds=3, index=0, clients=(0, 2), **overrides):
        changed = dict(config, **overrides)
        return shadow_key(build_federation(changed) if overrides else federation, changed, rounds, index, clients)

    reference = key()
    assert reference == key(clients=(2, 0))
    assert reference == key(**{"out-dir": "elsewhere", "unlearn-methods": "kfac", "mia-shadows": 7})
    for other in (
        key(rounds=4),
        key(index=1),
        key(clients=(0, 3)),
        key(seed=1),
        key(model="simple-cnn"),
        key(**{"local-epochs": 3}),
        key(**{"dirichlet-alpha": 0.3}),
        key(**{"lr-decay": 0.9}),  # the lr of rounds 2 and 3
        key(**{"forget-share": 0.3, "forget-clients": "1"}),  # another partition
    ):
        assert other != reference


# --- bad input ------------------------------------------------------------------------------------


def test_bad_input_is_named(federation):
    config = small_config()
    for bad in (2, 3, -1):
        with pytest.raises(ConfigError, match="'lira-shadows'.*valid: 0 \\(off\\) or an integer >= 4"):
            LiraShadows.fit(federation, config, [0], bad, "cpu", None)
    with pytest.raises(ConfigError, match="'forget-clients': 7.*0..3"):
        LiraShadows.fit(federation, config, [7], 4, "cpu", None)
    with pytest.raises(ValueError, match="forget_clients is empty"):
        LiraShadows.fit(federation, config, [], 4, "cpu", None)
    with pytest.raises(ValueError, match="disagree on lr"):
        LiraShadows.fit(federation, dict(config, lr=0.5), [0], 4, "cpu", None)
    fake = TensorDataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))
    shadows = LiraShadows(forget_set=fake, test_set=fake, forget_client_of=np.zeros(2, int),
                          memberships=paired_memberships(2, 4, 0), forget_phi=np.zeros((4, 2)),
                          test_phi=np.zeros((4, 2)), shadows=[], rounds=1)
    with pytest.raises(ValueError, match="variant must be one of auto, online, offline"):
        shadows.variant("best")
    with pytest.raises(ValueError, match="shadows x targets"):
        fit_gaussians(np.zeros((4, 2)), np.zeros((4, 3), bool))
