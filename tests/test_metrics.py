"""Functional metrics against hand-computed values, and the evaluator's output contract."""

import json
import math
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import Subset, TensorDataset

from fedunlearn.data import load_dataset
from fedunlearn.files import json_ready
from fedunlearn.metrics import (
    METRIC_KEYS,
    RETRAIN_KEYS,
    MembershipInference,
    UnlearningEvaluator,
    accuracy,
    causal_faithfulness,
    compare_to_retrain,
    evaluate_model,
    kl_divergence,
    logit_mse,
    model_outputs,
    parameter_gap,
    prediction_agreement,
    speedup,
    stopwatch,
)
from fedunlearn.models import build_model
from fedunlearn.training import LocalTrainingConfig, loss_and_accuracy, streamed_accuracy, train_local


pytestmark = pytest.mark.usefixtures("one_thread")


# --- output comparisons ---------------------------------------------------------------------------


def test_accuracy_and_agreement_count_argmax_matches():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0], [0.0, 1.0]])
    reference = torch.tensor([[2.0, 1.0], [3.0, 0.0], [5.0, 0.0], [0.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75
    assert prediction_agreement(logits, reference) == 0.75
    assert prediction_agreement(reference, reference) == 1.0


def test_kl_is_in_nats_from_the_reference_and_not_symmetric():
    p = torch.tensor([[0.9, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    reference_logits, logits = p.log(), q.log()
    expected = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert kl_divergence(reference_logits, logits) == pytest.approx(expected, rel=1e-9)
    reverse = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(logits, reference_logits) == pytest.approx(reverse, rel=1e-9)
    # Softmax ignores a constant shift; so does KL.
    assert kl_divergence(reference_logits + 7.0, reference_logits) == 0.0


def test_kl_is_a_mean_over_examples_and_stable_for_huge_logits():
    reference = torch.tensor([[1000.0, 0.0], [0.0, 0.0]])
    model = torch.tensor([[0.0, 1000.0], [0.0, 0.0]])
    assert kl_divergence(reference, model) == pytest.approx(1000.0 / 2)


def test_logit_mse_averages_over_examples_and_classes():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    reference = torch.tensor([[1.0, 2.0, 5.0], [0.0, 1.0, 0.0]])
    assert logit_mse(logits, reference) == pytest.approx((4.0 + 1.0) / 6)
    with pytest.raises(ValueError, match="one shape"):
        logit_mse(logits, reference[:1])


# --- parameter gap --------------------------------------------------------------------------------


def test_parameter_gap_is_relative_to_the_reference_over_all_parameters():
    reference, model = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        reference.weight.fill_(1.0), reference.bias.fill_(0.0)  # ||theta_r|| = sqrt(6)
        model.weight.fill_(1.0), model.bias.fill_(2.0)  # difference only in the bias: ||.|| = sqrt(8)
    assert parameter_gap(model, reference) == pytest.approx(math.sqrt(8 / 6))
    assert parameter_gap(reference, reference) == 0.0


def test_parameter_gap_leaves_buffers_out_unless_asked():
    reference = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    model.load_state_dict(reference.state_dict())
    model[1].running_mean.fill_(5.0)
    assert parameter_gap(model, reference) == 0.0
    assert parameter_gap(model, reference, include_buffers=True) > 0.0  # num_batches_tracked (int) never counts


def test_parameter_gap_refuses_different_architectures():
    with pytest.raises(ValueError, match="not the same architecture"):
        parameter_gap(nn.Linear(3, 2), nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="shape"):
        parameter_gap(nn.Linear(3, 2), nn.Linear(4, 2))


# --- CF, timing, JSON -----------------------------------------------------------------------------


def test_cf_reconstruction_matches_the_papers_table_1_denominator():
    # Original 71.76 %, retrained 70.79 % (denominator 0.97 points), HF-KCU 71.16 %.
    assert causal_faithfulness(0.7176, 0.7116, 0.7079) == pytest.approx(0.60 / 0.97)
    assert causal_faithfulness(0.7176, 0.7079, 0.7079) == pytest.approx(1.0)  # as retraining
    assert causal_faithfulness(0.7176, 0.7176, 0.7079) == 0.0  # nothing changed
    # Misleading sign (paper App. A.11): unlearning and retraining both *gain* accuracy -> positive.
    assert causal_faithfulness(0.70, 0.72, 0.71) == pytest.approx(2.0)


def test_cf_is_nan_not_inf_when_the_denominator_is_noise():
    assert math.isnan(causal_faithfulness(0.90, 0.85, 0.90))
    assert math.isnan(causal_faithfulness(0.9000, 0.85, 0.8995))
    assert not math.isnan(causal_faithfulness(0.9000, 0.85, 0.8990))
    assert math.isnan(causal_faithfulness(0.9, 0.85, 0.89, min_denominator=0.02))
    with pytest.raises(ValueError, match="fraction"):
        causal_faithfulness(71.76, 71.16, 70.79)  # percentages are a unit mistake


def test_speedup_and_stopwatch():
    assert speedup(100.0, 4.0) == 25.0
    assert math.isnan(speedup(100.0, 0.0))
    with pytest.raises(ValueError):
        speedup(-1.0, 2.0)
    with stopwatch() as timer:
        time.sleep(0.05)
    assert 0.05 <= timer["seconds"] < 5.0  # wall clock of the block, in seconds (not ms, not 0)


def test_json_ready_turns_nan_and_inf_into_null():
    cleaned = json_ready({"cf": math.nan, "speedup": math.inf, "auc": 0.5, "attack": "loss-threshold", "n": 3})
    assert json.loads(json.dumps(cleaned, allow_nan=False)) == {
        "cf": None, "speedup": None, "auc": 0.5, "attack": "loss-threshold", "n": 3
    }


# --- forward passes -------------------------------------------------------------------------------


def test_model_outputs_batches_in_eval_mode_without_grad_and_restores_the_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    data = TensorDataset(torch.randn(50, 4), torch.randint(0, 3, (50,)))
    model.train()
    small, labels = model_outputs(model, data, batch_size=7)
    large, _ = model_outputs(model, data, batch_size=512)
    assert model.training  # put back
    assert torch.allclose(small, large, atol=1e-6)  # dropout was off, batching does not matter
    assert not small.requires_grad and small.shape == (50, 3) and torch.equal(labels, data.tensors[1])
    with pytest.raises(ValueError, match="empty"):
        model_outputs(model, Subset(data, []))


def test_every_reduction_of_the_one_loop_agrees_with_model_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    data = TensorDataset(torch.randn(50, 4), torch.randint(0, 3, (50,)))
    logits, labels = model_outputs(model, data, batch_size=7)
    scores = loss_and_accuracy(model, data, torch.device("cpu"), batch_size=7)
    assert scores["accuracy"] == accuracy(logits, labels)
    assert scores["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, labels)), rel=1e-6)
    assert not model.training  # loss_and_accuracy leaves the model in eval mode
    batches = [(data.tensors[0][i : i + 7], data.tensors[1][i : i + 7]) for i in range(0, 50, 7)]
    assert streamed_accuracy(model, batches) == streamed_accuracy(model, data) == scores["accuracy"]
    predicted = logits.argmax(dim=1)
    assert streamed_accuracy(lambda x: model(x).argmax(dim=1), data) == scores["accuracy"]  # classes, not logits
    assert streamed_accuracy(model, data, target_class=1) == float((predicted == 1).double().mean())
    assert streamed_accuracy(model, []) == 0.0


# --- the evaluator on digits ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_models():
    digits = load_dataset("digits")
    settings = LocalTrainingConfig(epochs=3, batch_size=32, lr=0.05, momentum=0.9)
    rows = np.arange(len(digits.train))
    forget, retain = rows[:100], rows[100:]

    def fit(data, seed):
        torch.manual_seed(seed)
        model = build_model("logreg", digits.input_shape, digits.num_classes)
        train_local(model, data, settings, torch.device("cpu"), seed)
        return model

    original = fit(digits.train, 0)
    retrained = fit(Subset(digits.train, retain.tolist()), 1)
    return digits, original, retrained, Subset(digits.train, forget.tolist()), Subset(digits.train, retain.tolist())


def _by_hand(model, retrained, original, digits, forget, retain):
    """Every retrain metric of ``model`` from plain forward passes (no fedunlearn.metrics code)."""
    def logits_of(net, dataset):
        x = torch.stack([dataset[i][0] for i in range(len(dataset))])
        y = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
        with torch.no_grad():
            return net.eval()(x).double(), y

    expected = {}
    accuracies = {}
    for split, dataset in (("test", digits.test), ("forget", forget), ("retain", retain)):
        z, y = logits_of(model, dataset)
        z_r, _ = logits_of(retrained, dataset)
        log_p, log_q = torch.log_softmax(z_r, dim=1), torch.log_softmax(z, dim=1)
        prefix = "" if split == "test" else f"{split}_"
        accuracies[split] = float((z.argmax(dim=1) == y).double().mean())
        expected[f"{split}_accuracy"] = accuracies[split]
        expected[f"{split}_accuracy_gap"] = accuracies[split] - float((z_r.argmax(dim=1) == y).double().mean())
        expected[f"{prefix}kl_to_retrain"] = float((log_p.exp() * (log_p - log_q)).sum(dim=1).mean())
        expected[f"{prefix}kl_reversed"] = float((log_q.exp() * (log_q - log_p)).sum(dim=1).mean())
        expected[f"{prefix}logit_mse_to_retrain"] = float((z - z_r).pow(2).mean())
        expected[f"{prefix}agreement_with_retrain"] = float((z.argmax(dim=1) == z_r.argmax(dim=1)).double().mean())
    theta = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    theta_r = torch.cat([p.detach().double().flatten() for p in retrained.parameters()])
    expected["param_gap"] = float((theta - theta_r).norm() / theta_r.norm())
    z_o, y = logits_of(original, digits.test)
    original_accuracy = float((z_o.argmax(dim=1) == y).double().mean())
    retrain_accuracy = accuracies["test"] - expected["test_accuracy_gap"]
    expected["cf"] = (original_accuracy - accuracies["test"]) / (original_accuracy - retrain_accuracy)
    return expected


def test_evaluator_scores_each_model_against_the_oracle_as_computed_by_hand(digits_models):
    """Every key of a model that is neither the original nor the oracle, against plain forward passes:
    swapping forget and retain, the KL's direction, the oracle and the original, or CF's terms fails."""
    digits, original, retrained, forget, retain = digits_models
    settings = LocalTrainingConfig(epochs=3, batch_size=32, lr=0.05)
    shadow_pool, nonmembers = Subset(digits.test, list(range(180))), Subset(digits.test, list(range(180, 360)))
    membership = MembershipInference(
        lambda: build_model("logreg", digits.input_shape, digits.num_classes), shadow_pool, settings, num_shadows=1
    )
    evaluator = UnlearningEvaluator(
        original=original,
        retrained=retrained,
        test_set=digits.test,
        forget_set=forget,
        retain_set=retain,
        membership=membership,
        mia_nonmembers=nonmembers,
    )
    assert membership.fitted  # fitted once, by the evaluator
    between = build_model("logreg", digits.input_shape, digits.num_classes)
    between.load_state_dict({name: 0.3 * original.state_dict()[name] + 0.7 * value for name, value in retrained.state_dict().items()})
    for model in (original, between):
        result = evaluator.evaluate(model)
        assert set(METRIC_KEYS) <= set(result)
        json.dumps(result, allow_nan=False)
        expected = _by_hand(model, retrained, original, digits, forget, retain)
        # The checks below can tell the alternatives apart on this model.
        assert expected["forget_accuracy"] != expected["retain_accuracy"]
        assert abs(expected["kl_reversed"] - expected["kl_to_retrain"]) > 1e-3 * expected["kl_to_retrain"]
        checked = [key for key in RETRAIN_KEYS if key in expected and not (model is original and key == "cf")]
        # (CF of the original is 0 by construction: nothing to check.)
        assert {"test_accuracy", "forget_accuracy", "retain_accuracy", "kl_to_retrain", "logit_mse_to_retrain",
                "agreement_with_retrain", "param_gap"} <= set(checked)
        for key in checked:
            assert result[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-9), key
    assert evaluator.evaluate(between)["cf"] not in (0.0, 1.0, None)


def test_compare_to_retrain_and_evaluate_model_agree_with_the_evaluator(digits_models):
    digits, original, retrained, forget, retain = digits_models
    evaluator = UnlearningEvaluator(
        original=original, retrained=retrained, test_set=digits.test, forget_set=forget, retain_set=retain
    )
    direct = compare_to_retrain(
        original,
        retrained,
        evaluator.original_test_accuracy,
        digits.test,
        forget,
        retain,
        "cpu",
    )
    assert json_ready(direct) == {key: value for key, value in evaluator.evaluate(original).items() if key in direct}
    one_off = evaluate_model(
        original, original=original, retrained=retrained, test_set=digits.test, forget_set=forget, retain_set=retain
    )
    assert one_off == evaluator.evaluate(original)
    assert one_off["mia_attack"] == "loss-threshold" and one_off["mia_shadow_auc"] is None


def test_empty_forget_set_is_named(digits_models):
    digits, original, retrained, _, retain = digits_models
    with pytest.raises(ValueError, match="forget_set is empty"):
        UnlearningEvaluator(
            original=original,
            retrained=retrained,
            test_set=digits.test,
            forget_set=Subset(digits.train, []),
            retain_set=retain,
        )


def test_evaluator_keeps_its_own_copy_of_the_oracle(digits_models):
    digits, original, retrained, forget, retain = digits_models
    shared = build_model("logreg", digits.input_shape, digits.num_classes)
    shared.load_state_dict(retrained.state_dict())
    evaluator = UnlearningEvaluator(
        original=original, retrained=shared, test_set=digits.test, forget_set=forget, retain_set=retain
    )
    shared.load_state_dict(original.state_dict())  # the caller reuses one module for the next model
    assert evaluator.evaluate(shared)["param_gap"] == evaluator.evaluate(original)["param_gap"] > 0
